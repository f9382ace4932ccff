"""The artifact's runtimes in a child process, so that they run while this process computes the reference.

Validation of a batch is: the reference forward pass, the runtimes on the same inputs, the rounding bounds and
the comparisons. The LCE interpreter holds Python's global lock while it runs (a thread cannot overlap it), so
on one worker the parts ran one after another. Here a child process owns the runtimes and works through the
batches in order while the parent computes the reference of the next batch and compares the previous one:
on two cores the wall time approaches the larger of the two, not their sum. The report is the same.

The child is started only for long validations (``WORTH_STARTING_S``), in the background: batches go on in this
process until it is ready.

Step tensors cross the process boundary as int8 where that is exact (0, ±1), a quarter of float32.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from .data import count
from .errors import BadInput


class BatchRun(Protocol):
    """What the loops here need of a validation pass (``validate.Validation``): the batch in one process, or its
    two halves around the child's work."""

    runners: Sequence[Any]
    results: Sequence[Any]

    def batch(self, x: Any, y: Any, part: str, offset: int) -> None: ...

    def feed(self, x: Any) -> dict[str, np.ndarray]: ...

    def reference_of(self, x: Any) -> tuple[tuple[Any, ...], Any]: ...

    def compare_with(self, inputs: tuple[Any, ...], ref: Any, answers: Sequence[Any], y: Any, part: str,
                     offset: int) -> None: ...


Part = tuple  # ("data" or "crafted", inputs, labels, offset), as validate.Part

STEP_DTYPE = np.int8


@dataclass
class RunnerTimes:
    """What the child measured for one runner on one batch."""

    seconds: float
    inference_seconds: float


def _serve(requests, answers, artifact: str, device: str, threads: int) -> None:
    """The child: open the artifact's runtimes, then answer each ("run", feed) with every runner's tensors."""
    from .runtimes import read_artifact, runners_for

    try:
        info = read_artifact(Path(artifact))
        runners = runners_for(info, device, threads)
        steps = {s.tensor for s in info.steps}
        answers.put(("ready", [(r.name, r.device) for r in runners]))
    except Exception as e:  # noqa: BLE001 — the parent reports it as the one-line error it is
        answers.put(("error", _one_line(e)))
        return
    import time

    while True:
        message = requests.get()
        if message[0] != "run":
            return
        try:
            results = []
            for runner in runners:
                started, inside = time.perf_counter(), runner.inference_seconds
                tensors = runner.run(message[1])
                times = RunnerTimes(time.perf_counter() - started, runner.inference_seconds - inside)
                results.append(({k: _small(v) if k in steps else v for k, v in tensors.items()}, times))
            answers.put(("ok", results))
        except Exception as e:  # noqa: BLE001
            answers.put(("error", _one_line(e)))


def _small(values: np.ndarray) -> np.ndarray:
    """A step tensor as int8 when that is exact (0, ±1); a wrong artifact's other values stay as they are."""
    small = values.astype(STEP_DTYPE)
    return small if np.array_equal(small, values) else values


def _one_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, BadInput) else f"{type(e).__name__}: {text}"


class RunnerProcess:
    """The artifact's runners in a child process, started in the background: ``ready()`` says (without waiting)
    whether it can take batches; then ``submit`` batches in order and ``collect`` their results in the same order.
    A child that fails to start is closed and never ready: validation goes on in this process."""

    def __init__(self, artifact: Path, steps: set[str], device: str = "cpu", threads: int = 0) -> None:
        context = mp.get_context("spawn")
        # queues, not one pipe: their feeder threads send, so a large batch going one way never waits for a
        # large result coming the other way
        self._requests, self._answers = context.Queue(), context.Queue()
        self.steps = steps
        self.process = context.Process(target=_serve, args=(self._requests, self._answers, str(artifact), device,
                                                            threads), daemon=True)
        self.process.start()
        self.names: list[tuple[str, str]] = []
        self.state = "starting"  # then "ready" or "failed"

    def ready(self) -> bool:
        if self.state == "starting" and not self.process.is_alive() and self._answers.empty():
            self.state = "failed"
        if self.state == "starting" and not self._answers.empty():
            kind, answer = self._answers.get()
            self.state = "ready" if kind == "ready" and answer else "failed"
            self.names = answer if self.state == "ready" else []
            if self.state == "failed":
                self.close()
        return self.state == "ready"

    def _receive(self) -> tuple[str, Any]:
        while True:
            try:
                kind, answer = self._answers.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise BadInput("the process running the artifact's runtimes stopped unexpectedly") from None
        if kind == "error":
            self.close()
            raise BadInput(answer)
        return kind, answer

    def submit(self, feed: dict[str, np.ndarray]) -> None:
        self._requests.put(("run", feed))

    def collect(self) -> list[tuple[dict[str, np.ndarray], RunnerTimes]]:
        _, results = self._receive()
        return [({k: v.astype(np.float32) if k in self.steps and v.dtype == STEP_DTYPE else v
                  for k, v in tensors.items()}, times) for tensors, times in results]

    def close(self) -> None:
        if self.process.is_alive() and self.state == "starting":
            self.process.terminate()  # still importing: it would read "stop" only once it has started
        elif self.process.is_alive():
            self._requests.put(("stop",))
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(timeout=5)
        for q in (self._requests, self._answers):
            q.cancel_join_thread()  # what is still queued is not wanted: do not wait to flush it
            q.close()


