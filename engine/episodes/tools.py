"""Tools as plain Python functions (`--rollout.tools package.module:a,b`), and the environment that runs them.

A tool is a function with type hints and a Google-style docstring, as transformers' chat templates take them:
its JSON schema (`transformers.utils.get_json_schema`) is rendered into every prompt by the tokenizer's chat
template (`tools=`), so the model sees what it may call. The model calls one by writing, in its turn,

    <tool_call>
    {"name": "lookup", "arguments": {"noun": "cat"}}
    </tool_call>

(the Hermes format of Qwen2.5, Qwen3, Hermes and most open tool-calling templates). A tokenizer that knows
how to parse its own responses (transformers' `response_template` or `response_schema`, which TRL's
`add_response_schema` sets for the templates it knows) is asked first, with the Hermes format as the
fallback; another format: write an environment (engine/episodes/env.py). `ToolEnvironment` runs every call
of a turn and answers with one "tool" message per call: the function's result as text, or the error (an
unknown tool, arguments that do not fit, an exception) for the model to read; a turn without a call ends the
episode, whose reward then comes from the reward model or function (--reward.*) reading the whole episode.
"""
from __future__ import annotations

import json
import re

from ..user_code import import_named
from .env import Step

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def load_tools(spec: str, flag: str = "--rollout.tools") -> list:
    """The functions `spec` ("package.module:a,b") names, each with a schema, or a ValueError saying why not."""
    module, names = import_named(spec, flag, "package.module:function[,function...]")
    tools = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"{flag} {spec}: {module.__name__} has no function {name!r}")
        schema(fn, flag)
        tools.append(fn)
    return tools


def schema(fn, flag: str = "--rollout.tools") -> dict:
    """The function's JSON schema as chat templates render it, or a ValueError naming what it lacks."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own errors for missing hints or docs
        raise ValueError(f"{flag}: {getattr(fn, '__name__', fn)} cannot be described to the model ({exc}); give it "
                         f"type hints and a docstring with an Args: section") from None


def shown(schemas: dict | None, names: list | None, where: str) -> list | None:
    """The schemas a prompt shows: every one of --rollout.tools (`schemas`: name -> schema), or the record's
    own `names` among them; None without tools. A name that is not a tool is a ValueError naming `where`."""
    if schemas is None:
        if names:
            raise ValueError(f"{where}: the record names tools {names}, but no --rollout.tools is given")
        return None
    if names is None:
        return list(schemas.values())
    unknown = [n for n in names if n not in schemas]
    if unknown:
        raise ValueError(f"{where}: tools {unknown} are not among --rollout.tools ({', '.join(schemas)})")
    return [schemas[n] for n in names]


def parser_of(tokenizer):
    """The tokenizer, where it parses its own responses (transformers' parse_response), else None."""
    known = getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None)
    return tokenizer if known and callable(getattr(tokenizer, "parse_response", None)) else None


def parse_calls(reply: str, parser=None) -> list:
    """[(name, arguments) or (None, why)] of every tool call in a turn's text, in order: by `parser`'s
    parse_response where given (and it parses), else the Hermes <tool_call> format."""
    if parser is not None:
        try:
            out = []
            # the turn alone, ended as the model ended it (the runner hands environments the text without it)
            turn = reply + (parser.eos_token or "")
            for call in parser.parse_response(turn, prefix="").get("tool_calls") or []:
                fn = call["function"]
                args = fn.get("arguments") or {}
                out.append((fn["name"], args) if isinstance(args, dict) else (None, "the arguments are not an object"))
            return out
        except Exception:  # noqa: BLE001 - a response the parser cannot read: read as Hermes text below
            pass
    out = []
    for body in CALL.findall(reply):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            out.append((None, f"the tool call is not JSON ({exc.msg})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or \
                not isinstance(call.get("arguments", {}), dict):
            out.append((None, 'a tool call is {"name": ..., "arguments": {...}}'))
            continue
        out.append((call["name"], call.get("arguments", {})))
    return out


class ToolEnvironment:
    """Runs a turn's tool calls (see the module's docstring). Made per episode with the run's `tools`."""

    def __init__(self, tools: list, parser=None):
        self.tools, self.parser = {fn.__name__: fn for fn in tools}, parser
        self.allowed = self.tools

    def reset(self, prompt, tools: list | None = None, **args):
        """tools: the names the prompt record shows (its "tools" field), the only ones it may call."""
        self.allowed = self.tools if tools is None else {n: self.tools[n] for n in tools}

    def step(self, reply: str) -> Step:
        calls = parse_calls(reply, self.parser)
        if not calls:
            return Step(done=True)
        messages = []
        for name, arguments in calls:
            if name is None:
                text = f"error: {arguments}"
            elif name not in self.allowed:
                text = f"error: no tool named {name!r} (tools: {', '.join(sorted(self.allowed))})"
            else:
                try:
                    text = str(self.allowed[name](**arguments))
                except TypeError as exc:
                    text = f"error: {name} cannot take these arguments ({exc})"
                except Exception as exc:  # noqa: BLE001 - the tool's own failure is the model's to read
                    text = f"error: {name} raised {type(exc).__name__}: {exc}"
            messages.append({"role": "tool", "name": name or "", "content": text})
        return Step(messages)
