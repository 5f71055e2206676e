"""Over-optimisation on the built-in task (issue 40): gold against proxy as PPO moves away from SFT, with a
single reward model and with an ensemble of 4 (mean, WCO, UWO), beside best-of-n from the SFT policy.

    python -m bench.bench_overopt                    # 3 seeds x 4 PPO runs of 150 iterations, ~40 min, 2 cores
    python -m bench.bench_overopt --iterations 30 --seeds 0   # a quick look (not for the record)

Per seed (--run.seed: the reward models' initialisation and data order, PPO's sampling; the task's data and
the pretrained and SFT policies, the first seed's, stay): rm as the built-in pipeline makes it; an ensemble
RM (`rm --rm.members 4`) from the same SFT policy; then PPO with a low KL coefficient (--kl_coef, default 0.01, where the single RM is
over-optimised) against each reward. Every --eval_every iterations the run logs (engine/task/gold.py) the gold
(the held-out labelers' expected utility, which no reward model saw), the proxy (the reward it trains on) and
d = sqrt(KL to SFT) on the first --prompts held-out prompts. Best-of-n: 64 SFT answers to each of the same
prompts, the answer with the best proxy kept (exact expectations over n-subsets, engine/overopt/scaling.py),
its KL to SFT log n - (n - 1)/n. Gao et al.'s RL and best-of-n curves are fitted to every run.
The guard (engine/overopt/guard.py) reads only what a run sees: it stops at the first evaluation where the
proxy's gain per unit of d since the last one falls below --guard_fraction of its first; it is scored
against the gold peak it never saw. The ensembles' spread is reported too (it did not grow: see the results).
Results: bench/results/<device>/overoptimization.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .harness import provenance, write_rows

NS = [1, 2, 4, 8, 16, 32, 64]


def engine(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "engine", *argv, "--run.progress", "false"],
                          stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"python -m engine {' '.join(argv)} failed")


def bases(work: Path, seed: int, first: int) -> tuple[Path, Path]:
    """(the single-RM base, the ensemble base) of one seed, made unless there. The pretrained and SFT policies
    are the first seed's for every seed: the seeds vary the reward models and PPO, what this bench is about."""
    single, ens = work / f"seed{seed}" / "single", work / f"seed{seed}" / "ensemble"
    flags = ["--run.seed", str(seed), "--run.resume", "true"]
    if seed != first and not (single / "sft" / "final").is_dir():
        shutil.rmtree(single, ignore_errors=True)
        source = work / f"seed{first}" / "single"
        for part in ("pretrain", "sft", "tokenizer", "data"):
            shutil.copytree(source / part, single / part)
    for stage in ("pretrain", "sft", "rm"):
        engine([stage, "--out", str(single), *flags])
    if not (ens / "rm" / "final").is_dir():
        shutil.rmtree(ens, ignore_errors=True)
        shutil.copytree(single, ens, ignore=lambda d, names: ["rm"] if d == str(single) else [])
        engine(["rm", "--out", str(ens), *flags, "--rm.members", "4"])
    return single, ens


