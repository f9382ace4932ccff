"""Where validation's reference comes from, batch by batch, and the rounding bounds that go with it.

Validation needs, per batch, the reference's outputs, step bits and pre-activations, and, wherever a
backend differs from them, the rounding bounds of those values (``htaf_export.bounds``). Two sources:

- **one interpreted pass** (``bounded_reference``): the bounds interpreter computes every value anyway,
  each with its bound, so one pass over the traced hardened model gives both, ``CHUNK`` rows at a time.
  On a deep float path where every sample needs bounds (a ResNet's logits differ in their last bits on
  every row) this saves the whole separate reference pass. The values are the hardened model's, in
  float32, through the aten operations of its traced program; where a rule evaluates a layer in another
  order (a batch norm as x·s + (β − μ·s)), the difference from the module's own forward is within the
  bounds, which hold for every float32 evaluation.
- **the model's own forward** (``run_reference``), bounds computed afterwards for the rows that need
  them: a TorchScript model, a streaming SNN, a reference on another device, fixed tolerances, or a
  model with an operation that has no rounding rule (from that batch on).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import bounds
from .compare import BatchBounds, rows_needing_bounds
from .parity import Tolerance
from .reference import ReferenceRun, run_reference
from .runtimes import ArtifactInfo

CHUNK = bounds.CHUNK
Chunk = tuple[int, int, ReferenceRun, "BatchBounds | None"]  # rows [start, stop) of a batch, their reference, bounds


def bounded_reference(program: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], output_names: list[str],
                      step_keys: set[tuple[str, int]]) -> tuple[ReferenceRun, BatchBounds] | None:
    """The reference run of ``inputs`` with the bounds of every output and step input; None when the pass
    does not see every output and step call the artifact has. Raises ``bounds.NoBound`` for an operation
    without a rounding rule."""
    it = bounds.interpret(program, inputs)
    if len(it.leaves) != len(output_names) or not step_keys <= it.steps.keys():
        return None
    run = ReferenceRun()
    found = BatchBounds({}, {})
    for name, b in zip(output_names, it.leaves):
        run.outputs[name] = b.value.numpy()
        found.outputs[name] = (bounds.SLACK * b.error).numpy()
    for key, (x, y, step) in it.steps.items():
        run.steps[key] = y.numpy()
        run.preactivations[key] = (x.value - step.threshold).numpy()
        run.order.append(key)
        if step.tie:
            run.ties.add(step.tie)
        if key in step_keys:  # computed only for a step with a flipped bit to explain
            found.steps[key] = lambda key=key: it.step_bound(key).numpy()
    return run, found


def rows(values: Any, start: int, stop: int, n: int) -> Any:
    """Rows [start, stop) of a batch's tensors (a tuple of inputs, or arrays by name); views, not copies."""
    if start == 0 and stop == n:
        return values
    if isinstance(values, dict):
        return {k: v[start:stop] for k, v in values.items()}
    return tuple(v[start:stop] for v in values)


def _analysis_failed(e: Exception) -> str:
    # a rule meeting arguments it was not written for must not stop the comparison: fixed tolerances
    return f"the analysis failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


class References:
    """The reference of each batch, and its bounds; ``no_bound`` says why bounds are unavailable, if they are."""

    def __init__(self, model: nn.Module, info: ArtifactInfo, tol: Tolerance, device: str, graph_steps=None) -> None:
        self.model, self.info, self.tol, self.device, self.graph_steps = model, info, tol, device, graph_steps
        self.program: torch.fx.GraphModule | None = None
        self.untraced = ""  # why the model has no bounds program, once tried
        # reference and bounds from one interpreted pass while the model allows it
        self.merged = tol.derived and device == "cpu" and not info.streaming and graph_steps is None \
            and not isinstance(model, torch.jit.ScriptModule)
        self.step_keys = {(s.site, s.call) for s in info.steps}
        self.no_bound = "a streaming SNN is checked one step at a time" if info.streaming else ""
        self.needed_bounds = False

    def chunks(self, inputs: tuple[torch.Tensor, ...], note: Callable[[ReferenceRun], None]) -> Iterator[Chunk]:
        """The batch's reference in chunks (each is compared and dropped before the next is computed);
        ``note`` sees each reference run once."""
        n = int(inputs[0].shape[0])
        start = 0
        program = self._program(inputs) if self.merged else None
        while program is not None and start < n:
            stop = min(n, start + CHUNK)
            got = None
            try:
                got = bounded_reference(program, rows(inputs, start, stop, n), self.info.output_names, self.step_keys)
            except bounds.NoBound as e:
                self.no_bound = str(e)
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
                self.no_bound = _analysis_failed(e)
            if got is None:
                self.merged = False  # the module's own forward from now on
                break
            note(got[0])
            yield start, stop, *got
            start = stop
        if start < n:
            ref = run_reference(self.model, rows(inputs, start, n, n), self.info.output_names, self.device,
                                streaming=self.info.streaming, graph_steps=self.graph_steps, tol=self.tol)
            note(ref)
            yield start, n, ref, None

    def bounds_for(self, inputs: tuple[torch.Tensor, ...], ref: ReferenceRun, arts: list[dict[str, np.ndarray]],
                   n: int) -> BatchBounds | None:
        """For a reference from the model's forward: the rounding bounds of the samples that need them (a
        flipped bit or a float output beyond its last bits, on any backend), once per batch, those rows only."""
        if not self.tol.derived or (self.no_bound and self.needed_bounds):
            return None
        need = rows_needing_bounds(self.info, ref, arts, n)
        if not need.any():
            return None
        self.needed_bounds = True
        if self.no_bound:
            return None
        program = self._program(inputs)
        if program is None:
            self.no_bound = self.untraced
            return None
        index = torch.from_numpy(np.nonzero(need)[0])
        try:
            outs, steps = bounds.batch_bounds(program, tuple(x[index] for x in inputs), self.info.output_names)
        except bounds.NoBound as e:
            self.no_bound = str(e)
            return None
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
            self.no_bound = _analysis_failed(e)
            return None
        if not isinstance(self.model, torch.jit.ScriptModule):
            return BatchBounds.scatter(need, outs, steps, ref)
        # Its converted graph names the steps otherwise than the artifact: the fixed flip margin. And its exporter
        # folds batch norms into the weights, an evaluation the bounds of the module's own ops do not cover: the
        # fixed tolerances stay the floor, the bounds widen them where deep float paths need it.
        found = BatchBounds.scatter(need, outs, {}, ref)
        for name, bound in found.outputs.items():
            floor = (self.tol.atol + self.tol.rtol * np.abs(ref.outputs[name])) / 2
            found.outputs[name] = np.maximum(bound, floor.astype(np.float32))
        return found

    def _program(self, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule | None:
        if self.program is None and not self.untraced:
            self.program = bounds.traced_program(self.model, [list(x.shape[1:]) for x in inputs])
            if self.program is None:
                self.untraced = "a model torch.export cannot trace, or a TorchScript one torch cannot convert"
        return self.program
