"""A rollout engine in a process of its own, generating the next batches while the trainer updates on this one.

The trainer and the engine split the machine's cores (`split_cores`). Weights go from the trainer to the engine
through shared memory (PyTorch's own multiprocessing: tensors in `share_memory_()` storage, handed to the child
once at start), in `slots` of whole tensors, one per policy version kept: version v lives in slot
v mod len(slots). The engine copies a version into its own weights between batches, when a request asks for
it, before generating (vLLM's in-place sync, or the transformers model's parameters). Requests and answers are
plain Python values: requests on a queue, answers on a one-way pipe whose write end only the child holds, so
that a child that dies, even in the middle of an answer larger than the pipe's buffer, is an end of file for
the trainer rather than a read that never returns. The child ends itself when the trainer is gone (its
parent changes), so a killed trainer leaves no engine behind.

Which version generates which batch is the caller's to decide (engine/trainers/async_ppo.py: batch t with
version t - k), so a run is deterministic whatever the processes' speeds. A slot is rewritten only once the
batch that reads it is back (the caller's order guarantees it with max_staleness + 1 slots).

    engine = AsyncRollout(spec, named_weights, slots=2)
    engine.submit(batch=0, prompts=[[1, 5, 7]], seeds=[11], version=0)
    version, results, seconds = engine.result(0)   # RolloutResult list, as the in-process backends return
    engine.publish(1, model.named_parameters())    # into slot 1 % 2
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from .base import RolloutResult


class EngineProcessDied(RuntimeError):
    """The engine's process ended (killed, out of memory, an error inside it) while the trainer needed it."""


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its engine and what every generate call passes. backend: "hf" | "vllm";
    engine_kw: VLLMRollout's keyword arguments; cores: the CPUs the engine runs on (its threads)."""
    backend: str
    model_dir: str
    seed: int
    pad_token_id: int
    eos_token_id: int
    dtype: str
    max_model_len: int
    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    cores: tuple[int, ...] = ()
    pinned: bool = True                    # the engine's threads bound to `cores` (else their count only)
    engine_kw: dict = field(default_factory=dict)
    # episodes of several turns: an object with run(engine, rows, prompt_ids, n=, seeds=) -> results
    # (engine.episodes.EpisodeTask, plain data and an importable class, so it crosses to the child as it is)
    episodes: object | None = None


def split_cores(placement: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the trainer's cores, the engine's) among the CPUs this process may use. split: halved (the engine the
    upper half; one CPU: both share it). shared: the trainer keeps them all and the engine's threads (half as
    many) may run on any of them, so the cores the engine leaves idle between batches go back to the trainer.
    follow: as shared, and the trainer's threads drop to the cores the engine leaves while it generates
    (engine/trainers/follow_threads.py)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(len(cpus) // 2, 1)
    if placement in ("shared", "follow") or len(cpus) == 1:
        return tuple(cpus), tuple(cpus[len(cpus) - half:])
    return tuple(cpus[:len(cpus) - half]), tuple(cpus[len(cpus) - half:])


def _build(spec: EngineSpec):
    if spec.backend == "vllm":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, spec.cores)) if spec.cores and spec.pinned \
            else "auto"
        from .vllm import VLLMRollout

        return VLLMRollout(spec.model_dir, dtype=spec.dtype, seed=spec.seed, max_model_len=spec.max_model_len,
                           **spec.engine_kw)
    from .hf import HFRollout

    return HFRollout(spec.model_dir, seed=spec.seed, pad_token_id=spec.pad_token_id, eos_token_id=spec.eos_token_id)


def _serve(spec: EngineSpec, slots: list[dict], requests, answers, busy: torch.Tensor, trainer: int) -> None:
    """The child: build the engine, then for each request (batch, prompts, seeds, version, rows) adopt that
    version's weights if the engine holds another, generate (with spec.episodes: run the episodes of the run's
    prompts `rows`, the environment in this process), and answer (batch, version, results, seconds). None ends it.
    busy[0] is 1 from a request's arrival to its answer (the trainer's threads may follow it). answers: the
    pipe's write end, fed by a thread so that the next batch is generated while the trainer reads this one.
    trainer: the trainer's pid (it may be gone before this child gets here)."""
    _end_with_parent(trainer)
    outbox: queue.Queue = queue.Queue()
    sender = threading.Thread(target=_send_all, args=(outbox, answers), daemon=True, name="answers")
    sender.start()
    try:
        if spec.cores:
            if spec.pinned:
                os.sched_setaffinity(0, spec.cores)
            torch.set_num_threads(len(spec.cores))
        engine = _build(spec)
        held = None
        while (req := requests.get()) is not None:
            busy[0] = 1
            batch, prompts, seeds, version, rows = req
            began = time.perf_counter()
            if version != held:
                engine.update_weights(slots[version % len(slots)].items())
                held = version
            if spec.episodes is not None:
                results = spec.episodes.run(engine, rows, prompts, n=spec.n, seeds=seeds)
            else:
                results = engine.generate(prompts, n=spec.n, max_tokens=spec.max_tokens,
                                          temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                                          seeds=seeds)
            plain = [(r.prompt_index, list(r.token_ids), list(r.logprobs), r.finish_reason, r.loss_mask, r.episode)
                     for r in results]
            outbox.put(("batch", batch, version, plain, time.perf_counter() - began))
            busy[0] = 0
        engine.close()
        outbox.put(None)
        sender.join()
    except BaseException:  # noqa: BLE001 - whatever ends the engine is the trainer's to report, once
        outbox.put(("error", traceback.format_exc()))
        outbox.put(None)
        sender.join(timeout=30)
        sys.exit(1)


