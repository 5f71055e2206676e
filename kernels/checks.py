"""Input validation shared by every backend.

Each public op validates once, here, before dispatch, so the Triton/CUDA/torch paths can assume
well-formed input and every backend raises the same ValueError naming the offending argument.

Masks: a position is valid where mask != 0, in every op and on every backend (2.0 counts as 1, never as a
weight of 2); a NaN in a floating mask is refused (one reduction over the mask, a device sync on a GPU:
give a bool mask, as the engine does, to skip it). Outputs (`out=`) may not share memory with each other or
with an input, even in part.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KL_ESTIMATORS = ("k1", "k2", "k3")


def check_tensor(name: str, x, *, floating: bool | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"`{name}` must be a floating tensor ({_names(FLOAT_DTYPES)}), got {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"`{name}` must be an integer tensor (e.g. torch.long), got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"`{name}` must have dtype in ({_names(dtypes)}), got {x.dtype}")


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)} but `{ref_name}` has shape {tuple(ref.shape)}; "
            "they must match"
        )


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"`{name}` is on {x.device} but `{ref_name}` is on {ref.device}; move both to one device")


def check_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {KL_ESTIMATORS}, got {estimator!r}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")


def check_token_logprobs_args(logits, tokens, temperature) -> None:
    check_tensor("logits", logits, floating=True)
    check_tensor("tokens", tokens, floating=False)
    check_positive("temperature", temperature)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"`logits` must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"`tokens` has shape {tuple(tokens.shape)} but must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}"
        )
    check_same_device("tokens", tokens, "logits", logits)
    # The range check costs a device sync, so it runs on the CPU only. On a GPU the Triton kernels mask the
    # target read and give NaN for an out-of-range id (never a read out of bounds); the torch path's gather
    # raises a device-side assert.
    if tokens.device.type == "cpu" and tokens.numel() > 0:
        lo, hi = int(tokens.min()), int(tokens.max())
        vocab = logits.shape[-1]
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`tokens` contains id {bad}, outside the vocabulary [0, {vocab}) of `logits`")


def check_linear_token_logprobs_args(hidden, weight, tokens, bias, temperature) -> None:
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("tokens", tokens, floating=False)
    check_positive("temperature", temperature)
    if hidden.dim() != 2:
        raise ValueError(f"`hidden` must have shape [N, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"`weight` must have shape [V, H] = [V, {hidden.shape[1]}] with V > 0 (the LM head), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"`weight` has dtype {weight.dtype} but `hidden` has {hidden.dtype}; cast one to match")
    if tuple(tokens.shape) != (hidden.shape[0],):
        raise ValueError(f"`tokens` must have shape [N] = [{hidden.shape[0]}], got {tuple(tokens.shape)}")
    check_same_device("weight", weight, "hidden", hidden)
    check_same_device("tokens", tokens, "hidden", hidden)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"`bias` must be [V] = [{weight.shape[0]}] of dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        check_same_device("bias", bias, "hidden", hidden)
    if tokens.device.type == "cpu" and tokens.numel() > 0:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`tokens` contains id {bad}, outside the vocabulary [0, {weight.shape[0]}) of `weight`")


def check_kl_args(logprobs, ref_logprobs, estimator) -> None:
    check_tensor("logprobs", logprobs, floating=True)
    check_tensor("ref_logprobs", ref_logprobs, floating=True)
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    check_same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    check_estimator(estimator)


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    """A floating mask holds no NaN (it would be neither valid nor invalid); bool and integer masks cannot."""
    if mask.is_floating_point() and mask.numel() and bool(torch.isnan(mask).any()):
        where = tuple(torch.nonzero(torch.isnan(mask))[0].tolist())
        raise ValueError(f"`{name}` holds NaN at {list(where)}; a mask is 0 (ignored) or nonzero (valid). Give a "
                         f"bool mask (e.g. `{name} > 0`)")


def check_mask_2d(name: str, mask, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, mask)
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32,
                          torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"`{name}` must be a bool, integer or float 0/1 tensor, got {mask.dtype}")
    check_same_shape(name, mask, ref_name, ref)
    check_same_device(name, mask, ref_name, ref)
    check_mask_values(name, mask)


def check_shape_rewards_args(scores, logprobs, ref_logprobs, mask, kl_coef, estimator) -> None:
    check_kl_args(logprobs, ref_logprobs, estimator)
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must have shape [B, T], got {tuple(logprobs.shape)}")
    check_mask_2d("mask", mask, "logprobs", logprobs)
    check_tensor("scores", scores, floating=True)
    if tuple(scores.shape) != (logprobs.shape[0],):
        raise ValueError(f"`scores` must have shape [B] = [{logprobs.shape[0]}], got {tuple(scores.shape)}")
    check_same_device("scores", scores, "logprobs", logprobs)
    if not isinstance(kl_coef, (int, float)):
        raise ValueError(f"`kl_coef` must be a float, got {type(kl_coef).__name__}")


def _span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, one past the last byte) of the memory `t` can touch; None when empty."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    es = t.element_size()
    return t.untyped_storage().data_ptr(), t.storage_offset() * es, (t.storage_offset() + last + 1) * es


def check_no_overlap(outputs: dict, inputs: dict) -> None:
    """No output shares memory with another output or with an input, even in part (a kernel that writes one
    while reading the other gives a wrong answer that depends on the backend)."""
    spans = [(name, _span(t), True) for name, t in outputs.items()] + \
            [(name, _span(t), False) for name, t in inputs.items() if isinstance(t, torch.Tensor)]
    for i, (a, sa, a_out) in enumerate(spans):
        for b, sb, b_out in spans[i + 1:]:
            if (a_out or b_out) and sa and sb and sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]:
                raise ValueError(f"`{a}` and `{b}` share memory (in part); an output must not overlap another "
                                 f"output or an input: give separate tensors (torch.empty_like)")


def check_out_pair(out, logprobs, inputs: dict | None = None) -> None:
    """`out` = (rewards, kl): two contiguous [B, T] tensors of the compute dtype on the inputs' device, sharing
    no memory with each other or with `inputs` ({name: tensor})."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"`out` must be a (rewards, kl) pair of tensors, got {type(out).__name__}")
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    for name, t in zip(("out[0] (rewards)", "out[1] (kl)"), out):
        check_tensor(name, t, dtypes=(dtype,))
        check_same_shape(name, t, "logprobs", logprobs)
        check_same_device(name, t, "logprobs", logprobs)
        if not t.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous (allocate it with torch.empty_like(logprobs, dtype={dtype}))")
    check_no_overlap({"out[0] (rewards)": out[0], "out[1] (kl)": out[1]}, inputs or {})


