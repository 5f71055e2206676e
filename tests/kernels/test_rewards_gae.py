"""kl_penalty, shape_rewards and gae against hand-computed and float64 loop references."""
import math

import pytest
import torch

import kernels
from kernels import dispatch, reference

BACKENDS = {op: [b for b in ("torch", "triton", "cpu") if dispatch.available(op, b)]
            for op in ("kl_penalty", "shape_rewards", "gae")}


def masks(b, t, rng):
    """Right-padded, left-padded, with holes, all-empty rows and a full row."""
    lengths = torch.randint(0, t + 1, (b,), generator=rng)
    right = torch.arange(t)[None] < lengths[:, None]
    left = right.flip(1)
    holes = right & (torch.rand(b, t, generator=rng) > 0.3)
    holes[0] = True
    return {"right": right, "left": left, "holes": holes}


@pytest.mark.parametrize("backend", BACKENDS["kl_penalty"])
def test_kl_estimators_hand_values(backend):
    lp = torch.tensor([-1.0, -0.5, -2.0])
    ref = torch.tensor([-1.5, -0.5, -1.0])
    r = lp - ref  # 0.5, 0, -1
    torch.testing.assert_close(kernels.kl_penalty(lp, ref, estimator="k1", backend=backend), r)
    torch.testing.assert_close(kernels.kl_penalty(lp, ref, estimator="k2", backend=backend),
                               torch.tensor([0.125, 0.0, 0.5]))
    want = torch.tensor([math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(1.0) - 1 - 1.0])
    torch.testing.assert_close(kernels.kl_penalty(lp, ref, estimator="k3", backend=backend), want)


def test_kl_bad_estimator():
    with pytest.raises(ValueError, match="`estimator`"):
        kernels.kl_penalty(torch.zeros(2), torch.zeros(2), estimator="k4")
    with pytest.raises(ValueError, match="`ref_logprobs` has shape"):
        kernels.kl_penalty(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
def test_shape_rewards_hand_example(backend):
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -4.0], [-2.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])  # right-padded, holes, empty
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.1, backend=backend)
    want_kl = torch.tensor([[0.5, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    want_r = -0.1 * want_kl
    want_r[0, 2] += 10.0  # last valid of row 0 is index 2
    want_r[1, 3] += 20.0  # last valid of row 1 is index 3
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(rewards, want_r)  # row 2 has no valid token: all zeros, no score


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("b,t", [(1, 1), (5, 13), (33, 70)])
def test_shape_rewards_random_vs_float64(backend, estimator, b, t, rng):
    for name, mask in masks(b, t, rng).items():
        lp = -torch.rand(b, t, generator=rng) * 5
        ref = -torch.rand(b, t, generator=rng) * 5
        scores = torch.randn(b, generator=rng)
        rewards, kl = kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator=estimator, backend=backend)
        r64, kl64 = kernels.reference.shape_rewards(scores.double(), lp.double(), ref.double(), mask, 0.05, estimator)
        torch.testing.assert_close(kl.double(), kl64, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(rewards.double(), r64, atol=1e-5, rtol=1e-5, msg=name)
        assert (rewards[~mask.bool()] == 0).all(), name


def gae_scalar(r, v, m, gamma, lam):
    """The textbook recursion, one row at a time over the valid positions only (float64 Python)."""
    b, t = len(r), len(r[0])
    adv = [[0.0] * t for _ in range(b)]
    ret = [[0.0] * t for _ in range(b)]
    for i in range(b):
        valid = [j for j in range(t) if m[i][j]]
        next_v = next_a = 0.0
        for j in reversed(valid):
            delta = r[i][j] + gamma * next_v - v[i][j]
            next_a = delta + gamma * lam * next_a
            next_v = v[i][j]
            adv[i][j], ret[i][j] = next_a, next_a + v[i][j]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25, 0.5]])
    m = torch.ones(1, 3)
    adv, ret = kernels.gae(r, v, m, gamma=1.0, lam=0.5, backend="torch")
    # t=2: d=1-0.5=0.5, A=0.5; t=1: d=0+0.5-0.25=0.25, A=0.25+0.5*0.5=0.5; t=0: d=0.25-0.5=-0.25, A=-0.25+0.25=0
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.75, 1.0]]))


