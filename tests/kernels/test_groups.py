"""group_advantages (GRPO, Dr. GRPO, RLOO) against float64 loops over each prompt's group, every backend."""
import math

import pytest
import torch

import kernels
from kernels import dispatch

BACKENDS = [b for b in ("torch", "triton", "cpu") if dispatch.available("group_advantages", b)]
MODES = ("grpo", "drgrpo", "rloo")


def loop_reference(scores, n, mode, eps=1e-6):
    """The definitions, one group and one sample at a time, in float64."""
    s = [float(x) for x in scores.double()]
    out = []
    for g in range(0, len(s), n):
        group = s[g:g + n]
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        for i, x in enumerate(group):
            if mode == "grpo":
                out.append((x - mean) / (std + eps) if std + eps > 0 else 0.0)
            elif mode == "drgrpo":
                out.append(x - mean)
            else:
                others = (sum(group) - x) / (n - 1)
                out.append(x - others)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompts,n", [(1, 2), (5, 3), (3, 7), (64, 16), (2, 33)])
def test_float32_against_float64_loops(backend, mode, prompts, n, rng):
    scores = torch.randn(prompts * n, generator=rng) * 3 + 1
    got = kernels.group_advantages(scores, n, mode=mode, backend=backend)
    assert got.dtype == torch.float32 and got.shape == scores.shape
    torch.testing.assert_close(got.double(), loop_reference(scores, n, mode), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_constant_groups_give_zeros_never_nan(backend, mode):
    scores = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 5.0, -7.0, -7.0, -7.0])
    for eps in (1e-6, 0.0):
        got = kernels.group_advantages(scores, 3, mode=mode, eps=eps, backend=backend)
        assert torch.isfinite(got).all()
        assert got[:3].tolist() == [0.0, 0.0, 0.0] and got[6:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_bfloat16_and_non_contiguous_input(backend, rng):
    base = torch.randn(8, 2, generator=rng)
    scores = base[:, 0]  # stride 2
    want = loop_reference(scores, 4, "grpo")
    torch.testing.assert_close(kernels.group_advantages(scores, 4, mode="grpo", backend=backend).double(), want,
                               atol=2e-5, rtol=1e-5)
    exact = kernels.group_advantages(scores.double(), 4, mode="rloo", backend=backend)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, loop_reference(scores, 4, "rloo"), atol=1e-12, rtol=1e-12)
    low = scores.bfloat16()
    got = kernels.group_advantages(low, 4, mode="drgrpo", backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_reference(low.float(), 4, "drgrpo"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=1, mode="grpo"), r"`n` must be an int >= 2 for mode 'grpo'"),
    (dict(n=1, mode="rloo"), r"`n` must be an int >= 2 for mode 'rloo'"),
    (dict(n=3, mode="grpo"), r"`scores` has 8 entries, not a multiple of n = 3"),
    (dict(n=4, mode="ppo"), r"`mode` must be one of \('grpo', 'drgrpo', 'rloo'\)"),
    (dict(n=4, mode="grpo", eps=-1.0), r"`eps` must be a number >= 0"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.group_advantages(torch.zeros(8), **kwargs)
    with pytest.raises(ValueError, match=r"`scores` must have shape \[B\]"):
        kernels.group_advantages(torch.zeros(2, 4), 4, mode="grpo")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_score_shows_in_its_group_only_the_same_on_every_backend(backend, mode, bad, dtype, rng):
    """NaN or inf in a group's scores is never hidden as zeros: every advantage of that group is non-finite,
    on every backend alike (the torch path used to give 0, the C++ one NaN); the other groups are unharmed."""
    scores = (torch.randn(12, generator=rng) * 2).to(dtype)
    scores[5] = bad  # group 1 of 3 (n = 4)
    for eps in (1e-6, 0.0):
        got = kernels.group_advantages(scores, 4, mode=mode, eps=eps, backend=backend)
        assert not torch.isfinite(got[4:8]).any(), got
        keep = torch.cat([scores[:4], scores[8:]])
        want = loop_reference(keep, 4, mode, eps)
        torch.testing.assert_close(torch.cat([got[:4], got[8:]]).double(), want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got, kernels.group_advantages(scores, 4, mode=mode, eps=eps, backend="torch"),
                                   atol=2e-5, rtol=1e-5, equal_nan=True)
