"""A whole RL job, the engine against TRL's GRPOTrainer, side by side in one run.

The job (both sides): a random Llama checkpoint written by `python -m engine tiny-model` (hidden 512, 8 layers,
19.4M parameters), 8 prompts x 4 answers per iteration, 32 new tokens at temperature 1, GRPO advantages
(group mean and std), token-mean loss (TRL's "dapo", its default), KL coefficient 0 (TRL's default beta),
one optimizer step per batch (AdamW, lr 1e-6), float32, no gradient checkpointing, the same reward function
(`bench/e2e_reward.py`: answer length in words / 10). Generation on both sides is transformers'
`generate()` (TRL without vLLM; the engine's `hf` backend).

Each side runs in its own process (`python -m engine ppo ...`; TRL through `python -m bench.bench_e2e
--trl ...`), alternating A B A B for --pairs pairs; a run's first iteration is its warm-up and is left out.
Per run: the median seconds per iteration (the engine's `time/step`; TRL's time between its own
on_step_begin and on_step_end callbacks, which wrap generation and the update), generated tokens per second,
and the peak resident memory of the process (GNU time's %M). Per pair: TRL's median / the engine's (above
1: the engine is faster). The engine's phase split (`time/<phase>`) is reported beside it.

    python -m bench.bench_e2e                  # 3 pairs x 6 iterations -> bench/results/cpu-2core/e2e.{md,json}
    python -m bench.bench_e2e --size builtin   # the built-in task's model size (hidden 128, 2 layers)
    python -m bench.bench_e2e --dry-run        # 1 pair x 3 iterations at a tiny size; nothing saved
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"19m": dict(hidden=512, layers=8, heads=8), "builtin": dict(hidden=128, layers=2, heads=2),
         "tiny": dict(hidden=64, layers=1, heads=1)}
JOB = dict(prompts=8, n=4, new_tokens=32, lr=1e-6, temperature=1.0)
PROMPTS = ["Explain why the sky is blue in one sentence.", "Name three primary colors.", "What is 17 times 3?",
           "Write a haiku about the sea.", "Give a synonym for happy.", "Count to five.", "Reverse: cat dog sun",
           "What color is the apple?", "Describe a cat in four words.", "Say hello politely.",
           "List two fruits.", "What is the capital of France?", "Spell the word blue.", "Repeat cat three times.",
           "Name a planet.", "How many legs has a spider?"]


def write_inputs(work: Path, size: str) -> dict:
    """The model directory, the prompts file and the reward module both sides read."""
    from engine.task.tiny_checkpoint import write_tiny_model

    spec = SIZES[size]
    model = write_tiny_model("llama", work / "model", hidden=spec["hidden"], layers=spec["layers"],
                             heads=spec["heads"])
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    return {"model": model, "prompts": prompts}


def engine_cmd(inputs: dict, out: Path, iterations: int, estimator: str = "grpo") -> list[str]:
    """estimator "grpo" (the job TRL runs too) or "gae" (PPO with a critic: a value model, started from the
    policy since the reward is a function, trained beside it)."""
    j = JOB
    return [sys.executable, "-m", "engine", "ppo", "--policy.path", str(inputs["model"]), "--data.prompts",
            str(inputs["prompts"]), "--reward.fn", "bench.e2e_reward:length_reward", "--out", str(out),
            "--ppo.advantage_estimator", estimator, "--ppo.samples_per_prompt", str(j["n"]),
            "--ppo.rollout_batch", str(j["prompts"]), "--ppo.minibatch", str(j["prompts"] * j["n"]),
            "--ppo.epochs", "1", "--ppo.kl_coef", "0", "--ppo.loss_agg", "token-mean", "--ppo.lr", str(j["lr"]),
            "--ppo.iterations", str(iterations), "--ppo.checkpoint_every", str(iterations),
            "--rollout.backend", "hf", "--rollout.max_new_tokens", str(j["new_tokens"]),
            "--rollout.temperature", str(j["temperature"]), "--run.progress", "false", "--run.dtype", "float32"]


def step_clock(times: list[float]):
    """A transformers TrainerCallback appending each optimizer step's seconds (on_step_begin to on_step_end,
    which wrap a TRL trainer's whole step: generation or reference pass, forward, backward, update) to times."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    return Clock()