@pytest.mark.parametrize("backend", BACKENDS["gae"])
@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (16, 129)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_random_masks_vs_float64(backend, b, t, gamma, lam, rng):
    for name, mask in masks(b, t, rng).items():
        r = torch.randn(b, t, generator=rng)
        v = torch.randn(b, t, generator=rng)
        adv, ret = kernels.gae(r, v, mask, gamma=gamma, lam=lam, backend=backend)
        want_a, want_r = gae_scalar(r.double().tolist(), v.double().tolist(), mask.tolist(), gamma, lam)
        torch.testing.assert_close(adv.double(), want_a, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(ret.double(), want_r, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS["gae"])
def test_gae_non_contiguous_and_bool_or_float_masks(backend, rng):
    r = torch.randn(7, 40, generator=rng)[:, ::2]
    v = torch.randn(40, 7, generator=rng).t()[:, :20]
    m = torch.rand(7, 20, generator=rng) > 0.2
    a1, r1 = kernels.gae(r, v, m, gamma=0.99, lam=0.9, backend=backend)
    a2, r2 = kernels.gae(r.contiguous(), v.contiguous(), m.float(), gamma=0.99, lam=0.9, backend=backend)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_gae_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="`values` has shape"):
        kernels.gae(z, torch.zeros(2, 4), z, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="`gamma`"):
        kernels.gae(z, z, z, gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match="`rewards` must have shape"):
        kernels.gae(torch.zeros(3), torch.zeros(3), torch.zeros(3), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="`rewards` must be a floating"):
        kernels.gae(z.long(), z, z, gamma=1.0, lam=1.0)


def test_shape_rewards_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="`scores` must have shape"):
        kernels.shape_rewards(torch.zeros(3), z, z, z, kl_coef=0.1)
    with pytest.raises(ValueError, match="`mask` has shape"):
        kernels.shape_rewards(torch.zeros(2), z, z, torch.zeros(2, 2), kl_coef=0.1)


@pytest.mark.parametrize("backend", BACKENDS["gae"])
def test_gae_ignores_garbage_under_the_mask(backend, rng):
    """Masked positions may hold anything (NaN from a padded forward pass): it must not leak."""
    r = torch.randn(3, 11, generator=rng)
    v = torch.randn(3, 11, generator=rng)
    mask = torch.rand(3, 11, generator=rng) > 0.4
    mask[:, 0] = True
    r_bad, v_bad = r.clone(), v.clone()
    r_bad[~mask] = float("nan")
    v_bad[~mask] = float("inf")
    adv, ret = kernels.gae(r_bad, v_bad, mask, gamma=0.99, lam=0.9, backend=backend)
    ref_adv, ref_ret = reference.gae(r.double(), v.double(), mask, 0.99, 0.9)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS["gae"])
