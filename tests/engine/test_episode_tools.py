"""Tools as plain functions (--rollout.tools): their schemas in the prompt, calls parsed from the model's text
in the Hermes <tool_call> format, every call's result or error answered as a tool message."""
import json

import pytest

from engine.episodes import Step
from engine.episodes.tools import ToolEnvironment, load_tools, parse_calls
from envs import tools as user_tools


def call(name, **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_calls_are_run_and_answered_in_order_errors_included():
    env = ToolEnvironment(load_tools("envs.tools:lookup,add"))
    env.reset("what color was the cat ?")
    reply = "let me look. " + call("lookup", noun="cat") + call("add", a=2, b=3) + call("lookup", noun="sun") \
        + call("fly") + "<tool_call>{not json}</tool_call>" + call("add", a=1)
    step = env.step(reply)
    assert not step.done and step.reward == 0.0
    texts = [m["content"] for m in step.messages]
    assert texts[:2] == ["the cat was blue", "5"]
    assert texts[2] == "error: lookup raised KeyError: 'sun'"
    assert texts[3] == "error: no tool named 'fly' (tools: add, lookup)"
    assert texts[4].startswith("error: the tool call is not JSON")
    assert texts[5].startswith("error: add cannot take these arguments") and "'b'" in texts[5]
    assert [m["role"] for m in step.messages] == ["tool"] * 6
    assert env.step("the cat was blue") == Step(done=True)  # no call: the episode ends, the reward model judges


def test_parse_calls_reads_the_hermes_format_only():
    assert parse_calls(call("lookup", noun="cat")) == [("lookup", {"noun": "cat"})]
    assert parse_calls('<tool_call>{"name": "add"}</tool_call>') == [("add", {})]
    assert parse_calls('{"name": "add", "arguments": {}}') == []  # outside the tags: text, not a call
    assert parse_calls('<tool_call>["add"]</tool_call>')[0][0] is None


@pytest.mark.parametrize("spec, says", [
    ("envs.tools", "give package.module:function"),
    ("envs.tools:nothing", "envs.tools has no function 'nothing'"),
    ("no_such_module_x:f", "cannot import 'no_such_module_x'"),
    ("envs.tools:undocumented", "undocumented cannot be described to the model"),
])
def test_bad_tools_are_refused_by_name(spec, says):
    with pytest.raises(ValueError, match="--rollout.tools") as err:
        load_tools(spec)
    assert says in str(err.value)


def test_the_tools_schemas_are_in_every_prompt_and_the_episode_runs(tiny_models, tmp_path):
    """A Qwen2 checkpoint whose template renders tools: the prompts carry the schema, and PPO runs episodes with
    the tool environment (its reward from a reward function reading the whole episode)."""
    from engine.cli import main
    from engine.data.encode import make_encoder
    from engine.config import DataConfig
    from engine.episodes.tools import schema
    from engine.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_models["qwen2"], "test")
    tok.chat_template = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                         "<|im_end|>\n{% endif %}" + tok.chat_template)
    enc = make_encoder(tok, DataConfig(), 512, 20)
    plain = tok.decode(enc.prompt("what color was the cat ?"))
    enc.tools = [schema(user_tools.lookup)]
    shown = tok.decode(enc.prompt("what color was the cat ?"))
    assert '"name": "lookup"' in shown and '"name": "lookup"' not in plain and shown.endswith(plain)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what color was the {n} ?"}) + "\n" for n in ("cat", "dog") * 4))
    out = tmp_path / "run"
    assert main(["ppo", "--out", str(out), "--policy.path", str(tiny_models["qwen2"]), "--data.prompts", str(prompts),
                 "--rollout.tools", "envs.tools:lookup,add", "--reward.fn", "engine.task.rewards:exact_answer",
                 "--rollout.max_turns", "2", "--rollout.max_new_tokens", "6", "--ppo.advantage_estimator", "grpo",
                 "--ppo.iterations", "1", "--ppo.rollout_batch", "2", "--ppo.samples_per_prompt", "2",
                 "--ppo.minibatch", "4", "--run.progress", "false"]) == 0
    m = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["episodes/turns"] == 1.0 and m["episodes/done"] == 1.0  # a random model calls no tool


