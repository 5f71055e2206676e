"""Masked statistics and the three losses against hand-computed values and brute force."""
import itertools
import math

import pytest
import torch

from kernels import masked_mean, masked_var, policy_loss, ranking_loss, value_loss, whiten


def test_masked_mean_var_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    assert masked_var(x, m).item() == pytest.approx(5.0 / 3.0)  # values 1..4, unbiased
    w = whiten(x, m)
    assert w[m.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[m.bool()].std().item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~m.bool()] == 0).all()
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 3.5]))


def test_policy_loss_hand_values():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)


def test_policy_loss_gradient_zero_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_value_loss_hand_values():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    loss, _ = value_loss(v, old, ret, torch.ones(1, 2), clip_eps=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_ranking_loss_matches_brute_force(rng):
    b, kmax = 5, 9
    scores = torch.randn(b, kmax, generator=rng, dtype=torch.float64)
    ks = [4, 9, 5, 7, 2]
    valid = torch.zeros(b, kmax, dtype=torch.bool)
    ranks = torch.full((b, kmax), 99)
    for i, k in enumerate(ks):
        valid[i, :k] = True
        ranks[i, :k] = torch.randperm(k, generator=rng)
    loss, acc = ranking_loss(scores, ranks, valid)
    per_prompt, right, total = [], 0, 0
    for i, k in enumerate(ks):
        terms = []
        for a, c in itertools.combinations(range(k), 2):
            w, l = (a, c) if ranks[i, a] < ranks[i, c] else (c, a)
            d = (scores[i, w] - scores[i, l]).item()
            terms.append(-math.log(1 / (1 + math.exp(-d))))
            right += d > 0
            total += 1
        assert len(terms) == k * (k - 1) // 2
        per_prompt.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_prompt) / b, rel=1e-9)
    assert acc == pytest.approx(right / total)


def test_ranking_loss_shape_error():
    with pytest.raises(ValueError, match="shape \\[B, K\\]"):
        ranking_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


@pytest.mark.parametrize("call,match", [
    (lambda: whiten(torch.zeros(2, 3), torch.ones(3)), r"`mask` has shape \(3,\) but `x` has shape \(2, 3\)"),
    (lambda: masked_mean(torch.zeros(2, 3), torch.ones(2, 1)), r"`mask` has shape \(2, 1\)"),
    (lambda: masked_var(torch.zeros(4), torch.ones(2, 4)), r"`mask` has shape \(2, 4\)"),
    (lambda: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)),
     r"`advantages` has shape \(3,\) but `logprobs` has shape \(2, 3\)"),
    (lambda: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.2,
                         is_weights=torch.ones(2, 1)), r"`is_weights` has shape \(2, 1\)"),
    (lambda: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), -0.2),
     r"`clip_eps` must be a positive number"),
    (lambda: value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3)),
     r"`mask` has shape \(3,\) but `values` has shape \(2, 3\)"),
])
def test_shapes_that_would_broadcast_are_refused(call, match):
    """A mask or advantage that merely broadcasts would average over the wrong positions without a word."""
    with pytest.raises(ValueError, match=match):
        call()


def test_decoupled_clipping_clips_above_at_clip_high():
    """DAPO's clip-higher: with A > 0 a ratio of 1.3 is clipped at 1 + clip_high (0.28), not 1 + clip_eps."""
    new = torch.log(torch.tensor([[1.3, 0.7]]))
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    symmetric, _ = policy_loss(new, torch.zeros(1, 2), adv, mask, 0.2)
    decoupled, stats = policy_loss(new, torch.zeros(1, 2), adv, mask, 0.2, clip_high=0.28)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert decoupled.item() == pytest.approx((-1.28 + 0.8) / 2)
    lowered, _ = policy_loss(new, torch.zeros(1, 2), adv, mask, 0.2, clip_low=0.1, clip_high=0.28)
    assert lowered.item() == pytest.approx((-1.28 + 0.9) / 2)


def test_loss_aggregations_weigh_tokens_as_each_recipe_does():
    """token-mean: every token alike; seq-mean-token-mean: every answer alike; seq-mean-token-sum-norm: token
    sums over a constant (Dr. GRPO). Row 3 has no valid token and is left out of the per-answer means."""
    from kernels import aggregate

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm", norm_len=10).item() == pytest.approx((0.6 + 0.4) / 2)
    with pytest.raises(ValueError, match="`loss_agg` must be one of"):
        aggregate(x, m, "sum")


def test_kl_loss_is_k3_of_policy_against_reference_and_has_its_gradient():
    from kernels import kl_loss

    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = kl_loss(lp, ref, torch.ones(1, 2))
    r = lp.detach() - ref
    want = (torch.exp(-r) - 1 + r).mean()
    assert loss.item() == pytest.approx(want.item()) and stats["kl_loss"] == pytest.approx(want.item())
    loss.backward()
    torch.testing.assert_close(lp.grad, (1 - torch.exp(-r)) / 2)  # d/dr (e^-r - 1 + r) = 1 - e^-r
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        kl_loss(lp, ref, torch.ones(1, 2), estimator="k4")
