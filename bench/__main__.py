"""`python -m bench`: every kernel against its naive path and peers, as one table, saved under
bench/results/<device>/kernels.{md,json}. The measurements are pytest-benchmark's (bench/test_kernels.py,
run here with --benchmark-json); this prints and saves them as a table. `--quick` uses small sizes (a smoke
run, not for the record); `python -m bench.bench_gae` (and _token_logprobs, _rewards, _linear_logprobs,
_groups) prints one kernel's rows. Extra arguments after `--` go to pytest (e.g. `-- --benchmark-autosave`)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from . import suite
from .harness import Result, provenance, save, table


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes; results are not saved")
    ap.add_argument("--only", choices=sorted(suite.KERNELS), help="one kernel's rows, printed and not saved (what "
                    "`python -m bench.bench_<kernel>` runs)")
    args = ap.parse_args(own)
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        code = pytest.main([str(Path(__file__).with_name("test_kernels.py")), "--benchmark-only", "-q",
                            "-p", "no:cacheprovider", f"--benchmark-json={report}", "--benchmark-columns=median,iqr,rounds",
                            f"--bench-device={args.device}", f"--bench-size={'quick' if args.quick else args.device}",
                            *([f"--bench-only={args.only}"] if args.only else []), *extra])
        if code != 0 or not report.exists():
            print(f"the benchmark run failed (pytest exit code {int(code)})", file=sys.stderr)
            return int(code) or 1
        data = json.loads(report.read_text())
    results = [Result(**b["extra_info"]["result"]) for b in data["benchmarks"]]
    copy_bw = data["machine_info"]["copy_bandwidth_gbps"]
    print(f"\nmeasured copy bandwidth: {copy_bw:.1f} GB/s (bytes read + written)\n")
    print(table(results))
    if not args.quick and not args.only:
        meta = provenance("python -m bench " + " ".join(shlex.quote(a) for a in argv), args.device)
        meta["copy_bandwidth_gbps"] = copy_bw
        notes = [f"Copy bandwidth measured in the same run: {copy_bw:.1f} GB/s (a 256 MiB float32 copy, "
                 "bytes read + written). 'of copy BW' is each kernel's minimum bytes over its median time, "
                 "as a fraction of that.",
                 "Timed by pytest-benchmark (bench/test_kernels.py): 2 warm-up calls, then as many as fit in 2 s "
                 "(5 to 200); median and 20th/80th percentiles of those.",
                 "Peak extra MiB: the process's peak resident memory above the baseline during one call "
                 "(CPU) or torch.cuda.max_memory_allocated above the baseline (CUDA).",
                 f"Torch's CPU tensors of 2 MiB and more on transparent huge pages: THP_MEM_ALLOC_ENABLE="
                 f"{meta['thp_alloc']} (bench/__init__.py)."]
        print("\nsaved", save("kernels", results, meta, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
