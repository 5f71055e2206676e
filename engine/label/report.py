"""`python -m engine label report --session DIR`: what the people said, as report.json, report.md and
report.png in the session folder.

Blind comparisons: for each pair of policies, the first one's win rate against the second, the pair oriented
as `label compare --policies` listed them (the policy under test first; ties count half, InstructGPT's rule),
with a 95% confidence interval (normal approximation on the per-judgment scores 1, 0.5, 0: mean +- 1.96
standard errors), overall and per labeler. Agreement, on the items two or more labelers did:
the paper's pairwise agreement (the share of labeler pairs x response pairs ordered the same way; for A/B,
the same verdict) and Krippendorff's alpha (ordinal on each response's place in the ranking; nominal on A/B
verdicts), computed by the `krippendorff` package. Per labeler: items done, median seconds per item, and
agreement with the others, to spot a careless labeler.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..rundir.atomic import write_bytes_atomic, write_text_atomic

Z95 = 1.959963984540054


def win_rate(scores: list[float]) -> dict:
    """scores: 1 (a won), 0.5 (tie), 0 (b won) -> {"n", "win_rate", "ci95": [low, high]} (the interval is
    [nan, nan] for fewer than two judgments)."""
    n = len(scores)
    if n == 0:
        return {"n": 0, "win_rate": None, "ci95": [None, None]}
    mean = sum(scores) / n
    if n < 2:
        return {"n": n, "win_rate": mean, "ci95": [None, None]}
    half = Z95 * statistics.stdev(scores) / math.sqrt(n)
    return {"n": n, "win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)]}


def compare_report(judgments: list[dict], order: list[str] = ()) -> dict:
    """Win rates per policy pair ("a vs b", a before b in `order`: --policies as given; a pair not in it keeps
    its items' order, which is --policies' too), overall and per labeler."""
    scores, by_labeler = defaultdict(list), defaultdict(lambda: defaultdict(list))
    rank, seen = {name: i for i, name in enumerate(order)}, {}
    for j in judgments:
        a, b = j["policies"]
        if a in rank and b in rank:
            a, b = (a, b) if rank[a] < rank[b] else (b, a)
        else:  # as the pair's first judgment lists it
            a, b = seen.setdefault(frozenset((a, b)), (a, b))
        score = 0.5 if j["winner"] is None else float(j["winner"] == a)
        scores[f"{a} vs {b}"].append(score)
        by_labeler[f"{a} vs {b}"][j["labeler"]].append(score)
    return {pair: {**win_rate(s), "ties": s.count(0.5), "per_labeler": {n: win_rate(v) for n, v in
                                                                          sorted(by_labeler[pair].items())}}
            for pair, s in sorted(scores.items())}


def _verdicts(records: list[dict], kind: str) -> dict:
    """{item: {labeler: what they said}}: the place of each response (rank), or the winner (compare)."""
    out = defaultdict(dict)
    for r in records:
        if kind == "rank":
            out[r["item"]][r["labeler"]] = {resp: place for place, resp in enumerate(r["ranking"])}
        else:
            out[r["item"]][r["labeler"]] = r["winner"]
    return out


def _agree(x, y, kind: str) -> tuple[int, int]:
    """(agreeing, compared) between two labelers' verdicts on one item."""
    if kind == "compare":
        return int(x == y), 1
    same = total = 0
    for i, j in itertools.combinations(sorted(x), 2):
        same += (x[i] < x[j]) == (y[i] < y[j])
        total += 1
    return same, total


def agreement(records: list[dict], kind: str) -> dict:
    """Pairwise agreement and Krippendorff's alpha over the items done by two or more labelers, and each
    labeler's agreement with the others."""
    import numpy as np
    import krippendorff

    items = {i: v for i, v in _verdicts(records, kind).items() if len(v) >= 2}
    same = total = 0
    per = defaultdict(lambda: [0, 0])
    for verdicts in items.values():
        for (la, x), (lb, y) in itertools.combinations(sorted(verdicts.items()), 2):
            s, t = _agree(x, y, kind)
            same, total = same + s, total + t
            for name in (la, lb):
                per[name][0] += s
                per[name][1] += t
    alpha = None
    if items:
        labelers = sorted({n for v in items.values() for n in v})
        units = [(i, resp) for i, v in items.items() for resp in (next(iter(v.values())) if kind == "rank" else [0])]
        codes = {}
        data = np.full((len(labelers), len(units)), np.nan)
        for col, (item, resp) in enumerate(units):
            for row, name in enumerate(labelers):
                if name in items[item]:
                    said = items[item][name]
                    data[row, col] = said[resp] if kind == "rank" else codes.setdefault(said, len(codes))
        if np.unique(data[~np.isnan(data)]).size > 1:
            alpha = float(krippendorff.alpha(reliability_data=data,
                                             level_of_measurement="ordinal" if kind == "rank" else "nominal"))
    return {"items": len(items), "pairwise": same / total if total else None, "krippendorff_alpha": alpha,
            "per_labeler": {n: s / t for n, (s, t) in sorted(per.items()) if t}}