def trl_worker(model: str, prompts: str, out: str, iterations: int) -> None:
    """TRL's GRPOTrainer on the same job; writes {"steps": [seconds per step], "tokens": [...]} to `out`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench.e2e_reward import length_reward

    j = JOB
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    steps: list[float] = []
    cfg = GRPOConfig(output_dir=str(Path(out).parent / "trl-out"), per_device_train_batch_size=j["prompts"] * j["n"],
                     num_generations=j["n"], max_completion_length=j["new_tokens"], temperature=j["temperature"],
                     learning_rate=j["lr"], beta=0.0, num_iterations=1, gradient_accumulation_steps=1,
                     max_steps=iterations, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     logging_steps=1, report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
                          reward_funcs=length_reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[step_clock(steps)])
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    Path(out).write_text(json.dumps({"steps": steps, "mean_length": lengths}))


def timed(cmd: list[str], env: dict | None = None) -> float:
    """Run cmd under GNU time; returns its peak resident MiB (its process alone)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-3000:]}")
        return int(rss.read().split()[-1]) / 1024


def run_engine(inputs: dict, work: Path, iterations: int, tag: str, estimator: str = "grpo") -> dict:
    out = work / f"engine-{estimator}-{tag}"
    peak = timed(engine_cmd(inputs, out, iterations, estimator))
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
    tokens = [r["response_len"] * JOB["prompts"] * JOB["n"] for r in rows]
    phases = {k[5:]: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("time/") and k != "time/step"}
    step = statistics.median(r["time/step"] for r in rows)
    return {"s_per_iter": step, "tokens_per_s": statistics.median(tokens) / step, "peak_mib": peak, "phases": phases}


