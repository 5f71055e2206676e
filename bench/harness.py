"""The one harness every benchmark uses: timing with spread, bytes moved, fraction of the measured copy
bandwidth, peak extra memory, and where results are written.

Kernel cases (`Case`) are timed by pytest-benchmark in bench/test_kernels.py (`pytest bench
--benchmark-only`; `python -m bench` runs that and prints the tables from its JSON); `time_fn` times the
calibrations (copy bandwidth, matmul rate) and the end-to-end benchmarks: on CUDA, triton.testing.do_bench
(L2 flushed between runs); on the CPU, repeated wall-clock runs after warm-up. Both report the median and the
20th/80th percentiles in milliseconds.
Peak extra memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call; on
the CPU, the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) above its
resident set before the call, with glibc told to mmap every allocation of 64 KiB or more and unmap it on
free (torch's CPU allocator does not cache), so every temporary shows, reused or not.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Result:
    kernel: str           # what is computed, e.g. "token_logprobs fwd"
    impl: str             # whose implementation, e.g. "ours (cpu)", "naive torch", "TRL selective_log_softmax"
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes: int | None = None          # minimum bytes the op must move (reads + writes)
    gbps: float | None = None
    frac_copy_bw: float | None = None
    peak_extra_mb: float | None = None
    extra: dict = field(default_factory=dict)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int | None = None,
            budget_s: float = 2.0) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device == "cuda":
        import triton.testing

        qs = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(budget_s * 100))
        return tuple(float(q) for q in qs)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while (reps is None and (len(times) < 5 or time.perf_counter() - start < budget_s) and len(times) < 200) or \
            (reps is not None and len(times) < reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), qs[1], qs[7]


@dataclass
class Case:
    """One benchmark case: what is computed, whose implementation, and a no-argument call that runs it once.
    nbytes: the minimum bytes it must move (for GB/s and the fraction of copy bandwidth); flops: its FLOPs
    (for TFLOP/s against the measured matmul rate, `peak_tflops`)."""

    kernel: str
    impl: str
    shape: str
    dtype: str
    fn: Callable[[], object]
    nbytes: int | None = None
    flops: int | None = None
    peak_tflops: float | None = None

    @property
    def label(self) -> str:
        return f"{self.kernel} | {self.impl} | {self.shape} | {self.dtype}"


def summarize(case: Case, times_ms: list[float], copy_bw: float, peak_mb: float | None) -> Result:
    """A Case's Result from its per-call times: median and 20th/80th percentiles, bandwidth and FLOP rate."""
    qs = statistics.quantiles(times_ms, n=10) if len(times_ms) >= 2 else [times_ms[0]] * 9
    med = statistics.median(times_ms)
    gbps = case.nbytes / (med * 1e-3) / 1e9 if case.nbytes else None
    extra = {}
    if case.flops and case.peak_tflops:
        tflops = case.flops / (med * 1e-3) / 1e12
        extra = {"tflops": round(tflops, 3), "frac_matmul_peak": round(tflops / case.peak_tflops, 3),
                 "matmul_peak_tflops": round(case.peak_tflops, 3)}
    return Result(case.kernel, case.impl, case.shape, case.dtype, med, qs[1], qs[7], case.nbytes, gbps,
                  gbps / copy_bw if gbps else None, peak_mb, extra)


def rounds_for(fn: Callable[[], object], device: str, budget_s: float = 2.0) -> int:
    """How many timed calls fit in the budget (at least 5, at most 200), from one untimed call."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    return int(min(200, max(5, budget_s / one)))


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _mallopt(mmap_threshold: int) -> None:
    """glibc: allocations of at least `mmap_threshold` bytes get their own mmap, unmapped on free."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, mmap_threshold)       # M_MMAP_THRESHOLD (a fixed value)
    libc.mallopt(-1, 2 * mmap_threshold)   # M_TRIM_THRESHOLD


