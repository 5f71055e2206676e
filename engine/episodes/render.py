"""An environment's messages as the token ids appended after the model's turn.

The model's own tokens are kept as it generated them; only the new messages are rendered, on their own: the
chat template's text for [a user turn, an assistant turn] is compared with its text for the same two turns
plus the new messages and the generation prompt, and the difference (the new messages, then the header of the
model's next turn) is tokenised alone. Re-tokenising the whole conversation instead drifts: a sampled token
sequence need not be the one the tokenizer would make of its text, and the trained log-probs would then be of
tokens the model never sampled. Template text after the end-of-turn token that the model stopped at (Qwen's
"\n" after <|im_end|>) is kept in front of the new messages, so the trajectory reads as the template writes it.

Environment text is untrusted: a special token of the tokenizer in it (which would forge a turn or end the
episode) is an EnvFailure, and each message is cut to `max_tokens` tokens.
"""
from __future__ import annotations

from .contain import EnvFailure

_PROBE = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]


class TurnRenderer:
    def __init__(self, tokenizer, max_tokens: int = 256):
        self.tok, self.max_tokens = tokenizer, max_tokens
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.special = sorted({t for t in tokenizer.all_special_tokens if t})
        if self.chat:
            self.before = self._template(_PROBE, False)
            eos = tokenizer.eos_token or ""
            at = self.before.rfind(eos) if eos else -1
            self.tail = self.before[at + len(eos):] if at >= 0 else ""
            for role in ("tool", "user"):  # a template that cannot render a role says so now, not mid-run
                try:
                    self.ids([{"role": role, "content": "probe"}])
                except EnvFailure as exc:
                    raise ValueError(f"the tokenizer's chat template cannot render a {role!r} message after the "
                                     f"assistant's turn ({exc}); an environment needs one that can") from None

    def _template(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raises whatever the template raises
            raise EnvFailure("malformed", f"the chat template refused the messages ({type(exc).__name__}: {exc})")

    def _text(self, messages: list[dict]) -> str:
        if not self.chat:  # as prompts without a template are encoded: contents joined by blank lines
            return "\n\n" + "\n\n".join(m["content"] for m in messages) + "\n\n"
        after = self._template(_PROBE + messages, True)
        if not after.startswith(self.before):
            raise EnvFailure("malformed", "the chat template renders the earlier turns differently once these "
                                          "messages follow them; it cannot be extended turn by turn")
        return self.tail + after[len(self.before):]

    def ids(self, messages: list[dict], what: str = "the environment") -> list[int]:
        """Token ids of `messages` as appended after the model's turn (the next turn's header included)."""
        cut = []
        for i, m in enumerate(messages):
            hits = [(m["content"].find(t), -len(t), t) for t in self.special if t in m["content"]]
            if hits:  # the first in the text (the longest of those starting there)
                hit = min(hits)[2]
                raise EnvFailure("special_token", f"{what} returned messages[{i}] containing {hit!r}, a special "
                                                  f"token of the tokenizer (it would forge a turn or end the episode)")
            content = self.tok(m["content"][: 16 * self.max_tokens], add_special_tokens=False).input_ids
            if len(content) > self.max_tokens:
                m = {**m, "content": self.tok.decode(content[: self.max_tokens])}
            cut.append(m)
        return list(self.tok(self._text(cut), add_special_tokens=False).input_ids)
