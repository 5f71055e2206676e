"""One DPO job, the engine against TRL's DPOTrainer, side by side in one run; then the largest batch each
fits in a fixed memory budget.

The job (both sides): a random Llama checkpoint (`engine.task.tiny_checkpoint`: hidden 512, 8 layers, 8 heads)
whose vocabulary is widened to Llama-3's 128,256 rows (the tokenizer stays the tiny one, so every text is
the same tokens on both sides; the LM head's cost is the vocabulary's, whatever ids are used), untied LM head:
--params parameters. The same pairwise comparisons file (random words; chat messages, so both sides apply
the tokenizer's chat template), sigmoid loss, beta 0.1, AdamW lr 1e-6 with no warm-up, one optimizer step
per batch of --batch pairs, float32, no gradient checkpointing, the reference model a second copy of the
start, its log-probs computed during training (TRL's default; the engine computes each comparison's once, and
the data are large enough that a step's comparisons are almost always new). Both compute the log-probs with
a fused LM head (TRL 1.16's `add_fused_lm_head`; ours `kernels.linear_token_logprobs`).

Each side runs in its own process (`python -m engine dpo ...`; TRL through `python -m bench.bench_dpo --trl
...`), A B A B for --pairs pairs, the first step of a run left out: per run the median seconds per step (the
engine's `time/step`; TRL's time between its on_step_begin and on_step_end callbacks) and the process's
peak resident memory (GNU time's %M). Per pair: TRL's median / the engine's (above 1: the engine is faster).
Then, for each side, runs of 2 steps at growing batch sizes: the largest batch whose peak stays within
--budget-gib.

    python -m bench.bench_dpo               # -> bench/results/cpu-2core/dpo-trl.{md,json}
    python -m bench.bench_dpo --dry-run     # a tiny model, 1 pair, no memory search; nothing saved
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from .bench_e2e import step_clock, timed

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"full": dict(hidden=512, layers=8, heads=8, vocab=128256), "tiny": dict(hidden=64, layers=1, heads=1,
                                                                                 vocab=1024)}
JOB = dict(beta=0.1, lr=1e-6, prompt_words=16, response_words=48)
WORDS = ("the a sky sea blue green red cat dog sun moon river stone tree leaf wind rain snow fire light dark "
         "quick slow calm loud bright soft warm cold old new small large near far high low deep wide").split()


def write_inputs(work: Path, size: str, n_rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.task.tiny_checkpoint import write_tiny_model

    spec = SIZES[size]
    path = write_tiny_model("llama", work / "model", hidden=spec["hidden"], layers=spec["layers"],
                            heads=spec["heads"])
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model.resize_token_embeddings(spec["vocab"], mean_resizing=False)
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    data = work / "comparisons.jsonl"
    with data.open("w") as f:
        for _ in range(n_rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(JOB["prompt_words"])}],
                                "chosen": text(JOB["response_words"]), "rejected": text(JOB["response_words"])})
                    + "\n")
    return {"model": path, "data": data, "params": params}


def engine_cmd(inputs: dict, out: Path, steps: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "engine", "dpo", "--policy.path", str(inputs["model"]), "--data.comparisons",
            str(inputs["data"]), "--out", str(out), "--dpo.loss", "sigmoid", "--dpo.beta", str(JOB["beta"]),
            "--dpo.lr", str(JOB["lr"]), "--dpo.warmup", "0", "--dpo.batch_size", str(batch), "--dpo.steps",
            str(steps), "--dpo.checkpoint_every", str(steps), "--dpo.log_every", "1", "--run.progress", "false",
            "--run.dtype", "float32", "--data.max_prompt_tokens", "4096", "--data.max_response_tokens", "4096"]


def trl_worker(model: str, data: str, out: str, steps: int, batch: int) -> None:
    """TRL's DPOTrainer on the same job; writes {"steps": [seconds per step], "tokens": mean tokens per pair}."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    ds = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    times: list[float] = []
    cfg = DPOConfig(output_dir=str(Path(out).parent / "trl-out"), per_device_train_batch_size=batch,
                    learning_rate=JOB["lr"], beta=JOB["beta"], loss_type=["sigmoid"], max_length=None,
                    max_steps=steps, lr_scheduler_type="constant", warmup_steps=0, use_cpu=True, bf16=False,
                    gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                    dataloader_num_workers=0, precompute_ref_log_probs=False, dataset_num_proc=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"), args=cfg,
                         train_dataset=ds, processing_class=tok, callbacks=[step_clock(times)])
    tokens = statistics.mean(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                             for r in trainer.train_dataset.select(range(64)))
    trainer.train()
    Path(out).write_text(json.dumps({"steps": times, "tokens": tokens}))


