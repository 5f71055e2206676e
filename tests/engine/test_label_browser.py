"""The ranking page in a real headless browser (Debian's chromium driven by Playwright; no browser is
downloaded from anywhere else): one labeler ranks by dragging the handles and picking ratings, another by
keyboard alone, and the file the server wrote is checked field by field.

Chromium comes from Debian's packages: where it is missing and the tests run as root with apt-get (CI), this
module installs it; elsewhere it is skipped with the command to run. RLHF_ENGINE_SCREENSHOTS=DIR keeps the
page's screenshots there (the README's)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.label.session import FLAGS, Session, create_session
from test_label import free_port, start

SCREENSHOTS = os.environ.get("RLHF_ENGINE_SCREENSHOTS")


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    return found


def launch(*args: str):
    """Debian's chromium through Playwright (headless), with more command-line `args`; skipped saying why
    where either is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium here: install Debian's (apt-get install chromium) to run the browser tests")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", *args])
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser():
    yield from launch()


ANSWERS = ["Blue is the colour of a clear sky.", "Red.", "I do not know, sorry.\n" + "Long answer. " * 80]


@pytest.fixture
def session(tmp_path):
    items = [{"prompt": f"Name a colour (question {i}).", "responses": ANSWERS} for i in range(2)]
    folder = create_session(tmp_path / "s", items, ["ann", "bob"], overlap=1.0, per_shared=2)
    port = free_port()
    proc = start(folder, port)
    yield folder, f"http://127.0.0.1:{port}", json.loads((folder / "tokens.json").read_text())
    proc.kill()
    proc.wait()


def wait_until(page, expression: str, timeout: float = 15.0) -> None:
    """Poll a JavaScript expression with page.evaluate until it is true (Playwright's wait_for_function evals a
    string inside the page, which the app's content policy forbids, as it should)."""
    import time

    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        time.sleep(0.05)


def shown_to_response(folder, name, item_id):
    s = Session.open(folder)
    order = s.order(name, item_id)
    s.close()
    return order


def test_two_labelers_rank_one_by_dragging_one_by_keyboard_and_the_file_says_exactly_that(browser, session, tiny_models,
                                                                                         tmp_path):
    folder, url, tokens = session
    # ann: drags the third shown response onto the first, rates with the menus, flags one, clicks Submit
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(f"{url}/rank?token={tokens['labelers']['ann']}")
    page.wait_for_selector("#response-3")
    assert page.locator(".card").count() == 3 and page.locator("details").count() == 1  # the long one folds
    first_item = page.evaluate("item.item")
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "label-rank.png"), full_page=True)
    page.drag_and_drop("#response-3 .handle", "#response-1")
    assert page.evaluate("order") == [2, 0, 1]
    page.click("#submit")
    assert "Rate every response" in page.inner_text("#status")  # nothing is sent before every rating
    for shown, rating in ((1, 2), (2, 3), (3, 7)):
        page.select_option(f"#response-{shown} select.rating", str(rating))
    page.check(f"#response-2 >> text={FLAGS[1]}")
    page.click("#submit")
    wait_until(page, f"item && item.item !== {json.dumps(first_item)}")
    page.close()

    # bob: keyboard only: 2 picks the second shown response, ArrowUp moves it first, Shift+digit rates, Enter
    page = browser.new_page()
    page.goto(f"{url}/rank?token={tokens['labelers']['bob']}")
    page.wait_for_selector("#response-3")
    bob_item = page.evaluate("item.item")
    for key in ("Digit2", "ArrowUp", "Shift+Digit6", "Digit1", "Shift+Digit1", "Digit3", "Shift+Digit4", "Enter"):
        page.keyboard.press(key)
    wait_until(page, f"item && item.item !== {json.dumps(bob_item)}")
    page.close()

    rows = {r["labeler"]: r for r in map(json.loads, (folder / "comparisons.jsonl").read_text().splitlines())}
    assert set(rows) == {"ann", "bob"}
    ann, bob = rows["ann"], rows["bob"]
    order = shown_to_response(folder, "ann", ann["item"])
    assert ann["item"] == first_item and ann["responses"] == ANSWERS and ann["finished"] == [True] * 3
    assert ann["ranking"] == [order[2], order[0], order[1]]
    assert [ann["ratings"][order[p]] for p in range(3)] == [2, 3, 7]
    assert ann["flags"][order[1]] == [FLAGS[1]] and ann["flags"][order[0]] == ann["flags"][order[2]] == []
    assert ann["prompt"].startswith("Name a colour") and ann["seconds"] > 0 and ann["time"].endswith("+00:00")
    order = shown_to_response(folder, "bob", bob["item"])
    assert bob["ranking"] == [order[1], order[0], order[2]]
    assert [bob["ratings"][order[p]] for p in range(3)] == [1, 6, 4] and bob["flags"] == [[], [], []]

    from engine.cli import main  # a reward model trains on the file the page wrote, as it is

    assert main(["rm", "--policy.path", str(tiny_models["llama"]), "--data.comparisons",
                 str(folder / "comparisons.jsonl"), "--out", str(tmp_path / "run"), "--run.progress", "false",
                 "--rm.steps", "2", "--rm.batch_size", "2"]) == 0
    assert json.loads((tmp_path / "run" / "rm" / "eval.json").read_text())["rm_train_accuracy"] >= 0


