"""PPO against the critic-free estimators on the built-in task, each with the reward model and with the
task's verifiable reward (exact answers), at the same number of generated answers: the held-out labelers'
win rate against SFT, the exact-answer rate, the KL to SFT, wall time and peak memory.

    python -m bench.bench_estimators                  # about 15 minutes on 2 CPU cores
    python -m bench.bench_estimators --iterations 20  # a quicker look (not for the record)

One SFT policy and RM (the built-in pipeline's pretrain, sft, rm) serve every run; each run is
`python -m engine ppo` in its own process (its peak resident memory is that process's), on a copy of that
directory. Every estimator sees 64 answers per iteration: PPO and REINFORCE++ one answer to each of 64
prompts, the group estimators four answers to each of 16. Each uses its usual settings: PPO with the KL
in the reward; GRPO with DeepSeekMath's KL term in the loss (0.04) and per-answer token means; Dr. GRPO
with neither the std nor the length normalisation and no KL; RLOO and REINFORCE++ with the KL in the
reward, as TRL and OpenRLHF run them. Results: bench/results/<device>/estimators.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import provenance, write_rows

ESTIMATORS = {  # name -> the flags that make it, at 64 answers per iteration
    "PPO": ["--ppo.advantage_estimator", "gae"],
    "GRPO": ["--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "4", "--ppo.rollout_batch", "16",
             "--ppo.kl_coef", "0", "--ppo.kl_loss_coef", "0.04", "--ppo.loss_agg", "seq-mean-token-mean"],
    "Dr. GRPO": ["--ppo.advantage_estimator", "drgrpo", "--ppo.samples_per_prompt", "4", "--ppo.rollout_batch",
                 "16", "--ppo.kl_coef", "0", "--ppo.loss_agg", "seq-mean-token-sum-norm"],
    "RLOO": ["--ppo.advantage_estimator", "rloo", "--ppo.samples_per_prompt", "4", "--ppo.rollout_batch", "16"],
    "REINFORCE++": ["--ppo.advantage_estimator", "reinforce_pp"],
}
REWARDS = {"RM": [], "exact answers": ["--reward.fn", "engine.task.rewards:exact_answer"]}


def engine(argv: list[str]) -> tuple[float, float]:
    """`python -m engine ARGV` in its own process -> (wall seconds, peak resident MiB). The peak is GNU time's
    (%M) of the engine's process alone: a child's own rusage would count the pages it shares with this
    process between its fork and its exec."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, "-m", "engine", *argv],
                              stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"python -m engine {' '.join(argv)} failed")
        return seconds, int(rss.read().split()[-1]) / 1024


def builtin_base(base: Path):
    """The built-in pipeline's pretrain, sft and rm in `base` (made unless there), and what judging against its
    SFT policy needs -> (cfg, data, sft model, sft's answers to the held-out prompts)."""
    from engine.config import Config
    from engine.models.loading import load_model, load_tokenizer
    from engine.task.datasets import make_task_data
    from engine.task.evaluate import sample_answers

    if not (base / "rm" / "final").is_dir():
        for stage in ("pretrain", "sft", "rm"):
            engine([stage, "--out", str(base), "--run.resume", "true", "--run.progress", "false"])
    cfg = Config()
    data = make_task_data(cfg.task)
    sft_path = base / "sft" / "final" / "policy"
    sft = load_model(sft_path, flag="sft", scalar=False)
    sft_answers = sample_answers(sft, load_tokenizer(sft_path), data.eval_prompts, temperature=cfg.eval.temperature,
                                 max_tokens=cfg.rollout.max_new_tokens, seed=cfg.eval.seed)
    return cfg, data, sft, sft_answers


