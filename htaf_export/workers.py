"""Validation in worker processes: ``--workers N`` spreads the batches over N processes on this machine.

The LCE interpreter runs one sample at a time and holds Python's global lock while it does, so threads
cannot overlap it with the reference; processes can. Each worker rebuilds the hardened model (from the
source file, exactly as the parent hardened it, or from pickled bytes), reads the artifact, starts its
own runtimes, then takes batches from a bounded queue (memory stays bounded: at most two batches wait
per worker) and sends back one ``Shard`` of counts, which the parent merges into the report.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .batch_axis import BatchAxes, move_with_hooks
from .data import count
from .errors import BadInput
from .validate import Part, Shard, ShardSetup

POLL_S = 0.2


@dataclass(frozen=True)
class ModelRecipe:
    """How a worker rebuilds the hardened model: load → harden → record every step, as the parent did;
    or, for a module that exists only in memory, from its pickled bytes."""

    path: str | None = None
    trust_pickle: bool = False
    tie: str | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()
    sites: tuple[str, ...] | None = ()  # None: the parent did not trace the hardened model
    pickled: bytes | None = None
    source: bytes | None = None  # the model file's bytes, for workers on other machines
    batch_axes: BatchAxes | None = None  # a time-first module made batch-first by the parent (``batch_axis``)
    sign_as_step: bool = False

    def portable(self) -> "ModelRecipe":
        """The same recipe, carrying the model file itself rather than its path on this machine."""
        if self.pickled is not None or self.source is not None or self.path is None:
            return self
        return replace(self, source=Path(self.path).read_bytes())

    @classmethod
    def of_module(cls, model: nn.Module, fallback: "ModelRecipe | None" = None) -> "ModelRecipe":
        """The pickled module (cheaper for a worker than loading and hardening again); ``fallback`` where
        it does not pickle (a graph module from torch.export does not)."""
        buffer = io.BytesIO()
        try:
            torch.save(model, buffer)
        except (pickle.PicklingError, AttributeError, TypeError, RuntimeError) as e:
            if fallback is not None:
                return fallback
            raise BadInput(f"--workers needs a model file or a picklable module ({type(e).__name__})") from None
        return cls(pickled=buffer.getvalue())

    def build(self) -> nn.Module:
        if self.pickled is not None:
            # the parent unpickled the user's classes with the current directory importable (pickles.py); a
            # spawned worker has the same working directory but not that sys.path entry
            from .pickles import current_directory_importable

            with current_directory_importable():
                return torch.load(io.BytesIO(self.pickled), weights_only=False)
        from .harden import harden, record_every_step
        from .io import load

        if self.source is not None:
            with tempfile.TemporaryDirectory() as folder:
                copy = Path(folder) / Path(self.path or "model.pt").name
                copy.write_bytes(self.source)
                module = load(copy, trust_pickle=self.trust_pickle).module
        else:
            module = load(self.path, trust_pickle=self.trust_pickle).module
        if self.batch_axes is not None:  # a .pt2 is moved at load already (and marked so)
            move_with_hooks(module, self.batch_axes)
        hardening = harden(module, tie=self.tie, input_shapes=[list(s) for s in self.input_shapes] or None,
                           sign_as_step=self.sign_as_step)
        if self.sites is None:
            return hardening.model
        return record_every_step(hardening, [list(s) for s in self.input_shapes], list(self.sites)).model


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class ProcessPool:
    """``workers`` processes on this machine (the ``ShardPool`` of ``htaf_export.validate``). A context
    manager: the workers start on entry (loading the model while the parent builds the crafted inputs)
    and are stopped on exit, whatever happened."""

    def __init__(self, recipe: ModelRecipe, artifact: Path, device: str, workers: int) -> None:
        if workers < 1:
            raise BadInput(f"--workers must be at least 1, not {workers}")
        self.recipe, self.artifact, self.device, self.workers = recipe, Path(artifact), device, workers
        self.procs: list[Any] = []

    def __enter__(self) -> "ProcessPool":
        ctx = mp.get_context("spawn")  # torch, ONNX Runtime and TensorFlow are not safe to fork
        self.tasks: Any = ctx.Queue(maxsize=2 * self.workers)
        self.results: Any = ctx.Queue()
        self.setups = [ctx.Queue() for _ in range(self.workers)]
        job = (self.recipe, str(self.artifact), self.device, threads_per_worker(self.workers))
        self.procs = [ctx.Process(target=serve, args=(job, setup, self.tasks, self.results), daemon=True)
                      for setup in self.setups]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join()
        # tasks nobody will read (a worker failed) must not keep this process from exiting
        for q in (self.tasks, self.results, *self.setups):
            q.cancel_join_thread()
            q.close()

    def run(self, setup: ShardSetup, parts: Iterator[Part], advance: Callable[[int], None]) -> list[Shard]:
        for q in self.setups:
            q.put(setup)
        shards: list[Shard] = []
        for part in parts:
            _put(self.tasks, part, self.results, self.procs, advance, shards)
        for _ in self.procs:
            _put(self.tasks, None, self.results, self.procs, advance, shards)
        while len(shards) < len(self.procs):
            _handle(_get(self.results, self.procs), advance, shards)
        return shards


def _put(tasks: Any, item: Part | None, results: Any, procs: Sequence[Any], advance: Callable[[int], None],
         shards: list[Shard]) -> None:
    """Queue one task, handling messages meanwhile (a full queue must not hide a worker's error)."""
    while True:
        try:
            tasks.put(item, timeout=POLL_S)
            return
        except queue.Full:
            _drain(results, advance, shards)
            _check_alive(procs)


def _drain(results: Any, advance: Callable[[int], None], shards: list[Shard]) -> None:
    while True:
        try:
            message = results.get_nowait()
        except queue.Empty:
            return
        _handle(message, advance, shards)


def _get(results: Any, procs: Sequence[Any]) -> tuple[str, Any]:
    while True:
        try:
            return results.get(timeout=POLL_S)
        except queue.Empty:
            _check_alive(procs)
            if not any(p.is_alive() for p in procs):
                try:  # a last message may still be in the pipe
                    return results.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError("the validation workers stopped without sending their results") from None


def _check_alive(procs: Sequence[Any]) -> None:
    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
    if dead:
        raise RuntimeError(f"a validation worker stopped (exit code {dead[0].exitcode})")


def _handle(message: tuple[str, Any], advance: Callable[[int], None], shards: list[Shard]) -> None:
    kind, value = message
    if kind == "done":
        advance(value)
    elif kind == "shard":
        shards.append(pickle.loads(value))
    else:
        raise value


class ShardWorker:
    """One worker's side: the rebuilt model, the artifact's runtimes, and the validation of its batches
    (used by the processes here and by the Ray actors of ``htaf_export.distributed``)."""

    def __init__(self, recipe: ModelRecipe, artifact: Path, device: str, threads: int) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import warnings

        warnings.filterwarnings("ignore")
        torch.set_num_threads(threads)
        from .runtimes import backends_for, read_artifact

        self.model = recipe.build()
        self.info = read_artifact(Path(artifact))
        self.runners, _ = backends_for(self.info, device, model=self.model, threads=threads)

    def start(self, setup: ShardSetup) -> None:
        from .validate import Validation

        self.run = Validation(self.model, self.info, self.runners, setup.tolerance, setup.reference_device,
                              setup.crafted, setup.graph_steps)

    def batch(self, part: Part) -> int:
        kind, x, y, offset = part
        self.run.batch(x, y, kind, offset)
        return count(x)

    def shard(self) -> bytes:
        # pickled here, not in a queue's feeder thread, where a failure would be silent
        return pickle.dumps(self.run.shard())


def serve(job: tuple, setups: Any, tasks: Any, results: Any) -> None:
    """A worker process: rebuild the model, open the artifact's runtimes, validate batches until told to stop."""
    recipe, artifact, device, threads = job
    try:
        worker = ShardWorker(recipe, Path(artifact), device, threads)
        worker.start(setups.get())
        while (part := tasks.get()) is not None:
            results.put(("done", worker.batch(part)))
        results.put(("shard", worker.shard()))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which reports it
        results.put(("error", _sendable(e)))


def _sendable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception that cannot cross processes becomes its message
        return RuntimeError(f"{type(e).__name__}: {e}")
