"""Users' records -> token ids, with the tokenizer's chat template where it has one.

Prompts: a chat template renders the messages (a plain-text prompt becomes one user turn) with the
generation prompt; without a template the text is tokenized as is (messages: their contents joined by blank
lines). Responses: the template's rendering of the assistant turn after the prompt, cut after its first
eos; without a template, the text followed by eos. Every response ends with eos unless it was cut.

Length rule (stated, and counted in the log): a prompt longer than `max_prompt_tokens` keeps its last
`max_prompt_tokens` tokens (long_prompts="truncate", the end holds the question and the generation prompt)
or is dropped (long_prompts="drop"); a response longer than `max_response_tokens` is cut to that length.
The model's context (`context`, its position count) bounds both: a prompt keeps room for `reserve` tokens
after it (1 for SFT and the RM; rollout.max_new_tokens for PPO), and prompt + response never exceed it, so
a model with learned positions (GPT-2) is never asked for a position it does not have.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class LengthCounts:
    prompts: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0
    responses: int = 0
    responses_cut: int = 0

    def summary(self) -> str:
        text = f"{self.prompts} prompts ({self.prompts_truncated} truncated, {self.prompts_dropped} dropped)"
        return text + (f", {self.responses} responses ({self.responses_cut} cut)" if self.responses else "")


@dataclass
class Encoder:
    tokenizer: object
    max_prompt_tokens: int = 512
    max_response_tokens: int = 512
    long_prompts: str = "truncate"
    context: int | None = None               # the model's positions; None: unbounded
    reserve: int = 1                         # tokens a prompt leaves room for within `context`
    counts: LengthCounts = field(default_factory=LengthCounts)
    tools: list | None = None                # tools' JSON schemas, rendered into every prompt by the template
    # rendered chat templates by (messages, generation prompt): a prompt is rendered again for each of its K
    # ranked responses and in every PPO iteration that draws it (a jinja render + tokenization, ~0.1 ms)
    _rendered: dict = field(default_factory=dict, repr=False)

    @property
    def prompt_limit(self) -> int:
        if self.context is None:
            return self.max_prompt_tokens
        return min(self.max_prompt_tokens, self.context - self.reserve)

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _messages(self, prompt) -> list[dict]:
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def _render(self, messages, generation_prompt: bool) -> list[int]:
        try:
            key = (tuple(tuple(sorted(m.items())) for m in messages), generation_prompt,
                   json.dumps(self.tools, sort_keys=True) if self.tools else None)
            hash(key)
        except TypeError:  # a message with unhashable fields: render without the cache
            key = None
        if key is not None and key in self._rendered:
            return list(self._rendered[key])
        ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=True, return_dict=False, tools=self.tools))
        if key is not None:
            if len(self._rendered) >= 65536:
                self._rendered.clear()
            self._rendered[key] = tuple(ids)
        return ids

    def raw_prompt(self, prompt) -> list[int]:
        if self.chat:
            return self._render(self._messages(prompt), True)
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
        return list(self.tokenizer(text).input_ids)

    def prompt(self, prompt) -> list[int] | None:
        """Token ids of a prompt (str or chat messages), or None when the length rule drops it."""
        ids = self.raw_prompt(prompt)
        self.counts.prompts += 1
        if len(ids) > self.prompt_limit:
            if self.long_prompts == "drop":
                self.counts.prompts_dropped += 1
                return None
            self.counts.prompts_truncated += 1
            ids = ids[-self.prompt_limit:]
        return ids

    def response(self, prompt, text: str, prompt_len: int = 0, finished: bool = True) -> list[int]:
        """Token ids of `text` answering `prompt` (of `prompt_len` tokens), ending with eos unless cut by
        max_response_tokens or the model's context, or unless `finished` is False (an answer cut off while it
        was sampled: it is scored as it was, without an end)."""
        eos = self.tokenizer.eos_token_id
        ids = None
        if self.chat:
            msgs = self._messages(prompt)
            before = self._render(msgs, True)
            full = self._render(msgs + [{"role": "assistant", "content": text}], False)
            if full[:len(before)] == before and len(full) > len(before):
                ids = full[len(before):]
                ids = ids[:ids.index(eos) + 1] if eos in ids else ids + [eos]
        if ids is None:  # no template, or one that renders the prompt differently once answered
            ids = list(self.tokenizer(text, add_special_tokens=False).input_ids) + [eos]
        if not finished:
            ids = ids[:ids.index(eos)] if eos in ids else ids
        self.counts.responses += 1
        limit = self.max_response_tokens if self.context is None else \
            min(self.max_response_tokens, self.context - prompt_len)
        if len(ids) > limit:
            self.counts.responses_cut += 1
            ids = ids[:limit]
        return ids

    def text_of(self, response_ids: list[int]) -> str:
        """A sampled response's text (up to its eos), for re-tokenizing under another tokenizer."""
        eos = self.tokenizer.eos_token_id
        if eos in response_ids:
            response_ids = response_ids[:response_ids.index(eos)]
        return self.tokenizer.decode(response_ids, skip_special_tokens=True)


def make_encoder(tokenizer, data_cfg, context: int | None = None, reserve: int = 1, flag: str = "") -> Encoder:
    """data_cfg: engine.config.DataConfig. context: the model's positions (None: unbounded); reserve: the
    tokens each prompt must leave room for (a ValueError naming `flag` when the context has no room)."""
    if context is not None and context - reserve < 1:
        raise ValueError(f"the model ({flag}) has {context} positions, which leaves no room for a prompt before "
                         f"{reserve} new tokens: lower --rollout.max_new_tokens")
    return Encoder(tokenizer, data_cfg.max_prompt_tokens, data_cfg.max_response_tokens, data_cfg.long_prompts,
                   context, reserve)


def text_examples(tokenizer, texts: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Pretraining text as (prompt, response) pairs for the LM loss: bos (or, without one, the text's first
    token) as the prompt, then the text and eos, in at most `max_tokens` tokens after the prompt."""
    out = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)[:max_tokens - 1] + [tokenizer.eos_token_id]
        bos = tokenizer.bos_token_id
        out.append(([bos], ids) if bos is not None else (ids[:1], ids[1:]))
    return out


def special_texts(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (eos, end-of-turn, role markers, ...), which user data
    must not contain: the tokenizer would read them as those tokens."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()))
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return tuple(sorted(t for t in texts if t))
