"""The plan as a person reads it: one table of per-rank memory by component, the verdict, and the smallest
change that fits (search.py)."""
from __future__ import annotations

from .estimate import GIB, Estimate
from .search import smallest_fit
from .settings import PlanSettings

LABELS = {
    "params": "parameters (trained, float32 master)",
    "grads": "gradients (float32)",
    "optimizer": "optimizer state (AdamW, float32)",
    "frozen": "frozen models' weights",
    "gathered": "gathered by FSDP2 (the root unit, a block and the next, their gradients)",
    "activations": "activations (one micro-batch)",
    "engine_weights": "rollout engine weights",
    "kv_cache": "rollout engine KV cache",
    "engine_runtime": "rollout engine runtime (scheduler, buffers)",
    "sync": "weight sync (whole tensors in flight to the engine)",
    "overhead": "per-process overhead",
}


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def describe(s: PlanSettings) -> str:
    return (f"{s.stage} on {s.nodes} x {s.gpus_per_node} ({s.world} ranks, {s.gpu_mem_gib:g} GiB each, {s.device}), "
            f"{s.dtype}, micro-batch {s.micro_batch_tokens} tokens, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}, frozen models "
            f"{'offloaded' if s.offload_frozen else 'on the device'}"
            + (f", engine {s.engine}" + (f" TP {s.engine_tp}" if s.engine == "vllm" else "")
               + f" ({s.rollout_sequences} x {s.rollout_len} tokens{', sleeps while training' if s.engine_sleep and s.engine == 'vllm' and s.device == 'cuda' else ''})"
               if s.stage in ("ppo", "grpo") else ""))


def table(est: Estimate) -> list[str]:
    lines = ["| per rank | GiB |", "|---|---:|"]
    for key, label in LABELS.items():
        if est.parts.get(key):
            lines.append(f"| {label} | {_gib(est.parts[key])} |")
    lines.append(f"| **training phase** | **{_gib(est.train_total)}** |")
    if est.rollout_total:
        lines.append(f"| **rollout phase** | **{_gib(est.rollout_total)}** |")
    return lines


def render(s: PlanSettings, cache: dict | None = None) -> tuple[str, dict]:
    """(markdown, the same as a JSON-able dict) for settings `s` and the smallest change that fits."""
    from .estimate import estimate

    cache = {} if cache is None else cache
    est = estimate(s, cache)
    params = ", ".join(f"{role} {n / 1e9:.2f}B" for role, n in est.params.items())
    lines = [f"# plan: {describe(s)}", "", f"Models: {params}.", "", *table(est), ""]
    verdict = "fits" if est.fits else "does not fit"
    lines.append(f"Peak per rank {_gib(est.peak)} GiB of {s.gpu_mem_gib:g}: **{verdict}**.")
    out = {"settings": s.__dict__, "parts_gib": {k: v / GIB for k, v in est.parts.items()},
           "train_gib": est.train_total / GIB, "rollout_gib": est.rollout_total / GIB, "fits": est.fits}
    if not est.fits:
        fit, changes = smallest_fit(s, cache)
        if fit.fits:
            lines += ["", f"Smallest change that fits ({'; '.join(changes)}): {describe(fit.settings)}", "",
                      *table(fit), "", f"Peak per rank {_gib(fit.peak)} GiB."]
        else:
            lines += ["", f"Nothing up to {fit.settings.nodes} nodes fits (tried: {'; '.join(changes)}); the peak "
                          f"is still {_gib(fit.peak)} GiB per rank."]
        out["recommended"] = {"changes": changes, "settings": fit.settings.__dict__, "fits": fit.fits,
                              "peak_gib": fit.peak / GIB}
    return "\n".join(lines) + "\n", out