def test_a_tokenizer_that_parses_its_own_responses_is_asked_first():
    """Llama 3's calls are bare JSON with "parameters", ended by <|eot_id|>: transformers' parse_response
    (with the response template TRL sets for the templates it knows) reads them, where the Hermes format finds
    nothing; a Qwen2.5 tokenizer's parser reads its <tool_call> tags, and a call it cannot parse is still named."""
    from trl.chat_template_utils import add_response_schema, llama3_2_chat_template, qwen2_5_chat_template

    from engine.episodes.tools import parser_of
    from engine.task.tiny_checkpoint import build_tokenizer

    bare = '{"name": "add", "parameters": {"a": 2, "b": 3}}'
    tok = build_tokenizer("llama")
    assert parser_of(tok) is None
    tok.chat_template = llama3_2_chat_template
    llama = parser_of(add_response_schema(tok))
    assert llama is tok and parse_calls(bare, llama) == [("add", {"a": 2, "b": 3})] and parse_calls(bare) == []
    env = ToolEnvironment(load_tools("envs.tools:add"), llama)
    assert env.step(bare).messages == [{"role": "tool", "name": "add", "content": "5"}]
    tok = build_tokenizer("qwen2")
    tok.chat_template = qwen2_5_chat_template
    qwen = parser_of(add_response_schema(tok))
    assert parse_calls("sure " + call("add", a=2, b=3), qwen) == [("add", {"a": 2, "b": 3})]
    assert parse_calls("<tool_call>{bad</tool_call>", qwen)[0][0] is None
    assert parse_calls("the cat was blue", qwen) == []


def test_a_prompt_record_shows_and_allows_only_the_tools_it_names(tiny_models, tmp_path, capsys):
    from engine.cli import main
    from engine.config import RolloutConfig
    from engine.data.formats import load
    from engine.episodes import episode_task
    from engine.episodes.tools import schema, shown
    from engine.models.loading import load_tokenizer

    schemas = {"lookup": schema(user_tools.lookup), "add": schema(user_tools.add)}
    assert shown(schemas, None, "x") == [schemas["lookup"], schemas["add"]]
    assert shown(schemas, ["add"], "x") == [schemas["add"]] and shown(None, None, "x") is None
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "add two and three", "tools": ["add"]}) + "\n"
                    + json.dumps({"prompt": "what color was the cat ?"}) + "\n")
    a, b = load(path, "prompts")
    assert a.tools == ["add"] and b.tools is None
    tok = load_tokenizer(tiny_models["qwen2"], "test")
    task = episode_task(RolloutConfig(tools="envs.tools:lookup,add"), tok, [a.prompt, b.prompt], [a.env, b.env],
                        [a.tools, b.tools])
    env = task.env_cls()
    env.reset(a.prompt, **task.args[0])
    assert env.step(call("add", a=2, b=3)).messages[0]["content"] == "5"
    assert env.step(call("lookup", noun="cat")).messages[0]["content"] == "error: no tool named 'lookup' (tools: add)"
    env.reset(b.prompt, **task.args[1])
    assert env.step(call("lookup", noun="cat")).messages[0]["content"] == "the cat was blue"
    path.write_text(json.dumps({"prompt": "hi", "tools": ["fly"]}) + "\n")
    code = main(["ppo", "--out", str(tmp_path / "run"), "--policy.path", str(tiny_models["qwen2"]), "--data.prompts",
                 str(path), "--rollout.tools", "envs.tools:lookup,add", "--reward.fn", "engine.task.rewards:exact_answer",
                 "--run.progress", "false"])
    assert code == 2
    assert f"--data.prompts {path}: record 1: tools ['fly'] are not among --rollout.tools (lookup, add)" in \
        capsys.readouterr().err
    path.write_text(json.dumps({"prompt": "hi", "tools": "add"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1.*field 'tools' must be a list of function names"):
        load(path, "prompts")
