"""Implicit concept bottleneck models: a real backbone, an HTAF concept layer, a linear head."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from ..nn import HTAF
from .registry import ReferenceModel, register


@register("icbm_cnn")
class IcbmCNN(ReferenceModel):
    """backbone (convs, ReLU, pool) → concept_fc → concept bits c ∈ {0,1}ⁿ → head(c) = logits.

    ``forward`` returns ``(logits, concepts)``: the concept bits are the interpretable output.
    """

    family = "icbm"
    output_names = ("logits", "concepts")

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: Sequence[int] = (16, 32),
                 concepts: int = 32, classes: int = 10, alpha: float = 2.0, beta: float = 4.0,
                 mode: str = "smooth", tie: str = "ge") -> None:
        super().__init__(dict(in_channels=in_channels, image_size=image_size, channels=channels, concepts=concepts,
                              classes=classes, alpha=alpha, beta=beta, mode=mode, tie=tie),
                         [in_channels, image_size, image_size])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels
        for i, c in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(width, c, 3, padding=1)
            layers[f"relu{i}"] = nn.ReLU()
            width = c
        layers["pool"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten()
        self.backbone = nn.Sequential(layers)
        self.concept_fc = nn.Linear(width * (image_size // 2) ** 2, concepts)
        self.concept_bn = nn.BatchNorm1d(concepts)
        self.concept_act = HTAF(alpha, beta, levels="01", mode=mode, tie=tie)  # type: ignore[arg-type]
        self.head = nn.Linear(concepts, classes)

    def forward(self, x):
        c = self.concept_act(self.concept_bn(self.concept_fc(self.backbone(x))))
        return self.head(c), c
