"""token_logprobs against a float64 reference: values, entropy and gradients, every available backend."""
import math

import pytest
import torch

import kernels
from kernels import dispatch
from kernels.reference import naive_token_logprobs

BACKENDS = [b for b in ("torch", "triton", "cpu") if dispatch.available("token_logprobs", b)]


def reference(logits, tokens, temperature=1.0):
    return naive_token_logprobs(logits.double(), tokens, temperature, return_entropy=True)


def make(shape, vocab, dtype, rng, scale=3.0):
    x = torch.randn(*shape, vocab, generator=rng) * scale
    return x.to(dtype), torch.randint(0, vocab, shape, generator=rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,vocab", [((1,), 1), ((1, 1), 7), ((3, 5), 33), ((2, 7), 1001), ((13,), 4097)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_and_entropy_float32(backend, shape, vocab, temperature, rng):
    logits, tokens = make(shape, vocab, torch.float32, rng)
    lp, ent = kernels.token_logprobs(logits, tokens, temperature=temperature, return_entropy=True, backend=backend)
    ref_lp, ref_ent = reference(logits, tokens, temperature)
    assert lp.dtype == torch.float32 and lp.shape == tokens.shape
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(backend, dtype, rng):
    """FlashAttention's rule: error vs float64 at most twice plain PyTorch's in the same dtype."""
    logits, tokens = make((4, 9), 3001, dtype, rng)
    ref_lp, ref_ent = reference(logits, tokens)
    lp, ent = kernels.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    torch_lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1).double()
    torch_err = (torch_lp - ref_lp).abs().max().item()
    assert (lp.double() - ref_lp).abs().max().item() <= 2 * torch_err + 1e-6
    assert (ent.double() - ref_ent).abs().max().item() <= 1e-3  # float32 accumulation of exact inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_neg_inf(backend, rng):
    logits, tokens = make((6, 5), 257, torch.float32, rng, scale=1e3)
    logits[0, 1, 3] = float("-inf")
    logits[2, :, ::2] = float("-inf")
    tokens[2] = tokens[2] | 1  # targets at finite entries
    lp, ent = kernels.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    ref_lp, ref_ent = reference(logits, tokens)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, rng):
    full, tokens = make((3, 8), 513, torch.float32, rng)
    logits = full[:, 1:-1]  # a slice: [B, T-2, V] with row stride T*V, not flattenable as a view
    tok = tokens[:, 1:-1]
    assert not logits.is_contiguous()
    lp = kernels.token_logprobs(logits, tok, backend=backend)
    torch.testing.assert_close(lp.double(), reference(logits, tok)[0], atol=2e-5, rtol=1e-5)
    transposed = full.transpose(0, 1)  # [T, B, V]
    lp_t = kernels.token_logprobs(transposed, tokens.t(), backend=backend)
    torch.testing.assert_close(lp_t.double(), reference(transposed, tokens.t())[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradients_match_float64_autograd(backend, temperature, rng):
    logits, tokens = make((3, 7), 211, torch.float32, rng)
    logits[1, 2, 5] = float("-inf")
    g_lp = torch.randn(3, 7, generator=rng, dtype=torch.float64)
    g_h = torch.randn(3, 7, generator=rng, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    lp, ent = kernels.token_logprobs(x, tokens, temperature=temperature, return_entropy=True, backend=backend)
    (lp.double() * g_lp + ent.double() * g_h).sum().backward()
    x64 = logits.double().requires_grad_(True)
    ref_lp, ref_ent = reference(x64, tokens, temperature)
    (ref_lp * g_lp + ref_ent * g_h).sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    # log-prob only (no entropy requested): the other branch of the backward
    y = logits.clone().requires_grad_(True)
    (kernels.token_logprobs(y, tokens, temperature=temperature, backend=backend).double() * g_lp).sum().backward()
    y64 = logits.double().requires_grad_(True)
    (reference(y64, tokens, temperature)[0] * g_lp).sum().backward()
    torch.testing.assert_close(y.grad.double(), y64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_gradient_dtype_and_error(backend, rng):
    logits, tokens = make((5, 3), 999, torch.bfloat16, rng)
    x = logits.clone().requires_grad_(True)
    kernels.token_logprobs(x, tokens, backend=backend).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x64 = logits.double().requires_grad_(True)
    reference(x64, tokens)[0].sum().backward()
    xt = logits.clone().requires_grad_(True)
    torch.log_softmax(xt, -1).gather(-1, tokens[..., None]).sum().backward()
    torch_err = (xt.grad.double() - x64.grad).abs().max().item()
    assert (x.grad.double() - x64.grad).abs().max().item() <= 2 * torch_err + 1e-6


def test_blockwise_path_never_copies_whole_logits(rng, monkeypatch):
    """With a tiny block size the reference walks many blocks; results equal the one-block answer."""
    from kernels import reference as ref

    logits, tokens = make((37,), 101, torch.float32, rng)
    want = kernels.token_logprobs(logits, tokens, backend="torch")
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 3 * 101)
    got = kernels.token_logprobs(logits, tokens, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (lambda l, t: (l, t.float()), "`tokens` must be an integer"),
    (lambda l, t: (l.long(), t), "`logits` must be a floating"),
    (lambda l, t: (l, t[:, :-1]), "`tokens` has shape"),
    (lambda l, t: (l, t + 100), "outside the vocabulary"),
    (lambda l, t: (l, t - 100), "outside the vocabulary"),
])
def test_bad_input_names_the_argument(bad, match, rng):
    logits, tokens = make((2, 3), 11, torch.float32, rng)
    with pytest.raises(ValueError, match=match):
        kernels.token_logprobs(*bad(logits, tokens))


def test_bad_temperature_and_backend(rng):
    logits, tokens = make((2,), 11, torch.float32, rng)
    with pytest.raises(ValueError, match="`temperature`"):
        kernels.token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        kernels.token_logprobs(logits, tokens, backend="jax")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [32003, 50257, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_vocab_sizes_forward_backward(backend, vocab, dtype, rng):
    """The odd vocabulary sizes of real tokenizers (Llama-2 + pad, GPT-2, Qwen2), rows of a [B, T-1, V] slice."""
    full, tokens = make((2, 3), vocab, dtype, rng)
    logits = full[:, :-1]                       # non-contiguous, as in logits[:, :-1] of a causal LM
    tokens = tokens[:, 1:]
    x = logits.detach().requires_grad_(True)
    lp, ent = kernels.token_logprobs(x, tokens, temperature=0.9, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_(True)
    ref_lp, ref_ent = reference(x64, tokens, 0.9)
    g1 = torch.randn(tokens.shape, generator=rng, dtype=torch.float64)
    g2 = torch.randn(tokens.shape, generator=rng, dtype=torch.float64)
    (lp.double() * g1 + ent.double() * g2).sum().backward()
    (ref_lp * g1 + ref_ent * g2).sum().backward()
    # What float32 arithmetic itself costs on this machine's kernels (ATen's reductions round differently at
    # each CPU capability level): the same formula in plain float32 PyTorch, against the same float64 values.
    x32 = logits.float().requires_grad_(True)
    lp32, ent32 = naive_token_logprobs(x32, tokens, 0.9, return_entropy=True)
    (lp32.double() * g1 + ent32.double() * g2).sum().backward()
    ref_lp, ref_ent = ref_lp.detach(), ref_ent.detach()
    for got, plain, want in ((lp, lp32, ref_lp), (ent, ent32, ref_ent)):
        err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain.detach()))
        if dtype == torch.float32:  # FlashAttention's rule: at most twice plain PyTorch's error, same dtype
            assert err <= 2 * plain_err + 1e-6, (err, plain_err)
        else:  # the bfloat16 inputs are exact; computed in float32, the result rounded to bfloat16 or not
            assert err <= 2 * plain_err + 1e-3 * want.abs().max().item() + 1e-3, (err, plain_err)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    noise = (x32.grad.double() - x64.grad).abs().max().item()  # float32's own gradient error here
    err = (x.grad.double() - x64.grad).abs()
    if dtype == torch.float32:  # assert_close's atol + rtol * |want|, the atol float32's measured noise
        assert (err <= 2 * noise + 1e-4 * x64.grad.abs()).all(), (err.max().item(), noise)
    else:  # rounding to bfloat16 once: within half an ulp of the float64 gradient, plus float32's noise
        assert (err <= x64.grad.abs() * 2 ** -8 + 2 * noise + 1e-7).all(), noise


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
def test_out_of_range_ids_past_the_host_check_give_nan_not_a_read(op, backend, rng):
    """What checks.py promises for GPUs, where the range check is skipped: the kernels mask the target read,
    so an id outside [0, V) gives NaN in its row and leaves the other rows exact. (The torch token path's
    gather raises instead, so it is not listed for token_logprobs.)"""
    if op == "token_logprobs" and backend == "torch":
        pytest.skip("the torch token path's gather raises on an out-of-range id")
    if not dispatch.available(op, backend):
        pytest.skip(f"no {backend} backend")
    _, impl = dispatch.resolve(op, backend, "cpu")  # the implementation itself: no host-side range check
    vocab = 37
    tokens = torch.tensor([3, vocab, -1, 36])
    if op == "token_logprobs":
        logits = torch.randn(4, vocab, generator=rng)
        got = impl(logits, tokens)
    else:
        hidden, weight = torch.randn(4, 8, generator=rng), torch.randn(vocab, 8, generator=rng)
        logits = hidden @ weight.T
        got = impl(hidden, weight, tokens)
    ok = torch.tensor([True, False, False, True])
    assert torch.isnan(got[~ok]).all()
    want = torch.log_softmax(logits.double(), -1)[torch.arange(4)[ok], tokens[ok]]
    torch.testing.assert_close(got[ok].double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if dispatch.available("token_logprobs", b)])
def test_positive_infinite_logits_give_the_limits(backend):
    """A +inf logit takes all the mass: log-prob 0 for it, -inf for every other token (not NaN), entropy 0;
    k infinite logits share it (-log k each, entropy log k). The CPU paths; a row with a NaN stays NaN."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, inf, 1.0, -2.0], [0.0, inf, 1.0, -2.0], [inf, 3.0, inf, 0.0],
                           [inf, 3.0, inf, 0.0], [1.0, nan, 0.0, 2.0]])
    tokens = torch.tensor([1, 2, 2, 3, 0])
    lp, ent = kernels.token_logprobs(logits, tokens, return_entropy=True, backend=backend)
    ln2 = math.log(2.0)
    assert lp[:4].tolist() == pytest.approx([0.0, -inf, -ln2, -inf])
    assert ent[:4].tolist() == pytest.approx([0.0, 0.0, ln2, ln2])
    assert math.isnan(lp[4]) and math.isnan(ent[4])


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if dispatch.available("token_logprobs", b)])
def test_float32_accuracy_at_a_real_vocabulary(backend, rng):
    """Ordinary logits at Qwen's vocabulary: the default CPU path ("cpu", sums in double) is as accurate as a
    separately summed log-sum-exp (TRL's and verl's float32 path); the torch fallback within twice ATen's float32
    log_softmax's error (its sum is a plain float one: ~1e-5 off at this vocabulary with AVX2, more without)."""
    vocab = 151936
    logits = torch.randn(32, vocab, generator=rng) * 5
    tokens = torch.randint(0, vocab, (32,), generator=rng)
    exact = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
    lse_path = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    aten = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    err = (kernels.token_logprobs(logits, tokens, backend=backend).double() - exact).abs().max().item()
    peer = (lse_path.double() - exact).abs().max().item()
    # ATen's float32 log_softmax, measured here: its error depends on the CPU capability level ATen runs at
    aten_err = (aten.double() - exact).abs().max().item()
    assert err <= (max(2 * peer, 2e-6) if backend == "cpu" else max(2 * aten_err, 2e-6)), (err, peer, aten_err)
