"""KL-shaped rewards: ours per backend vs the reference composed of PyTorch ops."""
from __future__ import annotations

import torch

import kernels
from kernels import dispatch

from .harness import Case


def cases(device: str, b: int, t: int) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    lp = -torch.rand(b, t, device=device, generator=g) * 3
    ref = -torch.rand(b, t, device=device, generator=g) * 3
    scores = torch.randn(b, device=device, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[:, t - t // 4:] = False
    nbytes = b * t * (4 + 4 + 1) + b * 4 + b * t * 8
    names = ["torch", "triton", "cuda"] if device == "cuda" else ["torch", "cpu"]
    given = (torch.empty_like(lp), torch.empty_like(lp))  # out=: outputs reused, as the copy it is compared to
    out = []
    for be in [x for x in names if dispatch.available("shape_rewards", x)]:
        for label, o in ((f"ours ({be})", None), (f"ours ({be}, out=)", given)):
            out.append(Case("shape_rewards k3", label, f"{b}x{t}", "float32",
                            lambda be=be, o=o: kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.05,
                                                                     estimator="k3", backend=be, out=o), nbytes))
    return out


if __name__ == "__main__":  # python -m bench.bench_rewards [--quick] [--device cuda]
    from .harness import run_only

    run_only("rew")
