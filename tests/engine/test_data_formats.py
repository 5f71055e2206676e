"""Users' data files: the documented formats load; every bad input names its file, line and field."""
import json
from pathlib import Path

import pytest

from engine.data.formats import Comparison, DataError, Demonstration, Prompt, load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_files_load():
    prompts = load(EXAMPLES / "prompts.jsonl", "prompts")
    assert isinstance(prompts[0], Prompt) and prompts[0].prompt.startswith("Explain")
    assert prompts[1].prompt[-1] == {"role": "user", "content": "Name three primary colors."}
    demos = load(EXAMPLES / "demonstrations.jsonl", "demonstrations")
    assert isinstance(demos[1], Demonstration) and demos[1].completion == "Red, yellow and blue."
    pairs = load(EXAMPLES / "comparisons_pairwise.jsonl", "comparisons")
    assert pairs[0] == Comparison("What is 17 times 3?", ["17 times 3 is 51.", "It is 41."], [0, 1])
    ranked = load(EXAMPLES / "comparisons_ranked.jsonl", "comparisons")
    assert ranked[0].ranking == [1, 2, 0, 3] and len(ranked[0].responses) == 4


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet(tmp_path, suffix):
    rows = [{"prompt": "a b", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]},
            {"prompt": "c", "responses": ["u", "v"], "ranking": [1, 0]}]
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow
        import pyarrow.parquet as pq
        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    got = load(path, "comparisons")
    assert [c.ranking for c in got] == [[2, 0, 1], [1, 0]]


def write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("kind,lines,needle", [
    ("prompts", ['{"prompt": "ok"}', '{"prompt": "broken"'], "line 2: malformed JSON"),
    ("prompts", ['{"prompt": "ok"}', '', '{"text": "no prompt"}'], "line 3: missing field 'prompt'"),
    ("demonstrations", ['{"prompt": "p", "completion": ""}'], "line 1: field 'completion' is empty"),
    ("demonstrations", ['{"prompt": "p"}'], "line 1: missing field 'completion'"),
    ("comparisons", ['{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]}'],
     "line 1: field 'ranking' must be a permutation of 0..2"),
    ("comparisons", ['{"prompt": "p", "responses": ["a", " "], "ranking": [0, 1]}'], "field 'responses'[1] is empty"),
    ("comparisons", ['{"prompt": "p", "chosen": "a"}'], "line 1: missing field 'rejected'"),
    ("comparisons", ['{"prompt": "p", "responses": ["a", "b"]}'], "missing field 'ranking'"),
    ("prompts", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'],
     "must end with a user (or tool) turn"),
    ("demonstrations", ['{"messages": [{"role": "robot", "content": "hi"}]}'], "role must be system, user, assistant or tool"),
])
def test_bad_records_name_file_line_and_field(tmp_path, kind, lines, needle):
    path = write(tmp_path, lines)
    with pytest.raises(DataError) as exc:
        load(path, kind)
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "missing.jsonl", "prompts")
    with pytest.raises(DataError, match="unknown file type"):
        load(write(tmp_path, ["x"], "data.csv"), "prompts")
    with pytest.raises(DataError, match="must hold a list"):
        load(write(tmp_path, ['{"prompt": "p"}'], "data.json"), "prompts")
    with pytest.raises(DataError, match="no records"):
        load(write(tmp_path, [""], "empty.jsonl"), "prompts")


def test_pretraining_texts(tmp_path):
    texts = load(EXAMPLES / "pretrain.jsonl", "texts")
    assert len(texts) == 5 and texts[1] == "Spiders have eight legs; insects have six."
    with pytest.raises(DataError, match=r"line 2: missing field 'text'"):
        load(write(tmp_path, ['{"text": "ok"}', '{"prompt": "not text"}']), "texts")


def test_chat_renders_are_reused_and_never_shared():
    """A prompt is rendered once per encoder however many responses it has; the ids handed out are copies."""
    from engine.data.encode import Encoder
    from engine.task.vocab import build_tokenizer

    enc = Encoder(build_tokenizer())
    assert enc.chat
    first = enc.prompt("repeat cat three times")
    a = enc.response("repeat cat three times", "cat cat cat .", len(first))
    b = enc.response("repeat cat three times", "cat cat .", len(first))
    assert len(enc._rendered) == 3  # the prompt once, and each answered conversation
    first.append(-1)
    assert enc.prompt("repeat cat three times") == first[:-1]
    assert a != b and a[-1] == b[-1] == enc.tokenizer.eos_token_id
    fresh = Encoder(build_tokenizer())
    assert fresh.response("repeat cat three times", "cat cat .", len(first) - 1) == b