def _send_all(outbox: queue.Queue, answers) -> None:
    """The child's sender: each answer onto the pipe in order, until None; a trainer that is gone ends it."""
    try:
        while (msg := outbox.get()) is not None:
            answers.send(msg)
    except OSError:  # the trainer closed its end or died: nobody is left to answer
        os._exit(1)
    finally:
        answers.close()


def _end_with_parent(parent: int, every: float = 0.5) -> None:
    """A daemon thread that ends this process once its parent (the trainer, pid `parent`) is gone: a SIGKILLed
    trainer cannot close anything, and an orphaned engine would hold its memory and cores until someone
    notices. An orphan's parent becomes another process, so a changed parent pid is the sign."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class AsyncRollout:
    """The trainer's handle on the engine process. named_weights: the policy's (name, tensor) pairs, whose
    shapes size the shared slots; slots: how many versions can be in flight at once (max_staleness + 1)."""

    def __init__(self, spec: EngineSpec, named_weights, *, slots: int):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        named = [(n, t.detach()) for n, t in named_weights]
        self.slots = [{n: t.to("cpu", copy=True).contiguous().share_memory_() for n, t in named} for _ in range(slots)]
        self.requests = ctx.Queue()
        self.answers, child_end = ctx.Pipe(duplex=False)
        self.done: dict[int, tuple] = {}
        self.busy = torch.zeros(1, dtype=torch.int32).share_memory_()  # the engine generating (1) or idle (0)
        self.proc = ctx.Process(target=_serve, args=(spec, self.slots, self.requests, child_end, self.busy, os.getpid()),
                                daemon=True,
                                name="rlhf-engine-rollouts")
        self.proc.start()
        child_end.close()  # the child holds the only write end: its death is an end of file here

    def publish(self, version: int, named_tensors) -> None:
        """Copy the policy's weights (name, tensor) into version `version`'s slot."""
        slot = self.slots[version % len(self.slots)]
        with torch.no_grad():
            for name, t in named_tensors:
                slot[name].copy_(t)

    def submit(self, batch: int, prompts: list[list[int]], seeds: list[int], version: int,
               rows: list[int] | None = None) -> None:
        """Ask for batch `batch`: samples of `prompts` (one seed each) with version `version`'s weights. rows: the
        run's indices of the prompts (what an episode's environment is started with)."""
        self.requests.put((batch, [list(map(int, p)) for p in prompts], list(seeds), version, rows))

    def result(self, batch: int) -> tuple[int, list[RolloutResult], float]:
        """(version, results, seconds the engine took) of batch `batch`, waiting for it. An engine that died
        raises EngineProcessDied with what it said."""
        while batch not in self.done:
            try:
                if not self.answers.poll(0.5):
                    if not self.proc.is_alive():
                        raise self._died(f"while batch {batch} was awaited")
                    continue
                msg = self.answers.recv()
            except (EOFError, OSError):  # it died, perhaps half-way through an answer
                raise self._died(f"while batch {batch} was awaited") from None
            if msg[0] == "error":
                raise EngineProcessDied(f"the rollout engine process (pid {self.proc.pid}) failed:\n{msg[1]}")
            _, b, version, plain, seconds = msg
            self.done[b] = (version, [RolloutResult(*r) for r in plain], seconds)
        return self.done.pop(batch)

    def _died(self, when: str) -> EngineProcessDied:
        self.proc.join(timeout=5)  # its exit code, once the end of its pipe was seen
        return EngineProcessDied(f"the rollout engine process (pid {self.proc.pid}) ended with exit code "
                                 f"{self.proc.exitcode} {when}")

    def close(self) -> None:
        """Ask the child to end, stop reading (a child blocked on an answer nobody will read ends then), and
        wait for it; killed after 30 s."""
        if self.proc.is_alive():
            self.requests.put(None)
        self.answers.close()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.requests.cancel_join_thread()
        self.requests.close()
