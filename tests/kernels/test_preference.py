"""DPO, IPO and listwise (Plackett-Luce) DPO against hand computations in float64, on fresh random inputs:
rankings of varying K with missing responses, the pairwise losses summed pair by pair in Python, the
Plackett-Luce likelihood as an explicit sum over the ranking's choices."""
import itertools
import math

import pytest
import torch

from kernels.preference import preference_loss, sequence_logps


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_rankings(gen, b=5, kmax=6, scale=3.0):
    """[B, Kmax] float64 log-ratios, ranks (a random permutation per prompt) and valid (K from 1 to Kmax)."""
    z = torch.randn(b, kmax, dtype=torch.float64, generator=gen) * scale
    ranks = torch.full((b, kmax), kmax, dtype=torch.long)
    valid = torch.zeros(b, kmax, dtype=torch.bool)
    for i in range(b):
        k = 1 if i == 0 else int(torch.randint(2, kmax + 1, (1,), generator=gen))
        ranks[i, :k] = torch.randperm(k, generator=gen)
        valid[i, :k] = True
    z = torch.where(valid, z, torch.full_like(z, 1e30))  # what sits past K must never be read
    return z, ranks, valid


def by_hand(z, ranks, valid, loss, beta, eps=0.0):
    """The batch loss, prompt by prompt and pair by pair in Python floats."""
    per_prompt = []
    for i in range(z.shape[0]):
        ks = [k for k in range(z.shape[1]) if valid[i, k]]
        if len(ks) < 2:
            continue
        if loss == "listwise":
            order = sorted(ks, key=lambda k: int(ranks[i, k]))
            s = [beta * float(z[i, k]) for k in order]
            nll = -sum(s[j] - math.log(sum(math.exp(x) for x in s[j:])) for j in range(len(s) - 1))
            per_prompt.append(nll / (len(s) - 1))
            continue
        terms = []
        for w, l in itertools.permutations(ks, 2):
            if ranks[i, w] < ranks[i, l]:
                h = float(z[i, w] - z[i, l])
                if loss == "sigmoid":
                    terms.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
                else:
                    terms.append((h - 1 / (2 * beta)) ** 2)
        per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                           ("ipo", 2.0, 0.0), ("listwise", 0.1, 0.0), ("listwise", 1.0, 0.0)])
def test_each_loss_equals_the_hand_computation(loss, beta, eps):
    gen = torch.Generator().manual_seed(hash((loss, beta)) % 2**31)
    for _ in range(3):
        z, ranks, valid = random_rankings(gen)
        got, stats = preference_loss(z, ranks, valid, loss=loss, beta=beta, label_smoothing=eps)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(by_hand(z, ranks, valid, loss, beta, eps), rel=1e-12)
        pairs = [(i, w, l) for i in range(z.shape[0]) for w in range(6) for l in range(6)
                 if valid[i, w] and valid[i, l] and ranks[i, w] < ranks[i, l]]
        assert stats["accuracy"] == pytest.approx(sum(z[i, w] > z[i, l] for i, w, l in pairs).item() / len(pairs))
        assert stats["margin"] == pytest.approx(sum(beta * (z[i, w] - z[i, l]) for i, w, l in pairs).item()
                                                / len(pairs))


def test_listwise_with_two_responses_is_sigmoid_dpo_in_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(7, 2, dtype=torch.float64, generator=gen) * 4).requires_grad_(True)
    ranks = torch.stack([torch.randperm(2, generator=gen) for _ in range(7)])
    valid = torch.ones(7, 2, dtype=torch.bool)
    grads = []
    for loss in ("listwise", "sigmoid"):
        value, _ = preference_loss(z, ranks, valid, loss=loss, beta=0.3)
        grads.append((value.item(), *torch.autograd.grad(value, z)))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-13, atol=1e-15)


def test_listwise_of_four_is_the_explicit_plackett_luce_sum_and_its_gradient():
    """K = 4: P(ranking) = prod_j exp(s_j) / sum_{m >= j} exp(s_m), written out; gradients by autograd of
    the explicit formula."""
    s = torch.tensor([[0.3, -1.2, 2.0, 0.7]], dtype=torch.float64, requires_grad=True)
    ranks = torch.tensor([[2, 3, 0, 1]])        # best first: response 2, 3, 0, 1
    beta = 0.7
    got, _ = preference_loss(s, ranks, torch.ones(1, 4, dtype=torch.bool), loss="listwise", beta=beta)
    a, b, c, d = (beta * s[0, k] for k in (2, 3, 0, 1))
    explicit = -(torch.log(a.exp() / (a.exp() + b.exp() + c.exp() + d.exp()))
                 + torch.log(b.exp() / (b.exp() + c.exp() + d.exp())) + torch.log(c.exp() / (c.exp() + d.exp()))) / 3
    assert got.item() == pytest.approx(explicit.item(), rel=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(explicit, s)[0], rtol=1e-12,
                               atol=0)


def test_extreme_log_ratios_stay_finite_and_float32_matches_float64():
    gen = torch.Generator().manual_seed(3)
    z, ranks, valid = random_rankings(gen, b=9, kmax=9, scale=2000.0)
    for loss in ("sigmoid", "ipo", "listwise"):
        want, _ = preference_loss(z, ranks, valid, loss=loss, beta=0.5)
        got32, _ = preference_loss(z.float(), ranks, valid, loss=loss, beta=0.5)
        assert math.isfinite(want.item()) and math.isfinite(got32.item())
        assert got32.item() == pytest.approx(want.item(), rel=1e-5)
        grad = torch.autograd.grad(preference_loss(z.clone().requires_grad_(True), ranks, valid, loss=loss,
                                                   beta=0.5)[0], z.requires_grad_(True), allow_unused=True)
        z.requires_grad_(False)
        assert grad[0] is None or torch.isfinite(grad[0]).all()


def test_a_batch_with_no_pair_has_zero_loss_that_still_backpropagates():
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, False], [True, False, False]])
    value, stats = preference_loss(z, torch.zeros(2, 3, dtype=torch.long), valid)
    assert value.item() == 0.0 and stats["accuracy"] == 0.0
    value.backward()
    assert (z.grad == 0).all()


def test_sequence_logps_sum_or_mean_over_a_non_contiguous_masked_input():
    gen = torch.Generator().manual_seed(4)
    lp = (-torch.rand(11, 6, dtype=torch.float64, generator=gen)).t()[:5]  # [5, 11] view, not contiguous
    assert not lp.is_contiguous()
    mask = torch.rand(5, 11, generator=gen) > 0.4
    mask[2] = False
    want_sum = [sum(float(lp[i, t]) for t in range(11) if mask[i, t]) for i in range(5)]
    torch.testing.assert_close(sequence_logps(lp, mask), torch.tensor(want_sum, dtype=torch.float64))
    means = sequence_logps(lp, mask, length_norm=True)
    for i in range(5):
        n = int(mask[i].sum())
        assert means[i].item() == pytest.approx(want_sum[i] / n if n else 0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(loss="kto"), "`loss` must be one of sigmoid, ipo, listwise"),
    (dict(beta=0.0), "`beta` must be > 0"),
    (dict(label_smoothing=0.5), r"`label_smoothing` must be in \[0, 0.5\)"),
    (dict(loss="listwise", label_smoothing=0.1), "defined for the sigmoid loss"),
])
def test_bad_arguments_are_named(kw, match):
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=match):
        preference_loss(z, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool), **kw)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"shape \[B, K\]; got \(2, 3\), \(2, 2\), \(2, 2\)"):
        preference_loss(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))
