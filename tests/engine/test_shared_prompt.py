"""Each distinct prompt run once (engine/models/shared_prompt.py) gives the plain pass's log-probs, values and
gradients, for every supported family, with left padding, repeated and single prompts, and answers of
different lengths.

Bounds: float64 models, so the two passes differ by the order of float64 sums only; the states still agree to
1e-10 rather than 1e-15 because transformers' RMSNorm computes in float32 whatever the model's dtype, and
one float32 rounding that falls the other way moves a value by 1e-7 relative before the next layers damp it.
Gradients, summed over the rows sharing a prompt in another order and through the same float32 norms, agree
to 1e-5 of each tensor's largest element."""
import pytest
import torch
import transformers

from engine.models.batch import make_batch
from engine.models.forward import PolicyLogprobs, TokenValues
from engine.task.tiny_checkpoint import FAMILIES, build_config, build_tokenizer


def models(family: str, dtype=torch.float64):
    tok = build_tokenizer(family)
    torch.manual_seed(0)
    cfg = build_config(family, tok, hidden=64, layers=2, heads=4)
    cfg._attn_implementation = "sdpa"
    lm = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    cfg.num_labels = 1
    scalar = transformers.AutoModelForSequenceClassification.from_config(cfg).to(dtype)
    return tok, lm.eval(), scalar.eval()  # no dropout (GPT-2 has some)


def grpo_batch(pad: int, vocab: int, seed: int):
    """3 prompts of 2, 5 and 1 tokens (left-padded), 3, 4 and 2 answers each of 0-7 tokens, rows interleaved."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (2, 5, 1)]
    rows = [(i, torch.randint(3, vocab, (int(torch.randint(0, 8, (), generator=g)),), generator=g).tolist())
            for i, n in ((0, 3), (1, 4), (2, 2)) for _ in range(n)]
    order = torch.randperm(len(rows), generator=g).tolist()
    return make_batch([prompts[rows[i][0]] for i in order], [rows[i][1] for i in order], pad)


def run(module, params, batch):
    for p in params:
        p.grad = None
    out = module(batch)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompts_give_the_plain_pass(family):
    tok, lm, scalar = models(family)
    batch = grpo_batch(tok.pad_token_id or tok.eos_token_id, len(tok), seed=FAMILIES.index(family))
    assert batch.response_mask.sum(1).min() == 0 and batch.attention_mask[:, 0].min() == 0  # holes, padding
    for wrap in (lambda s: PolicyLogprobs(lm, share_prompts=s), lambda s: TokenValues(scalar, share_prompts=s)):
        params = [p for p in wrap(True).parameters() if p.requires_grad]
        shared, g_shared = run(wrap(True), params, batch)
        plain, g_plain = run(wrap(False), params, batch)
        m = batch.response_mask
        torch.testing.assert_close(shared[m], plain[m], rtol=1e-10, atol=1e-10)
        for a, b in zip(g_shared, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_float32_and_the_plain_path_where_nothing_repeats():
    tok, lm, _ = models("llama", torch.float32)
    batch = grpo_batch(tok.pad_token_id, len(tok), seed=3)
    shared = PolicyLogprobs(lm, share_prompts=True)(batch)
    plain = PolicyLogprobs(lm, share_prompts=False)(batch)
    torch.testing.assert_close(shared, plain, rtol=2e-5, atol=2e-5)
    distinct = make_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], tok.pad_token_id)  # nothing to share: bitwise
    assert torch.equal(PolicyLogprobs(lm)(distinct), PolicyLogprobs(lm, share_prompts=False)(distinct))


def test_gradient_checkpointing_runs_the_plain_pass():
    tok, lm, _ = models("llama", torch.float32)
    batch = grpo_batch(tok.pad_token_id, len(tok), seed=4)
    plain = PolicyLogprobs(lm, share_prompts=False)(batch)
    lm.gradient_checkpointing_enable()
    lm.train()
    assert torch.equal(PolicyLogprobs(lm, share_prompts=True)(batch), plain)


def test_sharing_runs_under_sdpa_and_is_refused_for_untested_attention():
    tok, lm, _ = models("llama", torch.float32)
    batch = grpo_batch(tok.pad_token_id, len(tok), seed=5)
    from engine.models.shared_prompt import body_of

    calls = []  # what each call of the body was given: the path itself observed, not its rounding
    hook = body_of(lm).register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape, kwargs.get("past_key_values") is not None)),
        with_kwargs=True)
    plain = PolicyLogprobs(lm, share_prompts=False)(batch)
    assert calls == [(batch.input_ids.shape, False)]  # the plain pass: every row's whole sequence, once
    calls.clear()
    shared = PolicyLogprobs(lm)(batch)
    hook.remove()
    p, distinct = batch.prompt_len, torch.unique(batch.input_ids[:, :batch.prompt_len - 1], dim=0).shape[0]
    assert distinct < batch.input_ids.shape[0]
    # shared: the distinct prompts once (no cache in), then every row's answer against their expanded cache
    assert calls == [(torch.Size([distinct, p - 1]), False),
                     (torch.Size([batch.input_ids.shape[0], batch.input_ids.shape[1] - p]), True)]
    torch.testing.assert_close(shared, plain)
    lm.config._attn_implementation = "flex_attention"  # not in SHARING_ATTENTION; never called on this path
    from engine.models.shared_prompt import can_share

    assert not can_share(lm)
