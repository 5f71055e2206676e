"""`python -m bench`: every kernel against its naive path and peers, as one table, saved under
bench/results/<device>/kernels.{md,json}. `--quick` uses small sizes (a smoke run, not for the record);
`python -m bench.bench_gae` (and _token_logprobs, _rewards, _linear_logprobs, _groups) prints one kernel's rows."""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from . import bench_gae, bench_groups, bench_linear_logprobs, bench_rewards, bench_token_logprobs
from .harness import copy_bandwidth_gbps, provenance, save, table


SIZES = {  # per kernel: (token log-probs N, V, dtype), (GAE B, T), (rewards B, T), (fused head N, H, V, dtype),
           # (group advantages prompts, n)
    "quick": dict(lp=(64, 1001, torch.float32), gae=(8, 64), rew=(8, 64), lin=(64, 32, 1001, torch.float32),
                  grp=(16, 4)),
    # the fused head at Liger-Kernel's published size (M 8192, H 4096, V 131072) and at the memory target's
    "cuda": dict(lp=(16384, 151936, torch.bfloat16), gae=(256, 2048), rew=(1024, 8192),
                 lin=[(8192, 4096, 131072, torch.bfloat16), (16384, 3584, 151936, torch.bfloat16)], grp=(4096, 16)),
    "cpu": dict(lp=(2048, 32000, torch.float32), gae=(256, 2048), rew=(1024, 8192),
                lin=(4096, 512, 32000, torch.float32), grp=(4096, 16)),
}
KERNELS = {"lp": bench_token_logprobs, "gae": bench_gae, "rew": bench_rewards, "lin": bench_linear_logprobs,
           "grp": bench_groups}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes; results are not saved")
    ap.add_argument("--only", choices=sorted(KERNELS), help="one kernel's rows, printed and not saved (what "
                    "`python -m bench.bench_<kernel>` runs)")
    args = ap.parse_args(argv)
    dev = args.device
    copy_bw = copy_bandwidth_gbps(dev)
    sizes = SIZES["quick" if args.quick else dev]
    results = []
    for key, module in KERNELS.items():
        if args.only in (None, key):
            for size in sizes[key] if isinstance(sizes[key], list) else [sizes[key]]:
                results += module.run(dev, copy_bw, *size)
    print(f"measured copy bandwidth: {copy_bw:.1f} GB/s (bytes read + written)\n")
    print(table(results))
    if not args.quick and not args.only:
        meta = provenance("python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), dev)
        meta["copy_bandwidth_gbps"] = copy_bw
        notes = [f"Copy bandwidth measured in the same run: {copy_bw:.1f} GB/s (a {256} MiB float32 copy, "
                 "bytes read + written). 'of copy BW' is each kernel's minimum bytes over its median time, "
                 "as a fraction of that.",
                 "Peak extra MiB: the process's peak resident memory above the baseline during one call "
                 "(CPU) or torch.cuda.max_memory_allocated above the baseline (CUDA)."]
        print("\nsaved", save("kernels", results, meta, notes))
    return 0


def main_only(key: str) -> int:
    """The `python -m bench.bench_<kernel>` entry point: that kernel's rows at the same sizes."""
    return main(["--only", key, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
