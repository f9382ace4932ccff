"""Deep Heaviside networks: real weights, {0, 1} Heaviside activations."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from ..nn import HTAF
from .registry import ReferenceModel, register


@register("dhn_mlp")
class DhnMLP(ReferenceModel):
    """fc1 → bn1 → H → … → fc_out, every hidden activation an HTAF site with levels {0, 1}."""

    family = "dhn"

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (256, 128), classes: int = 10,
                 alpha: float = 2.0, beta: float = 4.0, mode: str = "smooth", tie: str = "ge") -> None:
        super().__init__(dict(in_features=in_features, hidden=hidden, classes=classes, alpha=alpha, beta=beta,
                              mode=mode, tie=tie), [in_features])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"bn{i}"] = nn.BatchNorm1d(h)
            layers[f"act{i}"] = HTAF(alpha, beta, levels="01", mode=mode, tie=tie)  # type: ignore[arg-type]
            width = h
        layers["fc_out"] = nn.Linear(width, classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x):
        return self.layers(x)
