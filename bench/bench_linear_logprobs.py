"""Fused LM-head log-probs (kernels.linear_token_logprobs) vs F.linear + log_softmax + gather, forward +
backward: time, achieved FLOP rate against the measured matmul rate, peak extra memory; Liger-Kernel's
fused linear cross-entropy where it installs (GPU)."""
from __future__ import annotations

import torch

import kernels
from kernels import dispatch
from kernels.linear_logprobs_ref import naive_linear_token_logprobs

from .harness import Case, time_fn


def matmul_tflops(device: str, dtype: torch.dtype, n: int = 4096) -> float:
    """The machine's measured dense matmul rate for `dtype` (the ceiling for this op's 6*N*H*V FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    med, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n ** 3 / (med * 1e-3) / 1e12


def _liger(device):
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - optional peer
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, t: -loss(w, h, t)


def cases(device: str, n: int, h: int, v: int, dtype: torch.dtype) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h ** 0.5).requires_grad_(True)
    tokens = torch.randint(0, v, (n,), device=device, generator=g)
    peak = matmul_tflops(device, dtype)

    def fwd_bwd(f):
        def go():  # starts and ends with no .grad held, returns the gradients (counted in peak memory)
            f(hidden, weight, tokens).sum().backward()
            grads = (hidden.grad, weight.grad)
            hidden.grad = weight.grad = None
            return grads
        return go
    impls = {f"ours fused ({b})": (lambda b: lambda x, w, t: kernels.linear_token_logprobs(x, w, t, backend=b))(b)
             for b in (["torch", "triton"] if device == "cuda" else ["torch"])
             if dispatch.available("linear_token_logprobs", b)}
    impls["plain F.linear + log_softmax + gather"] = lambda x, w, t: naive_linear_token_logprobs(x, w, t)
    liger = _liger(device)
    if liger is not None:
        impls["Liger fused linear CE (loss only)"] = liger
    return [Case("linear_token_logprobs fwd+bwd", name, f"N{n} H{h} V{v}", str(dtype).replace("torch.", ""),
                 fwd_bwd(f), flops=6 * n * h * v, peak_tflops=peak) for name, f in impls.items()]


if __name__ == "__main__":  # python -m bench.bench_linear_logprobs [--quick] [--device cuda]
    from .harness import run_only

    run_only("lin")
