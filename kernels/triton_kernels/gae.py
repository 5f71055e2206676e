"""Triton GAE: the masked reverse recursion as a parallel scan over time, one launch, one program per row.

Walking backwards, each position t maps the carried state (A, V) = (advantage, value) of the next valid
position to its own:
    valid t:  A <- (r_t - v_t) + gamma * V + gamma * lam * A,   V <- v_t
    masked t: (A, V) unchanged
Both are affine maps x -> M x + b with M = [[a, c], [0, d]] (upper triangular, closed under composition),
so the whole recursion is an associative scan of maps (tl.associative_scan) over time, latest first.
A_t is the first component of the composed map applied to the initial state (0, 0), i.e. its b1. Rows
longer than one block are processed block by block from the end, carrying (A, V) between blocks.
The PyTorch twin is kernels.reference.gae; the CUDA and C++ twins are csrc/gae.cu and csrc/gae_cpu.cpp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from .common import rows

_MAX_BLOCK = 4096


@triton.jit
def _compose_later_first(a2, c2, d2, b2, e2, a1, c1, d1, b1, e1):
    # The scan combines (accumulated later positions, this earlier position): returns earlier o later.
    return _compose(a1, c1, d1, b1, e1, a2, c2, d2, b2, e2)


@triton.jit
def _compose(a1, c1, d1, b1, e1, a2, c2, d2, b2, e2):
    # (f o g)(x) with f = element 1 (earlier in time, applied last) and g = element 2 (later in time):
    # M_f M_g = [[a1 a2, a1 c2 + c1 d2], [0, d1 d2]],  M_f b_g + b_f = [a1 b2 + c1 e2 + b1, d1 e2 + e1]
    return a1 * a2, a1 * c2 + c1 * d2, d1 * d2, a1 * b2 + c1 * e2 + b1, d1 * e2 + e1


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, s_r, s_v, s_m, gamma, gl,
                BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    carry_a = tl.zeros((), tl.float32)  # A and V of the first valid position after this block
    carry_v = tl.zeros((), tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        # Lanes run backwards in time (lane 0 = the block's last position), so a *forward* scan composes
        # the maps in the recursion's order: tl.associative_scan(reverse=True) is avoided because it has
        # mis-ordered non-commutative combines on GPUs (triton-lang/triton#4362).
        cols = T - 1 - i * BLOCK_T - offs
        inb = cols >= 0
        m = tl.load(m_ptr + row * s_m + cols, mask=inb, other=0) != 0
        r = tl.load(r_ptr + row * s_r + cols, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * s_v + cols, mask=inb, other=0.0).to(tl.float32)
        a = tl.where(m, gl, 1.0)
        c = tl.where(m, gamma, 0.0)
        d = tl.where(m, 0.0, 1.0)
        b = tl.where(m, r - v, 0.0)
        e = tl.where(m, v, 0.0)
        # Lane k now holds F_t = f_t o f_{t+1} o ... o f_{block end} for its position t.
        a, c, d, b, e = tl.associative_scan((a, c, d, b, e), 0, _compose_later_first)
        adv = a * carry_a + c * carry_v + b
        val = d * carry_v + e
        tl.store(adv_ptr + row * T + cols, tl.where(m, adv, 0.0), mask=inb)
        tl.store(ret_ptr + row * T + cols, tl.where(m, adv + v, 0.0), mask=inb)
        # The last lane (the block's earliest position) holds the whole block's map: the next carry.
        last = offs == BLOCK_T - 1
        carry_a = tl.sum(tl.where(last, adv, 0.0), axis=0)
        carry_v = tl.sum(tl.where(last, val, 0.0), axis=0)


@register("gae", "triton")
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    r, v = rows(rewards), rows(values)
    m = rows(mask)
    b, t = r.shape
    adv = torch.empty(b, t, dtype=torch.float32, device=r.device)
    ret = torch.empty_like(adv)
    if b and t:
        block = min(triton.next_power_of_2(t), _MAX_BLOCK)
        _gae_kernel[(b,)](r, v, m, adv, ret, t, r.stride(0), v.stride(0), m.stride(0), float(gamma),
                          float(gamma * lam), BLOCK_T=block, num_warps=4 if block <= 1024 else 8)
    return adv, ret
