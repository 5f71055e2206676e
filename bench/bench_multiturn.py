"""Multi-turn episodes (issue 39): does RL teach the model to use a tool, and how fast does an episode run?

    python -m bench.bench_multiturn success          # 3 seeds x (pretrain, SFT, GRPO sync, GRPO staleness 1)
    python -m bench.bench_multiturn success --seeds 0 --iterations 5   # a quick look (not for the record)

The built-in lookup task (engine/task/tools.py): "what color was the cat ?", whose colour is drawn per episode
and known only to the tool ("see cat" -> "the cat was blue"); reward 1 for exactly "the cat was blue". The
demonstrations call the tool in half the episodes and guess in the rest. Per seed (--run.seed: the pretrained
model, SFT's data order, RL's sampling; the task's files are the same): the built-in pretrain, SFT on the
demonstrations, then GRPO with the environment (--rollout.env engine.task.tools:Lookup, 3 turns at most) in
the synchronous loop and with --ppo.max_staleness 1. Success: the mean reward of one sampled episode
(temperature 1, as trained; the same seeds for every policy) on each of the held-out prompts, which no run
trained on. Results: bench/results/<device>/multiturn-success.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .harness import provenance, write_rows

ENV = "engine.task.tools:Lookup"


def engine(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "engine", *argv, "--run.progress", "false"],
                          stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"python -m engine {' '.join(argv)} failed")


def success(policy_dir: Path, prompts_file: Path, seed: int = 1234) -> dict:
    """{success, tool_calls, turns} of one sampled episode per held-out prompt with the policy at policy_dir."""
    import torch

    from engine.data.formats import load
    from engine.episodes import EpisodeSettings, run_episodes
    from engine.episodes.render import TurnRenderer
    from engine.models.loading import load_model, load_tokenizer
    from engine.rollout import HFRollout
    from engine.seeds import derive_seed
    from engine.task.tools import Lookup

    tok = load_tokenizer(policy_dir, "bench")
    model = load_model(policy_dir, flag="bench", scalar=False)
    records = load(prompts_file, "prompts")
    ids = [tok.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=True, return_dict=False)
           for r in records]
    engine = HFRollout(model, seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    settings = EpisodeSettings(max_turns=3, max_tokens=8, max_episode_tokens=24)
    with torch.no_grad():
        out = run_episodes(engine, Lookup, [r.prompt for r in records], [r.env for r in records], ids, n=1,
                           settings=settings, renderer=TurnRenderer(tok, 16),
                           seeds=[derive_seed(seed, "eval", i) for i in range(len(records))])
    return {"success": sum(r.episode.reward for r in out) / len(out),
            "tool_calls": sum(r.episode.turns > 1 for r in out) / len(out),
            "turns": sum(r.episode.turns for r in out) / len(out)}


def run_success(args) -> None:
    from engine.task.tools import write_tool_task

    work = Path(args.work or tempfile.mkdtemp(prefix="multiturn-"))
    files = write_tool_task(work / "data", seed=0, n_eval=args.eval_prompts)
    rows = []
    for seed in args.seeds:
        base = work / f"seed{seed}"
        flags = ["--run.seed", str(seed), "--run.resume", "true"]
        engine(["pretrain", "--out", str(base), *flags])
        sft_out = work / f"seed{seed}-sft"
        engine(["sft", "--out", str(sft_out), "--policy.path", str(base / "pretrain" / "final" / "policy"),
                "--data.demonstrations", str(files["demonstrations"]), "--sft.steps", str(args.sft_steps), *flags])
        sft_dir = sft_out / "sft" / "final" / "policy"
        row = {"seed": seed, "sft": success(sft_dir, files["eval_prompts"])}
        for name, extra in (("sync", []), ("staleness1", ["--ppo.max_staleness", "1"])):
            out = work / f"seed{seed}-{name}"
            engine(["ppo", "--out", str(out), "--policy.path", str(sft_dir), "--data.prompts", str(files["prompts"]),
                    "--rollout.env", ENV, "--rollout.max_turns", "3", "--rollout.max_new_tokens", "8",
                    "--rollout.max_episode_tokens", "24", "--ppo.advantage_estimator", "grpo",
                    "--ppo.iterations", str(args.iterations), "--ppo.rollout_batch", "16",
                    "--ppo.samples_per_prompt", "4", "--ppo.minibatch", "32", *extra, *flags])
            row[name] = success(out / "ppo" / "final" / "policy", files["eval_prompts"])
            metrics = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
            row[name]["train_success_first_last"] = [metrics[0]["episodes/env_reward"], metrics[-1]["episodes/env_reward"]]
            row[name]["seconds"] = sum(sum(v for k, v in m.items() if k.startswith("time/")) for m in metrics)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = provenance("python -m bench.bench_multiturn success " + shlex.join(sys.argv[2:]), "cpu")
    write_rows("multiturn-success", "cpu", meta, rows, report(rows, meta, args))


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def report(rows: list[dict], meta: dict, args) -> str:
    lines = [f"# Multi-turn episodes: the lookup task, SFT against GRPO ({meta['device']})", "",
             f"{meta['date']}, commit {meta['commit']}, {meta.get('cpu')}, torch {meta['torch']}, "
             f"`{meta['command']}`.", "",
             f"{args.eval_prompts} held-out prompts, one sampled episode each (temperature 1, 3 turns at most); "
             f"GRPO {args.iterations} iterations x 16 prompts x 4 episodes from each seed's SFT policy; mean of "
             f"{len(rows)} seeds (min..max).", "",
             "| policy | success | episodes with a tool call | turns per episode |", "|---|---|---|---|"]
    for name, label in (("sft", "SFT"), ("sync", "GRPO, synchronous"), ("staleness1", "GRPO, --ppo.max_staleness 1")):
        lines.append(f"| {label} | {_spread([r[name]['success'] for r in rows])} | "
                     f"{_spread([r[name]['tool_calls'] for r in rows])} | {_spread([r[name]['turns'] for r in rows])} |")
    lines += ["", "Per seed:", "", "| seed | SFT | sync | staleness 1 |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['sft']['success']:.3f} | {r['sync']['success']:.3f} | "
              f"{r['staleness1']['success']:.3f} |" for r in rows]
    for name in ("sync", "staleness1"):
        gains = [r[name]["success"] - r["sft"]["success"] for r in rows]
        spread = max(max(r[k]["success"] for r in rows) - min(r[k]["success"] for r in rows) for k in ("sft", name))
        lines.append(f"\n{name}: the smallest gain over SFT across seeds is {min(gains):+.3f}; the widest spread of "
                     f"either across seeds is {spread:.3f}: the gain is {'larger' if min(gains) > spread else 'NOT larger'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("success", help="RL against SFT on the lookup task, 3 seeds")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--iterations", type=int, default=20)
    s.add_argument("--sft_steps", type=int, default=300)
    s.add_argument("--eval_prompts", type=int, default=200)
    s.add_argument("--work", default=None, help="where the runs go (a temporary folder by default)")
    args = p.parse_args()
    if args.what == "success":
        run_success(args)


if __name__ == "__main__":
    main()
