"""The inputs of one validation, as the parts it runs: the data in batches (with the offset of each batch's first
sample), then the crafted threshold inputs in batches. Streamed: data is read one batch at a time."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from .crafted import CraftedSet, craft
from .data import Batches, count


def crafted_inputs(model: nn.Module, batches: Batches, crafted: CraftedSet | bool,
                    notes: list[str]) -> CraftedSet | None:
    """The crafted threshold inputs to add to the data: built from the model, given, or none (and why)."""
    if isinstance(crafted, CraftedSet):
        return crafted
    if crafted is not True:
        return None
    head = batches.head(8)
    if isinstance(head, tuple):
        notes.append("crafted threshold inputs are built for single-input models; this model takes several "
                     "inputs, so it was validated on the data only")
        return None
    try:
        found = craft(model, list(head.shape[1:]), head)
        if not len(found):  # say why there are none (a TorchScript model records no step to aim at)
            notes.extend(found.notes)
        return found
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        # an exotic model must not stop the ordinary comparison
        notes.append(f"crafted threshold inputs could not be built ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else ''}); validated on the data only")
        return None


def validation_parts(batches: Batches, crafted_set: CraftedSet | None, batch_size: int) -> Iterator:
    """("data" or "crafted", inputs, labels or None, offset of the first sample), batch by batch."""
    offset = 0
    for x, y in batches.batches(batch_size):
        yield "data", x, y, offset
        offset += count(x)
    if crafted_set is not None:
        for i in range(0, len(crafted_set), batch_size):
            yield "crafted", crafted_set.x[i:i + batch_size], None, i
