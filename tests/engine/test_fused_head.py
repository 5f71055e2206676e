"""The fused LM head (kernels.linear_token_logprobs) inside PPO: same loss and gradients as the plain path, and
one PPO step the same on every kernel backend; on the CPU here, and on a GPU where there is one (the GPU kit's
test step runs the `cuda` cases)."""
import pytest
import torch

from engine.models.batch import make_batch
from engine.config import ModelConfig, PPOConfig
from engine.models.forward import PolicyLogprobs, SequenceScores, TokenValues
from engine.task.model import build_policy
from engine.task.vocab import build_tokenizer
from engine.trainers.experience import make_experience
from engine.trainers.ppo_update import ppo_minibatch_loss


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def tiny_models(device="cpu"):
    from transformers import LlamaForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tok)
    ref = build_policy(ModelConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=64), tok)
    cfg = policy.config.to_dict()
    cfg.update(num_labels=1)
    from transformers import LlamaConfig

    value = LlamaForSequenceClassification(LlamaConfig(**cfg))
    reward = LlamaForSequenceClassification(LlamaConfig(**cfg))
    return tok, policy.to(device), ref.to(device), value.to(device), reward.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_response_logprobs_fused_equals_plain(device):
    tok, policy, *_ = tiny_models(device)
    batch = make_batch([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]], tok.pad_token_id).to(device)
    lp_f, ent_f = PolicyLogprobs(policy, fused=True)(batch, return_entropy=True)
    lp_p, ent_p = PolicyLogprobs(policy, fused=False)(batch, return_entropy=True)
    m = batch.response_mask
    torch.testing.assert_close(lp_f[m], lp_p[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_f[m], ent_p[m], atol=1e-5, rtol=1e-5)
    assert (lp_f[~m] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_step_loss_and_gradients_match_plain_path(device):
    tok, policy, ref, value, reward = tiny_models(device)
    cfg = PPOConfig()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10], [1, 11, 12, 13]]
    responses = [[20, 21, 2], [22, 2], [23, 24, 25, 26], [27]]
    batch = make_batch(prompts, responses, tok.pad_token_id).to(device)
    results = {}
    for fused in (True, False):
        torch.manual_seed(1)
        lp, v = PolicyLogprobs(policy, fused=fused), TokenValues(value)
        exp = make_experience(lp, PolicyLogprobs(ref, fused=fused), v, batch, SequenceScores(reward)(batch),
                              kl_coef=0.1, cfg=cfg, temperature=0.9)
        policy.zero_grad(set_to_none=True)
        value.zero_grad(set_to_none=True)
        loss, stats = ppo_minibatch_loss(lp, v, exp, torch.arange(4, device=device), cfg, 0.9)
        loss.backward()
        results[fused] = (loss.detach(), exp, {n: p.grad.clone() for n, p in policy.named_parameters()})
    (l1, e1, g1), (l2, e2, g2) = results[True], results[False]
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e1.advantages, e2.advantages, atol=1e-5, rtol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in g1.values())


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_step_same_on_every_kernel_backend(device):
    """PPO's experience and loss through kernels on each backend (on the CPU, Triton via its interpreter)."""
    import dataclasses

    from kernels import dispatch

    tok, policy, ref, value, reward = tiny_models(device)
    batch = make_batch([[1, 5, 6, 7], [1, 8], [1, 9, 10]], [[20, 21, 2], [22, 2], [23, 24, 25, 26]],
                       tok.pad_token_id).to(device)
    out = {}
    for backend in ("torch", "triton", "cuda", "auto"):  # auto: the compiled ops where they are built
        if backend in ("triton", "cuda") and not dispatch.available("gae", backend) or \
                backend == "cuda" and device != "cuda":
            continue
        cfg = dataclasses.replace(PPOConfig(), backend=backend)
        lp, v = PolicyLogprobs(policy, backend=backend), TokenValues(value)
        exp = make_experience(lp, PolicyLogprobs(ref, backend=backend), v, batch, SequenceScores(reward)(batch),
                              kl_coef=0.1, cfg=cfg, temperature=1.0)
        loss, _ = ppo_minibatch_loss(lp, v, exp, torch.arange(3, device=device), cfg, 1.0)
        out[backend] = (loss.detach(), exp.rewards, exp.advantages, exp.returns, exp.old_logprobs)
    assert {"torch", "triton"} <= set(out)
    base = out["torch"]
    for backend, got in out.items():
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=backend)
