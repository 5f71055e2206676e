"""The one place that decides which backend runs an op.

`backend="auto"` picks, per call, from the tensor's device and what is installed:
  CUDA tensor -> "cuda" (compiled extension) if built, else "triton" if importable, else "torch";
  CPU tensor  -> "cpu" (compiled C++ extension) if built, else "torch".
An explicit backend is honoured or refused with a clear error; tests use that to force each path
(`backend="triton"` on CPU tensors runs Triton's interpreter when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")

# op name -> backend -> implementation. Modules that provide a backend register into this table on import.
_REGISTRY: dict[str, dict[str, Callable]] = {}
# Backends whose modules are imported lazily on first use, so `import kernels` stays light.
_LAZY_MODULES = {"triton": "kernels.triton_kernels", "cuda": "kernels.ext", "cpu": "kernels.ext"}
_import_errors: dict[str, str] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn
    return deco


def _load(backend: str) -> bool:
    mod = _LAZY_MODULES.get(backend)
    if mod is None or backend in _import_errors:
        return backend not in _import_errors
    try:
        importlib.import_module(mod)
        return True
    except Exception as exc:  # missing triton, unbuilt extension, ...
        _import_errors[backend] = f"{type(exc).__name__}: {exc}"
        return False


def available(op: str, backend: str) -> bool:
    if backend != "torch":
        _load(backend)
    return backend in _REGISTRY.get(op, {})


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    """Return (backend name, implementation) for `op` on tensors of `device_type`."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device_type == "cuda" else ("cpu", "torch")
        for cand in order:
            if available(op, cand):
                return cand, _REGISTRY[op][cand]
        raise RuntimeError(f"no backend implements {op!r}")  # unreachable: torch always registers
    if not available(op, backend):
        why = _import_errors.get(backend, f"no {backend} implementation of {op!r} exists")
        raise ValueError(f"backend={backend!r} is not available for {op!r} ({why}); use backend='auto' or 'torch'")
    if backend == "triton" and device_type == "cpu" and not triton_interpreter():
        raise ValueError(
            f"backend='triton' got CPU tensors for {op!r}; set TRITON_INTERPRET=1 to run Triton on the CPU, "
            "or move the tensors to a GPU"
        )
    if backend == "cuda" and device_type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors for {op!r}, got {device_type} tensors")
    if backend == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors for {op!r}, got {device_type} tensors")
    return backend, _REGISTRY[op][backend]
