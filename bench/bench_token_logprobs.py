"""token_logprobs forward and forward+backward: ours per backend vs the naive path vs TRL."""
from __future__ import annotations

import torch

import kernels
from kernels import dispatch

from .harness import Case


def _peers():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # noqa: BLE001 - TRL is optional
        return {}
    return {"TRL selective_log_softmax": lambda x, t: selective_log_softmax(x, t)}


def naive(logits, tokens):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def backends(device: str) -> list[str]:
    names = ["torch", "triton", "cuda"] if device == "cuda" else ["torch", "cpu"]
    return [b for b in names if dispatch.available("token_logprobs", b)]


def cases(device: str, n: int, vocab: int, dtype: torch.dtype) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, vocab, device=device, dtype=dtype, generator=g) * 3
    tokens = torch.randint(0, vocab, (n,), device=device, generator=g)
    e = logits.element_size()
    fwd_bytes, bwd_bytes = n * vocab * e + n * 12, 2 * n * vocab * e + n * 12  # bwd = re-read + write grad
    shape, dt = f"{n}x{vocab}", str(dtype).replace("torch.", "")
    impls = {f"ours ({b})": (lambda b: lambda x, t: kernels.token_logprobs(x, t, backend=b))(b) for b in backends(device)}
    impls["naive log_softmax().gather"] = naive
    impls.update(_peers())
    out = [Case("token_logprobs fwd", name, shape, dt, (lambda f: lambda: f(logits, tokens))(f), fwd_bytes)
           for name, f in impls.items()]
    leaf = logits.clone().requires_grad_(True)

    def fwd_bwd(f):
        def go():  # starts and ends with no .grad held, returns the gradient (counted in peak memory)
            f(leaf, tokens).sum().backward()
            g, leaf.grad = leaf.grad, None
            return g
        return go
    out += [Case("token_logprobs fwd+bwd", name, shape, dt, fwd_bwd(f), fwd_bytes + bwd_bytes)
            for name, f in impls.items()]
    return out


if __name__ == "__main__":  # python -m bench.bench_token_logprobs [--quick] [--device cuda]
    from .harness import run_only

    run_only("lp")