# A child costs seconds to start (it imports TensorFlow and opens the interpreters): started only when the
# runtimes' projected time for the rest of the inputs is longer than that, or at once for a file this large
# (megabytes of packed weights take milliseconds per sample in the interpreter).
WORTH_STARTING_S = 10.0
LARGE_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ChildPlan:
    """How validation may start a child for the artifact's runtimes, and whether to start it at once."""

    artifact: Path
    steps: frozenset[str]
    at_once: bool

    @classmethod
    def of(cls, artifact: Path, steps: set[str]) -> "ChildPlan":
        return cls(artifact, frozenset(steps), artifact.stat().st_size > LARGE_FILE_BYTES)

    def start(self) -> "RunnerProcess":
        return RunnerProcess(self.artifact, set(self.steps))


def worth_overlapping(kind: str) -> bool:
    """The LCE and TFLite interpreters run one sample at a time on one core, holding Python's lock: a second
    core can compute the reference meanwhile. ONNX Runtime already uses every core."""
    return kind == "tflite" and (os.cpu_count() or 1) >= 2


def with_child(run: BatchRun, plan: ChildPlan, parts: Iterator[Part], advance: Callable[[int], None],
                total: int) -> None:
    """Batches in this process until the runtimes' projected time for the rest is worth a child process; then,
    once the child (started in the background) is ready, the rest overlapped with it."""
    child, done, parts = plan.start() if plan.at_once else None, 0, iter(parts)
    try:
        for item in parts:
            if child is not None and child.ready():
                if [name for name, _ in child.names] != [r.name for r in run.runners]:
                    parts = itertools.chain([item], parts)
                    break  # not the same runtimes as here: the rest in this process
                _overlapped(run, child, itertools.chain([item], parts), advance)
                return
            spent = sum(r.seconds for r in run.results)
            run.batch(item[1], item[2], item[0], item[3])
            n = count(item[1])
            done += n
            advance(n)
            per_sample = (sum(r.seconds for r in run.results) - spent) / max(n, 1)
            if child is None and per_sample * (total - done) > WORTH_STARTING_S:
                child = plan.start()
        else:
            return
        for part, x, y, offset in parts:
            run.batch(x, y, part, offset)
            advance(count(x))
    finally:
        if child is not None:
            child.close()


def _overlapped(run: BatchRun, remote, parts: Iterator[Part], advance: Callable[[int], None]) -> None:
    """The child runs the runtimes on batch b while this process computes b's reference and compares b − 1.

    PyTorch here keeps to one thread meanwhile: the interpreter in the child has the other core to itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        waiting = None
        for part, x, y, offset in parts:
            remote.submit(run.feed(x))
            inputs, ref = run.reference_of(x)
            if waiting is not None:
                run.compare_with(waiting[0], waiting[1], remote.collect(), *waiting[2:])
                advance(int(waiting[0][0].shape[0]))
            waiting = (inputs, ref, y, part, offset)
        if waiting is not None:
            run.compare_with(waiting[0], waiting[1], remote.collect(), *waiting[2:])
            advance(int(waiting[0][0].shape[0]))
    finally:
        torch.set_num_threads(threads)
