"""The trainers: SFT/pretraining (`lm`), the reward model (`reward`), DPO (`dpo`), PPO and the critic-free
estimators (`ppo`, its phases in `ppo_setup`, `ppo_rollouts`, `experience`, `ppo_update`, `ppo_metrics`; the
asynchronous engine in `async_ppo`), and what they share (the step loop `loop`, `state`, `optim`, `phases`,
`passes`, `kl_control`).

They orchestrate; the RL math is the kernels' pure functions. Above models, the run directory and the
rollout engines, which they drive; below the stages, which build them from the config. They never import
the built-in task: a user's checkpoint runs the same code."""
