"""The compiled twins (csrc/): C++ on the CPU, CUDA C++ on GPUs, as torch ops `torch.ops.rlhf_engine.*`.

They come from `kernels._C`, built by setup.py when torch is importable at build time (CUDA sources too
when torch is a CUDA build and nvcc is found). With RLHF_ENGINE_JIT=1 a missing extension is built just in
time instead (torch.utils.cpp_extension.load, cached under ~/.cache/torch_extensions). Importing this
module registers the "cpu" and, when compiled in, the "cuda" backends with the dispatcher; if the
extension is absent the import fails and the dispatcher falls back to Triton or PyTorch.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .dispatch import register
from .reference import compute_dtype, into, rows_view

_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _load() -> None:
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
        return
    except ImportError:
        if os.environ.get("RLHF_ENGINE_JIT") != "1":
            raise
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = [CSRC / name for name in ("ops.cpp", "gae_cpu.cpp", "rewards_cpu.cpp", "token_logprobs_cpu.cpp",
                                        "groups_cpu.cpp")]
    if torch.version.cuda and CUDA_HOME:
        sources += [CSRC / "gae.cu", CSRC / "rewards.cu"]
    load(name="rlhf_engine_C", sources=[str(s) for s in sources], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
         extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False)


_load()


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_engine::{op}", key)


def gae(rewards, values, mask, gamma: float, lam: float):
    dtype = compute_dtype(rewards)
    return torch.ops.rlhf_engine.gae(rewards.to(dtype), values.to(dtype), mask, float(gamma), float(lam))


def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1", out=None):
    if out is not None and logprobs.device.type == "cpu":
        torch.ops.rlhf_engine.shape_rewards_out(scores, logprobs, ref_logprobs, mask, float(kl_coef),
                                                _ESTIMATORS[estimator], out[0], out[1])
        return tuple(out)
    return into(out, torch.ops.rlhf_engine.shape_rewards(scores, logprobs, ref_logprobs, mask, float(kl_coef),
                                                         _ESTIMATORS[estimator]))


class _CPUTokenLogprobs(torch.autograd.Function):
    """csrc/token_logprobs_cpu.cpp: forward and backward in one pass over the logits each (rows in parallel,
    sums in double); the gradient is written in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy):
        x = rows_view(logits)
        flat_tok = tokens.reshape(-1).long().contiguous()
        logp, lse, ent = torch.ops.rlhf_engine.token_logprobs_fwd(x, flat_tok, 1.0 / temperature, return_entropy)
        ctx.save_for_backward(x, flat_tok, lse, ent if return_entropy else lse)
        ctx.temperature, ctx.return_entropy, ctx.shape = temperature, return_entropy, logits.shape
        shape = tokens.shape
        return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        x, flat_tok, lse, ent = ctx.saved_tensors
        g_lp = grad_logp.reshape(-1) if grad_logp is not None else None
        g_h = grad_ent.reshape(-1) if (ctx.return_entropy and grad_ent is not None) else None
        grad = torch.ops.rlhf_engine.token_logprobs_bwd(x, flat_tok, lse, ent, g_lp, g_h, 1.0 / ctx.temperature)
        return grad.view(ctx.shape), None, None, None


def token_logprobs(logits, tokens, temperature: float = 1.0, return_entropy: bool = False):
    return _CPUTokenLogprobs.apply(logits, tokens, float(temperature), bool(return_entropy))


for _op, _fn in (("gae", gae), ("shape_rewards", shape_rewards)):
    if has_kernel(_op, "CPU"):
        register(_op, "cpu")(_fn)
    if has_kernel(_op, "CUDA"):
        register(_op, "cuda")(_fn)


if has_kernel("token_logprobs_fwd", "CPU"):
    register("token_logprobs", "cpu")(token_logprobs)

_GROUP_MODES = {"grpo": 0, "drgrpo": 1, "rloo": 2}


def group_advantages(scores, n: int, mode: str, eps: float = 1e-6):
    return torch.ops.rlhf_engine.group_advantages(scores, int(n), _GROUP_MODES[mode], float(eps))


if has_kernel("group_advantages", "CPU"):
    register("group_advantages", "cpu")(group_advantages)


@torch.library.register_fake("rlhf_engine::gae")
def _gae_fake(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.register_fake("rlhf_engine::shape_rewards")
def _shape_rewards_fake(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    out = torch.empty(logprobs.shape, dtype=compute_dtype(logprobs), device=logprobs.device)
    return out, torch.empty_like(out)


@torch.library.register_fake("rlhf_engine::shape_rewards_out")
def _shape_rewards_out_fake(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, rewards, kl):
    return None


@torch.library.register_fake("rlhf_engine::token_logprobs_fwd")
def _token_logprobs_fwd_fake(logits, tokens, inv_t, entropy):
    n = logits.shape[0] * logits.shape[1]
    out = torch.empty(n, dtype=compute_dtype(logits), device=logits.device)
    return out, torch.empty_like(out), torch.empty(n if entropy else 0, dtype=out.dtype, device=out.device)


@torch.library.register_fake("rlhf_engine::token_logprobs_bwd")
def _token_logprobs_bwd_fake(logits, tokens, lse, ent, grad_logp, grad_ent, inv_t):
    return torch.empty(logits.shape[0] * logits.shape[1], logits.shape[2], dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("rlhf_engine::group_advantages")
def _group_advantages_fake(scores, n, mode, eps):
    return torch.empty(scores.shape, dtype=compute_dtype(scores), device=scores.device)
