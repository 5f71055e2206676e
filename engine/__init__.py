"""rlhf-engine: InstructGPT's RLHF (SFT, reward model, PPO, PPO-ptx) end to end.

The packages, each importing only those below it (tests/engine/test_layering.py, test_imports.py):
    cli, commands, context, stages, reproduce, reward_fn   the top: one CLI, its commands, a run's set-up
    label, plan, task                                      the labeling app, the memory planner, the built-in task
    trainers                                               SFT, RM, DPO, PPO and the critic-free estimators
    rollout                                                generation backends (transformers, vLLM, async)
    rundir                                                 checkpoints, final models, metrics, locks, export
    models                                                 loading, forward passes, sharded loading, LoRA
    data                                                   users' data files and their encoding
    parallel                                               the process group, FSDP2, collectives
    config, seeds                                          typed configuration, seed derivation
and `kernels` (a separate package) below them all.
"""
__version__ = "0.1.0"
