"""One process against two (torchrun, FSDP2; gloo on the CPU, NCCL on GPUs): memory per rank and step time of
SFT and of a PPO iteration, at the same global batch, each beside what `python -m engine plan` predicts.

    python -m bench.bench_distributed                 # about 15 minutes on 2 CPU cores
    python -m bench.bench_distributed --device cuda   # on a machine with 2 GPUs

The model is the built-in task's Llama at a size where the weights dominate, in a real model's proportions
(hidden 1024, 16 layers, 16 heads: 203M parameters, a block 1/16 of the model), pretrained for one step;
SFT and the RM start from it, PPO from those (policy, value, reference and reward model: 4 x 203M). Every
run, one process or two, has MALLOC_MMAP_THRESHOLD_=4194304 (see ENV). Each run is `python -m engine <stage>` (or `torchrun
--nproc_per_node 2 -m engine <stage>`) in its own processes:
  held MiB   parameters + optimizer state of one rank, measured from its shards (engine.parallel.distributed.held_bytes)
  peak MiB   the largest process's peak resident memory (GNU time %M of the launcher, which counts its
             children), the whole process: torch, data, activations, the rollout engine's copy
  s / step   median wall time of a step after the first (SFT: one optimizer step; PPO: one iteration)
  plan       `engine.plan.estimate` for the same job (--device cpu, the run's own configs, the largest padded
             micro-batch the run logged): held = parameters + optimizer state, peak = the larger phase
Two processes on 2 cores share the cores that one process uses alone: no speed-up is expected there.
Results: bench/results/<device>/distributed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import provenance, write_rows

TASK = ["--task.n_corpus", "2000", "--task.n_demonstrations", "400", "--task.n_comparisons", "200",
        "--task.n_comparisons_heldout", "16", "--task.n_ppo_prompts", "256", "--run.progress", "false"]
MODEL = ["--model.hidden_size", "1024", "--model.num_heads", "16", "--model.num_layers", "16",
         "--model.intermediate_size", "2816", "--model.max_positions", "128"]
# glibc raises its mmap threshold (up to 32 MiB) after freeing an mmapped block, so blocks below it that
# FSDP2 gathers and frees stay in the heap: a 106M model with 11 MiB weights measured 3.60 GiB per process
# on 2 processes, 3.28 GiB with a fixed threshold. Real models' weights (a 7B MLP matrix is 112 MiB in
# bfloat16) are past that ceiling and always returned; the fixed threshold gives this small model the same.
ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304"}
STAGES = {
    "sft": ["--sft.steps", "4", "--sft.batch_size", "16", "--sft.log_every", "1", "--sft.checkpoint_every", "100"],
    "ppo": ["--ppo.iterations", "3", "--ppo.rollout_batch", "16", "--ppo.minibatch", "8", "--ppo.epochs", "1",
            "--ppo.eval_every", "0", "--ppo.checkpoint_every", "100", "--rollout.max_new_tokens", "16",
            "--rollout.backend", "hf"],
}
STAGES["ppo-vllm"] = [*STAGES["ppo"][:-1], "vllm"]
STAGES["ppo-vllm-tp"] = [*STAGES["ppo-vllm"], "--rollout.tensor_parallel", "2"]  # two processes only


def engine(procs: int, argv: list[str]) -> float:
    """Run one stage; returns the peak resident MiB of its largest process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *launcher, "-m", "engine", *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} with {procs} process(es) failed:\n{done.stderr[-3000:]}")
        return int(rss.read().split()[-1]) / 1024


