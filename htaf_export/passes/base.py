"""The one pass contract: an onnx-ir in-place pass whose result may carry records of what it did.

    result = SomePass()(model)         # PassReport: result.model, result.modified
    result.records                     # what the pass did, one frozen record per change
    result.refusals                    # (value, reason) where a rewrite rule matched the pattern but its
                                       # check refused, so a user can be told why a layer stayed as it was

Passes compose with ``ir.passes.Sequential``. Pattern rewrites are onnxscript rewrite rules
(``pattern`` / ``check`` returning a ``MatchResult`` with a reason / ``rewrite``), applied by
:func:`apply_rules`, which also collects the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRuleSet


@dataclass
class PassReport(ir.passes.PassResult):
    """``PassResult`` plus the records of what changed and the reasons rules gave for not changing."""

    records: tuple[Any, ...] = ()
    refusals: tuple[tuple[str, str], ...] = ()


class _Refusals(MatchingTracer):
    """Keeps every refusal (MatchingTracer alone keeps only the best match per rule). The matcher itself refuses
    a match one of whose inner values is used outside it, before any ``check`` runs: ``shared`` says that."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        self.shared = shared
        self.found: list[tuple[str, str]] = []

    def log(self, rule, container, node, match_result, status) -> None:  # type: ignore[override]
        value = str(node.outputs[0].name if node.outputs else node.name)
        reason = str(match_result.reason)
        if status == MatchStatus.CONDITION_FAILED:
            self.found.append((value, reason))
        elif "other uses" in reason:
            self.found.append((value, self.shared))
        super().log(rule, container, node, match_result, status)


def apply_rules(model: ir.Model, rules: Sequence[Any], commute: bool = False,
                shared: str = "a value inside the pattern is also used elsewhere") -> tuple[int, list[tuple[str, str]]]:
    """Apply ``rules`` to ``model``; returns (rewrites made, refusals). A tracer makes the rewriter change
    nothing, so the refusals are collected on a dry run after the rewrites (only what is left was refused)."""
    count = RewriteRuleSet(list(rules), commute=commute).apply_to_model(model)
    tracer = _Refusals(shared)
    RewriteRuleSet(list(rules), commute=commute).apply_to_model(model, tracer=tracer)
    return count, tracer.found


def report(model: ir.Model, records: Sequence[Any] = (), modified: bool | None = None,
           refusals: Sequence[tuple[str, str]] = ()) -> PassReport:
    records = tuple(records)
    return PassReport(model, bool(records) if modified is None else modified, records, tuple(refusals))
