"""The labeling app: the durable log, the session's rules, and the real server (uvicorn on loopback, real HTTP
requests): tokens, bounded bodies, rankings saved in the engine's format that `rm` trains on, and a load test
with the server killed by SIGKILL midway: every acknowledged submission is in the file exactly once."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from engine.label.session import FLAGS, Session, SubmissionError, create_session
from engine.label.store import SubmissionLog

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def items(n, k=3):
    return [{"prompt": f"Question {i}: name a colour.", "responses": [f"Answer {j} to {i}." for j in range(k)]}
            for i in range(n)]


def test_the_log_cuts_a_torn_last_line_and_keeps_each_id_once(tmp_path):
    path = tmp_path / "log.jsonl"
    log = SubmissionLog(path)
    assert log.append({"id": "a", "x": 1}) and log.append({"id": "b", "x": 2})
    assert not log.append({"id": "a", "x": 3})  # a resend: acknowledged, not stored again
    log.close()
    with open(path, "a") as f:
        f.write('{"id": "c", "x"')            # a write cut by a kill: never acknowledged
    again = SubmissionLog(path)
    assert [r["id"] for r in again.records] == ["a", "b"] and path.read_text().endswith("}\n")
    assert again.append({"id": "c", "x": 4})
    again.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(ValueError, match="symbolic link"):
        SubmissionLog(link)


def test_assignments_overlap_and_the_shown_order_maps_back_to_the_responses(tmp_path):
    folder = create_session(tmp_path / "s", items(400), ["ann", "bob", "cy"], overlap=0.25, seed=3)
    s = Session.open(folder)
    counts = [len(s.assigned(i)) for i in s.items]
    assert set(counts) == {1, 2} and 0.18 < counts.count(2) / 400 < 0.32
    assert all(len(set(s.assigned(i))) == len(s.assigned(i)) for i in s.items)
    assert sum(len(s.queue(n)) for n in ("ann", "bob", "cy")) == sum(counts)
    orders = {tuple(s.order(n, i)) for n in ("ann", "bob", "cy") for i in list(s.items)[:50]}
    assert len(orders) == 6  # every order of 3 responses occurs: no response is always shown first
    name = "ann"
    shown = s.next_item(name)
    order = s.order(name, shown["item"])
    assert shown["responses"] == [s.items[shown["item"]]["responses"][j] for j in order]
    # the labeler puts the last shown response first, then the rest as shown; rates by position
    ranking = [2, 0, 1]
    assert s.submit(name, {"id": "x1", "item": shown["item"], "ranking": ranking, "ratings": [7, 1, 4],
                           "flags": [[], [FLAGS[1]], []], "seconds": 12.5})
    rec = s.comparisons.records[-1]
    assert rec["ranking"] == [order[2], order[0], order[1]]
    assert rec["ratings"][order[0]] == 7 and rec["ratings"][order[1]] == 1 and rec["ratings"][order[2]] == 4
    assert rec["flags"][order[1]] == [FLAGS[1]] and rec["flags"][order[0]] == []
    assert rec["labeler"] == name and rec["seconds"] == 12.5 and rec["responses"] == s.items[shown["item"]]["responses"]
    assert not s.submit(name, {"id": "x1", "item": shown["item"], "ranking": ranking, "ratings": [7, 1, 4],
                               "flags": [[], [FLAGS[1]], []]})  # a resend: the same answer under the same id
    with pytest.raises(SubmissionError, match="already submitted"):
        s.submit(name, {"id": "x2", "item": shown["item"], "ranking": ranking, "ratings": [7, 1, 4]})
    other = next(i for i in s.items if name not in s.assigned(i))
    for bad, match in [({"item": other}, "not one of yours"), ({"ranking": [0, 0, 1]}, "permutation"),
                       ({"ratings": [8, 1, 1]}, "from 1 to 7"), ({"ratings": [True, 1, 1]}, "from 1 to 7"),
                       ({"flags": [["nope"], [], []]}, "flags"), ({"id": "y" * 65}, "'id'")]:
        body = {"id": "y", "item": s.next_item(name)["item"], "ranking": [0, 1, 2], "ratings": [1, 2, 3], **bad}
        with pytest.raises(SubmissionError, match=match):
            s.submit(name, body)
    s.close()
    assert Session.open(folder).queue(name) == s.queue(name)  # a restart resumes the same queue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(folder, port, *extra: str, scheme: str = "http") -> subprocess.Popen:
    """`label serve` of `folder` on `port` (extra: more flags; scheme https with --tls_cert/--tls_key), once it
    answers; its output is kept in `proc.output` (a file, not a pipe: a server that writes much never blocks)."""
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "label", "serve", "--session", str(folder), "--port",
                             str(port), *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc.output = out
    for _ in range(600):
        try:
            httpx.get(f"{scheme}://127.0.0.1:{port}/api/next", timeout=1, verify=False)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                out.seek(0)
                raise AssertionError(out.read().decode(errors="replace"))
            time.sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.fixture
def server(tmp_path):
    folder = create_session(tmp_path / "s", items(6), ["ann", "bob"], overlap=1.0)
    port = free_port()
    proc = start(folder, port)
    yield folder, f"http://127.0.0.1:{port}", json.loads((folder / "tokens.json").read_text())
    proc.kill()
    proc.wait()


def test_every_request_needs_the_right_token_and_bodies_are_bounded(server):
    folder, url, tokens = server
    ann = {"Authorization": "Bearer " + tokens["labelers"]["ann"]}
    admin = {"Authorization": "Bearer " + tokens["admin"]}
    assert oct(os.stat(folder / "tokens.json").st_mode & 0o777) == "0o600"
    for path in ("/api/next", "/rank", "/admin", "/api/progress"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path + "?token=wrong").status_code == 401
    page = httpx.get(url + "/rank?token=" + tokens["labelers"]["ann"])
    assert page.text.startswith("<!doctype html>")
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/api/next", headers=admin).status_code == 401       # the admin ranks nothing
    assert httpx.get(url + "/api/progress", headers=ann).status_code == 401     # a labeler sees no one else
    assert httpx.post(url + "/api/submit", headers=ann, content=b"x" * 70000).status_code == 413
    assert httpx.post(url + "/api/submit", headers=ann, content=b"[1, 2]").status_code == 400
    nxt = httpx.get(url + "/api/next", headers=ann).json()
    body = {"id": "s1", "item": nxt["item"], "ranking": [1, 0, 2], "ratings": [5, 6, 2], "seconds": 3}
    assert httpx.post(url + "/api/submit", headers=ann, json=body).json() == {"saved": True, "new": True}
    assert httpx.post(url + "/api/submit", headers=ann, json=body).json() == {"saved": True, "new": False}
    r = httpx.post(url + "/api/submit", headers=ann, json={**body, "id": "s2"})
    assert r.status_code == 409 and "already submitted" in r.json()["detail"]
    assert httpx.post(url + "/api/skip", headers=ann, json={"id": "k1", "item": nxt["item"]}).status_code == 409
    progress = httpx.get(url + "/api/progress", headers=admin).json()
    assert progress["labelers"]["ann"] == {"assigned": 6, "labeled": 1, "skipped": 0}


def test_an_undo_replaces_the_labelers_own_record_in_place_and_nothing_else(tmp_path):
    """A correction ("corrects": the id of the labeler's saved answer on that item) leaves exactly one record for
    the item, where the first one was, durable across a reopen; a resend of it is acknowledged, not stored; a
    correction of another labeler's record, of another item's or of an unknown id is refused (409)."""
    folder = create_session(tmp_path / "s", items(3), ["ann", "bob"], overlap=1.0, per_shared=2)
    s = Session.open(folder)
    first, second = s.queue("ann")[:2]
    body = {"id": "a1", "item": first, "ranking": [0, 1, 2], "ratings": [1, 2, 3]}
    assert s.submit("ann", body) and s.submit("bob", {**body, "id": "b1"})
    assert s.submit("ann", {**body, "id": "a2", "item": second})
    fixed = {**body, "id": "a3", "ranking": [2, 1, 0], "ratings": [7, 7, 7], "corrects": "a1"}
    assert s.submit("ann", fixed) is True and s.submit("ann", fixed) is False
    for corrects, item in (("b1", first), ("a2", first), ("nope", first), (["a3"], first), ("a3", second)):
        with pytest.raises(SubmissionError) as err:
            s.submit("ann", {**fixed, "id": "a4", "item": item, "corrects": corrects})
        assert err.value.status == 409 and "'corrects' must name your saved answer" in str(err.value)
    with pytest.raises(SubmissionError, match="already submitted"):  # a late resend of the replaced answer
        s.submit("ann", body)
    s.close()
    rows = [json.loads(line) for line in (folder / "comparisons.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a3", "b1", "a2"]
    reader = Session.open(folder, write=False)
    order = reader.order("ann", first)
    reader.close()
    assert rows[0]["ranking"] == [order[2], order[1], order[0]] and rows[0]["ratings"] == [7, 7, 7]
    again = Session.open(folder)
    assert first not in again.queue("ann") and [r["id"] for r in again.comparisons.records] == ["a3", "b1", "a2"]
    again.close()
    assert not [p for p in folder.iterdir() if "tmp" in p.name]


def test_rankings_saved_through_the_app_train_a_reward_model_as_they_are(tmp_path, tiny_models):
    from flag_bundles import cli_with_bundles as cli

    folder = create_session(tmp_path / "s", items(8, k=4), ["ann"], source={"policy": "p"})
    port = free_port()
    proc = start(folder, port)
    try:
        headers = {"Authorization": "Bearer " + json.loads((folder / "tokens.json").read_text())["labelers"]["ann"]}
        n = 0
        while (nxt := httpx.get(f"http://127.0.0.1:{port}/api/next", headers=headers).json())["item"]:
            body = {"id": f"s{n}", "item": nxt["item"], "ranking": [3, 1, 0, 2], "ratings": [1, 2, 3, 4],
                    "flags": [[FLAGS[0]], [], [], []]}
            if n == 5:
                assert httpx.post(f"http://127.0.0.1:{port}/api/skip", headers=headers, json=body).is_success
                skipped = nxt["item"]
            else:
                assert httpx.post(f"http://127.0.0.1:{port}/api/submit", headers=headers, json=body).is_success
            n += 1
    finally:
        proc.kill()
        proc.wait()
    rows = [json.loads(line) for line in (folder / "comparisons.jsonl").read_text().splitlines()]
    # the skipped item came back once, after every other one, and was ranked then
    assert len(rows) == 8 and len((folder / "skips.jsonl").read_text().splitlines()) == 1
    assert rows[-1]["item"] == skipped and skipped not in [r["item"] for r in rows[:-1]]
    assert all(sorted(r["ranking"]) == [0, 1, 2, 3] and r["source"] == {"policy": "p"} for r in rows)
    assert cli(["rm", "--policy.path", str(tiny_models["llama"]), "--data.comparisons", str(folder / "comparisons.jsonl"),
                "--out", str(tmp_path / "run"), "--run.progress", "false", "--rm.steps", "2",
                "--rm.batch_size", "2"]) == 0
    assert (tmp_path / "run" / "rm" / "final" / "reward").is_dir()


def test_twenty_labelers_2000_submissions_and_a_sigkill_midway_lose_nothing_acknowledged(tmp_path):
    """20 labelers, 100 items each, submitting at once; the server is killed with SIGKILL after ~800
    acknowledgements and started again; each client resends its unacknowledged submission (same id) until
    the server answers. Every acknowledged id is in the file exactly once, and every submission was made."""
    names = [f"l{i:02d}" for i in range(20)]
    folder = create_session(tmp_path / "s", items(2000, k=2), names)
    tokens = json.loads((folder / "tokens.json").read_text())["labelers"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = {"proc": start(folder, port), "acked": []}
    lock = threading.Lock()

    def labeler(name):
        headers = {"Authorization": "Bearer " + tokens[name]}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            done = 0
            while True:
                try:
                    nxt = client.get("/api/next").json()
                    if nxt["item"] is None:
                        return
                    body = {"id": f"{name}-{done}", "item": nxt["item"], "ranking": [1, 0], "ratings": [3, 4]}
                    while True:
                        try:
                            r = client.post("/api/submit", json=body)
                            break
                        except httpx.TransportError:
                            time.sleep(0.05)  # the server is down: resend the same submission
                    assert r.status_code == 200, r.text
                    with lock:
                        state["acked"].append(body["id"])
                    done += 1
                except httpx.TransportError:
                    time.sleep(0.05)

    threads = [threading.Thread(target=labeler, args=(n,)) for n in names]
    for t in threads:
        t.start()
    while len(state["acked"]) < 800:
        time.sleep(0.01)
    state["proc"].send_signal(signal.SIGKILL)
    state["proc"].wait()
    killed_at = len(state["acked"])
    state["proc"] = start(folder, port)
    for t in threads:
        t.join(timeout=600)
    state["proc"].kill()
    state["proc"].wait()
    ids = [json.loads(line)["id"] for line in (folder / "comparisons.jsonl").read_text().splitlines()]
    assert killed_at < 2000 and len(state["acked"]) == 2000
    assert len(ids) == len(set(ids)) == 2000 and set(ids) == set(state["acked"])


def test_win_rate_interval_and_agreement_against_hand_computations():
    import math
    import statistics

    from engine.label.report import agreement, compare_report, win_rate

    w = win_rate([1, 1, 0, 0.5])
    half = 1.959963984540054 * statistics.stdev([1, 1, 0, 0.5]) / 2
    assert w["win_rate"] == 0.625 and w["ci95"] == pytest.approx([0.625 - half, min(1, 0.625 + half)])
    assert win_rate([1])["ci95"] == [None, None] and win_rate([])["win_rate"] is None
    judged = [{"policies": ["good", "bad"], "winner": "good", "labeler": "a"},
              {"policies": ["bad", "good"], "winner": None, "labeler": "b"},
              {"policies": ["good", "bad"], "winner": "good", "labeler": "a"}]
    rep = compare_report(judged)  # each pair as its first judgment lists it, whatever the others' order
    assert list(rep) == ["good vs bad"] and rep["good vs bad"]["win_rate"] == pytest.approx((1 + 0.5 + 1) / 3)
    rep = compare_report(judged, ["bad", "good"])["bad vs good"]  # as --policies listed them: "bad" under test
    assert rep["win_rate"] == pytest.approx((0 + 0.5 + 0) / 3) and rep["ties"] == 1
    assert rep["per_labeler"]["a"]["win_rate"] == 0 and rep["per_labeler"]["b"]["win_rate"] == 0.5
    # rankings: A [0, 1, 2], B [0, 2, 1] on item x: pairs (0,1) and (0,2) agree, (1,2) does not -> 2/3
    ranks = [{"item": "x", "labeler": "A", "ranking": [0, 1, 2]}, {"item": "x", "labeler": "B", "ranking": [0, 2, 1]},
             {"item": "y", "labeler": "A", "ranking": [1, 0]}]  # y: one labeler only, left out
    a = agreement(ranks, "rank")
    assert a["items"] == 1 and a["pairwise"] == pytest.approx(2 / 3) and a["per_labeler"] == {"A": 2 / 3, "B": 2 / 3}
    # Krippendorff's ordinal alpha by hand: units (item x, response) with places A/B (0,0), (1,2), (2,1): the
    # coincidences o00 = o12 = o21 = 2, n0 = n1 = n2 = 2, n = 6; ordinal d2(0,1) = d2(1,2) = 2^2, d2(0,2) = 4^2;
    # D_o = (2*4 + 2*4) / 6, D_e = 2 * (2*2*4 + 2*2*4 + 2*2*16) / (6*5); alpha = 1 - D_o / D_e = 7/12
    assert a["krippendorff_alpha"] == pytest.approx(7 / 12)
    same = agreement([{"item": "x", "labeler": n, "ranking": [0, 1, 2]} for n in "AB"], "rank")
    assert same["pairwise"] == 1.0 and same["krippendorff_alpha"] == pytest.approx(1.0)
    flipped = agreement([{"item": "x", "labeler": "A", "ranking": [0, 1, 2]},
                         {"item": "x", "labeler": "B", "ranking": [2, 1, 0]}], "rank")
    assert flipped["pairwise"] == 0.0 and flipped["krippendorff_alpha"] < 0
    assert not math.isnan(a["krippendorff_alpha"])


def test_label_rank_and_compare_sample_from_real_policies_and_print_the_links(tiny_models, tmp_path, capsys):
    from engine.cli import main

    assert main(["label", "rank", "--policy", str(tiny_models["qwen2"]), "--prompts", str(EXAMPLES / "prompts.jsonl"),
                 "--labelers", "ann,bob", "--to", str(tmp_path / "r"), "--k", "3", "--max_new_tokens", "5",
                 "--flags", "off topic; rude", "--serve", "false"]) == 0
    assert json.loads((tmp_path / "r" / "session.json").read_text())["flags"] == ["off topic", "rude"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["responses"]) == 3 and len(r["finished"]) == 3 for r in rows)
    assert len({tuple(r["responses"]) for r in rows}) == 5  # sampled, not copied
    out = capsys.readouterr().out
    tokens = json.loads((tmp_path / "r" / "tokens.json").read_text())
    assert f"ann: http://127.0.0.1:8765/rank?token={tokens['labelers']['ann']}" in out
    assert main(["label", "compare", "--policies", f"q={tiny_models['qwen2']},l={tiny_models['llama']},"
                 f"m={tiny_models['mistral']}", "--prompts", str(EXAMPLES / "prompts.jsonl"), "--labelers", "ann",
                 "--to", str(tmp_path / "c"), "--max_new_tokens", "5", "--serve", "false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 and {tuple(r["policies"]) for r in rows} == {("q", "l"), ("q", "m"), ("l", "m")}
    assert "/compare?token=" in capsys.readouterr().out
    assert main(["label", "compare", "--policies", f"q={tiny_models['qwen2']}", "--prompts",
                 str(EXAMPLES / "prompts.jsonl"), "--labelers", "ann", "--to", str(tmp_path / "d"),
                 "--serve", "false"]) == 2
    assert "two or more name=DIR" in capsys.readouterr().err


def test_the_whole_loop_through_the_app_on_the_built_in_task(tiny_run, tmp_path, capsys):
    """Sample K from SFT -> the task's simulated labelers rank through the HTTP API -> an RM trains on the
    file -> PPO against it -> the held-out simulated labelers judge PPO against SFT blind through the API ->
    the report."""
    from engine.cli import main
    from engine.label.simulate import simulate

    sft, data, out = tiny_run / "sft" / "final" / "policy", tiny_run / "data", tmp_path / "run"
    quiet = ["--serve", "false", "--max_new_tokens", "8"]
    assert main(["label", "rank", "--policy", str(sft), "--prompts", str(data / "ppo_prompts.jsonl"), "--labelers",
                 "a,b", "--k", "4", "--overlap", "0.3", "--to", str(tmp_path / "rank"), *quiet]) == 0
    port = free_port()
    proc = start(tmp_path / "rank", port)
    try:
        done = simulate(tmp_path / "rank", f"http://127.0.0.1:{port}")
    finally:
        proc.kill()
        proc.wait()
    rows = [json.loads(line) for line in (tmp_path / "rank" / "comparisons.jsonl").read_text().splitlines()]
    assert sum(done.values()) == len(rows) > 64  # every prompt, some twice (the overlap)
    assert main(["label", "report", "--session", str(tmp_path / "rank")]) == 0
    agree = json.loads((tmp_path / "rank" / "report.json").read_text())["agreement"]
    assert agree["items"] > 5 and 0.3 < agree["pairwise"] <= 1  # the task's labelers agree ~73%
    few = ["--run.progress", "false", "--out", str(out)]
    assert main(["rm", "--policy.path", str(sft), "--data.comparisons", str(tmp_path / "rank" / "comparisons.jsonl"),
                 "--rm.steps", "4", "--rm.batch_size", "4", *few]) == 0
    assert main(["ppo", "--policy.path", str(sft), "--reward.path", str(out / "rm" / "final" / "reward"),
                 "--data.prompts", str(data / "ppo_prompts.jsonl"), "--ppo.iterations", "2", "--ppo.rollout_batch",
                 "8", "--ppo.minibatch", "8", "--rollout.max_new_tokens", "8", *few]) == 0
    # what to label next: with the RM given, the items it separates least come first
    rm_dir = out / "rm" / "final" / "reward"
    assert main(["label", "rank", "--policy", str(sft), "--prompts", str(data / "ppo_prompts.jsonl"), "--labelers",
                 "a", "--k", "3", "--rm", str(rm_dir), "--to", str(tmp_path / "next"), *quiet]) == 0
    check_uncertainty_order(tmp_path / "next", rm_dir)
    assert main(["label", "compare", "--policies", f"ppo={out / 'ppo' / 'final' / 'policy'},sft={sft}", "--prompts",
                 str(data / "eval_prompts.jsonl"), "--labelers", "h1,h2", "--to", str(tmp_path / "eval"), *quiet]) == 0
    proc = start(tmp_path / "eval", port)
    try:
        done = simulate(tmp_path / "eval", f"http://127.0.0.1:{port}", heldout=True)
    finally:
        proc.kill()
        proc.wait()
    assert main(["label", "report", "--session", str(tmp_path / "eval")]) == 0
    w = json.loads((tmp_path / "eval" / "report.json").read_text())["win_rates"]["ppo vs sft"]
    assert w["n"] == sum(done.values()) == 24 and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]


def check_uncertainty_order(folder, rm_dir):
    """The items' recorded spreads ascend, and each is the spread of the RM's scores computed here another way
    (all items in one batch through the RM trainer's own scoring)."""
    import statistics

    from engine.config import DataConfig
    from engine.data.encode import make_encoder
    from engine.models.loading import load_model, load_tokenizer
    from engine.models.forward import SequenceScores
    from engine.trainers.reward import score_comparisons

    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    spreads = [i["rm_spread"] for i in items]
    assert spreads == sorted(spreads) and spreads[-1] > spreads[0]
    tok = load_tokenizer(rm_dir)
    enc = make_encoder(tok, DataConfig(), None, 1)
    rm = SequenceScores(load_model(rm_dir, flag="rm", scalar=True, device="cpu", tokenizer=tok)).eval()
    rows = []
    for i in items:
        p = enc.prompt(i["prompt"])
        rows.append({"prompt": p, "ranks": list(range(len(i["responses"]))),
                     "responses": [enc.response(i["prompt"], r, len(p), f) for r, f in zip(i["responses"], i["finished"])]})
    with torch.no_grad():
        scores, _, _ = score_comparisons(rm, rows, tok.pad_token_id)
    for i, item in enumerate(items):
        assert item["rm_spread"] == pytest.approx(statistics.pstdev(scores[i].tolist()), abs=1e-5)
