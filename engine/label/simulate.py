"""The built-in task's simulated labelers at work through the app's HTTP API, as people would: each asks for
its next item, reads the prompt and the answers on the page, ranks or judges them with its own taste
(engine/task/people.py) and submits, until its queue is empty. The whole loop (sample K -> rank through the
app -> RM -> PPO -> blind comparison through the app) then runs on the CPU with no person at the keyboard.

    python -m engine label simulate --session DIR --url http://127.0.0.1:8765 [--heldout true]

Session labeler i is the task's labeler i (its `--heldout true` ones for a blind evaluation), made from the
task's default settings (engine.config.TaskConfig).
"""
from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path


def _call(url: str, path: str, token: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def label_queue(url: str, token: str, labeler, seed: int = 0) -> int:
    """Work through one labeler's queue; returns how many items it ranked or judged (skips excluded)."""
    from ..task.instructions import parse_instruction

    rng = random.Random(f"simulated-labeler-{seed}-{labeler.id}")
    done = 0
    while (item := _call(url, "/api/next", token))["item"] is not None:
        sid = f"sim-{labeler.id}-{item['item']}"
        inst = parse_instruction(_prompt_text(item["prompt"]))
        if inst is None:  # not one of the task's instructions: a person would skip it too
            _call(url, "/api/skip", token, {"id": sid, "item": item["item"]})
            continue
        responses, finished = item["responses"], item["finished"]
        if item["kind"] == "rank":
            ranks = labeler.rank(inst, responses, finished, rng)
            ranking = sorted(range(len(ranks)), key=lambda p: ranks[p])
            body = {"ranking": ranking, "ratings": [max(1, 7 - r) for r in ranks]}
        else:
            verdict = labeler.compare(inst, responses[0], responses[1], rng, finished[0], finished[1])
            body = {"choice": "tie" if verdict == 0.5 else (0 if verdict == 1.0 else 1)}
        _call(url, "/api/submit", token, {"id": sid, "item": item["item"], **body})
        done += 1
    return done


def simulate(folder: str | Path, url: str, heldout: bool = False, seed: int = 0) -> dict[str, int]:
    """Every labeler of the session, one after another, as the task's simulated labelers."""
    from ..config import TaskConfig
    from ..task.people import make_labelers

    cfg = TaskConfig()
    tokens = json.loads((Path(folder) / "tokens.json").read_text())["labelers"]
    first = cfg.n_labelers if heldout else 0
    people = make_labelers(len(tokens), first, cfg.label_noise, cfg.labeler_spread, cfg.seed)
    return {name: label_queue(url.rstrip("/"), tok, person, seed)
            for (name, tok), person in zip(tokens.items(), people)}
