"""The labeling app against hostile or damaged input (issue 44): every case ends with a 4xx or one message naming
the file or flag and what to do, never a hang, a traceback or a lost record. Real server (uvicorn on loopback),
real CLI in a subprocess, real files (FIFOs, links, bytes that are not UTF-8)."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.label.session import Session, SessionError, SubmissionError, create_session
from engine.label.store import SubmissionLog
from test_label import free_port, items, start

ROOT = Path(__file__).resolve().parents[2]


def label(*args, timeout=60):
    """`python -m engine label ...` -> (exit code, stdout, stderr); a hang fails the test instead of blocking it."""
    done = subprocess.run([sys.executable, "-m", "engine", "label", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def refused(code, out, err, *words):
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)


def test_a_whole_last_record_without_its_newline_is_kept_and_a_torn_one_cut_by_the_writer_only(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id":"a","x":1}')  # complete, only the newline missing: one record, acknowledged
    reader = SubmissionLog(path, write=False)
    assert [r["id"] for r in reader.records] == ["a"] and path.read_bytes() == b'{"id":"a","x":1}'
    writer = SubmissionLog(path)
    assert [r["id"] for r in writer.records] == ["a"] and path.read_bytes() == b'{"id":"a","x":1}\n'
    assert writer.append({"id": "b", "x": 2})
    writer.close()
    with open(path, "ab") as f:
        f.write(b'{"id":"c","x')  # torn
    before = path.read_bytes()
    assert [r["id"] for r in SubmissionLog(path, write=False).records] == ["a", "b"]
    assert path.read_bytes() == before  # a reader changes nothing
    assert [r["id"] for r in SubmissionLog(path).records] == ["a", "b"]
    assert path.read_bytes() == b'{"id":"a","x":1}\n{"id":"b","x":2}\n'


def test_report_keeps_a_one_record_log_whole(tmp_path):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    s = Session.open(folder)
    shown = s.next_item("ann")
    s.submit("ann", {"id": "r1", "item": shown["item"], "ranking": [0, 1, 2], "ratings": [1, 2, 3]})
    s.close()
    log = folder / "comparisons.jsonl"
    log.write_bytes(log.read_bytes().rstrip(b"\n"))
    before = log.read_bytes()
    code, out, err = label("report", "--session", folder)
    assert code == 0, err
    assert log.read_bytes() == before and json.loads((folder / "report.json").read_text())["records"] == 1


@pytest.mark.parametrize("name", ["comparisons.jsonl", "session.json", "items.jsonl"])
def test_a_fifo_in_a_session_is_refused_at_once(tmp_path, name):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    for action in (["report"], ["serve", "--port", free_port()]):
        refused(*label(*action, "--session", folder, timeout=30), name, "not a regular file")


@pytest.mark.parametrize("name, damage, says", [
    ("session.json", b"{not json", "not JSON"),
    ("session.json", b"[1, 2]", "JSON dict"),
    ("session.json", b'{"kind": "rank"}', "'flags'"),
    ("items.jsonl", b"\xff\xfe garbage\n", "not UTF-8"),
    ("items.jsonl", b'{"id": 1}\n', "line 1"),
    ("tokens.json", b'{"admin": 5}', "token"),
    ("comparisons.jsonl", b'{"id":"a"}\n\xff\n', "line 2: not UTF-8"),
    ("comparisons.jsonl", b"[" * 20000 + b"\n", "line 1: not JSON"),
    ("judgments.jsonl", b'{"id": "a"}\n', "no labeler or item"),
])
def test_a_damaged_session_file_is_named_with_what_to_do(tmp_path, name, damage, says):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    path = folder / name
    if path.exists():
        path.chmod(0o600)
    path.write_bytes(damage)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    refused(*label("report", "--session", folder), name, says)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing changed on disk
    with pytest.raises(SessionError, match=says):
        Session.open(folder, write=False)


def test_report_never_writes_through_a_planted_link(tmp_path):
    folder = create_session(tmp_path / "s", [{"prompt": "p", "policies": ["a", "b"], "responses": ["x", "y"]}],
                            ["ann"], kind="compare")
    s = Session.open(folder)
    s.submit("ann", {"id": "j1", "item": s.next_item("ann")["item"], "choice": 0})
    s.close()
    target = tmp_path / "precious"
    target.write_text("keep me")
    for name in ("report.png.tmp", ".report.png.tmp", ".report.md.tmp", ".report.json.tmp"):
        (folder / name).symlink_to(target)
    code, _, err = label("report", "--session", folder)
    assert code == 0, err
    assert target.read_text() == "keep me" and (folder / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_one_server_per_session_and_a_busy_port_is_refused_before_any_link(tmp_path):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    port = free_port()
    first = start(folder, port)
    try:
        code, out, err = label("serve", "--session", folder, "--port", free_port())
        refused(code, out, err, "in use by another run", "pid")
        assert "token=" not in out
        other = create_session(tmp_path / "t", items(2), ["bob"])
        code, out, err = label("serve", "--session", other, "--port", port)  # the first server's port
        refused(code, out, err, f"{port}", "--port")
        assert "token=" not in out
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_a_port_out_of_range_is_refused_by_name(tmp_path, port):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    refused(*label("serve", "--session", folder, "--port", port), "--port", "65535")


def test_links_on_all_interfaces_name_this_machine_and_warn_of_plain_http(tmp_path):
    folder = create_session(tmp_path / "s", items(2), ["ann"])
    code, out, err = label("serve", "--session", folder, "--host", "0.0.0.0", "--serve", "false")
    assert code == 0, err
    assert "0.0.0.0" not in out and f"http://{socket.gethostname()}:8765/rank?token=" in out
    assert "clear text" in err and "--public_url" in err
    code, out, err = label("serve", "--session", folder, "--serve", "false", "--public_url", "https://x.example/")
    assert code == 0 and "ann: https://x.example/rank?token=" in out


def test_a_reused_id_with_another_answer_is_refused_not_acknowledged(tmp_path):
    folder = create_session(tmp_path / "s", items(4), ["ann"])
    s = Session.open(folder)
    first, second = list(s.items)[:2]
    assert s.submit("ann", {"id": "same", "item": first, "ranking": [0, 1, 2], "ratings": [1, 2, 3]})
    assert not s.submit("ann", {"id": "same", "item": first, "ranking": [0, 1, 2], "ratings": [1, 2, 3]})
    for other in ({"item": first, "ranking": [2, 1, 0]}, {"item": second, "ranking": [0, 1, 2]}):
        with pytest.raises(SubmissionError, match="another answer") as info:
            s.submit("ann", {"id": "same", "ratings": [1, 2, 3], **other})
        assert info.value.status == 409
    assert len(s.comparisons.records) == 1
    s.close()


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "big", "float", "str", "bool", "null", "surrogate"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, 2, -1, 7, 8, 2**70])
    if kind == "big":
        return 10 ** rng.randint(20, 400)
    if kind == "float":
        return rng.choice([0.0, 1.0, 0.5, -3.5, 1e308])
    if kind == "str":
        return rng.choice(["", "tie", "x", "item-000000", "0", "a" * 100])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "surrogate":
        return "\ud800x"
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["id", "item", "ranking", "ratings", "flags", "choice", "seconds", "corrects", "x"]):
            random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


@pytest.mark.parametrize("kind", ["rank", "compare"])
def test_the_api_answers_every_malformed_body_with_a_4xx_and_a_reason(tmp_path, kind):
    rows = items(4) if kind == "rank" else [{"prompt": f"p{i}", "policies": ["a", "b"], "responses": ["x", "y"]}
                                           for i in range(4)]
    folder = create_session(tmp_path / "s", rows, ["ann"], kind=kind)
    port = free_port()
    proc = start(folder, port)
    try:
        token = json.loads((folder / "tokens.json").read_text())["labelers"]["ann"]
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
        item = httpx.get(f"{url}/api/next", headers=auth).json()["item"]
        rng = random.Random(44)
        fixed = [b"[0,1,2,\"x\"]", b'{"id": "a", "item": "' + item.encode() + b'", "ranking": [0, 1, 2, "x"], '
                 b'"ratings": [1, 2, 3]}', b'{"id": "a", "item": "' + item.encode() + b'", "choice": 0.0}',
                 b'{"id": "a", "item": ["x"]}', b'{"id": "a", "item": {"x": 1}}', b'{"id": "\\ud800", "item": "x"}',
                 b'{"id": ' + b"9" * 5000 + b"}", b"[" * 20000 + b"]" * 20000, b'{"id": "a", "ranking": null}',
                 b"\xff\xfe", b"", b"null"]
        bodies = fixed + [json.dumps(random_json(rng)).encode() for _ in range(150)]
        for n in range(150):  # near-valid: the right item, random fields
            extra = random_json(rng, 2)
            bodies.append(json.dumps({"id": f"i{n}", "item": item, **(extra if isinstance(extra, dict) else
                                                                       {"x": extra})}).encode())
        client = httpx.Client(headers={**auth, "Content-Type": "application/json"})  # one connection, kept alive
        for n, body in enumerate(bodies):
            for route in ("/api/submit", "/api/skip"):
                r = client.post(url + route, content=body)
                assert r.status_code < 500, (route, body[:200], r.status_code, r.text[:300])
                if r.status_code >= 400:
                    assert r.json()["detail"], (route, body[:200])
        client.close()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
