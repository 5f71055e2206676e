"""Rollout backends behind one protocol (`generate`, `update_weights`, `close`).

`VLLMRollout` is imported lazily (vLLM is an optional dependency); `HFRollout` always works.

Above the models (HF samples from a forward module) and the process group; below the trainers, which drive
it: a drop-in backend for anyone's trainer, so it never imports one.
"""
from .base import RolloutBackend, RolloutResult
from .hf import HFRollout

__all__ = ["RolloutBackend", "RolloutResult", "HFRollout", "VLLMRollout", "make_rollout", "resolve_backend"]


def __getattr__(name):
    if name == "VLLMRollout":
        from .vllm import VLLMRollout
        return VLLMRollout
    raise AttributeError(name)


def resolve_backend(backend: str) -> str:
    """"hf" or "vllm": what "auto" means here (vLLM where it imports)."""
    from .vllm import vllm_available

    if backend == "auto":
        return "vllm" if vllm_available()[0] else "hf"
    return backend


def make_rollout(backend: str, *, policy, model_dir, seed: int, pad_token_id: int, eos_token_id: int,
                 dtype: str = "float32", max_model_len: int | None = None, **vllm_kwargs):
    """The backend a trainer asked for: "hf", "vllm", or "auto" (vLLM where it imports, else HF)."""
    if resolve_backend(backend) == "vllm":
        from .vllm import VLLMRollout
        return VLLMRollout(model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len, **vllm_kwargs)
    vllm_kwargs.pop("cpu_packed_gemm", None)  # vLLM's CPU layout: nothing to do for transformers generate
    return HFRollout(policy, seed=seed, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