@torch.no_grad()
def judge(run_dir: Path, stage: str, sft_answers, data, cfg, sft) -> dict:
    """Win rate against SFT (held-out labelers), exact-answer rate, and the KL to SFT on the policy's own
    answers to the held-out prompts (sum over each answer's tokens of log pi - log pi_SFT, averaged)."""
    from engine.models.batch import make_batch
    from engine.data.encode import Encoder
    from engine.models.loading import load_model, load_tokenizer
    from engine.models.forward import PolicyLogprobs
    from engine.rollout import HFRollout
    from engine.task.evaluate import answer_quality, sample_answers, win_rate

    path = run_dir / stage / "final" / "policy"
    tok = load_tokenizer(path)
    policy = load_model(path, flag=stage, scalar=False)
    insts, kw = data.eval_prompts, dict(temperature=cfg.eval.temperature, max_tokens=cfg.rollout.max_new_tokens,
                                        seed=cfg.eval.seed)
    answers = sample_answers(policy, tok, insts, **kw)
    enc = Encoder(tok)
    prompts = [enc.prompt(i.prompt) for i in insts]
    results = HFRollout(policy, seed=cfg.eval.seed, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id).generate(prompts, max_tokens=cfg.rollout.max_new_tokens)
    batch = make_batch(prompts, [r.token_ids for r in results], tok.pad_token_id)
    kl = ((PolicyLogprobs(policy)(batch) - PolicyLogprobs(sft)(batch)) * batch.response_mask).sum(1).mean().item()
    return {"win_rate_vs_sft": win_rate(insts, answers, sft_answers, data.heldout_labelers, cfg.eval.seed)["win_rate"],
            "exact": answer_quality(insts, answers)["exact"], "kl_to_sft": kl}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_estimators", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=250, help="PPO iterations of each run (64 answers each)")
    ap.add_argument("--work", help="a directory for the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    from engine.task.evaluate import answer_quality

    work = Path(args.work or tempfile.mkdtemp(prefix="estimators-"))
    base = work / "base"
    common = ["--run.progress", "false"]
    cfg, data, sft, sft_answers = builtin_base(base)
    rows = [{"estimator": "SFT", "reward": "", "win_rate_vs_sft": 0.5,
             "exact": answer_quality(data.eval_prompts, sft_answers)["exact"], "kl_to_sft": 0.0}]
    for reward, reward_flags in REWARDS.items():
        for name, flags in ESTIMATORS.items():
            run = work / f"{name}-{reward}".replace(" ", "_").replace(".", "").replace("+", "p")
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(base, run, ignore=lambda d, names: [n for n in names if d == str(base) and
                                                                   n.startswith("ppo")])
            seconds, peak = engine(["ppo", "--out", str(run), "--ppo.iterations", str(args.iterations),
                                    "--ppo.eval_every", "0", *common, *flags, *reward_flags])
            row = {"estimator": name, "reward": reward, "seconds": round(seconds, 1), "peak_rss_mib": round(peak),
                   "value_model": name == "PPO", **judge(run, "ppo", sft_answers, data, cfg, sft)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = provenance("python -m bench.bench_estimators " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                      "cpu")
    meta.update(iterations=args.iterations, answers_per_iteration=64)
    text = render(rows, meta)
    print(text)
    if args.iterations == 250:
        print("saved", write_rows("estimators", "cpu", meta, rows, text, plot))
    return 0


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Estimators on the built-in task", "",
             f"Date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}; {meta.get('cpu')}, "
             f"{meta['threads']} threads.", "", f"Command: `{meta['command']}`", "",
             f"Each run: {meta['iterations']} iterations x {meta['answers_per_iteration']} answers from the same SFT "
             "policy; judged on 600 held-out prompts by the held-out labelers (win rate against SFT, ties half). "
             "KL to SFT: nats per answer on the policy's own answers.", "",
             "| estimator | reward | win rate vs SFT | exact answers | KL to SFT | minutes | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['reward']} | {100 * r['win_rate_vs_sft']:.1f}% | "
                     f"{100 * r['exact']:.1f}% | {r['kl_to_sft']:.2f} | "
                     f"{r['seconds'] / 60:.1f} | {r['peak_rss_mib']} |" if "seconds" in r else
                     f"| {r['estimator']} | | 50.0% | {100 * r['exact']:.1f}% | 0 | | |")
    return "\n".join(lines + ["", "![estimators](estimators.png)", ""])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if "seconds" in r]
    names = list(dict.fromkeys(r["estimator"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "win_rate_vs_sft", "win rate vs SFT (held-out labelers)"),
                           (axes[1], "exact", "exact answers")):
        for k, reward in enumerate(REWARDS):
            vals = [next(r[key] for r in runs if r["estimator"] == n and r["reward"] == reward) for n in names]
            ax.bar([i + 0.4 * k for i in range(len(names))], vals, width=0.4, label=f"reward: {reward}")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(0.5, color="gray", ls="--", lw=1)
    axes[1].axhline(next(r["exact"] for r in rows if r["estimator"] == "SFT"), color="gray", ls="--", lw=1,
                    label="SFT")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
