"""kernels.off_policy_weights: the importance weights of answers sampled by another (older, or numerically
different) policy, against a hand computation and a float64 reference."""
import math

import pytest
import torch

from kernels import off_policy_weights


def test_weights_and_statistics_match_a_hand_computation():
    proximal = torch.tensor([[0.0, -1.0, -2.0], [0.5, 0.0, 9.0]])
    behaviour = torch.tensor([[0.0, 0.0, -3.0], [-1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the second row's last two are padding (any value)
    # w = exp(prox - behav) on the 4 valid tokens: 1, e^-1, e^1, e^1.5
    raw = [1.0, math.exp(-1), math.exp(1), math.exp(1.5)]
    tis, stats = off_policy_weights(proximal, behaviour, mask, mode="tis", cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([[1.0, math.exp(-1), 2.0], [2.0, 0.0, 0.0]]))
    dec, dstats = off_policy_weights(proximal, behaviour, mask, mode="decoupled", cap=2.0)
    torch.testing.assert_close(dec, torch.tensor([[1.0, math.exp(-1), 0.0], [0.0, 0.0, 0.0]]))
    mean = sum(raw) / 4
    assert stats["is_weight_mean"] == pytest.approx(mean, rel=1e-6)
    assert stats["is_weight_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in raw) / 4), rel=1e-6)
    assert stats["is_weight_max"] == pytest.approx(math.exp(1.5), rel=1e-6)
    assert stats["is_truncated"] == dstats["is_truncated"] == 0.5
    w = [1.0, math.exp(-1), 2.0, 2.0]  # ESS of the final weights over the 4 tokens: (sum w)^2 / (n sum w^2)
    assert stats["is_ess"] == pytest.approx(sum(w) ** 2 / (4 * sum(x * x for x in w)), rel=1e-6)
    w = [1.0, math.exp(-1), 0.0, 0.0]
    assert dstats["is_ess"] == pytest.approx(sum(w) ** 2 / (4 * sum(x * x for x in w)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["tis", "decoupled"])
def test_random_inputs_against_float64(dtype, mode):
    g = torch.Generator().manual_seed(7)
    b, t = 5, 37
    proximal = (torch.randn(b, t * 2, generator=g) * 0.7).to(dtype)[:, ::2]  # non-contiguous
    behaviour = (proximal.float() + torch.randn(b, t, generator=g) * 0.5).to(dtype)
    behaviour[0, 3] = -60.0  # an extreme ratio: e^60 before the cap
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[2] = False  # an answer with no token
    w, stats = off_policy_weights(proximal, behaviour, mask, mode=mode, cap=1.5)
    raw = torch.exp(proximal.double() - behaviour.double()) * mask
    ref = raw.clamp(max=1.5) if mode == "tis" else torch.where(raw > 1.5, 0.0, raw)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w.double(), ref, rtol=tol, atol=tol)
    assert w.dtype == dtype and not w.requires_grad
    assert (w[~mask] == 0).all()
    assert stats["is_truncated"] == pytest.approx(float(((raw > 1.5) & mask).sum() / mask.sum()))


def test_a_bad_mode_or_cap_is_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="tis, decoupled|'tis', 'decoupled'"):
        off_policy_weights(x, x, x.bool(), mode="sequence")
    with pytest.raises(ValueError, match="cap"):
        off_policy_weights(x, x, x.bool(), cap=0.0)
