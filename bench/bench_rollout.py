"""Rollout throughput (vLLM vs transformers generate at the same batch) and the time to push all weights
into the running vLLM engine, against model size. `python -m bench.bench_rollout [--quick]`.

Models are built from configs with random weights (nothing is downloaded): the built-in tiny Llama, a ~50M
Llama and a Qwen2-0.5B-shaped model. Results: bench/results/<device>/rollout.{md,json}.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import Result, copy_bandwidth_gbps, provenance, save, table

CONFIGS = {
    "tiny (built-in)": dict(arch="llama", hidden=128, layers=2, heads=2, kv=2, inter=256, vocab=None),
    "~50M Llama": dict(arch="llama", hidden=512, layers=8, heads=8, kv=8, inter=1376, vocab=32000),
    "~0.5B Qwen2": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936),
}


def build(spec: dict, out: Path, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from engine.task.vocab import build_tokenizer

    tok = build_tokenizer()
    vocab = spec["vocab"] or len(tok)
    cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if spec["arch"] == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                  num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                  num_key_value_heads=spec["kv"], max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = cls(cfg).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


def tokens_per_second(rollout, prompts, new_tokens: int, reps: int) -> tuple[float, float]:
    times, counts = [], []
    rollout.generate(prompts[:2], max_tokens=4)  # warm-up
    for i in range(reps):
        t0 = time.perf_counter()
        res = rollout.generate(prompts, max_tokens=new_tokens, temperature=1.0, seed=i)
        times.append(time.perf_counter() - t0)
        counts.append(sum(len(r.token_ids) for r in res))
    med = statistics.median(times)
    return statistics.median(counts) / med, med


def sync_times(rollout, model, reps: int = 3) -> tuple[float, list[float]]:
    """(seconds of the first sync, which learns where each tensor goes; seconds of the next `reps`)."""
    t0 = time.perf_counter()
    rollout.update_weights(model.named_parameters())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rollout.update_weights(model.named_parameters())
        times.append(time.perf_counter() - t0)
    return first, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_rollout", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smoke run (CI, the GPU kit's dry run): the first model, "
                    "batch 8 x 16 new tokens, one repetition; not a measurement")
    ap.add_argument("--batch", type=int, default=None, help="prompts per generate call (64; --quick 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (64; --quick 16)")
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 64)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    from engine.rollout import HFRollout, VLLMRollout

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dt = str(dtype).split(".")[-1]
    copy_bw = copy_bandwidth_gbps(device)
    names = list(CONFIGS)[:1] if args.quick else list(CONFIGS)
    # vLLM's CPU backend: the plain layout (default: every parameter synced in place) and oneDNN's packed one
    layouts = {"plain": False, "packed": True} if device == "cpu" else {"": False}
    results, notes = [], [f"Copy bandwidth measured in the same run: {copy_bw:.1f} GB/s (bytes read + written)."]
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            model, tok = build(CONFIGS[name], Path(d), dtype)
            model = model.to(device).eval()
            params = sum(p.numel() for p in model.parameters())
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(4, len(tok), (16,), generator=g).tolist() for _ in range(args.batch)]
            shape = f"{params / 1e6:.1f}M params"
            gen_shape = f"{shape}, batch {args.batch} x {args.new_tokens} new"
            throughput = {}
            trainer_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            for layout, packed in layouts.items():
                label = f"VLLMRollout ({layout} layout)" if layout else "VLLMRollout"
                with VLLMRollout(d, dtype=dt, seed=0, max_model_len=256, cpu_packed_gemm=packed) as vr:
                    reps = 1 if params > 2e8 or args.quick else 3
                    tps, sec = tokens_per_second(vr, prompts, args.new_tokens, reps=reps)
                    throughput[label] = tps
                    results.append(Result("rollout", label, gen_shape, dt, sec * 1e3, sec * 1e3, sec * 1e3,
                                          extra={"tokens_per_s": round(tps, 1)}))
                    first, sync = sync_times(vr, model)
                    # read the trainer's tensors, write the engine's copy of each in its dtype (the same for both
                    # layouts: the packed one's parameters are emptied, its weights live in oneDNN's buffers)
                    nbytes = trainer_bytes + params * torch.empty((), dtype=dtype).element_size()
                    floor_ms = nbytes / (copy_bw * 1e9) * 1e3
                    qs = sorted(sync)
                    med = statistics.median(sync) * 1e3
                    gbps = nbytes / (med * 1e-3) / 1e9
                    results.append(Result("update_weights", label, shape, dt, med, qs[0] * 1e3, qs[-1] * 1e3,
                                          bytes=nbytes, gbps=gbps, frac_copy_bw=gbps / copy_bw,
                                          extra={"floor_ms": round(floor_ms, 1),
                                                 "x_floor": round(med / floor_ms, 2),
                                                 "first_sync_ms": round(first * 1e3, 1),
                                                 "in_place": vr.last_sync["in_place"],
                                                 "reloaded": len(vr.last_sync["reloaded"])}))
            if params < 2e8 or args.quick:  # HF generate of the 0.5B model on 2 CPU cores takes minutes
                hr = HFRollout(model, seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                tps, sec = tokens_per_second(hr, prompts, args.new_tokens, reps=1 if args.quick else 2)
                throughput["HF generate"] = tps
                results.append(Result("rollout", "HFRollout (transformers generate)", gen_shape, dt, sec * 1e3,
                                      sec * 1e3, sec * 1e3, extra={"tokens_per_s": round(tps, 1)}))
            notes.append(f"{name}: " + ", ".join(f"{k} {v:.0f} tokens/s" for k, v in throughput.items()))
            del model
    print(table(results))
    for n in notes:
        print(n)
    if not args.quick:
        meta = provenance("python -m bench.bench_rollout " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                          device)
        meta["copy_bandwidth_gbps"] = copy_bw
        notes += ["rollout rows: median seconds of one generate() call for the whole batch (3 calls; 1 at 0.5B); "
                  "tokens/s counts the tokens actually generated.",
                  "update_weights: all parameters, transformers naming, 512 MiB buckets through collective_rpc, "
                  "prefix cache reset; median of 3 after a first sync (first_sync_ms, which learns where each "
                  "tensor goes). bytes = the trainer's tensors read + the engine's written; floor_ms = bytes / "
                  "the copy bandwidth of this run; x_floor = median / floor. in_place / reloaded: tensors copied "
                  "into the engine's storage / sent through vLLM's layer-wise reload (the layers it repacks)."]
        print("saved", save("rollout", results, meta, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