def peak_extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory above the baseline while fn runs once, in MiB."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # While measuring, every allocation of 64 KiB or more is a fresh mapping, so reused memory counts too;
    # afterwards, glibc's usual steady state (32 MiB, where its dynamic threshold ends up) for the timings.
    # One thread while measuring: Linux keeps RSS counters per thread and syncs them lazily, so pages touched
    # by worker threads would show up late (or not at all) in VmHWM.
    _mallopt(64 * 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kb("VmRSS")
        out = fn()
        del out
        return (_rss_kb("VmHWM") - base) / 1024
    except OSError:
        return None
    finally:
        torch.set_num_threads(threads)
        _mallopt(32 * 2**20)


def copy_bandwidth_gbps(device: str, mib: int = 256) -> float:
    """The machine's measured copy bandwidth (bytes read + written per second), the ceiling for
    memory-bound kernels."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (med * 1e-3) / 1e9


def provenance(command: str, device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit = commit + ("+dirty" if dirty else "")
    except OSError:
        commit = None
    if not commit or commit.startswith("+"):  # no git (the GPU machine's copy): what prepare.sh recorded
        commit = os.environ.get("RLHF_ENGINE_COMMIT")
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "command": command, "device": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}
    if device == "cpu":
        info["cpu"] = _cpu_model()
    else:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def provenance_line(p: dict) -> str:
    """The line under a result's title that says when, where and how it was measured (from `provenance`)."""
    return f"{p['date']}, commit {p['commit']}, {p.get('cpu', p['device'])}, torch {p['torch']}, `{p['command']}`."


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(results: list[Result]) -> str:
    head = ("| kernel | implementation | shape | dtype | median ms | p20-p80 ms | GB/s | of copy BW | "
            "TFLOP/s (of matmul peak) | peak extra MiB | other |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        rows.append(
            f"| {r.kernel} | {r.impl} | {r.shape} | {r.dtype} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | "
            f"{'' if r.gbps is None else f'{r.gbps:.1f}'} | "
            f"{'' if r.frac_copy_bw is None else f'{100 * r.frac_copy_bw:.0f}%'} | "
            f"{_flops(r)} | "
            f"{'' if r.peak_extra_mb is None else f'{r.peak_extra_mb:.1f}'} | {_other(r)} |")
    return head + "\n" + "\n".join(rows)


def _other(r: Result) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.extra.items() if k not in ("tflops", "frac_matmul_peak"))


def _flops(r: Result) -> str:
    if "tflops" not in r.extra:
        return ""
    return f"{r.extra['tflops']:.2f} ({100 * r.extra['frac_matmul_peak']:.0f}%)"


def save(name: str, results: list[Result], meta: dict, notes: list[str]) -> Path:
    """bench/results/<device>/<name>.{json,md}"""
    out = RESULTS / meta["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    md = [f"# {name} on {meta['device']}", "",
          f"Date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}; {meta['threads']} threads; "
          f"{meta.get('cpu') or meta.get('gpu')}.", "", f"Command: `{meta['command']}`", "", table(results), ""]
    md += [f"- {n}" for n in notes]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return out / f"{name}.md"


def write_rows(name: str, device: str, meta: dict, rows: list[dict], text: str, plot=None) -> Path:
    """A whole-job bench's results: bench/results/<device>/<name>.json (meta and rows) and .md (text), and
    .png where plot(rows, path) draws one. Returns the .md's path."""
    out = RESULTS / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text(text)
    if plot is not None:
        plot(rows, out / f"{name}.png")
    return out / f"{name}.md"


def run_only(key: str) -> None:
    """`python -m bench.bench_<kernel>`: runs `python -m bench --only <key>` with the same arguments (the
    suite's command, through runpy rather than an import: the suite imports every bench_<kernel> module)."""
    import runpy
    import sys

    sys.argv = ["python -m bench", "--only", key, *sys.argv[1:]]
    runpy.run_module("bench", run_name="__main__", alter_sys=True)
