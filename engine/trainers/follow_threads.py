"""--rollout.engine_cores follow: the trainer's threads follow the engine process's state, so the two never
ask the CPUs for more threads than there are, and no core idles while the other side could use it.

While the engine generates, the trainer runs on the cores the engine leaves it (all CPUs less the engine's
threads); while the engine idles (between batches, waiting for its next request), the trainer takes every CPU.
The engine says which through one shared int (`AsyncRollout.busy`). The trainer looks at it at every block of
its models, forward and backward (a block: each element of an nn.ModuleList, the decoder layers, and the whole
model), because one optimizer step of a whole batch is one forward and one backward that last longer than a
batch's generation: switching only between steps would leave the engine's core idle for most of it.

Why not a fixed split: decoding a few dozen rows gains about 1.3-1.4x from a second thread on the 2-core
machine, training 1.7-1.8x, so a core given to the engine for good is worth less to it than to the trainer as
soon as the engine has nothing to do (bench/results/cpu-2core/async.md). Oversubscribing instead (every CPU to
the trainer and the engine's threads on top) stalls the trainer's threads at every parallel region's barrier
while one of them waits for a core.

torch.set_num_threads sets the calling thread's count; on the CPU the autograd engine runs backward on the
thread that called it, so the hooks below (all on that thread) govern the backward as well.
"""
from __future__ import annotations

import torch


class FollowEngine:
    """busy: the engine's shared flag ([1] int32, nonzero while it generates); alone: the trainer's threads while
    the engine idles; beside: while it generates."""

    def __init__(self, busy: torch.Tensor, *, alone: int, beside: int):
        self.busy, self.alone, self.beside = busy, alone, max(beside, 1)
        self.current = torch.get_num_threads()
        self.switches = 0
        self.handles: list = []

    def __call__(self) -> None:
        n = self.beside if int(self.busy[0]) else self.alone
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n
            self.switches += 1

    def attach(self, *models: torch.nn.Module | None) -> None:
        """Look at the engine before each block of `models` runs forward, and before its backward."""
        def before_backward(grad):
            self()
            return None

        def after_forward(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(before_backward)

        for model in (m for m in models if m is not None):
            blocks = [model] + [b for mod in model.modules() if isinstance(mod, torch.nn.ModuleList) for b in mod]
            for block in blocks:
                self.handles.append(block.register_forward_pre_hook(lambda module, args: self()))
                self.handles.append(block.register_forward_hook(after_forward))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
