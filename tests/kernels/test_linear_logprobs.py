"""linear_token_logprobs (LM head fused) against a float64 reference: values, entropy, all gradients."""
import pytest
import torch

import kernels
from kernels import dispatch, linear_logprobs_ref
from kernels.linear_logprobs_ref import naive_linear_token_logprobs

BACKENDS = [b for b in ("torch", "triton") if dispatch.available("linear_token_logprobs", b)]


def make(n, h, v, dtype, rng, bias=True):
    hidden = torch.randn(n, h, generator=rng).to(dtype)
    weight = (torch.randn(v, h, generator=rng) / h ** 0.5 * 3).to(dtype)
    b = (torch.randn(v, generator=rng) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,), generator=rng)


def run(fn, hidden, weight, bias, tokens, g_lp, g_h, temperature):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]
    lp, ent = fn(*leaves, tokens, temperature)
    (lp.double() * g_lp + ent.double() * g_h).sum().backward()
    return lp.detach().double(), ent.detach().double(), [x.grad.double() if x is not None else None for x in leaves]


def ours(backend):
    return lambda h, w, b, t, temp: kernels.linear_token_logprobs(h, w, t, bias=b, temperature=temp,
                                                                  return_entropy=True, backend=backend)


def plain(h, w, b, t, temp):
    return naive_linear_token_logprobs(h, w, t, b, temp, True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred columns, so even small vocabularies span many chunks (and a ragged last one)."""
    monkeypatch.setattr(linear_logprobs_ref, "CHUNK_BYTES", 1)  # -> the minimum, 128 columns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,bias", [(1, 1, 1, False), (37, 24, 1001, True), (5, 64, 3001, False)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_against_float64(backend, n, h, v, bias, temperature, rng, small_chunks):
    hidden, weight, b, tokens = make(n, h, v, torch.float32, rng, bias)
    g_lp, g_h = torch.randn(n, generator=rng, dtype=torch.float64), torch.randn(n, generator=rng, dtype=torch.float64)
    lp, ent, grads = run(ours(backend), hidden, weight, b, tokens, g_lp, g_h, temperature)
    args = [x.double() if x is not None else None for x in (hidden, weight, b)]
    rlp, rent, rgrads = run(plain, *args, tokens, g_lp, g_h, temperature)
    torch.testing.assert_close(lp, rlp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, rent, atol=2e-5, rtol=1e-5)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        if rg is not None:
            torch.testing.assert_close(g, rg, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [32003, 151936])
def test_bfloat16_within_twice_pytorch_error(backend, v, rng):
    """FlashAttention's rule, per output: the error against float64 is at most twice plain PyTorch's in bf16."""
    n, h = 6, 32
    hidden, weight, b, tokens = make(n, h, v, torch.bfloat16, rng, bias=False)
    g_lp, g_h = torch.randn(n, generator=rng, dtype=torch.float64), torch.randn(n, generator=rng, dtype=torch.float64)
    exact = run(plain, hidden.double(), weight.double(), None, tokens, g_lp, g_h, 1.0)
    mine = run(ours(backend), hidden, weight, None, tokens, g_lp, g_h, 1.0)
    torch_bf16 = run(plain, hidden, weight, None, tokens, g_lp, g_h, 1.0)

    def err(x, y):
        return (x - y).abs().max().item()
    for name, k in (("logp", 0), ("entropy", 1)):
        assert err(mine[k], exact[k]) <= 2 * err(torch_bf16[k], exact[k]) + 1e-6, name
    for name, i in (("hidden", 0), ("weight", 1)):
        assert mine[2][i].shape == exact[2][i].shape
        assert err(mine[2][i], exact[2][i]) <= 2 * err(torch_bf16[2][i], exact[2][i]) + 1e-6, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_dtypes_and_no_grad_inputs(backend, rng):
    hidden, weight, b, tokens = make(4, 8, 50, torch.bfloat16, rng)
    h = hidden.clone().requires_grad_(True)
    lp = kernels.linear_token_logprobs(h, weight, tokens, bias=b, backend=backend)  # weight needs no grad
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and weight.grad is None


def test_matches_token_logprobs_of_full_logits(rng):
    hidden, weight, b, tokens = make(9, 16, 777, torch.float32, rng)
    full = kernels.token_logprobs(torch.nn.functional.linear(hidden, weight, b), tokens)
    torch.testing.assert_close(kernels.linear_token_logprobs(hidden, weight, tokens, bias=b), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.zeros(3, 4, 5)), "`hidden` must have shape"),
    (dict(weight=torch.zeros(10, 5)), "`weight` must have shape"),
    (dict(weight=torch.zeros(10, 4, dtype=torch.float64)), "`weight` has dtype"),
    (dict(tokens=torch.zeros(4, dtype=torch.long)), "`tokens` must have shape"),
    (dict(tokens=torch.tensor([0, 1, 10])), "outside the vocabulary"),
    (dict(tokens=torch.zeros(3)), "`tokens` must be an integer"),
    (dict(bias=torch.zeros(9)), "`bias` must be"),
    (dict(temperature=0.0), "`temperature` must be a positive"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(10, 4), tokens=torch.tensor([0, 1, 2]), bias=None,
                temperature=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kernels.linear_token_logprobs(args["hidden"], args["weight"], args["tokens"], bias=args["bias"],
                                      temperature=args["temperature"])
