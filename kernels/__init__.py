"""rlhf-engine kernels: the hot paths of RLHF, each with a plain-PyTorch reference and one dispatch point.

Never imports `engine`. Ops take tensors and scalars only.
"""
from .losses import policy_loss, ranking_loss, value_loss
from .ops import gae, kl_penalty, linear_token_logprobs, shape_rewards, token_logprobs
from .stats import masked_mean, masked_sum, masked_var, whiten

__all__ = [
    "token_logprobs", "linear_token_logprobs", "kl_penalty", "shape_rewards", "gae",
    "masked_mean", "masked_sum", "masked_var", "whiten",
    "policy_loss", "value_loss", "ranking_loss",
]
