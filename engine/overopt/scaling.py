"""Gao, Schulman and Hilton 2022 (arXiv 2210.10760), *Scaling Laws for Reward Model Overoptimization*: the gold
reward as a function of d = sqrt(KL(pi || pi_init)), and best-of-n's KL in closed form.

- RL:        R(d) = d (alpha - beta log d), peak at d* = exp(alpha / beta - 1) (beta > 0);
- best-of-n: R(d) = d (alpha - beta d),     peak at d* = alpha / (2 beta)     (beta > 0);
- best-of-n's KL to the policy it samples from is log n - (n - 1) / n (Stiennon et al. 2020, appendix G.3).

Both curves are linear in (alpha, beta), so the fit is ordinary least squares: exact, no starting point, no
iterations. R is measured relative to the initial policy (R(0) = 0): pass gold minus the initial gold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurveFit:
    """A fitted R(d). form: "rl" or "bon"; r2: the coefficient of determination of the fit (1 - SSE/SST);
    peak_d: where R is largest (None when beta <= 0: no peak, R grows without bound in the fitted law)."""
    form: str
    alpha: float
    beta: float
    r2: float
    peak_d: float | None

    def __call__(self, d):
        """R at d (a float or an array)."""
        d = np.asarray(d, dtype=np.float64)
        second = _second(self.form, d)
        return d * self.alpha - self.beta * second

    @property
    def peak(self) -> float | None:
        """R(peak_d), the predicted best gold gain."""
        return None if self.peak_d is None else float(self(self.peak_d))


def _second(form: str, d: np.ndarray) -> np.ndarray:
    """The beta term's factor: d log d for RL (0 at d = 0, its limit), d^2 for best-of-n."""
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, d * np.log(safe), 0.0)
    if form == "bon":
        return d * d
    raise ValueError(f"form must be 'rl' or 'bon', got {form!r}")


def fit_curve(d, gain, form: str = "rl") -> CurveFit:
    """Least-squares (alpha, beta) of Gao et al.'s law through points (d_i, gain_i), with no intercept (the law
    passes through (0, 0)). d: [N] sqrt-KL of each point, >= 0; gain: [N] gold (or proxy) minus its value at
    d = 0. Needs at least two points with d > 0 that are not all the same."""
    d = np.asarray(d, dtype=np.float64).ravel()
    y = np.asarray(gain, dtype=np.float64).ravel()
    if d.shape != y.shape:
        raise ValueError(f"fit_curve: {d.size} values of d but {y.size} gains; give one gain per d")
    if not (np.isfinite(d).all() and np.isfinite(y).all()):
        raise ValueError("fit_curve: d and gain must be finite (a NaN or an infinity reached the fit)")
    if (d < 0).any():
        raise ValueError(f"fit_curve: d = sqrt(KL) cannot be negative, got {d.min():g}")
    x = np.stack([d, -_second(form, d)], axis=1)  # gain = alpha * d - beta * second
    if np.linalg.matrix_rank(x) < 2:
        raise ValueError(f"fit_curve: needs at least two distinct d > 0 to fit alpha and beta, got {np.unique(d)}")
    (alpha, beta), *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ np.array([alpha, beta])
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / sst if sst > 0 else float("nan")
    return CurveFit(form, float(alpha), float(beta), r2, _peak(form, float(alpha), float(beta)))


def _peak(form: str, alpha: float, beta: float) -> float | None:
    if beta <= 0:
        return None
    if form == "rl":  # dR/dd = alpha - beta (log d + 1) = 0
        exponent = alpha / beta - 1.0
        return math.exp(exponent) if exponent < 700 else math.inf
    return alpha / (2.0 * beta)


def best_of_n_kl(n) -> np.ndarray | float:
    """KL(best-of-n || pi) in nats = log n - (n - 1) / n, for n >= 1 (0 at n = 1)."""
    arr = np.asarray(n, dtype=np.float64)
    if (arr < 1).any():
        raise ValueError(f"best_of_n_kl: n must be >= 1, got {arr.min():g}")
    out = np.log(arr) - (arr - 1.0) / arr
    return float(out) if out.ndim == 0 else out


def best_of_n_means(proxy, gold, ns) -> tuple[np.ndarray, np.ndarray]:
    """Expected proxy and gold of the answer the proxy picks out of n, for each n in `ns`, from N >= max(ns)
    samples per prompt, exactly (no resampling): over every n-subset of a prompt's N samples, equally likely,
    the one with the highest proxy is the i-th smallest with probability C(i-1, n-1) / C(N, n).

    proxy, gold: [P, N] scores of N samples of each of P prompts; ns: the n to report. Returns (proxy [len(ns)],
    gold [len(ns)]), each the mean over prompts. Ties in the proxy are broken by sample order."""
    proxy = np.asarray(proxy, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if proxy.ndim != 2 or proxy.shape != gold.shape:
        raise ValueError(f"best_of_n_means: proxy and gold must both be [prompts, samples], got {proxy.shape} "
                         f"and {gold.shape}")
    n_samples = proxy.shape[1]
    order = np.argsort(proxy, axis=1, kind="stable")
    p_sorted = np.take_along_axis(proxy, order, axis=1)
    g_sorted = np.take_along_axis(gold, order, axis=1)
    out_p, out_g = [], []
    for n in ns:
        if not 1 <= int(n) <= n_samples:
            raise ValueError(f"best_of_n_means: n = {n} needs 1 <= n <= {n_samples} (the samples per prompt)")
        w = _max_weights(int(n), n_samples)
        out_p.append(float((p_sorted @ w).mean()))
        out_g.append(float((g_sorted @ w).mean()))
    return np.array(out_p), np.array(out_g)


def _max_weights(n: int, big_n: int) -> np.ndarray:
    """P(the maximum of a uniform n-subset of ranks 1..N is rank i) = C(i-1, n-1) / C(N, n), i = 1..N, in logs
    (C(64, 32) is 1.8e18: exact in floats only by luck)."""
    i = np.arange(1, big_n + 1, dtype=np.float64)
    log_c = np.full(big_n, -np.inf)
    ok = i >= n
    lg = np.vectorize(math.lgamma)
    log_c[ok] = lg(i[ok]) - lg(n) - lg(i[ok] - n + 1)  # log C(i-1, n-1)
    log_total = math.lgamma(big_n + 1) - math.lgamma(n + 1) - math.lgamma(big_n - n + 1)
    w = np.exp(log_c - log_total)
    return w / w.sum()
