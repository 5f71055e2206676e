"""GAE: ours per backend vs a per-timestep Python loop (what TRL, OpenRLHF and verl write)."""
from __future__ import annotations

import torch

import kernels
from kernels import dispatch

from .harness import Case


def python_loop_gae(rewards, values, gamma: float, lam: float):
    """The usual trainer code: a Python loop over time steps (no masks), stacked at the end."""
    t_len = rewards.shape[1]
    last = 0.0
    rev = []
    for t in reversed(range(t_len)):
        next_v = values[:, t + 1] if t < t_len - 1 else 0.0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        rev.append(last)
    adv = torch.stack(rev[::-1], dim=1)
    return adv, adv + values


def cases(device: str, b: int, t: int) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    r = torch.randn(b, t, device=device, generator=g)
    v = torch.randn(b, t, device=device, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[:, t - t // 4:] = torch.rand(b, t // 4, device=device, generator=g) < 0.5  # ragged ends
    nbytes = b * t * (4 + 4 + 1) + b * t * 8
    names = ["torch", "triton", "cuda"] if device == "cuda" else ["torch", "cpu"]
    out = []
    for be in [x for x in names if dispatch.available("gae", x)]:
        label = "ours (torch, loop over time, batched)" if be == "torch" else f"ours ({be})"
        out.append(Case("gae", label, f"{b}x{t}", "float32",
                        lambda be=be: kernels.gae(r, v, mask, gamma=1.0, lam=0.95, backend=be), nbytes))
    out.append(Case("gae", "per-timestep Python loop (TRL-style)", f"{b}x{t}", "float32",
                    lambda: python_loop_gae(r, v, 1.0, 0.95), nbytes))
    return out


if __name__ == "__main__":  # python -m bench.bench_gae [--quick] [--device cuda]
    from .harness import run_only

    run_only("gae")
