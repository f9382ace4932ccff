"""Binary neural networks: ±1 weights and sign activations (HTAF with levels ±1)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from ..nn import HTAF, BinaryConv2d, BinaryLinear
from .registry import ReferenceModel, register


def _sign_site(alpha: float, beta: float, mode: str, tie: str) -> HTAF:
    return HTAF(alpha, beta, levels="pm1", mode=mode, tie=tie)  # type: ignore[arg-type]


@register("bnn_mlp")
class BnnMLP(ReferenceModel):
    """fc1 → bn1 → sign → … → fc_out → bn_out; every fc binary. The first layer sees real inputs."""

    family = "bnn"

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (256, 256), classes: int = 10,
                 alpha: float = 2.0, beta: float = 4.0, mode: str = "surrogate", tie: str = "ge",
                 scale: bool = False) -> None:
        super().__init__(dict(in_features=in_features, hidden=hidden, classes=classes, alpha=alpha, beta=beta,
                              mode=mode, tie=tie, scale=scale), [in_features])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = BinaryLinear(width, h, scale=scale)
            layers[f"bn{i}"] = nn.BatchNorm1d(h)
            layers[f"act{i}"] = _sign_site(alpha, beta, mode, tie)
            width = h
        layers["fc_out"] = BinaryLinear(width, classes, scale=scale)
        layers["bn_out"] = nn.BatchNorm1d(classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x):
        return self.layers(x)


@register("bnn_cnn")
class BnnCNN(ReferenceModel):
    """Binary 3x3 convs with batch norm and sign between them, a max pool, and a binary classifier.

    conv1 sees real pixels and pads with 0; later convs see ±1 activations and pad with +1.
    """

    family = "bnn"

    def __init__(self, in_channels: int = 1, image_size: int = 8, channels: Sequence[int] = (32, 64, 64),
                 classes: int = 10, alpha: float = 2.0, beta: float = 4.0, mode: str = "surrogate",
                 tie: str = "ge", scale: bool = False) -> None:
        super().__init__(dict(in_channels=in_channels, image_size=image_size, channels=channels, classes=classes,
                              alpha=alpha, beta=beta, mode=mode, tie=tie, scale=scale),
                         [in_channels, image_size, image_size])
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width, size = in_channels, image_size
        for i, c in enumerate(channels, start=1):
            layers[f"conv{i}"] = BinaryConv2d(width, c, 3, padding=1, pad_value=0.0 if i == 1 else 1.0, scale=scale)
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
            layers[f"act{i}"] = _sign_site(alpha, beta, mode, tie)
            if i == 2:
                layers["pool"] = nn.MaxPool2d(2)
                size //= 2
            width = c
        layers["flatten"] = nn.Flatten()
        layers["fc_out"] = BinaryLinear(width * size * size, classes, scale=scale)
        layers["bn_out"] = nn.BatchNorm1d(classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x):
        return self.layers(x)
