"""One PPO iteration of the real trainer at a real size, phase by phase: generation, old and reference
log-probs, values, RM scores, rewards + GAE, the policy and value update, the weight sync; time and (on a
GPU) peak memory per phase, each beside its floor (its FLOPs at the matmul rate and its bytes at the copy
bandwidth, both measured in the same run), for the fused LM head on and off and each kernel backend.

    python -m bench.bench_ppo                       # GPU: a Qwen2.5-0.5B configuration, bf16, 64 x 256
    python -m bench.bench_ppo --size qwen2.5-1.5b
    python -m bench.bench_ppo --dry-run             # the same code at a tiny size on the CPU; nothing saved

Models are built from configs with random weights (nothing is downloaded). The iteration is
engine.trainers.ppo.ppo_iteration on a run made by make_ppo_run, as `python -m engine ppo` runs it;
the phases are the trainer's own `time/*` and `mem_gib/*` metrics. Iteration 1 warms up; the rows are the
median over the rest. Results: bench/results/<device>/ppo.{md,json} (ppo-<size>.* for other sizes).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from .harness import copy_bandwidth_gbps, provenance

# Qwen2.5 shapes (tied embeddings), and a tiny one for dry runs (head_dim 64 as vLLM's CPU backend wants)
SIZES = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv=2, inter=8960, vocab=151936),
    "tiny": dict(hidden=128, layers=2, heads=2, kv=1, inter=256, vocab=1024),
}
PHASES = ("generate", "logprobs", "ref_logprobs", "values", "score", "advantages", "update", "sync")


def _models(spec: dict, device: str, positions: int):
    """policy and value in float32 (trained: master weights), reference and reward model in the compute dtype."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    cfg = Qwen2Config(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv"], max_position_embeddings=positions, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0, num_labels=1)
    low = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg).to(device)
    reference = Qwen2ForCausalLM(cfg).to(device, low).requires_grad_(False).eval()
    reference.load_state_dict(policy.state_dict())
    value = Qwen2ForSequenceClassification(cfg).to(device)
    reward = Qwen2ForSequenceClassification(cfg).to(device, low).requires_grad_(False).eval()
    return policy, reference, value, reward


class _Ids:
    """The tokenizer facts the trainer reads (the prompts are random ids; nothing is decoded)."""
    pad_token_id, eos_token_id = 0, 1


def measure(size: str, device: str, *, batch: int, prompt_len: int, new_tokens: int, iterations: int, fused: bool,
            backend: str, minibatch: int, estimator: str = "gae") -> dict:
    """The median seconds and peak GiB of each phase over iterations 2..n, and the parameter count. A
    critic-free estimator samples 4 answers to each of batch / 4 prompts and has no value model."""
    from engine.config import Config, PPOConfig, RolloutConfig, RunConfig
    from engine.context import RunContext
    from engine.models.loading import compute_precision
    from engine.models.forward import PolicyLogprobs, SequenceScores
    from engine.trainers.ppo import ppo_iteration
    from engine.trainers.ppo_setup import PPOSetup, make_ppo_run

    spec = SIZES[size]
    policy, reference, value, reward = _models(spec, device, prompt_len + new_tokens)
    rm = SequenceScores(reward)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, spec["vocab"], (prompt_len,), generator=g).tolist() for _ in range(batch * 4)]
    with tempfile.TemporaryDirectory() as out:
        n = 1 if estimator in ("gae", "reinforce_pp") else 4
        cfg = Config(run=RunConfig(out=out, device=device, progress=False, fused_lm_head=fused,
                                   dtype="bfloat16" if device == "cuda" else "float32"),
                     ppo=PPOConfig(iterations=iterations, rollout_batch=batch // n, samples_per_prompt=n,
                                   advantage_estimator=estimator, minibatch=minibatch, epochs=1, eval_every=0,
                                   backend=backend),
                     rollout=RolloutConfig(backend="hf", max_new_tokens=new_tokens))
        ref = PolicyLogprobs(reference, backend=backend, fused=fused)
        setup = PPOSetup(load_policy=None, load_value=None, reference=ref,
                         score=lambda b, idx, results: rm(b), policy_dir=Path(out), prompts=prompts,
                         max_model_len=prompt_len + new_tokens)
        ctx = RunContext(cfg, Path(out), _Ids(), None)
        with compute_precision(cfg.run):
            run = make_ppo_run(ctx, setup, policy.train(), value.train() if estimator == "gae" else None, ptx=False)
            rows = [ppo_iteration(run, step, torch.Generator().manual_seed(step)) for step in range(iterations)]
        run.engine.close()
    rest = rows[1:] or rows
    out = {"params": sum(p.numel() for p in policy.parameters()), "tokens": batch * (prompt_len + new_tokens),
           "response_len": statistics.median(r["response_len"] for r in rest)}
    for phase in PHASES:  # a critic-free run has no "values" phase
        out[phase] = {"s": statistics.median(r.get(f"time/{phase}", 0.0) for r in rest),
                      "gib": max((r.get(f"mem_gib/{phase}", 0.0) for r in rest), default=0.0)}
    return out


