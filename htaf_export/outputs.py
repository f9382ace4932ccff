"""Model outputs of any structure (tensors, tuples, lists, dicts, nested mixes) as one flat, named list.

Flattening follows torch's pytree, as both ONNX exporters do, so the k-th flat output of the model is the
k-th output of the artifact. Names come from the structure: dict keys, list positions, joined with dots
(``{"logits": a, "aux": [b, c]}`` → ``logits``, ``aux.0``, ``aux.1``); a bare tensor is ``logits``, and a
top-level tuple or list is ``output.0``, ``output.1``, … unless the model declares ``output_names``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .errors import BadInput


def leaves(out: Any) -> list[torch.Tensor]:
    """The model's outputs, flattened in pytree order; anything that is not a tensor is refused."""
    flat = pytree.tree_leaves(out)
    odd = [type(v).__name__ for v in flat if not isinstance(v, torch.Tensor)]
    if odd:
        raise BadInput(f"the model returns {', '.join(sorted(set(odd)))} values besides tensors; "
                       f"return tensors (in tuples, lists or dicts) only")
    return flat


def scored(values: Sequence[Any]) -> int:
    """Index of the output that accuracy is scored on: the first that does not hold step values only (a concept
    bottleneck returning (concepts, logits) is scored on its logits), else the first. An integer output is a
    class index (an argmax in forward), a bool one decisions."""
    for k, value in enumerate(values):
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if a.dtype == bool or a.size == 0:
            continue
        if np.issubdtype(a.dtype, np.integer) or not (np.isin(a, (0, 1)).all() or np.isin(a, (-1, 1)).all()):
            return k
    return 0


def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def names(out: Any, declared: Sequence[str] | None = None) -> list[str]:
    """One name per flat output (see the module docstring); ``declared`` wins when it has the right count."""
    leaves(out)  # a None or a number among the outputs: refused here in one line, before capture trips on it
    paths = [p for p, _ in pytree.tree_flatten_with_path(out)[0]]
    if declared and len(declared) == len(paths):
        return [str(n) for n in declared]
    if len(paths) == 1 and not paths[0]:
        return ["logits"]
    joined = [".".join(_key(k) for k in p) for p in paths]
    if isinstance(out, (tuple, list)):
        joined = [f"output.{n}" for n in joined]
    if len(set(joined)) != len(joined):
        raise BadInput(f"the model's outputs cannot be named uniquely ({', '.join(joined)})")
    return joined


def require_batch_first(shapes: Sequence[Sequence[int]], n: int, names: Sequence[str]) -> None:
    """Refuse, in one line, an output whose axis 0 is not the batch of ``n`` samples (every target and
    validation read it so): a spiking model that stacks its time steps first is the usual case."""
    for name, shape in zip(names, shapes):
        if len(shape) == 0 or shape[0] != n:
            where = f" (the batch of {n} is on axis {list(shape).index(n)})" if n in list(shape) else ""
            raise BadInput(f"output {name!r} has shape {list(shape)} for a batch of {n}{where}: return every "
                           f"output batch first (time steps stacked with torch.stack(steps, dim=1))")

