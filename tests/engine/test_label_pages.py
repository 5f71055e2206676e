"""The labeling pages as a labeler who is not at the server's keyboard meets them, in Debian's chromium through
Playwright: opened through a host name mapped to loopback (plain http to a name: not a secure context, so no
crypto.randomUUID), on a 390x844 phone viewport with touch, and over https (--tls_cert/--tls_key with a
certificate made here). Every state a labeler can reach is checked against the files the server wrote:
Enter on a focused Skip skips, a skipped item comes back once at the end, the end of the queue hides the item
and its buttons, text dropped on a card changes nothing, Undo leaves exactly one record for the item, a
reload keeps a half-done ranking. RLHF_ENGINE_SCREENSHOTS=DIR keeps a screenshot of each state there."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from engine.label.session import FLAGS, create_session
from test_label import free_port
from test_label import start as start_server
from test_label_browser import launch, shown_to_response, wait_until

SCREENSHOTS = os.environ.get("RLHF_ENGINE_SCREENSHOTS")
HOST = "labeler.test"  # resolved to 127.0.0.1 inside the browser only
ANSWERS = ["Blue is the colour of a clear sky.", "Red.", "I do not know, sorry."]


@pytest.fixture(scope="module")
def browser():
    yield from launch(f"--host-resolver-rules=MAP {HOST} 127.0.0.1")


@pytest.fixture
def served(tmp_path):
    procs = []

    def start(items, labelers, *extra, kind="rank", scheme="http"):
        folder = create_session(tmp_path / f"s{len(procs)}", items, labelers, kind=kind)
        port = free_port()
        procs.append(start_server(folder, port, *extra, scheme=scheme))
        return folder, port, json.loads((folder / "tokens.json").read_text())["labelers"], procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def rows(folder: Path, name: str = "comparisons.jsonl") -> list[dict]:
    path = folder / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def next_shown(page, before: str) -> None:
    wait_until(page, f"!item || item.item !== {json.dumps(before)}")


def test_ranking_through_a_host_name_every_key_skip_undo_reload_and_the_end_of_the_queue(browser, served):
    items = [{"prompt": f"Name a colour (question {i}).", "responses": ANSWERS, "finished": [True, False, True]}
             for i in range(4)]
    folder, port, tokens, _ = served(items, ["ann"])
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(f"http://{HOST}:{port}/rank?token={tokens['ann']}")
    page.wait_for_selector("#response-3")
    # plain http to a name: no secure context, no crypto.randomUUID; the page draws and saves all the same
    assert page.evaluate("isSecureContext") is False and page.evaluate("typeof crypto.randomUUID") == "undefined"
    cut = shown_to_response(folder, "ann", page.evaluate("item.item")).index(1)  # the second answer ran out
    assert page.locator(".cut").count() == 1 and "cut off" in page.inner_text(f"#response-{cut + 1}")
    assert page.inner_text("#remaining") == "4 left for you"
    shot(page, "label-rank-insecure-context.png")

    # item 1, keyboard only: 2 picks the second shown, up moves it first, Shift+digit rates, F 2 flags, Enter
    i1 = page.evaluate("item.item")
    for key in ("Digit2", "ArrowUp", "Shift+Digit6", "Digit1", "Shift+Digit1", "Digit3", "Shift+Digit4", "KeyF",
                "Digit2", "Enter"):
        page.keyboard.press(key)
    next_shown(page, i1)
    assert f"Saved your ranking of \u201cName a colour (question 0).\u201d." == page.inner_text("#status")
    assert page.inner_text("#remaining") == "3 left for you"
    (r1,) = rows(folder)
    order = shown_to_response(folder, "ann", i1)
    assert r1["item"] == i1 and r1["ranking"] == [order[1], order[0], order[2]]
    assert [r1["ratings"][order[p]] for p in range(3)] == [1, 6, 4]
    assert r1["flags"][order[2]] == [FLAGS[1]] and r1["flags"][order[0]] == r1["flags"][order[1]] == []

    # item 2: Enter on the focused Skip button skips (it used to submit)
    i2 = page.evaluate("item.item")
    page.focus("#skip")
    page.keyboard.press("Enter")
    next_shown(page, i2)
    assert "Skipped" in page.inner_text("#status") and "comes back once" in page.inner_text("#status")
    assert [r["item"] for r in rows(folder)] == [i1] and [r["item"] for r in rows(folder, "skips.jsonl")] == [i2]

    # item 3: text dropped on a card changes nothing; then rated, saved, undone and corrected: one record
    i3 = page.evaluate("item.item")
    page.evaluate("""() => { const dt = new DataTransfer(); dt.setData('text/plain', '2');
        const el = document.querySelector('#response-1');
        el.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        el.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }""")
    assert page.evaluate("order") == [0, 1, 2] and page.locator(".card").count() == 3
    for key in ("Digit1", "Shift+Digit3", "Digit2", "Shift+Digit3", "Digit3", "Shift+Digit3", "Enter"):
        page.keyboard.press(key)
    next_shown(page, i3)
    first_id = rows(folder)[-1]["id"]
    page.keyboard.press("KeyU")
    wait_until(page, f"item && item.item === {json.dumps(i3)}")
    assert page.evaluate("order") == [0, 1, 2] and page.evaluate("ratings") == {"0": 3, "1": 3, "2": 3}
    shot(page, "label-rank-undo.png")
    for key in ("Digit1", "ArrowDown", "Shift+Digit7", "Enter"):
        page.keyboard.press(key)
    next_shown(page, i3)
    assert page.inner_text("#status").startswith("Corrected your ranking")
    mine = [r for r in rows(folder) if r["item"] == i3]
    order = shown_to_response(folder, "ann", i3)
    assert len(mine) == 1 and mine[0]["id"] != first_id and mine[0]["ranking"] == [order[1], order[0], order[2]]
    assert [mine[0]["ratings"][order[p]] for p in range(3)] == [7, 3, 3] and len(rows(folder)) == 2

    # item 4: half done, reloaded: the order and the ratings are still there
    i4 = page.evaluate("item.item")
    for key in ("Digit3", "ArrowUp", "Shift+Digit2", "Digit1", "Shift+Digit5"):
        page.keyboard.press(key)
    half = page.evaluate("[order, ratings]")
    page.reload()
    page.wait_for_selector("#response-3")
    assert page.evaluate("item.item") == i4 and page.evaluate("[order, ratings]") == half
    for key in ("Digit2", "Shift+Digit7", "Enter"):
        page.keyboard.press(key)
    next_shown(page, i4)

    # the skipped item comes back once, at the end; skipped again (S), the queue is over
    assert page.evaluate("item.item") == i2 and page.inner_text("#remaining") == "1 left for you"
    page.keyboard.press("KeyS")
    wait_until(page, "!item")
    assert page.is_hidden("#cards") and page.is_hidden("#skip") and page.inner_text("#remaining") == "0 left for you"
    assert "Nothing left to rank" in page.inner_text("#prompt")
    shot(page, "label-rank-end-of-queue.png")
    assert [r["item"] for r in rows(folder, "skips.jsonl")] == [i2, i2]
    assert sorted(r["item"] for r in rows(folder)) == sorted([i1, i3, i4])
    page.close()


def test_blind_comparison_through_a_host_name_with_skip_undo_and_the_end_of_the_queue(browser, served):
    items = [{"prompt": f"Say something ({i}).", "policies": ["tuned", "base"],
              "responses": [f"GOOD answer {i}.", f"plain answer {i}."], "finished": [True, False]} for i in range(2)]
    folder, port, tokens, _ = served(items, ["ann"], kind="compare")
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(f"http://{HOST}:{port}/compare?token={tokens['ann']}")
    page.wait_for_selector("#answer-1 h2")
    assert page.evaluate("isSecureContext") is False and page.locator(".cut").count() == 1
    first = page.evaluate("item.item")
    good = 0 if "GOOD" in page.inner_text("#answer-1") else 1
    page.keyboard.press("ArrowLeft" if good == 1 else "ArrowRight")  # base's answer, then undone: tuned's
    next_shown(page, first)
    page.keyboard.press("KeyU")
    wait_until(page, f"item && item.item === {json.dumps(first)}")
    page.keyboard.press("ArrowLeft" if good == 0 else "ArrowRight")
    next_shown(page, first)
    (only,) = rows(folder, "judgments.jsonl")
    assert only["item"] == first and only["winner"] == "tuned"
    second = page.evaluate("item.item")
    page.focus("#skip")
    page.keyboard.press("Enter")  # skipped, comes back once
    wait_until(page, "document.getElementById('status').textContent.startsWith('Skipped')")
    assert page.evaluate("item.item") == second
    page.click("#tie")
    wait_until(page, "!item")
    assert page.is_hidden("#answers") and page.is_hidden("#left") and page.inner_text("#remaining") == "0 left for you"
    shot(page, "label-compare-end-of-queue.png")
    assert [r["winner"] for r in rows(folder, "judgments.jsonl")] == ["tuned", None]
    page.close()


def test_a_phone_ranks_with_the_move_buttons_and_folded_flags(browser, served):
    folder, port, tokens, _ = served([{"prompt": "Name a colour.", "responses": ANSWERS}], ["ann"])
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = context.new_page()
    page.goto(f"http://{HOST}:{port}/rank?token={tokens['ann']}")
    page.wait_for_selector("#response-3")
    assert page.is_hidden("#response-1 .handle") and page.locator("details.flags").count() == 3
    page.tap("#response-3 button.up")
    page.tap("#response-3 button.up")
    assert page.evaluate("order") == [2, 0, 1]
    for shown, rating in ((1, 4), (2, 2), (3, 6)):
        page.select_option(f"#response-{shown} select.rating", str(rating))
    page.tap("#response-2 details.flags summary")
    page.tap(f"#response-2 >> text={FLAGS[0]}")
    shot(page, "label-rank-phone.png")
    page.tap("#submit")
    wait_until(page, "!item")
    (r,) = rows(folder)
    order = shown_to_response(folder, "ann", r["item"])
    assert r["ranking"] == [order[2], order[0], order[1]] and [r["ratings"][order[p]] for p in range(3)] == [4, 2, 6]
    assert r["flags"][order[1]] == [FLAGS[0]]
    context.close()


def test_https_with_a_certificate_made_here_serves_the_page_and_saves(browser, served, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here to make a test certificate (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={HOST}"], check=True, capture_output=True)
    folder, port, tokens, proc = served([{"prompt": "Name a colour.", "responses": ANSWERS[:2]}], ["ann"],
                                        "--tls_cert", str(cert), "--tls_key", str(key), scheme="https")
    with pytest.raises(httpx.TransportError):  # plain http on the https port gets nothing
        httpx.get(f"http://127.0.0.1:{port}/api/next", timeout=2)
    proc.output.seek(0)
    said = proc.output.read().decode()
    assert f"ann: https://127.0.0.1:{port}/rank?token=" in said and "clear text" not in said
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.goto(f"https://{HOST}:{port}/rank?token={tokens['ann']}")
    page.wait_for_selector("#response-2")
    assert page.evaluate("isSecureContext") is True
    for key in ("Digit2", "ArrowUp", "Shift+Digit5", "Digit1", "Shift+Digit3", "Enter"):
        page.keyboard.press(key)
    wait_until(page, "!item")
    (r,) = rows(folder)
    order = shown_to_response(folder, "ann", r["item"])
    assert r["ranking"] == [order[1], order[0]] and [r["ratings"][order[p]] for p in range(2)] == [3, 5]
    context.close()
