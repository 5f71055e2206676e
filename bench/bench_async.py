"""Asynchronous rollouts against the synchronous loop, side by side in one run: iterations and answers per
second with --ppo.max_staleness 0, 1, 2 and 4, and the built-in task's win rate against SFT with each
off-policy correction.

    python -m bench.bench_async                 # about 30 minutes on 2 CPU cores
    python -m bench.bench_async --rounds 1 --iterations 4 --ppo-iterations 30   # a quick look (not saved)

Two jobs, each `python -m engine ppo` in its own process on a copy of one base directory:
  26M        the built-in Llama at hidden 512, 8 layers, 128 positions (25.8M parameters, one step of each
             earlier stage: for speed only), GRPO against the task's exact-answer function (no reward model
             pass), 8 prompts x 4 answers of up to 96 tokens, one optimizer step per batch; k = 0, 1, 2, 4 in
             turn in each round (A B C D A B C D), and each k's ratio to k = 0 in the same round
  built-in   the built-in pipeline's PPO (its model, 250 iterations x 64 answers, critic, KL in the reward),
             judged on the 600 held-out prompts by the held-out labelers (bench_estimators.judge); k = 0 with
             --run.seed 0 and 1 (the synchronous run's noise), then k = 1, 2, 4 with each correction
Throughput: the iterations after the first (whose time includes the engine process's start) over the sum of
their time/step; answers per second = that x answers per iteration. With k > 0 the engine runs in its own
process, its cores as --cores says (default follow, the CLI's default; the built-in runs use it too); with
k = 0 the loop uses both cores for each phase in turn.
Results: bench/results/<device>/async.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from .bench_estimators import builtin_base, engine, judge
from .harness import provenance, write_rows

KS = (0, 1, 2, 4)
CORRECTIONS = ("decoupled", "tis")
MODEL_26M = ["--model.hidden_size", "512", "--model.num_heads", "8", "--model.num_layers", "8",
             "--model.intermediate_size", "1408", "--model.max_positions", "128"]
GRPO_26M = ["--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "4", "--ppo.rollout_batch", "8",
            "--ppo.minibatch", "32", "--ppo.epochs", "1", "--ppo.kl_coef", "0", "--rollout.max_new_tokens", "96",
            "--reward.fn", "engine.task.rewards:exact_answer"]
COMMON = ["--run.progress", "false", "--ppo.eval_every", "0", "--ppo.checkpoint_every", "1000"]


def copy_base(base: Path, to: Path) -> Path:
    if to.exists():
        shutil.rmtree(to)
    shutil.copytree(base, to, ignore=lambda d, names: [n for n in names if d == str(base) and n.startswith("ppo")])
    return to


def throughput(run: Path, answers: int) -> dict:
    """Iterations and answers per second after the first iteration, phase medians, the weights' statistics."""
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steady = [r["time/step"] for r in rows[1:]]
    its = len(steady) / sum(steady)
    out = {"iterations_per_s": its, "answers_per_s": its * answers,
           "staleness_max": max(r.get("staleness", 0) for r in rows),
           "response_len": statistics.mean(r["response_len"] for r in rows)}
    for key in ("is_ess", "is_weight_max", "is_truncated"):
        if key in rows[-1]:
            out[key] = statistics.mean(r[key] for r in rows)
    for key in ("time/generate", "engine_generate_s", "time/wait", "time/update"):
        vals = [r[key] for r in rows[1:] if key in r]
        if vals:
            out[key.replace("time/", "") + ("" if key.endswith("_s") else "_s")] = statistics.median(vals)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_async", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the 26M job (each k once per round)")
    ap.add_argument("--iterations", type=int, default=10, help="iterations of each 26M run")
    ap.add_argument("--ppo-iterations", type=int, default=250, help="iterations of each built-in run")
    ap.add_argument("--cores", nargs="+", default=["follow"], choices=["split", "shared", "follow"],
                    help="--rollout.engine_cores of the 26M job's k > 0 runs (each one every round)")
    ap.add_argument("--no-builtin", action="store_true",
                    help="the 26M job only (saved as async-cores.{md,json})")
    ap.add_argument("--work", help="a directory for the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="async-"))
    quiet = ["--run.resume", "true", "--run.progress", "false"]
    rows = []
    big = work / "base-26m"
    if not (big / "rm" / "final").is_dir():
        engine(["pretrain", "--out", str(big), *quiet, *MODEL_26M, "--pretrain.steps", "1"])
        engine(["sft", "--out", str(big), *quiet, "--sft.steps", "1"])
        engine(["rm", "--out", str(big), *quiet, "--rm.steps", "1"])
    for round_ in range(args.rounds):
        for k, cores in [(0, "")] + [(k, c) for c in args.cores for k in KS[1:]]:
            run = copy_base(big, work / f"26m-k{k}")
            seconds, peak = engine(["ppo", "--out", str(run), "--ppo.iterations", str(args.iterations), *COMMON,
                                    *GRPO_26M, "--ppo.max_staleness", str(k),
                                    *(["--rollout.engine_cores", cores] if k else [])])
            rows.append({"job": "26M", "round": round_, "k": k, "cores": cores, "correction": "decoupled" if k else "",
                         "seconds": seconds, "peak_rss_mib": peak, **throughput(run, 32)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(run)
    if args.no_builtin:
        meta = provenance("python -m bench.bench_async " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                          "cpu")
        text = render(rows, meta)
        print(text)
        if args.rounds >= 2:
            print("saved", write_rows("async-cores", "cpu", meta, rows, text))
        return 0

    base = work / "base-builtin"
    cfg, data, sft, sft_answers = builtin_base(base)
    plan = [(0, "", 0), (0, "", 1)] + [(k, c, 0) for k in KS[1:] for c in CORRECTIONS]
    for k, correction, seed in plan:
        run = copy_base(base, work / f"builtin-k{k}-{correction}-{seed}")
        flags = ["--ppo.max_staleness", str(k), "--run.seed", str(seed)] + \
            (["--ppo.off_policy_correction", correction] if k else [])
        seconds, peak = engine(["ppo", "--out", str(run), "--ppo.iterations", str(args.ppo_iterations), *COMMON,
                                *flags])
        rows.append({"job": "built-in", "k": k, "correction": correction, "seed": seed, "seconds": seconds,
                     "peak_rss_mib": peak, **throughput(run, 64), **judge(run, "ppo", sft_answers, data, cfg, sft)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(run)

    meta = provenance("python -m bench.bench_async " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                      "cpu")
    text = render(rows, meta)
    print(text)
    if args.rounds >= 2 and args.ppo_iterations == 250:
        print("saved", write_rows("async", "cpu", meta, rows, text, plot))
    return 0


def ratios(rows: list[dict], cores: str) -> dict[int, list[float]]:
    """Each k's iterations per second over k = 0's in the same round (26M job, engine cores `cores`), in round
    order."""
    out: dict[int, list[float]] = {}
    for r in rows:
        if r["job"] == "26M" and r["k"] and r.get("cores", "split") == cores:
            sync = next(s for s in rows if s["job"] == "26M" and s["round"] == r["round"] and s["k"] == 0)
            out.setdefault(r["k"], []).append(r["iterations_per_s"] / sync["iterations_per_s"])
    return out


def _f(x, fmt=".2f") -> str:
    return "" if x is None else format(x, fmt)


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# Asynchronous rollouts: {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}: `{meta['command']}`", "",
             "## 25.8M parameters: GRPO, exact-answer reward, 8 prompts x 4 answers of up to 96 tokens", "",
             "k = 0 is the synchronous loop (both cores for each phase in turn); k > 0 the engine in its own process "
             "beside the trainer, batch t generated by the policy after max(t - k, 0) updates (decoupled "
             "correction). Each round runs every k once, in this order; vs k = 0: iterations "
             "per second over k = 0's in the same round. generate: the engine's seconds per batch (k = 0: the "
             "loop's generate phase, 2 threads; k > 0: 1 thread, overlapped); waits: the trainer idle for a batch; "
             "update: the optimizer step's seconds (k = 0: 2 threads; k > 0: as the placement gives).", "",
             "engine cores: split (one core each, pinned), shared (the trainer on both, the engine one thread "
             "anywhere) or follow (as shared, the trainer's threads dropping to one while the engine generates).", "",
             "| k | engine cores | round | iterations / s | answers / s | vs k = 0 | generate s | trainer waits s | "
             "update s | ESS | peak RSS MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    placements = list(dict.fromkeys(r.get("cores", "split") for r in rows if r["job"] == "26M" and r["k"]))
    rat = {c: ratios(rows, c) for c in placements}
    for r in (r for r in rows if r["job"] == "26M"):
        cores = r.get("cores", "split") if r["k"] else ""
        vs = f"{rat[cores][r['k']][r['round']]:.2f}x" if r["k"] else ""
        gen = r.get("engine_generate_s", r.get("generate_s"))
        lines.append(f"| {r['k']} | {cores} | {r['round'] + 1} | {r['iterations_per_s']:.3f} | "
                     f"{r['answers_per_s']:.1f} | {vs} | {_f(gen)} | {_f(r.get('wait_s'))} | {_f(r.get('update_s'))} | "
                     f"{_f(r.get('is_ess'), '.4f')} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Median per-round ratio to k = 0: " + "; ".join(
        f"{c}, k = {k}: {statistics.median(v):.2f}x ({', '.join(f'{x:.2f}' for x in v)})"
        for c in placements for k, v in rat[c].items()) + "."]
    if not any(r["job"] == "built-in" for r in rows):
        return "\n".join(lines + [""])
    lines += ["", "## The built-in task: PPO with its critic, 250 iterations x 64 answers", "",
        "Win rate against SFT on the 600 held-out prompts by the held-out labelers (ties half); k = 0 with two "
        "seeds gives the synchronous run's noise. ESS, truncated, max weight: the importance weights to the "
        "engine's log-probs, averaged over iterations (ESS as a fraction of the tokens).", "",
        "| k | correction | seed | win rate vs SFT | exact answers | KL to SFT | iterations / s | answers / s | "
        "ESS | truncated | max weight | minutes |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["job"] == "built-in"):
        lines.append(f"| {r['k']} | {r['correction'] or 'none (synchronous)'} | {r['seed']} | "
                     f"{100 * r['win_rate_vs_sft']:.1f}% | {100 * r['exact']:.1f}% | {r['kl_to_sft']:.2f} | "
                     f"{r['iterations_per_s']:.2f} | {r['answers_per_s']:.0f} | {_f(r.get('is_ess'), '.4f')} | "
                     f"{_f(100 * r['is_truncated'] if 'is_truncated' in r else None)} | "
                     f"{_f(r.get('is_weight_max'))} | {r['seconds'] / 60:.1f} |")
    lines += ["", "![async](async.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cores in dict.fromkeys(r.get("cores", "split") for r in rows if r["job"] == "26M" and r["k"]):
        rat = ratios(rows, cores)
        axes[0].plot(KS, [1.0] + [statistics.median(rat[k]) for k in KS[1:]], "o-", label=f"26M GRPO ({cores})")
    builtin = [r for r in rows if r["job"] == "built-in"]
    sync = statistics.mean(r["iterations_per_s"] for r in builtin if r["k"] == 0)
    for c in CORRECTIONS:
        pick = {r["k"]: r for r in builtin if r["correction"] == c}
        axes[0].plot(KS, [1.0] + [pick[k]["iterations_per_s"] / sync for k in KS[1:]], "s--",
                     label=f"built-in PPO ({c})")
        axes[1].plot(KS[1:], [pick[k]["win_rate_vs_sft"] for k in KS[1:]], "o-", label=c)
    for r in builtin:
        if r["k"] == 0:
            axes[1].axhline(r["win_rate_vs_sft"], color="gray", ls="--", lw=1)
    axes[0].set(xlabel="max_staleness k", ylabel="iterations / s vs k = 0", title="throughput")
    axes[1].set(xlabel="max_staleness k", ylabel="win rate vs SFT", title="built-in task (gray: k = 0, two seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