def engine_tokens(inputs: dict) -> float:
    """Mean tokens per pair (both sequences, prompt included) as the engine encodes the file."""
    from engine.config import DataConfig
    from engine.data.encode import make_encoder
    from engine.models.loading import load_tokenizer
    from engine.stages import encode_comparisons

    tok = load_tokenizer(inputs["model"])
    enc = make_encoder(tok, DataConfig(max_prompt_tokens=4096, max_response_tokens=4096), 1 << 20, 1, "--policy.path")
    rows = encode_comparisons(enc, inputs["data"])[:64]
    return statistics.mean(2 * len(r["prompt"]) + sum(len(x) for x in r["responses"]) for r in rows)


def run_engine(inputs: dict, work: Path, steps: int, batch: int, tag: str) -> dict:
    out = work / f"engine-{tag}"
    peak = timed(engine_cmd(inputs, out, steps, batch))
    rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()][1:]
    return {"s_per_step": statistics.median(r["time/step"] for r in rows) if rows else None, "peak_mib": peak}


def run_trl(inputs: dict, work: Path, steps: int, batch: int, tag: str) -> dict:
    out = work / f"trl-{tag}.json"
    peak = timed([sys.executable, "-m", "bench.bench_dpo", "--trl", str(inputs["model"]), str(inputs["data"]),
                  str(out), str(steps), str(batch)])
    res = json.loads(out.read_text())
    steps_s = res["steps"][1:]
    return {"s_per_step": statistics.median(steps_s) if steps_s else None, "peak_mib": peak, "tokens": res["tokens"]}


