"""The Triton kernels. Importing this package registers each with the dispatcher (done lazily by
kernels.dispatch on first use of backend "triton" or "auto" on a GPU)."""
from . import gae, groups, linear_logprobs, rewards, token_logprobs  # noqa: F401
