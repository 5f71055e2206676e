"""Over-optimisation of a learned reward: gold against proxy as the policy moves away (Gao et al. 2022's
scaling laws, best-of-n as the baseline that needs no training) and reward-model ensembles that hold it back
(Coste et al. 2023).

Its layer is low (just above the config): plain math on numbers and tensors that imports nothing of the
engine, so the trainers (the ensemble's reward) and the report (the curves) can both use it.
"""
