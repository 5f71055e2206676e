"""Figure 1 of InstructGPT in miniature: win rate against the largest SFT model, for SFT, PPO and PPO-ptx
at several model sizes, judged by the held-out labelers. A benchmark (minutes per size), not part of CI.

Each size runs the whole pipeline in its own directory (`<out>/h<hidden>`), on the same task data; every
policy is then sampled on the same held-out prompts and compared with the largest SFT model's answers.
Unlike the paper, each size trains its own reward model (the value model is initialised from it, so it
must share the policy's shape); the labelers, data and seeds are the same for all sizes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import Config
from .rundir.atomic import write_text_atomic
from .task.evaluate import sample_answers, win_rate

log = logging.getLogger("engine")
STAGES = (("sft", "SFT"), ("ppo", "PPO"), ("ppo_ptx", "PPO-ptx"))


def size_config(cfg: Config, hidden: int) -> Config:
    """The run config for one model size: head_dim 64 (vLLM's CPU backend needs it), MLP 2x hidden."""
    model = dataclasses.replace(cfg.model, hidden_size=hidden, num_heads=max(1, hidden // 64),
                                intermediate_size=2 * hidden)
    run = dataclasses.replace(cfg.run, out=str(Path(cfg.run.out) / f"h{hidden}"))
    return dataclasses.replace(cfg, model=model, run=run)


def reproduce(cfg: Config, sizes: list[int], record: bool = True) -> dict:
    from . import stages
    from .context import make_context
    from .models.loading import load_model

    if not sizes:
        raise ValueError("--sizes must name at least one hidden size, e.g. --sizes [64,128,256]")
    sizes = sorted(set(sizes))
    started, ctxs, seconds = time.time(), {}, {}
    for hidden in sizes:
        t0 = time.time()
        ctx = make_context(size_config(cfg, hidden))
        stages.pipeline(ctx)
        ctxs[hidden], seconds[hidden] = ctx, time.time() - t0
        log.info("size h%d done in %.0f s", hidden, seconds[hidden])

    largest = ctxs[sizes[-1]]
    data = largest.task.data
    insts, labelers, seed = data.eval_prompts, data.heldout_labelers, cfg.eval.seed
    sample = dict(temperature=cfg.eval.temperature, max_tokens=cfg.rollout.max_new_tokens, seed=seed)

    def policy(ctx, stage):
        return load_model(ctx.final(stage, "policy"), flag=f"the {stage} policy", scalar=False, device=ctx.device,
                          run=ctx.cfg.run)

    def answers(ctx, stage):
        return sample_answers(policy(ctx, stage), ctx.tokenizer, insts, **sample)

    baseline = answers(largest, "sft")
    table = {}
    for hidden, ctx in ctxs.items():
        params = sum(p.numel() for p in policy(ctx, "sft").parameters())
        row = {"params": params, "seconds": round(seconds[hidden], 1)}
        for stage, _ in STAGES:
            row[stage] = win_rate(insts, answers(ctx, stage), baseline, labelers, seed)["win_rate"]
        table[hidden] = row
    result = {
        "what": "win rate against the largest SFT model, judged by held-out labelers (ties count half)",
        "n_eval_prompts": len(insts), "sizes": table,
        "smallest_ppo_beats_largest_sft": table[sizes[0]]["ppo"] > 0.5,
        **provenance(time.time() - started, cfg.run.device),
    }
    result["command"] = "python -m engine reproduce --sizes " + json.dumps(sizes).replace(" ", "")
    out = Path(cfg.run.out)
    write_text_atomic(out / "figure1.json", json.dumps(result, indent=2))
    draw_figure1(out / "figure1.png", table)
    write_text_atomic(out / "figure1.md", render(result))
    log.info("figure 1 -> %s", out / "figure1.png")
    results = _bench_results_dir(cfg.run.device) if record else None
    if results is not None:  # a source checkout: keep the record beside the other benchmarks
        results.mkdir(parents=True, exist_ok=True)
        for name in ("figure1.json", "figure1.png", "figure1.md"):
            shutil.copyfile(out / name, results / name)
        log.info("copied to %s", results)
    return result


def _bench_results_dir(device: str) -> Path | None:
    """bench/results/<device> of a source checkout (None for an installed package), keyed by the device the
    run used, as bench/harness.py keys it: the GPU's name, or cpu-<cores>core."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if not bench.is_dir():
        return None
    import torch

    key = torch.cuda.get_device_name().replace(" ", "-").lower() if device == "cuda" else f"cpu-{os.cpu_count()}core"
    return bench / "results" / key


def describe_device(device: str) -> str:
    """What ran the run: the GPU's name for --run.device cuda, else the CPU and its threads."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(seconds: float, device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    import torch

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit, "seconds": round(seconds),
            "device": describe_device(device),
            "torch": torch.__version__}


def render(r: dict) -> str:
    lines = ["# Figure 1 in miniature", "", f"{r['what']}; {r['n_eval_prompts']} held-out prompts.", "",
             f"Device: {r['device']}; date {r['date']}; commit {r['commit']}; {r['seconds']} s in all.", "",
             f"Command: `{r.get('command', 'python -m engine reproduce')}` (run directories under --out).", "",
             "| hidden size | parameters | SFT | PPO | PPO-ptx | minutes |", "|---|---|---|---|---|---|"]
    for hidden, row in r["sizes"].items():
        lines.append(f"| {hidden} | {row['params'] / 1e6:.2f}M | {100 * row['sft']:.1f}% | {100 * row['ppo']:.1f}% "
                     f"| {100 * row['ppo_ptx']:.1f}% | {row['seconds'] / 60:.1f} |")
    verdict = "is" if r["smallest_ppo_beats_largest_sft"] else "is not"
    lines += ["", f"The smallest PPO model {verdict} preferred over the largest SFT model.", "",
              "![figure 1](figure1.png)", ""]
    return "\n".join(lines)


def draw_figure1(path: Path, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [table[h]["params"] / 1e6 for h in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, label in STAGES:
        ax.plot(params, [table[h][stage] for h in table], marker="o", label=label)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("policy parameters (millions)")
    ax.set_ylabel("win rate vs largest SFT model")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