def ppo_run(base: Path, run: Path, seed: int, flags: list[str], args) -> list[dict]:
    """PPO from `base` (a copy at `run`) -> its metrics rows."""
    if not (run / "ppo" / "final").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run, ignore=lambda d, names: [n for n in names if d == str(base) and
                                                           n.startswith("ppo")])
        engine(["ppo", "--out", str(run), "--run.seed", str(seed), "--ppo.iterations", str(args.iterations),
                "--ppo.kl_coef", str(args.kl_coef), "--ppo.eval_every", str(args.eval_every),
                "--ppo.eval_prompts", str(args.prompts), *flags])
    return [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


def best_of_n(single: Path, ens: Path, prompts: int, samples: int, modes: dict) -> dict:
    """{"n", "kl", "gold": {reward: [...]}, "proxy": {reward: [...]}} of best-of-n from the SFT policy, each
    reward picking its best of n (gains over n = 1)."""
    import torch

    from engine.config import Config
    from engine.models.batch import make_batch
    from engine.models.forward import SequenceScores
    from engine.models.loading import load_model, load_tokenizer
    from engine.overopt.ensemble import combine
    from engine.overopt.scaling import best_of_n_kl, best_of_n_means
    from engine.task import decode_response
    from engine.task.datasets import make_task_data
    from engine.task.evaluate import sample_tokens
    from engine.task.gold import expected_utility

    cfg = Config()
    data = make_task_data(cfg.task)
    insts = data.eval_prompts[:prompts]
    sft_path = single / "sft" / "final" / "policy"
    tok = load_tokenizer(sft_path)
    sft = load_model(sft_path, flag="sft", scalar=False)
    ids, responses = sample_tokens(sft, tok, insts * samples, temperature=cfg.eval.temperature,
                                   max_tokens=cfg.rollout.max_new_tokens, seed=cfg.eval.seed)
    gold = np.array([expected_utility([insts[k % prompts]], [decode_response(tok, r)], data.heldout_labelers)
                     for k, r in enumerate(responses)]).reshape(samples, prompts).T  # [P, N]
    scores = {}
    for name, path in (("single RM", single), ("ensemble", ens)):
        rm = SequenceScores(load_model(path / "rm" / "final" / "reward", flag="rm", scalar=True))
        parts = []
        with torch.no_grad():
            for i in range(0, len(ids), 256):
                parts.append(rm(make_batch(ids[i:i + 256], responses[i:i + 256], tok.pad_token_id), members=True))
        scores[name] = torch.cat(parts, dim=1)  # [M, P * N]
    out = {"n": NS, "kl": [best_of_n_kl(n) for n in NS], "gold": {}, "proxy": {}}
    for label, (source, mode) in modes.items():
        s = scores[source]
        proxy = (s[0] if mode is None else combine(s, mode[0], mode[1])).double().numpy()
        proxy = proxy.reshape(samples, prompts).T
        p, g = best_of_n_means(proxy, gold, NS)
        out["proxy"][label], out["gold"][label] = (p - p[0]).tolist(), (g - g[0]).tolist()
    return out


def scoring_cost(single: Path, ens: Path, reps: int = 15) -> dict:
    """Seconds to score one PPO batch (64 answers to the first 64 held-out prompts, from the SFT policy) with
    the single RM, the 4-head ensemble, and four separate single RMs one after the other (what an ensemble of
    separate models costs), alternated A B C A B C; medians and the per-round ratios to the single RM."""
    import time

    import torch

    from engine.config import Config
    from engine.models.batch import make_batch
    from engine.models.forward import SequenceScores
    from engine.models.loading import load_model, load_tokenizer
    from engine.task.datasets import make_task_data
    from engine.task.evaluate import sample_tokens

    cfg = Config()
    sft_path = single / "sft" / "final" / "policy"
    tok = load_tokenizer(sft_path)
    ids, responses = sample_tokens(load_model(sft_path, flag="sft", scalar=False), tok,
                                   make_task_data(cfg.task).eval_prompts[:64], temperature=1.0,
                                   max_tokens=cfg.rollout.max_new_tokens, seed=0)
    batch = make_batch(ids, responses, tok.pad_token_id)
    one = SequenceScores(load_model(single / "rm" / "final" / "reward", flag="rm", scalar=True))
    four = SequenceScores(load_model(ens / "rm" / "final" / "reward", flag="rm", scalar=True))
    variants = {"single RM": lambda: one(batch), "4 heads, one body": lambda: four(batch, members=True),
                "4 separate RMs, one after another": lambda: [one(batch) for _ in range(4)],
                "4 separate RMs, stacked (torch.func.vmap)": _stacked(one.scalar, batch)}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f()  # warm-up
        for _ in range(reps):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    base = times["single RM"]
    return {"batch": [len(ids), batch.input_ids.shape[1]], "threads": torch.get_num_threads(),
            **{k: {"median_s": float(np.median(v)),
                   "ratio_median": float(np.median([a / b for a, b in zip(v, base)])),
                   "ratio_range": [float(min(a / b for a, b in zip(v, base))),
                                   float(max(a / b for a, b in zip(v, base)))]} for k, v in times.items()}}


def _stacked(model, batch):
    """Four copies of `model`'s parameters stacked and run in one call (torch.func.vmap over
    functional_call): what batching separate members costs; timing only (the copies are the same model)."""
    import copy

    import torch
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state([model] * 4)
    skeleton = copy.deepcopy(model).to("meta")

    def one(p, b):
        return functional_call(skeleton, (p, b), (batch.input_ids,), {"attention_mask": batch.attention_mask}).logits
    run = torch.vmap(one, in_dims=(0, 0))
    return lambda: run(params, buffers)


def summarize(name: str, seed: int, rows: list[dict], fraction: float) -> dict:
    from engine.overopt.guard import first_stop
    from engine.overopt.track import summarize as track

    t = track(rows)
    evals = [r for r in rows if "gold" in r]
    out = {"run": name, "seed": seed, "final_gold": t["final"]["gold"], "final_proxy": t["final"]["proxy"],
           "final_d": t["final"]["d"], "peak_gold": t["peak"]["gold"], "peak_d": t["peak"]["d"],
           "peak_step": t["peak"]["step"], "fell_by": t["fell_by"], "fit": t["gold_fit"],
           "final_win_rate": evals[-1]["win_rate_vs_sft"], "peak_win_rate": max(r["win_rate_vs_sft"] for r in evals),
           "curve": [{k: p[k] for k in ("step", "d", "gold", "proxy")} for p in _points(rows)]}
    curve = out["curve"]
    stop = first_stop([(p["d"], p["proxy"]) for p in curve], fraction)
    at = curve[stop] if stop is not None else None
    out["guard"] = {"step": at["step"] if at else None, "d": at["d"] if at else None,
                    "gold": at["gold"] if at else None,
                    "within_20pct": bool(at and abs(at["d"] - out["peak_d"]) <= 0.2 * out["peak_d"])}
    if "reward_spread" in rows[0]:
        spread = [r["reward_spread"] for r in rows]
        out["spread_first_last_10"] = [sum(spread[:10]) / 10, sum(spread[-10:]) / 10]
    return out


def _points(rows):
    from engine.overopt.track import gold_points

    return gold_points(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_overopt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--kl_coef", type=float, default=0.01)
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts of every evaluation")
    ap.add_argument("--uwo_lambda", type=float, default=10.0,
                    help="the members disagree by about 0.03 (std) at the start: lambda 10 makes their variance "
                         "count once they disagree ten times more")
    ap.add_argument("--guard_fraction", type=float, default=0.25,
                    help="the guard stops where the proxy's gain per unit of d falls below this share of its first")
    ap.add_argument("--work", help="a directory for the runs, reused when given (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="overopt-"))
    runs = {"single RM": (False, []), "ensemble mean": (True, ["--reward.ensemble", "mean"]),
            "ensemble WCO": (True, ["--reward.ensemble", "wco"]),
            "ensemble UWO": (True, ["--reward.ensemble", "uwo", "--reward.uwo_lambda", str(args.uwo_lambda)])}
    modes = {"single RM": ("single RM", None), "ensemble mean": ("ensemble", ("mean", 0.0)),
             "ensemble WCO": ("ensemble", ("wco", 0.0)), "ensemble UWO": ("ensemble", ("uwo", args.uwo_lambda))}
    rows, bon = [], []
    for seed in args.seeds:
        single, ens = bases(work, seed, args.seeds[0])
        for name, (use_ens, flags) in runs.items():
            tag = f"{name}-{args.iterations}it-kl{args.kl_coef}-e{args.eval_every}-p{args.prompts}".replace(" ", "-")
            if name == "ensemble UWO":
                tag += f"-l{args.uwo_lambda}"
            metrics = ppo_run(ens if use_ens else single, work / f"seed{seed}" / tag, seed, flags, args)
            row = summarize(name, seed, metrics, args.guard_fraction)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            rows.append(row)
        bon.append({"seed": seed, **best_of_n(single, ens, args.prompts, 64, modes)})
    meta = provenance("python -m bench.bench_overopt " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                      "cpu")
    meta.update(vars(args) | {"work": None})
    single, ens = bases(work, args.seeds[0], args.seeds[0])
    cost = scoring_cost(single, ens)
    print(json.dumps(cost), flush=True)
    result = {"runs": rows, "best_of_n": bon, "scoring": cost}
    text = render(result, meta)
    print(text)
    if args.iterations == 150 and len(args.seeds) >= 3:
        print("saved", write_rows("overoptimization", "cpu", meta, [result], text, plot))
    return 0


def _stats(values, pct: bool = False) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    if pct:
        return f"{100 * np.mean(v):.1f}% ({100 * min(v):.1f}-{100 * max(v):.1f}%)"
    return f"{np.mean(v):+.3f} ({min(v):+.3f} to {max(v):+.3f})"


def render(result: dict, meta: dict) -> str:
    from engine.overopt.scaling import fit_curve

    runs, bon = result["runs"], result["best_of_n"]
    names = list(dict.fromkeys(r["run"] for r in runs))
    lines = ["# Over-optimisation on the built-in task: gold against proxy", "",
             f"{meta['date']}, commit {meta['commit']}, {meta.get('cpu')}, torch {meta['torch']}, "
             f"`{meta['command']}`.", "",
             f"PPO (GAE critic) with --ppo.kl_coef {meta['kl_coef']} for {meta['iterations']} iterations of 64 answers, "
             f"seeds {meta['seeds']}; every {meta['eval_every']} iterations gold (the held-out labelers' expected "
             f"utility), proxy (the reward trained on) and d = sqrt(KL to SFT) on {meta['prompts']} held-out "
             "prompts. Gains are over the SFT policy's own values. UWO: lambda "
             f"{meta['uwo_lambda']}. Mean over seeds (range).", "",
             "| reward | final gold gain | peak gold gain | d at the peak | final d | gold lost since the peak | "
             "final win rate vs SFT | peak win rate | Gao RL fit R^2 (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = [r for r in runs if r["run"] == n]
        r2 = [r["fit"]["r2"] for r in rs if r["fit"]]
        lines.append(f"| {n} | {_stats(r['final_gold'] for r in rs)} | {_stats(r['peak_gold'] for r in rs)} | "
                     f"{np.mean([r['peak_d'] for r in rs]):.2f} | {np.mean([r['final_d'] for r in rs]):.2f} | "
                     f"{_stats(r['fell_by'] for r in rs)} | {_stats((r['final_win_rate'] for r in rs), True)} | "
                     f"{_stats((r['peak_win_rate'] for r in rs), True)} | {np.median(r2) if r2 else float('nan'):.2f} |")
    spreads = [r["spread_first_last_10"] for r in runs if "spread_first_last_10" in r]
    if spreads:
        lines += ["", f"The ensemble's members' spread (std per answer), mean over the ensemble runs: "
                  f"{np.mean([a for a, _ in spreads]):.4f} over the first 10 iterations, "
                  f"{np.mean([b for _, b in spreads]):.4f} over the last 10."]
    lines += ["", "Gao et al.'s RL law fitted to each run's gold gain against d (the origin included):", "",
              "| reward | seed | alpha | beta | R^2 | predicted peak d* | observed peak d |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["fit"]
        if f:
            star = f"{f['peak_d']:.2f}" if f["peak_d"] is not None else "none"
            lines.append(f"| {r['run']} | {r['seed']} | {f['alpha']:.3f} | {f['beta']:.3f} | {f['r2']:.2f} | {star} | "
                         f"{r['peak_d']:.2f} |")
    lines += ["", "Best-of-n from the SFT policy (64 samples per prompt, exact expectations over n-subsets; KL = "
              "log n - (n-1)/n), gold gain of the answer each reward picks, mean over seeds:", "",
              "| n | d | " + " | ".join(bon[0]["gold"]) + " |", "|---|---|" + "---|" * len(bon[0]["gold"])]
    for i, n in enumerate(bon[0]["n"]):
        lines.append(f"| {n} | {math.sqrt(bon[0]['kl'][i]):.2f} | " + " | ".join(
            f"{np.mean([b['gold'][k][i] for b in bon]):+.3f}" for k in bon[0]["gold"]) + " |")
    for k in bon[0]["gold"]:
        d = [math.sqrt(x) for x in bon[0]["kl"]]
        g = [np.mean([b["gold"][k][i] for b in bon]) for i in range(len(d))]
        try:
            f = fit_curve(d, g, "bon")
            lines.append(f"\nBest-of-n, {k}: Gao's best-of-n fit alpha {f.alpha:.3f}, beta {f.beta:.3f}, R^2 {f.r2:.2f}.")
        except ValueError:
            pass
    cost = result["scoring"]
    lines += ["", f"Scoring one PPO batch ({cost['batch'][0]} answers, {cost['batch'][1]} tokens wide; "
              f"{cost['threads']} threads; rounds alternated, median of 15, ratio to the single RM per round):", "",
              "| scoring | median ms | ratio to one RM (range) |", "|---|---|---|"]
    for k, v in cost.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {1000 * v['median_s']:.1f} | {v['ratio_median']:.2f}x "
                         f"({v['ratio_range'][0]:.2f}-{v['ratio_range'][1]:.2f}) |")
    guarded = [r for r in runs if "guard" in r]
    if guarded:
        hits = sum(r["guard"]["within_20pct"] for r in guarded)
        lines += ["", f"The guard (stop where the proxy's gain per unit of d falls below {meta['guard_fraction']} of its "
                  f"first; no gold given to it) stopped within 20% of the gold peak's d in {hits} of {len(guarded)} "
                  "runs:", "",
                  "| reward | seed | guard stop (step, d) | gold peak (step, d) | gold at the stop |", "|---|---|---|---|---|"]
        for r in guarded:
            g = r["guard"]
            stop = f"{g['step']}, {g['d']:.2f}" if g["step"] is not None else "never"
            lines.append(f"| {r['run']} | {r['seed']} | {stop} | {r['peak_step']}, {r['peak_d']:.2f} | "
                         f"{g['gold']:+.3f} |" if g["gold"] is not None else
                         f"| {r['run']} | {r['seed']} | {stop} | {r['peak_step']}, {r['peak_d']:.2f} | n/a |")
    return "\n".join(lines + ["", "![gold and proxy against d](overoptimization.png)", ""])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(dict.fromkeys(r["run"] for r in result["runs"]), ("tab:red", "tab:blue", "tab:green",
                                                                         "tab:purple")))
    for r in result["runs"]:
        d = [0.0] + [p["d"] for p in r["curve"]]
        for ax, key in zip(axes, ("gold", "proxy")):
            ax.plot(d, [0.0] + [p[key] for p in r["curve"]], color=colors[r["run"]], alpha=0.6, lw=1,
                    label=r["run"] if r["seed"] == result["runs"][0]["seed"] else None)
    bon = result["best_of_n"]
    d = [math.sqrt(x) for x in bon[0]["kl"]]
    for k in bon[0]["gold"]:
        for ax, key in zip(axes, ("gold", "proxy")):
            ax.plot(d, [np.mean([b[key][k][i] for b in bon]) for i in range(len(d))], color=colors[k], ls="--",
                    marker="o", ms=3, label=f"best-of-n, {k}" if key == "gold" else None)
    for ax, title in zip(axes, ("gold gain (held-out labelers' expected utility)", "proxy gain (the reward trained on)")):
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.set_title(title)
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
