"""rlhf-engine: InstructGPT's RLHF (SFT, reward model, PPO, PPO-ptx) end to end."""
__version__ = "0.1.0"
