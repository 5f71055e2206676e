"""The run's report: held-out labelers' win rates, RM accuracy beside labeler agreement, the alignment
tax, and training curves, as report.json, report.md and PNG plots."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.encode import Encoder
from ..models.loading import load_model
from ..overopt.track import gold_points, summarize
from ..rundir.atomic import write_text_atomic
from ..rundir.metrics import read_metrics
from .evaluate import answer_quality, corpus_loss, sample_answers, win_rate
from .people import write_response

POLICIES = (("pretrain", "Pretrained LM"), ("sft", "SFT"), ("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"), ("dpo", "DPO"),
            ("dpo_ipo", "IPO"), ("dpo_listwise", "Listwise DPO"))


def build_report(ctx) -> dict:
    """ctx: a RunContext of the built-in task (ctx.task)."""
    data = ctx.task.data
    tok, insts, labelers = ctx.tokenizer, data.eval_prompts, data.heldout_labelers
    seed, max_tokens = ctx.cfg.eval.seed, ctx.cfg.rollout.max_new_tokens
    answers, losses, available = {}, {}, []
    for stage, _ in POLICIES:
        path = ctx.stage_dir(stage) / "final" / "policy"
        if not path.is_dir():
            continue
        policy = load_model(path, flag=f"the {stage} policy", scalar=False, device=ctx.device, run=ctx.cfg.run)
        answers[stage] = sample_answers(policy, tok, insts, temperature=ctx.cfg.eval.temperature,
                                        max_tokens=max_tokens, seed=seed)
        losses[stage] = corpus_loss(policy, tok, data.corpus_heldout)
        available.append(stage)
    if "sft" not in answers:
        raise FileNotFoundError(f"no SFT policy under {ctx.out}: run `python -m engine sft` first")
    rng = random.Random(f"demonstrator-eval-{seed}")
    answers["demonstrator"] = [(write_response(i, rng), True) for i in insts]
    rows = {}
    for stage in available + ["demonstrator"]:
        rows[stage] = {
            "vs_sft": win_rate(insts, answers[stage], answers["sft"], labelers, seed),
            "vs_demonstrator": win_rate(insts, answers[stage], answers["demonstrator"], labelers, seed),
            "quality": answer_quality(insts, answers[stage]),
            "corpus_loss": losses.get(stage),
        }
    rm_eval = json.loads((ctx.stage_dir("rm") / "eval.json").read_text()) if (ctx.stage_dir("rm") / "eval.json").exists() else {}
    rm_eval.update(_second_labeler(ctx))
    report = {
        "n_eval_prompts": len(insts),
        "ppo_vs_sft_win_rate": rows.get("ppo", {}).get("vs_sft", {}).get("win_rate"),
        "ptx_vs_sft_win_rate": rows.get("ppo_ptx", {}).get("vs_sft", {}).get("win_rate"),
        "dpo_vs_sft_win_rates": {s: rows[s]["vs_sft"]["win_rate"] for s in rows if s.startswith("dpo")},
        "rm_heldout_accuracy": rm_eval.get("rm_heldout_accuracy"),
        "labeler_agreement": data.labeler_agreement(),
        "alignment_tax_ppo": _tax(losses, "ppo"),
        "alignment_tax_ptx": _tax(losses, "ppo_ptx"),
        "corpus_loss": losses,
        "policies": rows,
        "rm": rm_eval,
        "gold_vs_proxy": {s: g for s in ("ppo", "ppo_ptx")
                          if (g := summarize(read_metrics(ctx.stage_dir(s) / "metrics.jsonl"))) is not None},
    }
    out = ctx.out
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    plots = draw_plots(out, rows)
    write_text_atomic(out / "report.md", render_markdown(report, plots, ctx.cfg))
    samples = [{"prompt": insts[j].prompt, **{s: answers[s][j][0] for s in answers}} for j in range(min(20, len(insts)))]
    write_text_atomic(out / "samples.json", json.dumps(samples, indent=2))
    return report


def _second_labeler(ctx) -> dict:
    """The RM's held-out accuracy against a second held-out labeler's rankings of the same samples: beside
    the labelers' agreement with each other, the ceiling it can approach."""
    path = ctx.stage_dir("rm") / "final" / "reward"
    if not path.is_dir():
        return {}
    from ..models.forward import SequenceScores
    from ..trainers.reward import pairwise_accuracy

    tok, enc = ctx.tokenizer, Encoder(ctx.tokenizer)
    rm = SequenceScores(load_model(path, flag="the reward model", scalar=True, device=ctx.device, run=ctx.cfg.run))
    rows = []
    for c in ctx.task.data.comparisons_heldout:
        p = enc.prompt(c["prompt"])
        rows.append({"prompt": p, "ranks": c["ranks_second"],
                     "responses": [enc.response(c["prompt"], r, len(p), f) for r, f in zip(c["responses"], c["finished"])]})
    return {"rm_heldout_accuracy_second_labeler": pairwise_accuracy(rm, rows, tok.pad_token_id)}


