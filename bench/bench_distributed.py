"""One process against two (torchrun, FSDP2; gloo on the CPU, NCCL on GPUs): memory per rank and step time of
SFT and of a PPO iteration, at the same global batch.

    python -m bench.bench_distributed                 # about 5 minutes on 2 CPU cores
    python -m bench.bench_distributed --device cuda   # on a machine with 2 GPUs

The model is the built-in task's Llama at a size where the weights show (hidden 512, 8 layers: 25M
parameters), pretrained for one step; SFT and the RM start from it, PPO from those. Each run is
`python -m engine <stage>` (or `torchrun --nproc_per_node 2 -m engine <stage>`) in its own processes:
  held MiB   parameters + optimizer state of one rank, measured from its shards (engine.distributed.held_bytes)
  peak MiB   the largest process's peak resident memory (GNU time %M of the launcher, which counts its
             children), the whole process: torch, data, activations, the rollout engine's copy
  s / step   median wall time of a step after the first (SFT: one optimizer step; PPO: one iteration)
Two processes on 2 cores share the cores that one process uses alone: no speed-up is expected there.
Results: bench/results/<device>/distributed.{md,json}.
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
import time
from pathlib import Path

from .harness import RESULTS, device_name, provenance

TASK = ["--task.n_corpus", "2000", "--task.n_demonstrations", "400", "--task.n_comparisons", "200",
        "--task.n_ppo_prompts", "256", "--run.progress", "false"]
MODEL = ["--model.hidden_size", "512", "--model.num_heads", "8", "--model.num_layers", "8",
         "--model.intermediate_size", "1408", "--model.max_positions", "128"]
STAGES = {
    "sft": ["--sft.steps", "6", "--sft.batch_size", "16", "--sft.log_every", "1", "--sft.checkpoint_every", "100"],
    "ppo": ["--ppo.iterations", "4", "--ppo.rollout_batch", "16", "--ppo.minibatch", "8", "--ppo.epochs", "1",
            "--ppo.eval_every", "0", "--ppo.checkpoint_every", "100", "--rollout.max_new_tokens", "16",
            "--rollout.backend", "hf"],
}


def engine(procs: int, argv: list[str]) -> float:
    """Run one stage; returns the peak resident MiB of its largest process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *launcher, "-m", "engine", *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} with {procs} process(es) failed:\n{done.stderr[-3000:]}")
        return int(rss.read().split()[-1]) / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    meta = provenance("python -m bench.bench_distributed " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                      args.device)
    common = ["--run.device", args.device, *TASK]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        engine(1, ["pretrain", "--out", str(base), *common, *MODEL, "--pretrain.steps", "1"])
        engine(1, ["sft", "--out", str(base), *common, "--sft.steps", "1"])
        engine(1, ["rm", "--out", str(base), *common, "--rm.steps", "1"])
        for stage, flags in STAGES.items():
            for procs in args.procs:
                out = Path(tmp) / f"{stage}-{procs}"
                shutil.copytree(base, out, ignore=shutil.ignore_patterns(stage))
                t0 = time.perf_counter()
                peak = engine(procs, [stage, "--out", str(out), *common, *flags])
                wall = time.perf_counter() - t0
                steps = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
                rows.append({"stage": stage, "processes": procs, "held_mib": steps[0]["held_mib"],
                             "peak_mib": peak, "s_per_step": statistics.median(r["time/step"] for r in steps[1:]),
                             "wall_s": wall})
                print(rows[-1], flush=True)
    text = table(rows, meta)
    print(text)
    if not args.no_save:
        out = RESULTS / device_name(args.device)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distributed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "distributed.md").write_text(text)
        print("saved", out / "distributed.md")


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# One process against two: {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}: `{meta['command']}`", "",
             "Built-in Llama, hidden 512, 8 layers (25M parameters), float32, global batch the same for both. "
             "SFT: 16 demonstrations per step. PPO: 16 prompts x 16 new tokens per iteration, HF rollouts "
             "(each rank samples its half from a whole copy of the policy), policy + value + reference + RM.",
             "", "| stage | processes | held per rank (MiB) | peak per process (MiB) | s / step (median) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['processes']} | {r['held_mib']:.1f} | {r['peak_mib']:.0f} | "
                     f"{r['s_per_step']:.3f} | {r['wall_s']:.1f} |")
    lines += ["", "held: parameters + optimizer state of the trained models on one rank, from its shards. peak: "
              "the largest process's peak RSS. Two processes share the 2 cores one process uses alone."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