def floors(m: dict, *, batch: int, new_tokens: int, tflops: float, copy_gbps: float, low_bytes: int) -> dict:
    """Seconds each phase needs at least: FLOPs at the measured matmul rate, or the weights' (and for
    generation, each step's) bytes at the measured copy bandwidth, whichever is larger. 2 FLOPs per
    parameter per token forward, 6 forward + backward (attention's share is left out: short sequences)."""
    p, tokens = m["params"], m["tokens"]
    fwd = 2 * p * tokens
    weights = p * low_bytes

    def floor(flops, nbytes):
        return max(flops / (tflops * 1e12), nbytes / (copy_gbps * 1e9))
    return {"generate": floor(2 * p * batch * new_tokens, weights * new_tokens), "logprobs": floor(fwd, weights),
            "ref_logprobs": floor(fwd, weights), "values": floor(fwd, weights), "score": floor(fwd, weights),
            "advantages": 0.0, "update": floor(2 * 3 * fwd, 2 * 4 * p * 4), "sync": 0.0}


def render(results: list[dict], meta: dict) -> str:
    lines = [f"# One PPO iteration on {meta['device']}", "",
             f"Date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}; {meta.get('gpu') or meta.get('cpu')}.",
             "", f"Command: `{meta['command']}`", "",
             f"Measured in the same run: matmul {meta['matmul_tflops']:.1f} TFLOP/s ({meta['dtype']}), copy bandwidth "
             f"{meta['copy_gbps']:.1f} GB/s. Floor: a phase's FLOPs at that matmul rate or its bytes at that bandwidth, "
             "whichever is larger (generation: every step reads the weights).", ""]
    for r in results:
        lines += [f"## {r['size']}, {r['params'] / 1e6:.1f}M parameters, fused LM head {'on' if r['fused'] else 'off'}, "
                  f"kernels `{r['backend']}`, estimator `{r['estimator']}`", "",
                  f"{r['batch']} prompts x {r['prompt_len']} tokens, up to {r['new_tokens']} new (median answer "
                  f"{r['response_len']:.0f}); median of iterations 2..{r['iterations']}.", "",
                  "| phase | seconds | floor s | x floor | peak GiB |", "|---|---|---|---|---|"]
        for phase in PHASES:
            s, f = r["phases"][phase]["s"], r["floors"][phase]
            lines.append(f"| {phase} | {s:.3f} | {f:.3f} | {s / f:.1f} | {r['phases'][phase]['gib']:.1f} |" if f else
                         f"| {phase} | {s:.3f} | | | {r['phases'][phase]['gib']:.1f} |")
        total = sum(r["phases"][p]["s"] for p in PHASES)
        lines += [f"| **iteration** | **{total:.3f}** | | | |", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_ppo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="qwen2.5-0.5b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--backends", default="auto", help="comma-separated kernel backends (auto,torch,triton,cuda)")
    ap.add_argument("--fused", default="on,off", help="fused LM head: on, off or on,off")
    ap.add_argument("--estimators", default="gae", help="comma-separated advantage estimators (gae = PPO with a "
                                                         "value model; grpo etc. have none)")
    ap.add_argument("--dry-run", action="store_true", help="tiny size, 2 iterations, nothing saved")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.batch, args.prompt_len, args.new_tokens, args.iterations = "tiny", 4, 8, 8, 2
    from .bench_linear_logprobs import matmul_tflops

    dev = args.device
    low = torch.bfloat16 if dev == "cuda" else torch.float32
    tflops = matmul_tflops(dev, low, n=512 if args.dry_run else 4096)
    copy_gbps = copy_bandwidth_gbps(dev, mib=16 if args.dry_run else 256)
    results = []
    combos = [(b, f == "on", "gae") for b in args.backends.split(",") for f in args.fused.split(",")]
    combos += [(args.backends.split(",")[0], True, e) for e in args.estimators.split(",") if e != "gae"]
    for backend, fused, estimator in combos:
        shape = dict(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     iterations=args.iterations)
        m = measure(args.size, dev, fused=fused, backend=backend, minibatch=max(1, args.batch // 4),
                    estimator=estimator, **shape)
        results.append({"size": args.size, "fused": fused, "backend": backend, "estimator": estimator, **shape,
                        "params": m["params"], "response_len": m["response_len"], "phases": {p: m[p] for p in PHASES},
                        "floors": floors(m, batch=args.batch, new_tokens=args.new_tokens, tflops=tflops,
                                         copy_gbps=copy_gbps, low_bytes=torch.finfo(low).bits // 8)})
        if dev == "cuda":
            torch.cuda.empty_cache()
    meta = provenance("python -m bench.bench_ppo " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), dev)
    meta.update(matmul_tflops=tflops, copy_gbps=copy_gbps, dtype=str(low).split(".")[-1])
    text = render(results, meta)
    print(text)
    if not args.dry_run:
        out = save_ppo(results, meta, text, "ppo" if args.size == "qwen2.5-0.5b" else f"ppo-{args.size}")
        print("saved", out)
    return 0


def save_ppo(results: list[dict], meta: dict, text: str, name: str) -> Path:
    """bench/results/<device>/<name>.{md,json}"""
    import json

    from .harness import RESULTS

    folder = RESULTS / meta["device"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (folder / f"{name}.md").write_text(text)
    return folder / f"{name}.md"


if __name__ == "__main__":
    sys.exit(main())