def test_a_blind_comparison_through_the_page_reports_the_win_rate_and_interval_of_what_was_chosen(browser, tmp_path):
    """12 prompts, policies "tuned" and "base" (in that order; never named on the page); the labeler picks the
    answer that says GOOD (tuned's) on 9, base's on 2, a tie on 1, by keyboard and buttons. The report: tuned,
    listed first, wins (9 + 0.5) / 12, with the interval computed from those 12 scores, overall and per labeler."""
    import statistics

    from engine.cli import main

    items = [{"prompt": f"Say something ({i}).", "policies": ["tuned", "base"],
              "responses": [f"GOOD answer {i}.", f"plain answer {i}."]} for i in range(12)]
    folder = create_session(tmp_path / "c", items, ["ann"], kind="compare", seed=5)
    port = free_port()
    proc = start(folder, port)
    token = json.loads((folder / "tokens.json").read_text())["labelers"]["ann"]
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(f"http://127.0.0.1:{port}/compare?token={token}")
        page.wait_for_selector("#answer-1 h2")
        assert "tuned" not in page.content() and "base" not in page.content()
        if SCREENSHOTS:
            page.screenshot(path=str(Path(SCREENSHOTS) / "label-compare.png"), full_page=True)
        for n in range(12):
            current = page.evaluate("item.item")
            good = 0 if "GOOD" in page.inner_text("#answer-1") else 1
            if n == 0:
                page.click("#tie")
            elif n in (1, 2):
                page.keyboard.press("ArrowRight" if good == 0 else "ArrowLeft")  # base's answer
            elif n % 2:
                page.keyboard.press("Digit1" if good == 0 else "Digit2")
            else:
                page.click("#left" if good == 0 else "#right")
            wait_until(page, f"!item || item.item !== {json.dumps(current)}")
        assert "Nothing left" in page.inner_text("#prompt")
        page.close()
    finally:
        proc.kill()
        proc.wait()
    assert main(["label", "report", "--session", str(folder)]) == 0
    report = json.loads((folder / "report.json").read_text())
    scores = [0.5, 0, 0] + [1] * 9  # from tuned's side: "tuned vs base", as the items list the pair
    assert list(report["win_rates"]) == ["tuned vs base"]
    w = report["win_rates"]["tuned vs base"]
    half = 1.959963984540054 * statistics.stdev(scores) / 12 ** 0.5
    assert w["n"] == 12 and w["ties"] == 1 and w["win_rate"] == pytest.approx(9.5 / 12)
    assert w["ci95"] == pytest.approx([9.5 / 12 - half, min(1, 9.5 / 12 + half)])
    md = (folder / "report.md").read_text()
    assert "| tuned vs base | 12 | **79.2%** |" in md and (folder / "report.png").stat().st_size > 1000
    assert "| tuned vs base | ann | 12 | 79.2% |" in md  # per labeler
