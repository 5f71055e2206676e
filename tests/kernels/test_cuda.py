"""Every GPU backend (Triton, CUDA C++, torch) on CUDA tensors against the float64 CPU reference.

Skipped without a GPU (CI); the GPU session runs it with `python -m pytest -q tests/kernels/test_cuda.py` (without
TRITON_INTERPRET, which tests/conftest.py only sets when it is unset: export TRITON_INTERPRET=0 there).
"""
import pytest
import torch

import kernels
from kernels import dispatch, reference
from kernels.linear_logprobs_ref import naive_linear_token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_BACKENDS = ("torch", "triton", "cuda")


def backends(op):
    return [b for b in GPU_BACKENDS if dispatch.available(op, b)]


@pytest.mark.parametrize("backend", backends("token_logprobs") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("vocab", [1, 4097, 32003, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_cuda(backend, vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    full = (torch.randn(3, 6, vocab, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, vocab, (3, 5), generator=g)
    logits = full[:, :-1]                                   # non-contiguous rows
    x = logits.cuda().requires_grad_(True)
    lp, ent = kernels.token_logprobs(x, tokens.cuda(), temperature=0.8, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_(True)
    rlp, rent = reference.naive_token_logprobs(x64, tokens, 0.8, True)
    g1, g2 = torch.randn(tokens.shape, generator=g, dtype=torch.float64), torch.randn(tokens.shape, generator=g,
                                                                                     dtype=torch.float64)
    (lp.double() * g1.cuda() + ent.double() * g2.cuda()).sum().backward()
    (rlp * g1 + rent * g2).sum().backward()
    # plain PyTorch in the same dtype, on the GPU: the error budget is twice its error
    t = logits.cuda().requires_grad_(True)
    tl_ = torch.log_softmax(t.float() / 0.8, -1)
    tlp = tl_.gather(-1, tokens.cuda()[..., None]).squeeze(-1)
    tent = -(tl_.exp() * tl_).sum(-1)
    (tlp.double() * g1.cuda() + tent.double() * g2.cuda()).sum().backward()

    def err(a, b):
        return (a.double().cpu() - b).abs().max().item()
    assert err(lp, rlp.detach()) <= 2 * err(tlp, rlp.detach()) + 1e-5
    assert err(ent, rent.detach()) <= 2 * err(tent, rent.detach()) + 1e-5
    assert x.grad.dtype == dtype
    assert err(x.grad, x64.grad) <= 2 * err(t.grad, x64.grad) + 1e-6


@pytest.mark.parametrize("b,t", [(1, 1), (5, 37), (256, 2048), (3, 9000)])
def test_gae_and_shape_rewards_cuda(b, t):
    g = torch.Generator().manual_seed(t)
    r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    lp, ref = -torch.rand(b, t, generator=g) * 3, -torch.rand(b, t, generator=g) * 3
    scores = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, : t // 2] = False                               # left padding on one row, holes elsewhere
    radv, rret = reference.gae(r.double(), v.double(), mask, 0.99, 0.95)
    rrew, rkl = reference.shape_rewards(scores.double(), lp.double(), ref.double(), mask, 0.05, "k3")
    for backend in backends("gae"):
        adv, ret = kernels.gae(r.cuda(), v.cuda(), mask.cuda(), gamma=0.99, lam=0.95, backend=backend)
        torch.testing.assert_close(adv.double().cpu(), radv, atol=1e-4, rtol=1e-4, msg=backend)
        torch.testing.assert_close(ret.double().cpu(), rret, atol=1e-4, rtol=1e-4, msg=backend)
    for backend in backends("shape_rewards"):
        rew, kl = kernels.shape_rewards(scores.cuda(), lp.cuda(), ref.cuda(), mask.cuda(), kl_coef=0.05,
                                        estimator="k3", backend=backend)
        torch.testing.assert_close(rew.double().cpu(), rrew, atol=1e-5, rtol=1e-5, msg=backend)
        torch.testing.assert_close(kl.double().cpu(), rkl, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("backend", backends("linear_token_logprobs") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("n,h,v", [(7, 64, 1001), (33, 128, 151936)])
def test_linear_token_logprobs_cuda(backend, n, h, v):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 3).bfloat16()
    tokens = torch.randint(0, v, (n,), generator=g)

    def run(fn, dev, dt):
        hh = hidden.to(dev, dt).requires_grad_(True)
        ww = weight.to(dev, dt).requires_grad_(True)
        lp = fn(hh, ww, tokens.to(dev))
        lp.double().sum().backward()
        return lp.detach().double().cpu(), hh.grad.double().cpu(), ww.grad.double().cpu()
    exact = run(lambda a, b, c: naive_linear_token_logprobs(a, b, c), "cpu", torch.float64)
    plain = run(lambda a, b, c: naive_linear_token_logprobs(a, b, c), "cuda", torch.bfloat16)
    ours = run(lambda a, b, c: kernels.linear_token_logprobs(a, b, c, backend=backend), "cuda", torch.bfloat16)
    for k, name in enumerate(("logp", "grad hidden", "grad weight")):
        assert (ours[k] - exact[k]).abs().max() <= 2 * (plain[k] - exact[k]).abs().max() + 1e-6, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_shape_rewards_keep_the_score_and_output_type_on_every_gpu_backend(dtype):
    """The RM score is added in float32 (float64 for float64 inputs) on every backend: the CUDA op once rounded
    it to the log-probs' bfloat16, so a score of 1.001 became 1.0."""
    lp = torch.zeros(2, 5, dtype=dtype)
    mask = torch.ones(2, 5, dtype=torch.bool)
    scores = torch.tensor([1.001, -3.14159], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for backend in backends("shape_rewards"):
        rew, kl = kernels.shape_rewards(scores.cuda(), lp.cuda(), lp.cuda(), mask.cuda(), kl_coef=0.1,
                                        backend=backend)
        assert rew.dtype == want and kl.dtype == want, backend
        assert rew[:, -1].cpu().tolist() == scores.to(want).tolist(), backend
