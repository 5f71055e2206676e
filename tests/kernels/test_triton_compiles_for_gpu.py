"""Every Triton kernel compiles for an H100 (sm_90) here, without a GPU: Triton's CPU interpreter runs Python
and accepts code the GPU compiler rejects (a plain global inside a kernel, for one), so CI checks both."""
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton_kernels import gae, groups, linear_logprobs, rewards, token_logprobs  # noqa: E402

CASES = {
    "token_logprobs fwd": (token_logprobs._fwd_kernel, dict(
        logits_ptr="*bf16", tokens_ptr="*i64", logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", n_inner="i32",
        stride_outer="i64", stride_inner="i64", V="i32", inv_t="fp32"), dict(ENTROPY=True, BLOCK_V=8192)),
    "token_logprobs bwd": (token_logprobs._bwd_kernel, dict(
        logits_ptr="*bf16", grad_ptr="*i16", tokens_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", g_lp_ptr="*fp32",
        g_h_ptr="*fp32", n_inner="i32", stride_outer="i64", stride_inner="i64", g_stride_outer="i64",
        g_stride_inner="i64", V="i32", inv_t="fp32"), dict(HAS_GLP=True, HAS_GH=True, BF16_BITS=True, BLOCK_V=8192)),
    "kl_penalty": (rewards._kl_kernel, dict(lp_ptr="*fp32", ref_ptr="*fp32", out_ptr="*fp32", n="i32"),
                   dict(EST=3, BLOCK=1024)),
    "shape_rewards one block": (rewards._shape_kernel, dict(
        scores_ptr="*fp32", lp_ptr="*fp32", ref_ptr="*fp32", mask_ptr="*u8", rew_ptr="*fp32", kl_ptr="*fp32", T="i32",
        s_lp="i64", s_ref="i64", s_mask="i64", kl_coef="fp32"), dict(EST=3, BLOCK_T=8192, SINGLE=True)),
    "shape_rewards looped": (rewards._shape_kernel, dict(
        scores_ptr="*fp32", lp_ptr="*fp32", ref_ptr="*fp32", mask_ptr="*u8", rew_ptr="*fp32", kl_ptr="*fp32", T="i32",
        s_lp="i64", s_ref="i64", s_mask="i64", kl_coef="fp32"), dict(EST=1, BLOCK_T=2048, SINGLE=False)),
    "gae": (gae._gae_kernel, dict(r_ptr="*fp32", v_ptr="*fp32", m_ptr="*u8", adv_ptr="*fp32", ret_ptr="*fp32", T="i32",
                                  s_r="i64", s_v="i64", s_m="i64", gamma="fp32", gl="fp32"), dict(BLOCK_T=2048)),
    "group advantages": (groups._group_kernel, dict(s_ptr="*fp32", out_ptr="*fp32", n="i32", eps="fp32"),
                         dict(MODE=0, BLOCK=16)),
    "linear fold": (linear_logprobs._fold_kernel, dict(
        z_ptr="*bf16", tok_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32", zt_ptr="*fp32", C="i32",
        stride_z="i64", v0="i32", inv_t="fp32"), dict(ENTROPY=True, BLOCK=8192)),
    "linear grad": (linear_logprobs._grad_kernel, dict(
        z_ptr="*bf16", g_ptr="*i16", tok_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", glp_ptr="*fp32", gh_ptr="*fp32",
        C="i32", stride_z="i64", stride_g="i64", v0="i32", inv_t="fp32"),
        dict(HAS_GLP=True, HAS_GH=True, BF16_BITS=True, BLOCK=8192)),
}


def _compile(name):
    kernel, signature, constexprs = CASES[name]
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return ".entry" in compiled.asm["ptx"]


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_sm90(name):
    """In a fresh process without TRITON_INTERPRET (under it, @triton.jit gives interpreter objects)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from tests.kernels.test_triton_compiles_for_gpu import _compile; "
            f"print(json.dumps(_compile({name!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) is True
