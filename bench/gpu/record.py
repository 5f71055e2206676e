"""Records of the GPU kit's install and test steps, written like every benchmark's results:
bench/results/<gpu>/{install,tests}.{md,json} with device, date, commit and command.

    python -m bench.gpu.record install [--dry-run]
    python -m bench.gpu.record test --junit FILE [--dry-run]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import xml.etree.ElementTree as ET

import torch

from ..harness import RESULTS, provenance

OPS = ("token_logprobs", "linear_token_logprobs", "gae", "shape_rewards")
PACKAGES = ("torch", "triton", "transformers", "peft", "jsonargparse", "tensorboardX", "liger_kernel", "trl", "vllm")


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - absent or broken: say which
        return f"absent ({type(exc).__name__})"


def install_record() -> dict:
    from kernels import dispatch

    return {"packages": {p: _version(p) for p in PACKAGES},
            "cuda": torch.version.cuda, "gpu_available": torch.cuda.is_available(),
            "build_seconds": int(os.environ["BUILD_SECONDS"]) if os.environ.get("BUILD_SECONDS") else None,
            "backends": {op: [b for b in ("cuda", "triton", "cpu", "torch") if dispatch.available(op, b)] for op in OPS},
            "auto_on_cuda": {op: dispatch.resolve(op, "auto", "cuda")[0] for op in OPS} if torch.cuda.is_available()
            else None}


def test_record(junit: str) -> dict:
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def render(step: str, rec: dict, meta: dict) -> str:
    lines = [f"# GPU kit: {step} on {meta['device']}", "",
             f"Date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}; {meta.get('gpu') or meta.get('cpu')}.",
             "", f"Command: `{meta['command']}`", ""]
    if step == "install":
        lines += ["| package | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rec["packages"].items()]
        lines += ["", f"CUDA {rec['cuda']}; kernels._C built in {rec['build_seconds']} s (sm_90 only).", "",
                  "| op | backends available | auto on CUDA |", "|---|---|---|"]
        auto = rec["auto_on_cuda"] or {}
        lines += [f"| {op} | {', '.join(b)} | {auto.get(op, '')} |" for op, b in rec["backends"].items()]
    else:
        c = rec["counts"]
        lines += [f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped.", "",
                  "| test | outcome | message |", "|---|---|---|"]
        lines += [f"| {x['test']} | {x['outcome']} | {x['message']} |" for x in rec["cases"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.record")
    ap.add_argument("step", choices=("install", "test"))
    ap.add_argument("--junit", help="the test step's pytest --junitxml file")
    ap.add_argument("--dry-run", action="store_true", help="print the record, save nothing")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rec = install_record() if args.step == "install" else test_record(args.junit)
    meta = provenance(f"bash bench/gpu/run.sh {args.step}", device)
    text = render(args.step, rec, meta)
    print(text)
    if not args.dry_run:
        name = {"install": "install", "test": "tests"}[args.step]
        folder = RESULTS / meta["device"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps({"meta": meta, **rec}, indent=2))
        (folder / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