def vllm_runtime(model_dir: Path) -> float:
    """One vLLM engine's memory beyond its weights and KV cache on this policy (bench/vllm_runtime.py, run in
    a process of its own): the planner's --engine_overhead_gib, measured again."""
    done = subprocess.run([sys.executable, "-m", "bench.vllm_runtime", str(model_dir)], capture_output=True,
                          text=True, env={**os.environ, **ENV})
    if done.returncode != 0:
        raise RuntimeError(f"bench.vllm_runtime failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["runtime_gib"]


def predict(base: Path, command: str, procs: int, tokens: int, engine_name: str, tp: int, device: str) -> dict:
    """What `python -m engine plan` says of the same job: held (parameters + optimizer state) and peak MiB."""
    from engine.plan.estimate import estimate
    from engine.plan.settings import PlanSettings

    policy = base / "pretrain" / "final" / "policy" / "config.json"
    reward = base / "rm" / "final" / "reward" / "config.json"
    s = PlanSettings(stage=command, policy=str(policy), reward=str(reward), value=str(reward), nodes=1,
                     gpus_per_node=procs, device=device, micro_batch_tokens=tokens, engine=engine_name, engine_tp=tp,
                     rollout_sequences=16 // procs, rollout_len=128, gpu_mem_gib=1e6)
    est = estimate(s)
    mib = 2**20
    return {"plan_held_mib": (est.parts["params"] + est.parts["optimizer"]) / mib, "plan_peak_mib": est.peak / mib}


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
        runtime = vllm_runtime(base / "pretrain" / "final" / "policy") if args.device == "cpu" else None
        for stage, flags in STAGES.items():
            for procs in args.procs:
                if stage.endswith("-tp") and procs == 1:
                    continue
                command = stage.split("-")[0]
                out = Path(tmp) / f"{stage}-{procs}"
                shutil.copytree(base, out, ignore=shutil.ignore_patterns(command, "checkpoints"))
                t0 = time.perf_counter()
                peak = engine(procs, [command, "--out", str(out), *common, *flags])
                wall = time.perf_counter() - t0
                steps = [json.loads(line) for line in (out / command / "metrics.jsonl").read_text().splitlines()]
                tokens = int(max(r["padded_tokens_per_rank"] for r in steps))
                rows.append({"stage": stage, "processes": procs, "held_mib": steps[0]["held_mib"],
                             "peak_mib": peak, "s_per_step": statistics.median(r["time/step"] for r in steps[1:]),
                             "wall_s": wall, "tokens_per_rank": tokens,
                             "engine_mib": steps[-1].get("engine_weights_mib"),
                             **predict(base, command, procs, tokens, "vllm" if "vllm" in stage else "hf",
                                       2 if stage.endswith("-tp") else 1, args.device)})
                shutil.rmtree(out)  # a run of 4 x 203M models with checkpoints is gigabytes
                print(rows[-1], flush=True)
    meta["vllm_runtime_gib"] = runtime
    text = table(rows, meta)
    print(text)
    if not args.no_save:
        print("saved", write_rows("distributed", args.device, meta, rows, text))


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# One process against two: {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}: `{meta['command']}`", "",
             "Built-in Llama, hidden 1024, 16 layers, 16 heads (203M parameters), float32, global batch the same "
             "for both. SFT: 16 demonstrations per step. PPO: 16 prompts x 16 new tokens per iteration, policy + "
             "value + reference + RM, each loaded sharded (no rank reads a whole model); `ppo` samples with the "
             "HF backend from the sharded policy itself, `ppo-vllm` with a vLLM engine per process (a whole "
             "copy of the policy each), `ppo-vllm-tp` with one vLLM engine tensor-parallel across the 2 "
             "processes (`--rollout.tensor_parallel 2`: half the policy each; engine MiB is what one rank's "
             "engine holds, measured).",
             "", "| stage | processes | held per rank (MiB) | plan | peak per process (MiB) | plan | "
                 "peak vs 1 process | engine MiB | s / step (median) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    one = {r["stage"]: r["peak_mib"] for r in rows if r["processes"] == 1}
    one["ppo-vllm-tp"] = one.get("ppo-vllm")
    for r in rows:
        ratio = f"{r['peak_mib'] / one[r['stage']]:.2f}x" if one.get(r["stage"]) else ""
        engine_mib = f"{r['engine_mib']:.0f}" if r.get("engine_mib") else ""
        lines.append(f"| {r['stage']} | {r['processes']} | {r['held_mib']:.1f} | {r['plan_held_mib']:.1f} | "
                     f"{r['peak_mib']:.0f} | {r['plan_peak_mib']:.0f} ({r['plan_peak_mib'] / r['peak_mib'] - 1:+.0%}) | "
                     f"{ratio} | {engine_mib} | {r['s_per_step']:.3f} | {r['wall_s']:.1f} |")
    lines += ["", "held: parameters + optimizer state of the trained models on one rank, from its shards. peak: "
              "the largest process's peak RSS. plan: `python -m engine plan --device cpu` for the same job "
              "(its error against the measured peak in brackets). Two processes share the 2 cores one process "
              "uses alone. Every run with MALLOC_MMAP_THRESHOLD_=4194304: glibc's rising mmap threshold would "
              "keep the freed all-gather blocks of this small model's 11 MiB weights in its heaps (a 106M model "
              "measured 3.60 GiB per process on 2 processes instead of 3.28); real models' weights are past "
              "its 32 MiB ceiling and always returned."]
    if meta.get("vllm_runtime_gib") is not None:
        from engine.plan.settings import PlanSettings

        lines += ["", f"vLLM's runtime beyond its weights and KV cache, one engine on this policy measured in a "
                      f"process of its own (`python -m bench.vllm_runtime`): {meta['vllm_runtime_gib']:.2f} GiB; the "
                      f"planner counts --engine_overhead_gib {PlanSettings.engine_overhead_gib} per engine process, "
                      f"and with several processes the weight sync's bucket of whole tensors (512 MiB)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