def test_gae_whiten_option(backend, rng):
    r, v = torch.randn(4, 9, generator=rng), torch.randn(4, 9, generator=rng)
    mask = torch.rand(4, 9, generator=rng) > 0.3
    adv, ret = kernels.gae(r, v, mask, gamma=1.0, lam=0.95, backend=backend)
    wadv, wret = kernels.gae(r, v, mask, gamma=1.0, lam=0.95, backend=backend, whiten=True)
    torch.testing.assert_close(wret, ret)  # returns are not whitened
    valid = wadv[mask].double()
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std(unbiased=True).item() - 1) < 1e-4
    a = adv[mask].double()
    torch.testing.assert_close(valid, (a - a.mean()) / a.std(unbiased=True), atol=1e-4, rtol=1e-4)
    assert (wadv[~mask] == 0).all()


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton", "cpu") if dispatch.available("shape_rewards", b)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_shape_rewards_keep_the_score_exact_whatever_the_logprobs_dtype(backend, dtype):
    """The RM score is added in float32 (float64 for float64 inputs), never rounded to bfloat16 logprobs'
    precision (the CUDA twin of this test is in test_cuda.py)."""
    lp = torch.zeros(2, 5, dtype=dtype)
    mask = torch.ones(2, 5, dtype=torch.bool)
    scores = torch.tensor([1.001, -3.14159], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    rew, kl = kernels.shape_rewards(scores, lp, lp, mask, kl_coef=0.1, backend=backend)
    assert rew.dtype == want and kl.dtype == want
    assert rew[:, -1].tolist() == scores.to(want).tolist()


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
def test_shape_rewards_k3_keeps_small_and_extreme_log_ratios(backend, rng):
    """k3 = expm1(-d) + d is ~d^2/2 for small d, where exp(-d) - 1 would cancel: relative accuracy there, and
    the exact limits where |d| is huge or infinite (the vector kernels' exp saturates near 88)."""
    small = (torch.rand(3, 67, generator=rng) - 0.5) * torch.logspace(-4, 0, 67)  # |d| from 1e-4 to 0.5
    ref = -torch.rand(3, 67, generator=rng) * 3
    lp = ref + small
    mask = torch.ones(3, 67, dtype=torch.bool)
    _, kl = kernels.shape_rewards(torch.zeros(3), lp, ref, mask, kl_coef=0.1, estimator="k3", backend=backend)
    d = lp.double() - ref.double()  # the float32 inputs' own difference
    want = torch.expm1(-d) + d
    err = ((kl.double() - want).abs() / want).max().item()
    plain = ((torch.expm1(-(lp - ref)) + (lp - ref)).double() - want).abs().div(want).max().item()
    assert err <= 2 * plain, (err, plain)  # FlashAttention's rule: no worse than twice plain float32 torch
    if backend == "cpu":  # its vector k3 takes the series near 0: float32 accuracy throughout
        assert err < 2e-5, err

    lp = torch.tensor([[-1.0, -95.0, -1.0, float("-inf"), -1.0, float("nan"), -1.0, -1.0, -200.0, -1.0, -3.0]])
    ref = torch.tensor([[-90.0, -1.0, float("-inf"), -1.0, -1.0, -1.0, -100.0, -81.0, -1.0, -1.0, -2.0]])
    mask = torch.ones_like(lp, dtype=torch.bool)
    _, kl = kernels.shape_rewards(torch.zeros(1), lp, ref, mask, kl_coef=0.1, estimator="k3", backend=backend)
    _, want = kernels.reference.shape_rewards(torch.zeros(1).double(), lp.double(), ref.double(), mask, 0.1, "k3")
    torch.testing.assert_close(kl, want.float(), rtol=1e-6, atol=0, equal_nan=True)  # inf where f32 overflows


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_rewards_into_given_outputs(backend, estimator, dtype, rng):
    """out=(rewards, kl): the same values written into the caller's tensors (garbage before), which are returned.
    Rows of 131 floats start at every alignment, so the CPU path's aligned streaming body and its scalar start
    and tail all run."""
    b, t = 9, 131
    mask = masks(b, t, rng)["holes"]
    lp = (-torch.rand(b, t, generator=rng) * 5).to(dtype)
    ref = (-torch.rand(b, t, generator=rng) * 5).to(dtype)
    scores = torch.randn(b, generator=rng, dtype=dtype)
    want = kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator=estimator, backend=backend)
    out = (torch.full((b, t), float("nan"), dtype=dtype), torch.full((b, t), 7.0, dtype=dtype))
    got = kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.05, estimator=estimator, backend=backend, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    torch.testing.assert_close(out[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(out[1], want[1], atol=0, rtol=0)
    r64, kl64 = reference.shape_rewards(scores.double(), lp.double(), ref.double(), mask, 0.05, estimator)
    torch.testing.assert_close(out[1].double(), kl64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0].double(), r64, atol=1e-5, rtol=1e-5)


def test_shape_rewards_bad_outputs_are_named():
    z = torch.zeros(2, 3)
    args = (torch.zeros(2), z, z, z)
    with pytest.raises(ValueError, match=r"`out` must be a \(rewards, kl\) pair"):
        kernels.shape_rewards(*args, kl_coef=0.1, out=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`out\[1\] \(kl\)` has shape"):
        kernels.shape_rewards(*args, kl_coef=0.1, out=(torch.zeros(2, 3), torch.zeros(3, 2)))
    with pytest.raises(ValueError, match=r"`out\[0\] \(rewards\)` must have dtype"):
        kernels.shape_rewards(*args, kl_coef=0.1, out=(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="must be contiguous"):
        kernels.shape_rewards(*args, kl_coef=0.1, out=(torch.zeros(3, 2).t(), torch.zeros(2, 3)))
    shared = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="share memory"):
        kernels.shape_rewards(*args, kl_coef=0.1, out=(shared, shared))


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
def test_outputs_overlapping_in_part_or_an_input_are_refused(backend, rng):
    """A partial overlap of out[0] and out[1] (or of an output and an input) gave a wrong kl: refused on every
    backend. Two outputs cut from one buffer without overlapping are fine."""
    b, t = 4, 37
    lp, ref = -torch.rand(b, t, generator=rng), -torch.rand(b, t, generator=rng)
    mask, scores = masks(b, t, rng)["holes"], torch.randn(b, generator=rng)
    want = kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k3", backend=backend)
    buf = torch.zeros(2 * b * t)
    sbuf = torch.zeros(b * t)
    sbuf[:b] = scores
    for s, out in [(scores, (buf[: b * t].view(b, t), buf[t // 2: t // 2 + b * t].view(b, t))),  # in part
                   (scores, (buf[t: t + b * t].view(b, t), buf[: b * t].view(b, t))),
                   (scores, (lp, torch.zeros(b, t))), (scores, (torch.zeros(b, t), ref)),
                   (sbuf[:b], (torch.zeros(b, t), sbuf.view(b, t)))]:                             # over the scores
        with pytest.raises(ValueError, match="share memory"):
            kernels.shape_rewards(s, lp, ref, mask, kl_coef=0.1, estimator="k3", backend=backend, out=out)
    apart = (buf[: b * t].view(b, t), buf[b * t:].view(b, t))
    kernels.shape_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k3", backend=backend, out=apart)
    torch.testing.assert_close(apart[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(apart[1], want[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS["shape_rewards"])
def test_a_mask_is_read_as_nonzero_and_a_nan_in_it_is_refused(backend, rng):
    """2.0 or -1 mark a valid position exactly as 1 does, in every op and on every backend (never a weight);
    a NaN in a float mask is refused by name."""
    b, t = 5, 29
    valid = masks(b, t, rng)["holes"]
    odd = valid.float() * torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])[torch.randint(0, 5, (b, t), generator=rng)]
    lp, ref = -torch.rand(b, t, generator=rng), -torch.rand(b, t, generator=rng)
    scores, values = torch.randn(b, generator=rng), torch.randn(b, t, generator=rng)
    for got, want in [
        (kernels.shape_rewards(scores, lp, ref, odd, kl_coef=0.1, backend=backend),
         kernels.shape_rewards(scores, lp, ref, valid, kl_coef=0.1, backend=backend)),
        (kernels.gae(lp, values, odd, gamma=0.99, lam=0.9, backend=backend),
         kernels.gae(lp, values, valid, gamma=0.99, lam=0.9, backend=backend)),
        ((kernels.masked_mean(lp, odd), kernels.whiten(lp, odd), kernels.masked_var(lp, odd)),
         (kernels.masked_mean(lp, valid), kernels.whiten(lp, valid), kernels.masked_var(lp, valid))),
        (kernels.policy_loss(lp, ref, values, odd)[0], kernels.policy_loss(lp, ref, values, valid)[0]),
        (kernels.value_loss(lp, ref, values, odd)[0], kernels.value_loss(lp, ref, values, valid)[0]),
        (kernels.estimate_advantages("rloo", lp, odd, n=5, backend=backend)[0],
         kernels.estimate_advantages("rloo", lp, valid, n=5, backend=backend)[0]),
    ]:
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    nan = odd.clone()
    nan[2, 3] = float("nan")
    for call in (lambda: kernels.shape_rewards(scores, lp, ref, nan, kl_coef=0.1, backend=backend),
                 lambda: kernels.gae(lp, values, nan, gamma=0.99, lam=0.9, backend=backend),
                 lambda: kernels.masked_mean(lp, nan), lambda: kernels.policy_loss(lp, ref, values, nan),
                 lambda: kernels.estimate_advantages("rloo", lp, nan, n=5, backend=backend)):
        with pytest.raises(ValueError, match=r"`mask` holds NaN at \[2, 3\]"):
            call()
