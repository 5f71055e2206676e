"""The built-in pipeline's evaluation, redone through the labeling app: the held-out simulated labelers judge PPO
against SFT blind, through the app's HTTP API, and the app's report is set beside the pipeline's own.

Given a finished run of the built-in task (default: a fresh `python -m engine pipeline` in a temporary folder),
`python -m engine label compare --policies sft=...,ppo=...` samples one answer per held-out prompt from each
(600 prompts, the task's default answer length), the app is served on loopback, `label simulate --heldout true`
lets the task's 4 held-out labelers judge every pair through the API, and `label report` gives the win rate
with its 95% interval. The pipeline's report judged other samples of the same policies with the same labelers,
so the two should agree within the interval.

    python -m bench.bench_label_loop [--run DIR]     -> bench/results/cpu-2core/label-loop.{md,json}
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _engine(*argv) -> None:
    done = subprocess.run([sys.executable, "-m", "engine", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"python -m engine {' '.join(map(str, argv))} failed:\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a finished built-in run (default: run the pipeline)")
    args = ap.parse_args(argv)
    from .harness import provenance

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or Path(tmp) / "run"
        if args.run is None:
            _engine("pipeline", "--out", run, "--run.progress", "false")
        pipeline = json.loads((run / "report.json").read_text())
        session = Path(tmp) / "eval"
        t0 = time.perf_counter()
        _engine("label", "compare", "--policies", f"sft={run / 'sft/final/policy'},ppo={run / 'ppo/final/policy'}",
                "--prompts", run / "data" / "eval_prompts.jsonl", "--labelers", "h1,h2,h3,h4", "--to", session,
                "--max_new_tokens", "20", "--seed", "1234", "--serve", "false")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "engine", "label", "serve", "--session", session, "--port",
                                   str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            _engine("label", "simulate", "--session", session, "--url", f"http://127.0.0.1:{port}", "--heldout", "true")
        finally:
            server.kill()
            server.wait()
        _engine("label", "report", "--session", session)
        app = json.loads((session / "report.json").read_text())
        seconds = time.perf_counter() - t0
    w = app["win_rates"]["ppo vs sft"]
    result = {"pipeline_ppo_vs_sft": pipeline["ppo_vs_sft_win_rate"], "app": w, "agreement": app["agreement"],
              "seconds": seconds,
              "provenance": provenance(" ".join(["python -m bench.bench_label_loop", *(argv or sys.argv[1:])]), "cpu")}
    dest = ROOT / "bench" / "results" / "cpu-2core"
    (dest / "label-loop.json").write_text(json.dumps(result, indent=2))
    (dest / "label-loop.md").write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    p, w = r["provenance"], r["app"]
    inside = w["ci95"][0] <= r["pipeline_ppo_vs_sft"] <= w["ci95"][1]
    return "\n".join([
        "# The built-in task's evaluation through the labeling app", "",
        f"{p['date']}, commit {p['commit']}, {p.get('cpu', p['device'])}, `{p['command']}`.", "",
        "The task's 4 held-out simulated labelers judged PPO against SFT blind through the app's HTTP API (one "
        "answer per policy for each of the held-out prompts, left/right shuffled, the policies never named).", "",
        "| | PPO's win rate vs SFT | 95% interval | judgments |", "|---|---|---|---|",
        f"| through the app (`label report`) | **{100 * w['win_rate']:.1f}%** | {100 * w['ci95'][0]:.1f}% - "
        f"{100 * w['ci95'][1]:.1f}% | {w['n']} ({w['ties']} ties) |",
        f"| the pipeline's report (other samples, same labelers) | {100 * r['pipeline_ppo_vs_sft']:.1f}% | | |", "",
        f"The pipeline's figure is {'inside' if inside else 'outside'} the app's interval. Sampling, serving and "
        f"judging took {r['seconds']:.0f} s on the 2-core machine.", ""])


if __name__ == "__main__":
    main()
