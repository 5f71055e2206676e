"""group_advantages (GRPO, Dr. GRPO, RLOO): ours per backend vs the reshape-and-reduce most trainers write."""
from __future__ import annotations

import torch

import kernels
from kernels import dispatch

from .harness import Case


def peer_grpo(scores: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """TRL's and verl's GRPO advantage: view as [prompts, n], mean and std per row, broadcast back."""
    g = scores.view(-1, n)
    mean = g.mean(dim=1).repeat_interleave(n)
    std = g.std(dim=1).repeat_interleave(n)
    return (scores - mean) / (std + eps)


def cases(device: str, prompts: int, n: int) -> list[Case]:
    scores = torch.randn(prompts * n, device=device, generator=torch.Generator(device=device).manual_seed(0))
    nbytes = scores.numel() * 8  # read once, write once
    names = ["torch", "triton", "cuda"] if device == "cuda" else ["torch", "cpu"]
    out = [Case("group_advantages grpo", f"ours ({be})", f"{prompts}x{n}", "float32",
                lambda be=be: kernels.group_advantages(scores, n, mode="grpo", backend=be), nbytes)
           for be in names if dispatch.available("group_advantages", be)]
    out.append(Case("group_advantages grpo", "view + mean/std + repeat_interleave (TRL/verl-style)",
                    f"{prompts}x{n}", "float32", lambda: peer_grpo(scores, n), nbytes))
    return out


if __name__ == "__main__":  # python -m bench.bench_groups [--quick] [--device cuda]
    from .harness import run_only

    run_only("grp")
