"""The check that a loaded model is causal: every role here (policy, reference, value, reward) reads each
position from the tokens before it only. Run after loading, in one process (`loading.load_model`) or once a
sharded model's slices are in place (`meta_load.materialize`)."""
from __future__ import annotations

import torch

from .forward import body_hidden


@torch.no_grad()
def check_causal(model, flag: str, path) -> None:
    """A policy, reference, value or reward model here reads each position from the tokens before it only.
    An encoder (BERT) would see the future: changing the last token must leave earlier positions unchanged."""
    training = model.training
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 8), generator=g).to(next(model.parameters()).device)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    a, b = body_hidden(model, ids)[0, :-1].float(), body_hidden(model, other)[0, :-1].float()
    model.train(training)
    if (a - b).abs().max() > 1e-3 * (1 + a.abs().max()):
        raise ValueError(f"{flag} {path}: this {type(model).__name__} sees future tokens (changing the last token "
                         f"changed the earlier positions), so it is not a causal LM; RLHF here needs a decoder-only "
                         f"model (Llama, Qwen2, Mistral, GPT-2, ...), not an encoder such as BERT")