def run_trl(inputs: dict, work: Path, iterations: int, tag: str) -> dict:
    out = work / f"trl-{tag}.json"
    peak = timed([sys.executable, "-m", "bench.bench_e2e", "--trl", str(inputs["model"]), str(inputs["prompts"]),
                  str(out), str(iterations)])
    res = json.loads(out.read_text())
    steps, lengths = res["steps"][1:], res["mean_length"][1:]
    step = statistics.median(steps)
    tokens = statistics.median(lengths) * JOB["prompts"] * JOB["n"] if lengths else float("nan")
    return {"s_per_iter": step, "tokens_per_s": tokens / step, "peak_mib": peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="19m", choices=sorted(SIZES))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--critic", action="store_true",
                    help="PPO with a critic (GAE, value model) beside the engine's GRPO on the same job, no peer "
                         "-> e2e-critic.{md,json}")
    ap.add_argument("--trl", nargs=4, metavar=("MODEL", "PROMPTS", "OUT", "ITERATIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl:
        return trl_worker(*args.trl[:3], int(args.trl[3]))
    if args.dry_run:
        args.size, args.pairs, args.iterations = "tiny", 1, 3
    if args.critic:
        return critic_main(args, argv)
    from .harness import provenance

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = write_inputs(work, args.size)
        for i in range(args.pairs):  # A B A B: drift in the machine's speed hits both sides alike
            ours = run_engine(inputs, work, args.iterations, str(i))
            theirs = run_trl(inputs, work, args.iterations, str(i))
            rows.append({"pair": i + 1, "engine": ours, "trl": theirs,
                         "ratio": theirs["s_per_iter"] / ours["s_per_iter"]})
            print(f"pair {i + 1}: engine {ours['s_per_iter']:.2f} s/iter, TRL {theirs['s_per_iter']:.2f} s/iter, "
                  f"ratio {rows[-1]['ratio']:.2f}x", flush=True)
    report = {"job": {**JOB, "size": args.size, **SIZES[args.size]}, "pairs": rows,
              "median_ratio": statistics.median(r["ratio"] for r in rows),
              "provenance": provenance(" ".join(["python -m bench.bench_e2e", *(argv or sys.argv[1:])]), "cpu")}
    print(render(report))
    if not args.dry_run:
        dest = ROOT / "bench" / "results" / "cpu-2core"
        name = "e2e" if args.size == "19m" else f"e2e-{args.size}"
        (dest / f"{name}.json").write_text(json.dumps(report, indent=2))
        (dest / f"{name}.md").write_text(render(report))


def critic_main(args, argv) -> None:
    """The engine's PPO with a critic beside its GRPO on the same job, alternated A B A B."""
    from .harness import provenance

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = write_inputs(work, args.size)
        for i in range(args.pairs):
            grpo = run_engine(inputs, work, args.iterations, str(i), "grpo")
            ppo = run_engine(inputs, work, args.iterations, str(i), "gae")
            rows.append({"pair": i + 1, "grpo": grpo, "ppo": ppo, "ratio": ppo["s_per_iter"] / grpo["s_per_iter"]})
            print(f"pair {i + 1}: GRPO {grpo['s_per_iter']:.2f} s/iter, PPO with a critic {ppo['s_per_iter']:.2f} "
                  f"s/iter ({rows[-1]['ratio']:.2f}x the time)", flush=True)
    report = {"job": {**JOB, "size": args.size, **SIZES[args.size]}, "pairs": rows,
              "median_ratio": statistics.median(r["ratio"] for r in rows),
              "provenance": provenance(" ".join(["python -m bench.bench_e2e", *(argv or sys.argv[1:])]), "cpu")}
    text = render_critic(report)
    print(text)
    if not args.dry_run:
        dest = ROOT / "bench" / "results" / "cpu-2core"
        name = "e2e-critic" if args.size == "19m" else f"e2e-critic-{args.size}"
        (dest / f"{name}.json").write_text(json.dumps(report, indent=2))
        (dest / f"{name}.md").write_text(text)


def render_critic(report: dict) -> str:
    from .harness import provenance_line

    j, p = report["job"], report["provenance"]
    lines = ["# PPO with a critic beside GRPO, the same job in the engine", "",
             provenance_line(p), "",
             f"Job: as `e2e.md` (Llama hidden {j['hidden']}, {j['layers']} layers; {j['prompts']} prompts x {j['n']} "
             f"answers, {j['new_tokens']} new tokens, KL 0, one AdamW step per batch, float32); PPO adds a value "
             "model (started from the policy, the reward being a function), its forward and its update, and GAE. "
             "TRL 1.16 ships no PPO trainer at all (no `PPOTrainer` class in the package), so PPO stands beside "
             "our GRPO. Each run its own process, A B A B, first iteration left out, medians.", "",
             "| pair | GRPO s/iter | PPO s/iter | PPO / GRPO | GRPO tok/s | PPO tok/s | GRPO peak MiB | PPO peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["pairs"]:
        g, q = r["grpo"], r["ppo"]
        lines.append(f"| {r['pair']} | {g['s_per_iter']:.2f} | {q['s_per_iter']:.2f} | {r['ratio']:.2f}x | "
                     f"{g['tokens_per_s']:.0f} | {q['tokens_per_s']:.0f} | {g['peak_mib']:.0f} | {q['peak_mib']:.0f} |")
    first = report["pairs"][0]
    lines += ["", f"Median per-pair time ratio: **{report['median_ratio']:.2f}x** (PPO's iteration over GRPO's).", "",
              "Phases (median seconds per iteration, first pair): GRPO " + ", ".join(
                  f"{k} {v:.2f}" for k, v in first["grpo"]["phases"].items()) + "; PPO " + ", ".join(
                  f"{k} {v:.2f}" for k, v in first["ppo"]["phases"].items()), ""]
    return "\n".join(lines)


def render(report: dict) -> str:
    from .harness import provenance_line

    j, p = report["job"], report["provenance"]
    lines = [f"# One GRPO job, the engine against TRL {trl_version()}'s GRPOTrainer", "",
             provenance_line(p), "",
             f"Job: Llama hidden {j['hidden']}, {j['layers']} layers ({j['size']}); {j['prompts']} prompts x {j['n']} "
             f"answers, {j['new_tokens']} new tokens, KL 0, one AdamW step per batch, float32; each run in its own "
             f"process, A B A B, first iteration left out, medians.", "",
             "| pair | engine s/iter | TRL s/iter | TRL / engine | engine tok/s | TRL tok/s | engine peak MiB | "
             "TRL peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in report["pairs"]:
        e, t = r["engine"], r["trl"]
        lines.append(f"| {r['pair']} | {e['s_per_iter']:.2f} | {t['s_per_iter']:.2f} | **{r['ratio']:.2f}x** | "
                     f"{e['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {e['peak_mib']:.0f} | {t['peak_mib']:.0f} |")
    lines += ["", f"Median per-pair ratio: **{report['median_ratio']:.2f}x** (above 1: the engine is faster).", "",
              "The engine's phases (median seconds per iteration, first pair): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in report["pairs"][0]["engine"]["phases"].items()), ""]
    return "\n".join(lines)


def trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
