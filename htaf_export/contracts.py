"""Records that cross stages. Each is frozen, typed, and checks itself when built.

    load ─▶ harden ─▶ capture ─▶ convert ─▶ write ─▶ validate ─▶ report
                        │           │
                   StepSpec     Conversion (bytes + LayerRow summary)

A converter returns a :class:`Conversion`; the pipeline writes its bytes and shows its rows, whatever the
target. :class:`StepSpec` is how every artifact lists its steps (JSON in its metadata).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

STEP_OPS = ("Heaviside", "Sign")
TIES = ("ge", "gt")
# A step oracle's key for the bits of a step on exact ties only (NaN elsewhere): ``ORACLE_TIES + tensor``.
ORACLE_TIES = "ties:"
# What a layer whose ±1 weights are stored 1 bit each ``became`` in a conversion's rows.
PACKED_WEIGHTS = "packed 1-bit weights"


def check_one_of(what: str, value: object, allowed: tuple[str, ...], error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``what`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise error(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class StepSpec:
    """One step of the IR: the tensor it writes, its site (module path), op, tie rule, and which call of the
    site it is (``call`` k counts the calls of a site in one forward pass, as in an unrolled SNN)."""

    tensor: str
    site: str
    op: str
    tie: str
    call: int = 0

    def __post_init__(self) -> None:
        check_one_of(f"step {self.tensor!r}: op", self.op, STEP_OPS)
        check_one_of(f"step {self.tensor!r}: tie", self.tie, TIES)

    @property
    def levels(self) -> str:
        return "01" if self.op == "Heaviside" else "pm1"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepSpec":
        return cls(str(d["tensor"]), str(d["site"]), str(d["op"]), str(d["tie"]), int(d.get("call", 0)))


@dataclass(frozen=True)
class LayerRow:
    """One line of the export summary: what a layer or step became in the artifact, and why."""

    layer: str
    became: str
    note: str = ""


@dataclass(frozen=True)
class Conversion:
    """What a converter returns: the complete artifact bytes and the summary the user sees.

    ``binary_floor_bytes`` is one bit per binary weight; ``binary_stored_bytes`` what the file spends on them.
    """

    data: bytes
    rows: tuple[LayerRow, ...] = ()
    binary_floor_bytes: float = 0.0
    binary_stored_bytes: int = 0
    notes: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes) or not self.data:
            raise ValueError("a conversion must hold the artifact's bytes")
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "notes", tuple(self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {"artifact_bytes": len(self.data), "binary_stored_bytes": self.binary_stored_bytes,
                "binary_floor_bytes": self.binary_floor_bytes,
                "layers": [asdict(r) for r in self.rows], "notes": list(self.notes)}
