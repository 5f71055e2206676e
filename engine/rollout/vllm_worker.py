"""Runs inside vLLM's worker (loaded by name through `worker_extension_cls`): receives weight buckets.

Buckets are collected, then applied in one call to vLLM's in-place reload (`reload_weights`), which wraps
the model's own `load_weights`: it maps transformers names onto vLLM's fused layers (q/k/v -> qkv_proj,
gate/up -> gate_up_proj) and redoes the post-processing the backend applied at start-up (the CPU backend
repacks linear layers, which is why calling `load_weights` directly after start-up fails there). Its
layer-wise reload needs every weight of the model in one pass (a partial pass leaves the other layers
broken), hence collect-then-apply. In-process the collected tensors are the trainer's own (no copy).
"""
from __future__ import annotations


class WeightSyncExtension:
    def rlhf_engine_receive_weights(self, named_tensors) -> int:
        device = getattr(self.model_runner, "device", None)
        pending = self.__dict__.setdefault("_rlhf_engine_pending", [])
        pending.extend((name, t.to(device) if device is not None else t) for name, t in named_tensors)
        return len(pending)

    def rlhf_engine_apply_weights(self) -> int:
        pending = self.__dict__.pop("_rlhf_engine_pending", [])
        if pending:
            self.model_runner.reload_weights(weights_iterator=iter(pending))
        return len(pending)
