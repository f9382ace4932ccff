"""The end of a validation: what its pass (``validate.Validation``) found, written into the report, with a note
for each thing it could not compare and why."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .parity import ParityReport, uncompared_outputs


def finish(report: ParityReport, run: Any) -> None:
    """What the pass found, into the report: results, margins, the tie rule applied, notes (``run``: the
    ``validate.Validation`` that made the pass)."""
    report.backends = run.results
    if report.tie_rule["reference"] is None and len(run.ties) == 1:
        report.tie_rule["reference"] = next(iter(run.ties))  # a traced model: the comparisons it applied
    report.margins = run.margins
    if run.graph_steps is not None:
        report.notes.append("the model (TorchScript) exposes no intermediate tensors: its step tensors and "
                            "pre-activations come from its captured graph run in ONNX Runtime (so they check the "
                            "conversion, not the capture); outputs from the model itself")
    if run.unsure:
        report.notes.append(f"{run.unsure} sample{'s' if run.unsure != 1 else ''}: the model's outputs differ from "
                            f"its captured graph's and a step input lies within the flip margin of its threshold "
                            f"(a near tie it may decide the other way); their outputs were not compared")
    spared = max(run.hidden.values(), default=0)
    if spared:
        report.notes.append(f"{spared} sample{'s' if spared != 1 else ''}: a step the file holds in no tensor (fused "
                            f"into a kernel) lies within rounding of its threshold, where it may flip unseen; their "
                            f"outputs were not compared")
    if run.foreign_labels:
        report.notes.append(run.foreign_labels)
    names = run.info.output_names
    if run.scored is not None and run.scored != names[0]:
        report.notes.append(f"argmax agreement and accuracy are scored on output {run.scored!r}: "
                            f"{', '.join(repr(n) for n in names[:names.index(run.scored)])} before it hold step values")
    if uncompared_outputs(run.results):
        report.notes.append(uncompared_outputs(run.results))
    if run.unobserved:
        report.notes.append(f"the reference cannot record step tensors {', '.join(sorted(run.unobserved))} "
                            f"(a traced model has no Step modules to hook); they are checked through the outputs only")
    if report.tolerance.derived and run.references.no_bound and run.references.needed_bounds:
        report.notes.append(f"rounding bounds are not available for this model ({run.references.no_bound}); "
                            f"the fixed tolerances were used")
        report.tolerance = replace(report.tolerance, derived=False)  # the report says what was applied
