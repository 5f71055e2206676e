"""rlhf-engine kernels: the hot paths of RLHF, each with a plain-PyTorch reference and one dispatch point.

Never imports `engine`. Ops take tensors and scalars only.
"""
from .advantages import ESTIMATORS, estimate_advantages, needs_critic
from .losses import OFF_POLICY, aggregate, kl_loss, off_policy_weights, policy_loss, ranking_loss, value_loss
from .preference import PREFERENCE_LOSSES, preference_loss, sequence_logps
from .ops import gae, group_advantages, kl_penalty, linear_token_logprobs, shape_rewards, token_logprobs
from .stats import masked_mean, masked_sum, masked_var, whiten

__all__ = [
    "token_logprobs", "linear_token_logprobs", "kl_penalty", "shape_rewards", "gae", "group_advantages",
    "masked_mean", "masked_sum", "masked_var", "whiten",
    "policy_loss", "value_loss", "ranking_loss", "kl_loss", "aggregate", "off_policy_weights", "OFF_POLICY",
    "preference_loss", "sequence_logps", "PREFERENCE_LOSSES",
    "estimate_advantages", "needs_critic", "ESTIMATORS",
]