def _tax(losses: dict, stage: str):
    if stage in losses and "sft" in losses:
        return losses[stage] - losses["sft"]
    return None


def _fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def render_markdown(r: dict, plots: list[str], cfg) -> str:
    names = dict(POLICIES, demonstrator="Demonstrator (human baseline)")
    lines = [
        "# InstructGPT on the built-in task",
        "",
        f"Held-out labelers (never used in training) compared each policy's answer with the SFT policy's on "
        f"{r['n_eval_prompts']} held-out prompts (one sample each, temperature {cfg.eval.temperature}; ties "
        "count half).",
        "",
        f"- **PPO preferred over SFT: {_fmt(r['ppo_vs_sft_win_rate'], True)}**; PPO-ptx over SFT: "
        f"{_fmt(r['ptx_vs_sft_win_rate'], True)}" + "".join(
            f"; {names[s]} over SFT: {_fmt(w, True)}" for s, w in r.get("dpo_vs_sft_win_rates", {}).items()),
        f"- Reward model accuracy on held-out comparisons: {_fmt(r['rm_heldout_accuracy'], True)}; held-out "
        f"labelers' agreement with each other: {_fmt(r['labeler_agreement'], True)} (the ceiling it can approach)",
        f"- Alignment tax (held-out pretraining-corpus loss minus SFT's, nats/token): PPO "
        f"{_fmt(r['alignment_tax_ppo'])}, PPO-ptx {_fmt(r['alignment_tax_ptx'])}",
        "",
        "| policy | win rate vs SFT | win rate vs demonstrator | exact answers | polite opener | corpus loss |",
        "|---|---|---|---|---|---|",
    ]
    for stage, row in r["policies"].items():
        q = row["quality"]
        lines.append(f"| {names.get(stage, stage)} | {_fmt(row['vs_sft']['win_rate'], True)} | "
                     f"{_fmt(row['vs_demonstrator']['win_rate'], True)} | {_fmt(q['exact'], True)} | "
                     f"{_fmt(q['opener_sure'], True)} | {_fmt(row['corpus_loss'])} |")
    lines += _gold_lines(r.get("gold_vs_proxy", {}), names)
    lines += ["", "![training](training.png)", ""] if "training.png" in plots else []
    lines += ["![gold against proxy](gold_vs_proxy.png)", ""] if "gold_vs_proxy.png" in plots else []
    lines += ["![win rates](win_rates.png)", ""] if "win_rates.png" in plots else []
    return "\n".join(lines) + "\n"


