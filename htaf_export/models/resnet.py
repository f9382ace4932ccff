"""A binary ResNet (Bi-Real style): binary 3x3 convs inside real-valued residual paths."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..nn import HTAF, BinaryConv2d
from .registry import ReferenceModel, register


class BinaryBlock(nn.Module):
    """x → sign → binary 3x3 conv → BN, plus a real shortcut (average pool + 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, alpha: float, beta: float, mode: str, tie: str) -> None:
        super().__init__()
        self.act = HTAF(alpha, beta, levels="pm1", mode=mode, tie=tie)  # type: ignore[arg-type]
        self.conv = BinaryConv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(cin, cout, 1, bias=False),
                                                     nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(self.act(x))) + self.shortcut(x)


@register("bnn_resnet")
class BnnResNet(ReferenceModel):
    """Stem (real 3x3 conv + BN) → stages of binary blocks → global average pool → real classifier.

    The defaults give ResNet-18's size (16 binary 3x3 convs in 4 stages, 64–512 channels, about 11 M weights)
    on 32x32 inputs.
    """

    family = "bnn"

    def __init__(self, in_channels: int = 3, image_size: int = 32, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (4, 4, 4, 4), classes: int = 10, alpha: float = 2.0, beta: float = 4.0,
                 mode: str = "surrogate", tie: str = "ge") -> None:
        super().__init__(dict(in_channels=in_channels, image_size=image_size, widths=widths, blocks=blocks,
                              classes=classes, alpha=alpha, beta=beta, mode=mode, tie=tie),
                         [in_channels, image_size, image_size])
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        layers = []
        width = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BinaryBlock(width, w, stride, alpha, beta, mode, tie))
                width = w
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))
