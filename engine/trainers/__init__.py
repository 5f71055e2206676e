"""The trainers: SFT/pretraining (`lm`), the reward model (`reward`), PPO (`ppo`), and the step loop they share."""
