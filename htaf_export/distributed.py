"""Validation over a Ray cluster: ``htaf-export validate MODEL ARTIFACT --ray ADDRESS [--workers N]``.

Each of N Ray actors (one CPU each; N defaults to the cluster's CPUs) receives the model (pickled, or
the model file itself) and the artifact's bytes, so nodes need htaf-export installed but no shared
file system. The parent streams the batches to whichever actor is free (at most two waiting per
actor: memory stays bounded), then merges one ``Shard`` per actor into the report, exactly as
``--workers`` does on one machine. Optional: ``pip install 'htaf-export[distributed]'``.
"""

from __future__ import annotations

import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BadInput, HtafExportError
from .validate import Part, Shard, ShardSetup
from .workers import ModelRecipe, ShardWorker


def _ray():
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs Ray: pip install 'htaf-export[distributed]'") from None
    return ray


class ShardActor:
    """A ``ShardWorker`` on a Ray node, holding the artifact in a temporary folder of its own."""

    def __init__(self, job: tuple[ModelRecipe, str, bytes, str]) -> None:
        recipe, artifact_name, artifact, device = job
        self.folder = tempfile.TemporaryDirectory()
        path = Path(self.folder.name) / artifact_name
        path.write_bytes(artifact)
        self.worker = ShardWorker(recipe, path, device, threads=1)

    def start(self, setup: ShardSetup) -> None:
        self.worker.start(setup)

    def batch(self, part: Part) -> int:
        return self.worker.batch(part)

    def shard(self) -> bytes:
        return self.worker.shard()

    def close(self) -> None:
        self.folder.cleanup()  # ray.kill skips finalisers: the artifact copy would stay on the node


class RayPool:
    """The ``ShardPool`` of ``htaf_export.validate`` on a Ray cluster at ``address``."""

    def __init__(self, recipe: ModelRecipe, artifact: Path, device: str, address: str, workers: int | None = None) -> None:
        self.recipe, self.artifact, self.device, self.address = recipe.portable(), Path(artifact), device, address
        self.workers = workers or 0
        self.actors: list[Any] = []

    def __enter__(self) -> "RayPool":
        ray = _ray()
        _check_reachable(self.address)
        try:
            ray.init(address=None if self.address == "local" else self.address, logging_level="ERROR",
                     log_to_driver=False, include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise BadInput(f"cannot reach a Ray cluster at {self.address}: {str(e).splitlines()[0][:200]}") from None
        try:
            if not self.workers:
                self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
            actor = ray.remote(num_cpus=1)(ShardActor)
            job = ray.put((self.recipe, self.artifact.name, self.artifact.read_bytes(), self.device))
            # one copy in the object store, whatever the number of actors (Ray resolves the reference)
            self.actors = [actor.remote(job) for _ in range(self.workers)]
        except BaseException:
            ray.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        ray = _ray()
        try:
            ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=30)
        finally:
            for a in self.actors:
                ray.kill(a)
            ray.shutdown()

    def run(self, setup: ShardSetup, parts: Iterator[Part], advance: Callable[[int], None]) -> list[Shard]:
        ray = _ray()
        _get(ray, [a.start.remote(setup) for a in self.actors])
        waiting: dict[Any, Any] = {}  # task → the actor running it
        load = {id(a): 0 for a in self.actors}
        for part in parts:
            while min(load.values()) >= 2:
                self._finish_one(ray, waiting, load, advance)
            actor = min(self.actors, key=lambda a: load[id(a)])
            load[id(actor)] += 1
            waiting[actor.batch.remote(part)] = actor
        while waiting:
            self._finish_one(ray, waiting, load, advance)
        return [pickle.loads(b) for b in _get(ray, [a.shard.remote() for a in self.actors])]

    @staticmethod
    def _finish_one(ray, waiting: dict[Any, Any], load: dict[int, int], advance: Callable[[int], None]) -> None:
        done, _ = ray.wait(list(waiting), num_returns=1)
        for ref in done:
            load[id(waiting.pop(ref))] -= 1
            advance(_get(ray, ref))


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nothing listens at (Ray itself retries for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--ray wants host:port (or 'local' for a Ray instance on this machine), not {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise BadInput(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def _get(ray, refs):
    """``ray.get``, with a worker's own error (bad input: one line, exit 2) brought back as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, HtafExportError):
            raise cause from None
        raise RuntimeError(f"a Ray worker failed: {type(cause).__name__ if cause else 'error'}: {cause}") from None
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"a Ray worker stopped: {str(e).splitlines()[0][:200]}") from None