def largest_batch(run, inputs: dict, work: Path, budget_mib: float, batches: list[int], name: str) -> dict:
    """Peak memory at each batch (2 steps) until one exceeds the budget -> {"peaks": {b: MiB}, "largest": b}."""
    peaks, largest = {}, None
    for b in batches:
        peak = run(inputs, work, 2, b, f"mem-{b}")["peak_mib"]
        peaks[b] = peak
        print(f"  {name} batch {b}: peak {peak:.0f} MiB", flush=True)
        if peak > budget_mib:
            break
        largest = b
    return {"peaks": peaks, "largest": largest}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--budget-gib", type=float, default=12.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--trl", nargs=5, metavar=("MODEL", "DATA", "OUT", "STEPS", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl:
        return trl_worker(*args.trl[:3], int(args.trl[3]), int(args.trl[4]))
    size = "tiny" if args.dry_run else "full"
    if args.dry_run:
        args.pairs, args.steps = 1, 3
    from .harness import provenance

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = write_inputs(work, size, n_rows=max(2000, 4 * args.steps * args.batch))
        rows = []
        for i in range(args.pairs):  # A B A B: drift in the machine's speed hits both sides alike
            ours = run_engine(inputs, work, args.steps, args.batch, str(i))
            theirs = run_trl(inputs, work, args.steps, args.batch, str(i))
            rows.append({"pair": i + 1, "engine": ours, "trl": theirs,
                         "ratio": theirs["s_per_step"] / ours["s_per_step"]})
            print(f"pair {i + 1}: engine {ours['s_per_step']:.2f} s/step {ours['peak_mib']:.0f} MiB, TRL "
                  f"{theirs['s_per_step']:.2f} s/step {theirs['peak_mib']:.0f} MiB, ratio {rows[-1]['ratio']:.2f}x",
                  flush=True)
        memory = {}
        if not args.dry_run:
            budget = args.budget_gib * 1024
            memory = {"budget_mib": budget,
                      "engine": largest_batch(run_engine, inputs, work, budget, args.batches, "engine"),
                      "trl": largest_batch(run_trl, inputs, work, budget, args.batches, "TRL")}
        report = {"job": {**JOB, **SIZES[size], "batch": args.batch, "steps": args.steps, "params": inputs["params"],
                          "tokens_per_pair": {"engine": engine_tokens(inputs), "trl": rows[0]["trl"]["tokens"]}},
                  "pairs": rows, "median_ratio": statistics.median(r["ratio"] for r in rows), "memory": memory,
                  "provenance": provenance(" ".join(["python -m bench.bench_dpo", *(argv or sys.argv[1:])]), "cpu")}
    print(render(report))
    if not args.dry_run:
        dest = ROOT / "bench" / "results" / "cpu-2core"
        (dest / "dpo-trl.json").write_text(json.dumps(report, indent=2))
        (dest / "dpo-trl.md").write_text(render(report))


def render(report: dict) -> str:
    from .harness import provenance_line

    from .bench_e2e import trl_version

    j, p, mem = report["job"], report["provenance"], report["memory"]
    lines = [f"# One DPO job, the engine against TRL {trl_version()}'s DPOTrainer", "",
             provenance_line(p), "",
             f"Job: Llama hidden {j['hidden']}, {j['layers']} layers, vocabulary {j['vocab']:,} "
             f"({j['params'] / 1e6:.1f}M parameters, untied LM head); {j['batch']} pairs per step, "
             f"{j['tokens_per_pair']['engine']:.0f} tokens per pair in the engine and "
             f"{j['tokens_per_pair']['trl']:.0f} in TRL (prompt counted twice, both answers); sigmoid loss, beta "
             f"{j['beta']}, AdamW, float32, reference log-probs computed during training; each run in its own "
             f"process, A B A B, {j['steps']} steps per run, the first left out, medians.", "",
             "| pair | engine s/step | TRL s/step | TRL / engine | engine peak MiB | TRL peak MiB |",
             "|---|---|---|---|---|---|"]
    for r in report["pairs"]:
        e, t = r["engine"], r["trl"]
        lines.append(f"| {r['pair']} | {e['s_per_step']:.2f} | {t['s_per_step']:.2f} | **{r['ratio']:.2f}x** | "
                     f"{e['peak_mib']:.0f} | {t['peak_mib']:.0f} |")
    lines += ["", f"Median per-pair ratio: **{report['median_ratio']:.2f}x** (above 1: the engine is faster).", ""]
    if mem:
        batches = sorted({int(b) for side in ("engine", "trl") for b in mem[side]["peaks"]})
        lines += [f"## The largest batch in {mem['budget_mib'] / 1024:.0f} GiB", "",
                  "Peak resident memory of the whole process (GNU time's %M: both models, AdamW state, data) over "
                  "a 2-step run at each batch size (pairs per step), until one exceeds the budget.", "",
                  "| pairs per step | " + " | ".join(str(b) for b in batches) + " | largest within budget |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for side, name in (("engine", "engine"), ("trl", "TRL")):
            peaks = {int(b): v for b, v in mem[side]["peaks"].items()}
            cells = [f"{peaks[b]:.0f} MiB" if b in peaks else "-" for b in batches]
            over = any(v > mem["budget_mib"] for v in peaks.values())  # else: no batch tried was too large
            largest = f"{mem[side]['largest']}" if over else f">= {mem[side]['largest']} (the largest tried)"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | **{largest}** |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
