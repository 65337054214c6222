"""A fast CIFAR-10 network in the style of airbench94 (Jordan 2024, "94 % on CIFAR-10 in 3.29 seconds").

Why it is in the zoo: a ResNet-18 spends most of its 0.56 GMACs at full 32x32 resolution; this net pools
early (after the first conv of every stage), so it costs ~0.12 GMACs an image yet trains to the mid-90s in
a handful of epochs on a GPU. It is the "airbench-class recipe" of configs/airbench94-gpu.yaml.

Layout (widths 64/256/256 at width 1.0):

    stem      2x2 conv, 3 -> 24 channels, no padding (32 -> 31), GELU
    stage xN  3x3 conv -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU   (31 -> 15 -> 7 -> 3)
    head      max-pool (3x3 -> 1x1) -> linear (no bias) -> x 1/9 (a fixed temperature: small logits early)

The net only: airbench's training tricks (whitening stem from data patches, dirac init, frozen BN scales,
the 64x BN-bias lr, lookahead, alternating flip) are options of edlab's one training loop (edlab.tricks),
all on in configs/airbench94.yaml and usable with other models; ``conv`` factorizes the 3x3 convs as in the
ResNets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import conv3x3, stage_plan
from ._registry import register_model


class ConvGroup(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: pooling before the BN halves its cost."""

    def __init__(self, cin: int, cout: int, conv: str):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, 1, conv)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout, 1, conv)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class AirNet(nn.Module):
    def __init__(self, widths: list[int], num_classes: int = 10, width: float = 1.0, conv: str = "standard"):
        super().__init__()
        widths, convs = stage_plan(widths, width, conv)
        self.stem = nn.Conv2d(3, 24, 2, bias=True)
        self.act = nn.GELU()
        cin, groups = 24, []
        for w, kind in zip(widths, convs):
            groups.append(ConvGroup(cin, w, kind))
            cin = w
        self.layers = nn.Sequential(*groups)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.act(self.stem(x)))
        x = x.amax((2, 3))  # global max-pool: airbench's 3x3 max-pool over the last 3x3 map
        return self.fc(x) * self.scale


@register_model
def airbench94(**kw) -> AirNet:
    """airbench94-style net: 3 conv groups, widths 64/256/256, ~1.97 M parameters, ~0.12 GMACs."""
    return AirNet([64, 256, 256], **kw)
