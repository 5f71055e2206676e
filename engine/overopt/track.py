"""A run's gold against proxy, from its metrics: the evaluations' (d, gold gain, proxy gain) with gains
measured from the initial policy's values, where the gold peaked and how far it fell since, and Gao et al.'s
RL curve fitted to each (engine.overopt.scaling)."""
from __future__ import annotations

import math
from dataclasses import asdict

from .guard import first_stop
from .scaling import fit_curve


def gold_points(rows: list[dict]) -> list[dict]:
    """The evaluations of a run's metrics rows that carry gold: [{"step", "d", "gold", "proxy"}], gold and proxy
    as gains over the initial policy's ("gold_sft", "proxy_sft"); proxy None where the run had no proxy."""
    out = []
    for m in rows:
        if "gold" not in m or "d_to_init" not in m:
            continue
        proxy = m["proxy"] - m["proxy_sft"] if "proxy" in m and "proxy_sft" in m else None
        out.append({"step": m["step"], "d": m["d_to_init"], "gold": m["gold"] - m["gold_sft"], "proxy": proxy})
    return out


def summarize(rows: list[dict]) -> dict | None:
    """{"points", "final", "peak", "fell_by", "guard", "gold_fit", "proxy_fit"} of a run's evaluations, None
    without any. fell_by: the gold gain lost from its peak to the last evaluation (0 when the last is the peak);
    guard: the evaluation where engine.overopt.guard (proxy and d only) would stop the run, or None;
    *_fit: Gao's RL curve through the points with the initial policy (d = 0, gain 0) as {"alpha", "beta",
    "r2", "peak_d"}, or None where it cannot be fitted (fewer than two distinct d > 0)."""
    pts = gold_points(rows)
    if not pts:
        return None
    peak = max(pts, key=lambda p: p["gold"])
    final = pts[-1]
    out = {"points": len(pts), "final": final, "peak": peak, "fell_by": peak["gold"] - final["gold"]}
    with_proxy = [p for p in pts if p["proxy"] is not None]
    stop = first_stop([(p["d"], p["proxy"]) for p in with_proxy])
    out["guard"] = with_proxy[stop] if stop is not None else None  # where the proxy-slope guard would stop
    for key in ("gold", "proxy"):
        usable = [p for p in pts if p[key] is not None and math.isfinite(p[key]) and math.isfinite(p["d"])]
        try:
            fit = fit_curve([0.0] + [p["d"] for p in usable], [0.0] + [p[key] for p in usable], "rl")
            out[f"{key}_fit"] = {k: v for k, v in asdict(fit).items() if k != "form"}
        except ValueError:
            out[f"{key}_fit"] = None
    return out