def _gold_lines(tracks: dict, names: dict) -> list[str]:
    """Gold against proxy at PPO's evaluations (engine.overopt): where the gold peaked, how far it fell since,
    and Gao et al.'s RL curve fitted to it."""
    if not tracks:
        return []
    lines = ["", "## Gold against proxy (over-optimisation)", "",
             "At each evaluation, on the same held-out prompts: the held-out labelers' expected utility of the "
             "policy's answers (gold, which the reward model never saw) and the reward model's score (proxy), "
             "both as gains over the SFT policy, against d = sqrt(KL to SFT). Gold that falls while the proxy "
             "rises is over-optimisation (Gao et al. 2022); the fit is their R(d) = d (alpha - beta log d). The "
             "guard sees no gold: it stops where the proxy's gain per unit of d falls below a quarter of its "
             "first (engine/overopt/guard.py).", "",
             "| policy | evaluations | final d | final gold gain | final proxy gain | peak gold gain (d) | fell since "
             "| fit alpha, beta (R^2) | predicted peak d* | the guard would stop at d |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, t in tracks.items():
        fit, fin, peak = t["gold_fit"], t["final"], t["peak"]
        fitted = f"{fit['alpha']:.3f}, {fit['beta']:.3f} ({fit['r2']:.2f})" if fit else "n/a"
        star = f"{fit['peak_d']:.2f}" if fit and fit["peak_d"] is not None else "none (still rising)" if fit else "n/a"
        lines.append(f"| {names.get(stage, stage)} | {t['points']} | {fin['d']:.2f} | {fin['gold']:+.3f} | "
                     f"{_fmt(fin['proxy']) if fin['proxy'] is not None else 'n/a'} | {peak['gold']:+.3f} "
                     f"({peak['d']:.2f}) | {t['fell_by']:.3f} | {fitted} | {star} | "
                     f"{f'{g:.2f}' if (g := (t.get('guard') or {}).get('d')) is not None else 'no stop'} |")
    return lines


def _draw_gold(plt, out: Path) -> bool:
    """gold_vs_proxy.png: gold and proxy gains against d for PPO and PPO-ptx, with the fitted gold curve."""
    import numpy as np

    from ..overopt.scaling import fit_curve

    series = {s: gold_points(read_metrics(out / s / "metrics.jsonl")) for s in ("ppo", "ppo_ptx")}
    if not any(series.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage, pts in series.items():
        if not pts:
            continue
        label = "PPO" if stage == "ppo" else "PPO-ptx"
        d = [0.0] + [p["d"] for p in pts]
        for ax, key in zip(axes, ("gold", "proxy")):
            ys = [0.0] + [p[key] if p[key] is not None else float("nan") for p in pts]
            line, = ax.plot(d, ys, marker=".", ls="none", label=label)
            try:
                fit = fit_curve(d, ys, "rl")
                grid = np.linspace(0.0, max(d), 100)
                ax.plot(grid, fit(grid), color=line.get_color(), alpha=0.6, label=f"{label} fit (R^2 {fit.r2:.2f})")
            except ValueError:
                pass
    for ax, title in zip(axes, ("gold gain (held-out labelers)", "proxy gain (reward model)")):
        ax.set_title(title)
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_proxy.png", dpi=110)
    plt.close(fig)
    return True


def draw_plots(out: Path, rows: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    series = {s: read_metrics(out / s / "metrics.jsonl") for s in ("ppo", "ppo_ptx")}
    if any(series.values()):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (key, title) in zip(axes.flat, [("score", "RM score"), ("kl", "KL to SFT (per answer)"),
                                                ("vf_loss", "value loss"), ("win_rate_vs_sft", "win rate vs SFT")]):
            for stage, rows_ in series.items():
                pts = [(m["step"], m[key]) for m in rows_ if key in m]
                if pts:
                    ax.plot(*zip(*pts), marker="." if key == "win_rate_vs_sft" else None,
                            label="PPO" if stage == "ppo" else "PPO-ptx")
            ax.set_title(title)
            ax.set_xlabel("PPO iteration")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=110)
        plt.close(fig)
        drawn.append("training.png")
    if _draw_gold(plt, out):
        drawn.append("gold_vs_proxy.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [s for s in rows if s != "sft"]
    ax.bar(labels, [rows[s]["vs_sft"]["win_rate"] for s in labels], color="tab:blue")
    ax.axhline(0.5, color="gray", ls="--")
    ax.set_ylabel("win rate vs SFT (held-out labelers)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=110)
    plt.close(fig)
    drawn.append("win_rates.png")
    return drawn
