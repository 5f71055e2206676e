"""Multi-turn episodes (issue 39): does RL teach the model to use a tool, and how fast does an episode run?

    python -m bench.bench_multiturn success          # 3 seeds x (pretrain, SFT, GRPO sync, GRPO staleness 1)
    python -m bench.bench_multiturn success --seeds 0 --iterations 5   # a quick look (not for the record)
    python -m bench.bench_multiturn speed            # the engine against TRL's GRPOTrainer(tools=), A B A B

The built-in lookup task (engine/task/tools.py): "what color was the cat ?", whose colour is drawn per episode
and known only to the tool ("see cat" -> "the cat was blue"); reward 1 for exactly "the cat was blue". The
demonstrations call the tool in half the episodes and guess in the rest. Per seed (--run.seed: the pretrained
model, SFT's data order, RL's sampling; the task's files are the same): the built-in pretrain, SFT on the
demonstrations, then GRPO with the environment (--rollout.env engine.task.tools:Lookup, 3 turns at most) in
the synchronous loop and with --ppo.max_staleness 1. Success: the mean reward of one sampled episode
(temperature 1, as trained; the same seeds for every policy) on each of the held-out prompts, which no run
trained on. Results: bench/results/<device>/multiturn-success.{md,json}.

speed: one multi-turn GRPO job (bench/multiturn_job.py: a Qwen2 checkpoint with Qwen2.5's chat template
fine-tuned to call a `lookup` tool, the tool's schema in every prompt, at most 3 model turns, the whole
episode bounded by --budget tokens, each turn by the same, as TRL bounds them; reward 1 for the right final
answer; 8 prompts x 4 episodes per iteration, KL 0, token-mean loss, lr 1e-6, float32, generation by
transformers on both sides) in the engine (`ppo --rollout.tools bench.multiturn_job:lookup`) and in TRL's
GRPOTrainer(tools=[lookup], max_tool_calling_iterations=2), each in its own process, alternating A B A B;
each run's first iteration left out. Per run: episodes per second (the median iteration), turns and tokens
per episode and the share of them masked (the tool's); per pair TRL's seconds / the engine's.
Results: bench/results/<device>/multiturn.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
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


def speed_worker_trl(model: str, prompts: str, out: str, iterations: int, budget: int) -> None:
    """TRL's GRPOTrainer with tools on the job; writes per-step seconds and its tool/length metrics to out."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from .bench_e2e import step_clock
    from .multiturn_job import correct_trl, lookup

    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    steps: list[float] = []
    cfg = GRPOConfig(output_dir=str(Path(out).parent / "trl-out"), per_device_train_batch_size=JOB["prompts"] * JOB["n"],
                     num_generations=JOB["n"], max_completion_length=budget, temperature=1.0, learning_rate=JOB["lr"],
                     beta=0.0, num_iterations=1, gradient_accumulation_steps=1, max_steps=iterations, use_cpu=True,
                     bf16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                     seed=0, dataloader_num_workers=0, max_tool_calling_iterations=JOB["turns"] - 1)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"), reward_funcs=correct_trl,
                          args=cfg, train_dataset=data, processing_class=tok, tools=[lookup],
                          callbacks=[step_clock(steps)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    Path(out).write_text(json.dumps({"steps": steps, "logs": logs}))


JOB = dict(prompts=8, n=4, lr=1e-6, turns=3)


def speed_engine_cmd(model: Path, prompts: Path, out: Path, iterations: int, budget: int) -> list[str]:
    j = JOB
    return [sys.executable, "-m", "engine", "ppo", "--policy.path", str(model), "--data.prompts", str(prompts),
            "--rollout.tools", "bench.multiturn_job:lookup", "--reward.fn", "bench.multiturn_job:correct",
            "--out", str(out), "--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", str(j["n"]),
            "--ppo.rollout_batch", str(j["prompts"]), "--ppo.minibatch", str(j["prompts"] * j["n"]),
            "--ppo.epochs", "1", "--ppo.kl_coef", "0", "--ppo.loss_agg", "token-mean", "--ppo.lr", str(j["lr"]),
            "--ppo.iterations", str(iterations), "--ppo.checkpoint_every", str(iterations),
            "--rollout.backend", "hf", "--rollout.max_turns", str(j["turns"]), "--rollout.max_new_tokens", str(budget),
            "--rollout.max_episode_tokens", str(budget), "--rollout.max_env_tokens", str(budget),
            "--data.max_prompt_tokens", "1024", "--run.progress", "false", "--run.dtype", "float32"]


def run_speed(args) -> None:
    from .bench_e2e import timed, trl_version
    from .multiturn_job import write_checkpoint, write_prompts

    work = Path(args.work or tempfile.mkdtemp(prefix="multiturn-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_checkpoint(work, hidden=args.hidden, layers=args.layers, heads=args.heads, sft_steps=args.sft_steps)
    prompts = write_prompts(work)
    episodes = JOB["prompts"] * JOB["n"]
    pairs = []
    for k in range(args.pairs):
        out = work / f"engine-{k}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the work folder may hold an older one)
        peak = timed(speed_engine_cmd(model, prompts, out, args.iterations, args.budget))
        rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
        step = statistics.median(r["time/step"] for r in rows)
        engine = {"s_per_iter": step, "episodes_per_s": episodes / step, "peak_mib": peak,
                  "turns": statistics.mean(r["episodes/turns"] for r in rows),
                  "tokens": statistics.mean(r["episodes/tokens"] for r in rows),
                  "masked_share": statistics.mean(r["episodes/masked_share"] for r in rows),
                  "reward": statistics.mean(r["score"] for r in rows),
                  "phases": {k[5:]: statistics.median(r[k] for r in rows) for k in rows[0]
                             if k.startswith("time/") and k != "time/step"}}
        trl_out = work / f"trl-{k}.json"
        peak = timed([sys.executable, "-m", "bench.bench_multiturn", "trl-worker", str(model), str(prompts),
                      str(trl_out), str(args.iterations), str(args.budget)])
        res = json.loads(trl_out.read_text())
        steps, logs = res["steps"][1:], res["logs"][1:]
        step = statistics.median(steps)
        trl = {"s_per_iter": step, "episodes_per_s": episodes / step, "peak_mib": peak,
               "tool_calls_per_episode": statistics.mean(h.get("tools/call_frequency", 0.0) for h in logs),
               "model_tokens": statistics.mean(h["completions/mean_length"] for h in logs),
               "reward": statistics.mean(h.get("reward", float("nan")) for h in logs)}
        pairs.append({"engine": engine, "trl": trl, "ratio": trl["s_per_iter"] / engine["s_per_iter"]})
        print(json.dumps(pairs[-1]), flush=True)
    meta = provenance("python -m bench.bench_multiturn speed " + shlex.join(sys.argv[2:]), "cpu")
    meta["trl"] = trl_version()
    write_rows("multiturn", "cpu", meta, pairs, speed_report(pairs, meta, args))


def speed_report(pairs: list[dict], meta: dict, args) -> str:
    e, t = [p["engine"] for p in pairs], [p["trl"] for p in pairs]
    ratios = [p["ratio"] for p in pairs]
    lines = [f"# A multi-turn GRPO job with a tool: the engine against TRL {meta['trl']}'s GRPOTrainer(tools=) "
             f"({meta['device']})", "", f"{meta['date']}, commit {meta['commit']}, {meta.get('cpu')}, torch "
             f"{meta['torch']}, `{meta['command']}`.", "",
             f"Job: bench/multiturn_job.py (Qwen2, hidden {args.hidden}, {args.layers} layers, Qwen2.5's chat template "
             f"with the tool's schema in every prompt), {JOB['prompts']} prompts x {JOB['n']} episodes per iteration, "
             f"at most {JOB['turns']} model turns and {args.budget} tokens per episode, {args.iterations} iterations "
             f"per run (the first left out), {len(pairs)} pairs A B A B; medians.", "",
             "| | episodes/s | s/iteration | peak MiB | reward |", "|---|---|---|---|---|",
             f"| engine | {statistics.median(x['episodes_per_s'] for x in e):.2f} | "
             f"{statistics.median(x['s_per_iter'] for x in e):.2f} | {statistics.median(x['peak_mib'] for x in e):.0f} | "
             f"{statistics.mean(x['reward'] for x in e):.2f} |",
             f"| TRL | {statistics.median(x['episodes_per_s'] for x in t):.2f} | "
             f"{statistics.median(x['s_per_iter'] for x in t):.2f} | {statistics.median(x['peak_mib'] for x in t):.0f} | "
             f"{statistics.mean(x['reward'] for x in t):.2f} |", "",
             f"Per pair, TRL's seconds per iteration / the engine's: {', '.join(f'{r:.2f}x' for r in ratios)} "
             f"(median {statistics.median(ratios):.2f}x).", "",
             f"Episodes (the engine's): {statistics.mean(x['turns'] for x in e):.2f} turns, "
             f"{statistics.mean(x['tokens'] for x in e):.1f} tokens after the prompt, of which "
             f"{100 * statistics.mean(x['masked_share'] for x in e):.0f}% the tool's (masked). TRL's: "
             f"{statistics.mean(x['tool_calls_per_episode'] for x in t):.2f} tool calls per episode, "
             f"{statistics.mean(x['model_tokens'] for x in t):.1f} model tokens per episode.", "",
             "The engine's phases (median s per iteration): " + ", ".join(
                 f"{k} {statistics.median(x['phases'][k] for x in e):.2f}" for k in e[0]["phases"]) + "."]
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
    v = sub.add_parser("speed", help="the engine against TRL's GRPOTrainer(tools=), A B A B")
    v.add_argument("--pairs", type=int, default=3)
    v.add_argument("--iterations", type=int, default=6)
    v.add_argument("--budget", type=int, default=128, help="tokens per episode after the prompt (and per turn)")
    v.add_argument("--hidden", type=int, default=128)
    v.add_argument("--layers", type=int, default=2)
    v.add_argument("--heads", type=int, default=2)
    v.add_argument("--sft_steps", type=int, default=150)
    v.add_argument("--work", default=None)
    w = sub.add_parser("trl-worker")
    w.add_argument("model")
    w.add_argument("prompts")
    w.add_argument("out")
    w.add_argument("iterations", type=int)
    w.add_argument("budget", type=int)
    args = p.parse_args()
    if args.what == "success":
        run_success(args)
    elif args.what == "speed":
        run_speed(args)
    else:
        speed_worker_trl(args.model, args.prompts, args.out, args.iterations, args.budget)


if __name__ == "__main__":
    main()
