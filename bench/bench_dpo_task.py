"""DPO, IPO, listwise DPO and PPO on the built-in task, judged by its held-out labelers: win rates against SFT,
side by side, over several training seeds.

Per seed (`--run.seed`; the task's data are the same for every seed): `python -m engine pipeline --with_dpo true`
(pretrain, SFT, RM, PPO, PPO-ptx and DPO on the pairs), then `dpo --dpo.loss listwise` and `dpo --dpo.loss ipo`
from the same SFT policy, then `eval`: the held-out labelers compare each policy's answer with SFT's on the
task's 600 held-out prompts. Every setting is the engine's default: the three DPO losses see the same
comparisons in the same order (300 steps x 16 prompts, each with its 4-9 ranked answers: the RM's data and
budget), the sigmoid and IPO losses over every ranked pair of a prompt, the listwise loss over the whole
ranking; PPO samples 250 x 64 prompts against the RM trained on those comparisons.

    python -m bench.bench_dpo_task                 # seeds 0 1 2 -> bench/results/cpu-2core/dpo.{md,json,png}
    python -m bench.bench_dpo_task --seeds 0 --out DIR   # one seed, runs kept under DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = (("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"), ("dpo", "DPO (pairs)"), ("dpo_ipo", "IPO (pairs)"),
            ("dpo_listwise", "Listwise DPO (K-way)"))


def engine(*argv) -> None:
    done = subprocess.run([sys.executable, "-m", "engine", *argv, "--run.progress", "false"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"python -m engine {' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def one_seed(out: Path, seed: int) -> dict:
    engine("pipeline", "--out", str(out), "--run.seed", str(seed), "--with_dpo", "true")
    for loss in ("listwise", "ipo"):
        engine("dpo", "--out", str(out), "--run.seed", str(seed), "--dpo.loss", loss)
    engine("eval", "--out", str(out), "--run.seed", str(seed))
    report = json.loads((out / "report.json").read_text())
    rows = report["policies"]
    held = {s: json.loads((out / s / "eval.json").read_text()) for s, _ in POLICIES if s.startswith("dpo")}
    return {"seed": seed,
            "win_rate": {s: rows[s]["vs_sft"]["win_rate"] for s, _ in POLICIES},
            "exact": {s: rows[s]["quality"]["exact"] for s, _ in POLICIES + (("sft", "SFT"),)},
            "corpus_loss": {s: rows[s]["corpus_loss"] for s, _ in POLICIES + (("sft", "SFT"),)},
            "heldout_pair_accuracy": {**{s: held[s]["heldout_accuracy"] for s in held},
                                      "rm": report["rm_heldout_accuracy"]},
            "n_eval_prompts": report["n_eval_prompts"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    from .harness import provenance

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        runs = []
        for seed in args.seeds:
            runs.append(one_seed(root / f"seed{seed}", seed))
            print(json.dumps(runs[-1]["win_rate"]), flush=True)
    report = {"runs": runs, "provenance": provenance(" ".join(["python -m bench.bench_dpo_task",
                                                               *(argv or sys.argv[1:])]), "cpu")}
    dest = ROOT / "bench" / "results" / "cpu-2core"
    (dest / "dpo.json").write_text(json.dumps(report, indent=2))
    plot(report, dest / "dpo.png")
    (dest / "dpo.md").write_text(render(report))
    print(render(report))


def _mean(runs, key, stage):
    return statistics.mean(r[key][stage] for r in runs)


def render(report: dict) -> str:
    from .harness import provenance_line

    runs, p = report["runs"], report["provenance"]
    seeds = [r["seed"] for r in runs]
    lines = ["# DPO, IPO and listwise DPO against PPO on the built-in task", "",
             provenance_line(p), "",
             f"The held-out labelers (never used in training) compare each policy's answer with the SFT policy's on "
             f"{runs[0]['n_eval_prompts']} held-out prompts (ties count half); one row per policy, one column per "
             f"training seed. Every policy starts from the same run's SFT model; the DPO losses train on the RM's "
             f"comparisons with the RM's budget (300 steps x 16 prompts, each with all its 4-9 ranked answers), PPO "
             f"on 250 x 64 sampled prompts scored by that RM. Defaults throughout (DPO: beta 0.1, lr 1e-4).", "",
             "| policy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | exact answers (mean) | "
             "corpus loss (mean) | held-out pair accuracy (mean) |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for stage, name in POLICIES:
        acc = f"{100 * _mean(runs, 'heldout_pair_accuracy', stage):.1f}%" if stage.startswith("dpo") else "-"
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['win_rate'][stage]:.1f}%" for r in runs)
                     + f" | **{100 * _mean(runs, 'win_rate', stage):.1f}%** | "
                     f"{100 * _mean(runs, 'exact', stage):.1f}% | {_mean(runs, 'corpus_loss', stage):.3f} | {acc} |")
    lines += ["| SFT (reference point) | " + " | ".join("50.0%" for _ in runs) + " | 50.0% | "
              f"{100 * _mean(runs, 'exact', 'sft'):.1f}% | {_mean(runs, 'corpus_loss', 'sft'):.3f} | "
              f"RM: {100 * _mean(runs, 'heldout_pair_accuracy', 'rm'):.1f}% |", "",
              "Held-out pair accuracy: the fraction of the held-out comparisons' ranked pairs that the policy's "
              "implicit reward (beta x log-ratio to SFT) orders like the labeler; the RM's own accuracy beside it. "
              "Corpus loss: the held-out pretraining text's loss (nats/token), the alignment tax's measure.", "",
              "![win rates](dpo.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (stage, name) in enumerate(POLICIES):
        values = [r["win_rate"][stage] for r in runs]
        ax.bar(i, statistics.mean(values), color="tab:orange" if stage.startswith("dpo") else "tab:blue", alpha=0.7)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.axhline(0.5, color="gray", ls="--")
    ax.set_xticks(range(len(POLICIES)), [n for _, n in POLICIES], rotation=15)
    ax.set_ylabel("win rate vs SFT (held-out labelers)")
    ax.set_ylim(0.3, 1)
    ax.set_title("Built-in task: mean over seeds (bars) and each seed (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
