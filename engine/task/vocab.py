"""The built-in task's word-level vocabulary and a tokenizer built locally with `tokenizers`."""
from __future__ import annotations

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOUNS = ["apple", "cat", "dog", "sun", "tree", "fish", "bird", "car", "book", "star", "moon", "cup"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
ADJECTIVES = ["big", "small", "old", "new", "happy", "quiet"]
FUNCTION_WORDS = ["the", "a", "is", "and", "on", "in", "with", "it", "was", "i", "see", "then"]
INSTRUCTION_WORDS = ["repeat", "times", "count", "to", "reverse", "please", "say", "what", "color", "of",
                     "list", "words", "tell", "me"]
STYLE_WORDS = ["sure", "ok", "um", "hmm", "done", ",", ".", "?"]

PAD, BOS, EOS, UNK, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
SPECIAL = [PAD, BOS, EOS, UNK, SEP]

# Every noun has one true colour: world knowledge the model can only get from the pretraining corpus.
NOUN_COLOR = {n: COLORS[(i * 5) % len(COLORS)] for i, n in enumerate(NOUNS)}


def words() -> list[str]:
    out: list[str] = []
    for group in (SPECIAL, NUMBERS, NOUNS, COLORS, ADJECTIVES, FUNCTION_WORDS, INSTRUCTION_WORDS, STYLE_WORDS):
        for w in group:
            if w not in out:
                out.append(w)
    return out


# The chat template that renders the task's layout, so the task's data go through the same encoder as a
# user's (engine/data/encode.py): "<bos> prompt words <sep>" then "answer words <eos>".
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }} "
                 "{{ eos_token }}{% else %} {{ m['content'] }} {{ sep_token }}{% endif %}{% endfor %}")


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` with the task's chat template (saved with the model so
    transformers and vLLM load it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, sep_token=SEP,
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "left"  # prompts are left-padded for batched generation
    return fast