def labelers(records: list[dict]) -> dict:
    by = defaultdict(list)
    for r in records:
        by[r["labeler"]].append(r.get("seconds"))
    return {n: {"done": len(s), "median_seconds": statistics.median([x for x in s if x is not None])
                if any(x is not None for x in s) else None} for n, s in sorted(by.items())}


def build_report(folder: str | Path) -> dict:
    from .session import Session

    session = Session.open(folder, write=False)
    try:
        kind = session.settings["kind"]
        records = session.comparisons.records if kind == "rank" else session.judgments.records
        report = {"kind": kind, "items": len(session.items), "records": len(records),
                  "skipped": len(session.skips.records), "agreement": agreement(records, kind),
                  "labelers": labelers(records)}
        if kind == "compare":
            source = session.settings.get("source")
            listed = source.get("policies") if isinstance(source, dict) else None  # --policies, in its order
            order = [n for n in listed if isinstance(n, str)] if isinstance(listed, (dict, list)) else []
            report["win_rates"] = compare_report(records, order)
    finally:
        session.close()
    folder = Path(folder)
    for name, agree in report["agreement"]["per_labeler"].items():
        report["labelers"].setdefault(name, {})["agreement_with_others"] = agree
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2))
    if kind == "compare" and report["win_rates"]:
        _plot(report["win_rates"], folder / "report.png")
    write_text_atomic(folder / "report.md", render(report))
    return report


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render(r: dict) -> str:
    lines = [f"# Labeling report ({r['kind']})", "",
             f"{r['records']} {'rankings' if r['kind'] == 'rank' else 'judgments'} of {r['items']} items, "
             f"{r['skipped']} skipped.", ""]
    if r["kind"] == "compare":
        lines += ["| pair | judgments | first's win rate (ties half) | 95% interval | ties |", "|---|---|---|---|---|"]
        for pair, w in r["win_rates"].items():
            lines.append(f"| {pair} | {w['n']} | **{_pct(w['win_rate'])}** | {_pct(w['ci95'][0])} - "
                         f"{_pct(w['ci95'][1])} | {w['ties']} |")
        lines += ["", "![win rates](report.png)", ""] if r["win_rates"] else []
        lines += ["Per labeler:", "", "| pair | labeler | judgments | first's win rate | 95% interval |",
                  "|---|---|---|---|---|"]
        for pair, w in r["win_rates"].items():
            for name, lw in w["per_labeler"].items():
                lines.append(f"| {pair} | {name} | {lw['n']} | {_pct(lw['win_rate'])} | {_pct(lw['ci95'][0])} - "
                             f"{_pct(lw['ci95'][1])} |")
        lines.append("")
    a = r["agreement"]
    alpha = "n/a" if a["krippendorff_alpha"] is None else f"{a['krippendorff_alpha']:.3f}"
    lines += [f"Agreement on the {a['items']} items two or more labelers did: pairwise {_pct(a['pairwise'])}, "
              f"Krippendorff's alpha {alpha}.",
              "", "| labeler | done | median seconds | agreement with the others |", "|---|---|---|---|"]
    for name, s in r["labelers"].items():
        sec = "n/a" if s.get("median_seconds") is None else f"{s['median_seconds']:.1f}"
        lines.append(f"| {name} | {s.get('done', 0)} | {sec} | {_pct(s.get('agreement_with_others'))} |")
    return "\n".join(lines) + "\n"


def _plot(win_rates: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(win_rates)
    rates = [win_rates[p]["win_rate"] for p in pairs]
    low = [r - (win_rates[p]["ci95"][0] if win_rates[p]["ci95"][0] is not None else r) for p, r in zip(pairs, rates)]
    high = [(win_rates[p]["ci95"][1] if win_rates[p]["ci95"][1] is not None else r) - r for p, r in zip(pairs, rates)]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(pairs)), 3.5))
    ax.bar(range(len(pairs)), rates, yerr=[low, high], capsize=6, color="tab:blue")
    ax.axhline(0.5, color="gray", ls="--")
    ax.set_xticks(range(len(pairs)), pairs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("first policy's win rate (95% CI)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())  # never through a name planted beside it
