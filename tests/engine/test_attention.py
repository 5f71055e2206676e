"""engine/models/attention.py's "sdpa_gqa" against transformers' "sdpa": the same logits, gradients and greedy
generations for every family on left-padded batches, float32, bfloat16 and float64, and the grouped call really
taken (a spy on PyTorch's SDPA records its arguments; the real function runs).

Bounds: the forward is the same computation (bitwise in float32 and float64 here; bfloat16 to one rounding);
the KV projections' gradients sum a group's heads in another order, so they agree to float rounding of each
tensor's largest element (1e-5 float32, 1e-12 float64, 2e-2 bfloat16)."""
import copy

import pytest
import torch
import transformers

from engine.models.attention import register
from engine.models.loading import resolve_attention
from engine.task.tiny_checkpoint import FAMILIES, build_config, build_tokenizer

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def pair(family, dtype):
    tok = build_tokenizer(family)
    cfg = build_config(family, tok, hidden=128, layers=2, heads=4)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    grouped = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=register())
    plain, grouped = plain.to(dtype).eval(), grouped.to(dtype).eval()  # (a shared config would be switched too)
    grouped.load_state_dict(plain.state_dict())
    return tok, plain, grouped


def left_padded(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (5, 13), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 4, 1, 9, 2)):
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_gradients_and_generations_as_sdpa(family, dtype, monkeypatch):
    tok, plain, grouped = pair(family, dtype)
    ids, mask = left_padded(len(tok), FAMILIES.index(family))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw.get("enable_gqa", False)) or real(*a, **kw))
    outs = []
    for model in (plain, grouped):
        calls.clear()
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}, list(calls)))
    (la, ga, plain_calls), (lb, gb, grouped_calls) = outs
    is_grouped = family != "gpt2"  # GPT-2 has as many KV heads as query heads: nothing to group
    assert grouped_calls == [is_grouped] * 2 and plain_calls == [False] * 2
    real_rows = mask.bool()
    torch.testing.assert_close(lb[real_rows], la[real_rows], rtol=TOL[dtype] if dtype == torch.bfloat16 else 0,
                               atol=TOL[dtype] if dtype == torch.bfloat16 else 0)
    for name in ga:
        scale = ga[name].abs().max().item()
        torch.testing.assert_close(gb[name], ga[name], rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=name)
    if dtype == torch.float32:
        with torch.no_grad():
            a, b = (m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id) for m in (plain, grouped))
        assert torch.equal(a, b)


def test_auto_is_sdpa_gqa_on_the_cpu():
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa_gqa"
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
