"""Over-optimisation's math: Gao et al.'s curves fitted back from noisy synthetic points, best-of-n's KL in
closed form against a Monte Carlo estimate, the exact best-of-n means against every subset, and the ensemble
rewards against hand computations."""
import itertools
import math

import numpy as np
import pytest
import torch

from engine.overopt.ensemble import combine, spread
from engine.overopt.scaling import best_of_n_kl, best_of_n_means, fit_curve


@pytest.mark.parametrize("form,alpha,beta", [("rl", 1.3, 0.45), ("rl", 0.6, 0.2), ("bon", 0.9, 0.25)])
def test_the_fit_recovers_alpha_beta_and_the_peak_from_noisy_curves(form, alpha, beta):
    rng = np.random.default_rng()  # fresh every run: the tolerance is the noise's, not one draw's
    d = np.linspace(0.05, 5.0, 60)
    clean = d * alpha - beta * (d * np.log(d) if form == "rl" else d * d)
    fit = fit_curve(d, clean + rng.normal(0.0, 0.02, d.size), form)
    # the estimator's standard error at this noise is ~0.005 for both; 0.05 is 10 of them
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.beta == pytest.approx(beta, abs=0.05)
    assert fit.r2 > 0.99
    peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
    assert fit.peak_d == pytest.approx(peak, rel=0.15)
    assert fit(fit.peak_d) >= fit(d).max() - 1e-9  # the peak is the curve's maximum
    exact = fit_curve(d, clean, form)
    assert (exact.alpha, exact.beta, exact.r2) == pytest.approx((alpha, beta, 1.0), abs=1e-9)


def test_a_curve_that_only_rises_has_no_peak_and_bad_points_are_refused():
    d = np.linspace(0.1, 3.0, 20)
    assert fit_curve(d, 0.5 * d + 0.1 * d * d, "bon").peak_d is None
    with pytest.raises(ValueError, match="two distinct d"):
        fit_curve([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        fit_curve([0.5, 1.0], [0.1, float("nan")])
    with pytest.raises(ValueError, match="negative"):
        fit_curve([-0.5, 1.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="'rl' or 'bon'"):
        fit_curve([0.5, 1.0], [0.1, 0.2], "exp")


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_in_closed_form_matches_monte_carlo(n):
    """With a continuous score, best-of-n's density over the base's is n F(x)^(n-1): the KL is the mean of
    log n + (n-1) log F over best-of-n samples; F(x) of the best of n uniforms is that maximum itself."""
    u = torch.rand(200_000, n, dtype=torch.float64).max(dim=1).values
    monte_carlo = (math.log(n) + (n - 1) * torch.log(u)).mean().item()
    assert best_of_n_kl(n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert monte_carlo == pytest.approx(best_of_n_kl(n), abs=0.01)  # standard error < 0.003 at every n here
    assert best_of_n_kl(1) == 0.0
    with pytest.raises(ValueError, match=">= 1"):
        best_of_n_kl(0)


def test_best_of_n_means_equal_the_average_over_every_subset():
    rng = np.random.default_rng()
    proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    proxy[0, 2] = proxy[0, 5]  # a tie: broken by sample order, like the stable sort
    ns = [1, 2, 3, 5, 7]
    got_p, got_g = best_of_n_means(proxy, gold, ns)
    for k, n in enumerate(ns):
        picks_p, picks_g = [], []
        for p in range(3):
            for subset in itertools.combinations(range(7), n):
                best = max(subset, key=lambda j: (proxy[p, j], j))  # the later sample wins a tie
                picks_p.append(proxy[p, best])
                picks_g.append(gold[p, best])
        assert got_p[k] == pytest.approx(np.mean(picks_p), abs=1e-12)
        assert got_g[k] == pytest.approx(np.mean(picks_g), abs=1e-12)
    assert got_p[0] == pytest.approx(proxy.mean()) and got_p[-1] == pytest.approx(proxy.max(1).mean())
    with pytest.raises(ValueError, match="1 <= n <= 7"):
        best_of_n_means(proxy, gold, [8])


def test_wco_uwo_and_mean_against_a_hand_computation():
    scores = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.5], [2.0, 0.0, 0.5], [0.0, -3.0, 0.5]])
    assert combine(scores, "mean").tolist() == [1.5, -1.5, 0.5]
    assert combine(scores, "wco").tolist() == [0.0, -3.0, 0.5]
    # population variances: (0.25 + 2.25 + 0.25 + 2.25) / 4 = 1.25 for both columns, 0 for the third
    assert combine(scores, "uwo", 0.5).tolist() == [1.5 - 0.625, -1.5 - 0.625, 0.5]
    assert combine(scores, "uwo", 0.0).tolist() == combine(scores, "mean").tolist()
    assert spread(scores).tolist() == pytest.approx([1.25 ** 0.5, 1.25 ** 0.5, 0.0])
    one = scores[:1]
    for mode in ("mean", "wco", "uwo"):
        assert torch.equal(combine(one, mode), scores[0])
    with pytest.raises(ValueError, match="mean, wco, uwo"):
        combine(scores, "max")
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        combine(scores, "uwo", -1.0)
    with pytest.raises(ValueError, match=r"\[members, answers\]"):
        combine(scores[0], "mean")


def test_the_proxy_slope_guard_fires_where_the_proxy_flattens_and_not_before():
    from engine.overopt.guard import ProxySlopeGuard, first_stop

    # proxy gain 0.7 d up to d = 1.5, then nearly flat: the guard fires at the first flat interval
    ds = [0.0, 0.5, 1.0, 1.5, 1.55, 2.0, 2.5]
    gains = [0.0 if d == 0 else (0.7 * d if d <= 1.5 else 1.05 + 0.02 * (d - 1.5)) for d in ds]
    assert first_stop(list(zip(ds, gains))) == 5  # 1.55 moved d by less than 0.1: it waits for 2.0
    # a proxy that keeps rising at its first rate, or one that wiggles d back, never fires
    assert first_stop([(d, 0.7 * d) for d in ds]) is None
    assert first_stop([(0.0, 0.0), (1.0, 0.7), (0.8, 0.9), (0.95, 0.95), (1.5, 1.1)]) is None
    g = ProxySlopeGuard(0.5)
    assert not g.feed(1.0, 1.0) and not g.feed(2.0, 1.6) and g.feed(3.0, 1.9) and g.feed(3.0, 0.0)
    assert g.fired_at == 3.0 and g.slopes == pytest.approx([1.0, 0.6, 0.3])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        ProxySlopeGuard(1.5)