def check_gae_args(rewards, values, mask, gamma, lam) -> None:
    check_tensor("rewards", rewards, floating=True)
    check_tensor("values", values, floating=True)
    if rewards.dim() != 2:
        raise ValueError(f"`rewards` must have shape [B, T], got {tuple(rewards.shape)}")
    check_same_shape("values", values, "rewards", rewards)
    check_same_device("values", values, "rewards", rewards)
    check_mask_2d("mask", mask, "rewards", rewards)
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"`{name}` must be a float in [0, 1], got {v!r}")


def check_masked(name: str, x, mask) -> None:
    """x and its mask: tensors of one shape on one device (no silent broadcasting), the mask without NaN."""
    check_tensor(name, x, floating=True)
    check_tensor("mask", mask)
    check_same_shape("mask", mask, name, x)
    check_same_device("mask", mask, name, x)
    check_mask_values("mask", mask)


def check_loss_args(mask, eps_name: str, eps: float, **tensors) -> None:
    """Per-token loss inputs: every tensor shaped like the first, and like `mask`; a positive clip range."""
    (first, ref), *rest = tensors.items()
    check_masked(first, ref, mask)
    for name, x in rest:
        if x is None:
            continue
        check_tensor(name, x, floating=True)
        check_same_shape(name, x, first, ref)
        check_same_device(name, x, first, ref)
    check_positive(eps_name, eps)


def check_group_args(scores, n, mode, eps) -> None:
    from .reference import GROUP_MODES

    check_tensor("scores", scores, floating=True)
    if scores.dim() != 1:
        raise ValueError(f"`scores` must have shape [B] (prompts x n samples, prompt-major), got {tuple(scores.shape)}")
    if mode not in GROUP_MODES:
        raise ValueError(f"`mode` must be one of {GROUP_MODES}, got {mode!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"`n` must be an int >= 2 for mode {mode!r} (a sample is compared with the other samples "
                         f"of its prompt), got {n!r}: sample several answers per prompt")
    if scores.shape[0] % n:
        raise ValueError(f"`scores` has {scores.shape[0]} entries, not a multiple of n = {n} (prompts x n samples)")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"`eps` must be a number >= 0, got {eps!r}")


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)
