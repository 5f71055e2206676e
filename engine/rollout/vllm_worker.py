"""Runs inside vLLM's worker (loaded by name through `worker_extension_cls`): receives weight buckets.

Each bucket is applied as it arrives (engine/rollout/vllm_sync.py): tensors whose engine storage is a plain
slice are copied into it in place (learnt from the model's own loader on the first sync); the rest (layers
the backend repacks) are kept and, at the end, go through vLLM's layer-wise `reload_weights`, which maps
names onto the fused layers and redoes the backend's post-processing. Only the layers in that remainder are
reloaded: the reload puts every other layer's current tensors back untouched.

Importing this module with RLHF_ENGINE_VLLM_PLAIN_CPU_GEMM=1 (set by VLLMRollout, inherited by a worker
process) makes vLLM's CPU backend keep linear layers in their plain layout (F.linear on the weight) instead
of oneDNN's packed copy, so that every parameter can be synced in place.
"""
from __future__ import annotations

import contextlib
import logging
import os

from .vllm_sync import SyncPlan, apply, check_whole_layers

PLAIN_CPU_GEMM = "RLHF_ENGINE_VLLM_PLAIN_CPU_GEMM"


def use_plain_cpu_gemm(plain: bool) -> None:
    """vLLM's CPU linear layers: F.linear on the plain weight (plain=True) or oneDNN's packed copy. Read when
    the model's layers are post-processed (at load), so set it before the engine starts."""
    import vllm._custom_ops as ops

    if not hasattr(ops, "_rlhf_engine_onednn"):
        ops._rlhf_engine_onednn = ops._supports_onednn
    ops._supports_onednn = False if plain else ops._rlhf_engine_onednn


if os.environ.get(PLAIN_CPU_GEMM) == "1":
    use_plain_cpu_gemm(True)


@contextlib.contextmanager
def _partial_reload_quiet():
    """vLLM warns, per layer and in a list, about every layer a reload did not receive; in a partial reload
    that is every layer synced in place, by design."""
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("inplace", "layerwise")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class WeightSyncExtension:
    def _rlhf_engine_state(self) -> dict:
        """The plan learnt so far and the tensors held for the reload at the end of this sync."""
        return self.__dict__.setdefault("_rlhf_engine_sync", {"plan": SyncPlan(), "pending": []})

    def rlhf_engine_receive_weights(self, named_tensors) -> int:
        device = getattr(self.model_runner, "device", None)
        state = self._rlhf_engine_state()
        moved = ((name, t.to(device) if device is not None else t) for name, t in named_tensors)
        state["pending"] += apply(self.model_runner.model, state["plan"], moved)
        return len(state["pending"])

    def rlhf_engine_apply_weights(self) -> dict:
        """Reload what could not be copied in place; return how the sync went (names per path)."""
        state = self._rlhf_engine_state()
        pending, state["pending"] = state["pending"], []
        if pending:
            check_whole_layers(self.model_runner.model, [n for n, _ in pending])
            with _partial_reload_quiet():
                self.model_runner.reload_weights(weights_iterator=iter(pending))
        plan = state["plan"]
        return {"in_place": len(plan.targets), "reloaded": sorted(n for n, _ in pending),
                "skipped": sorted(plan.skipped)}

    def rlhf_engine_held_bytes(self) -> int:
        """Bytes of the weights this worker's model holds (1/tensor_parallel of them under TP)."""
        return sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters())
