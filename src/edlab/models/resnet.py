"""ResNets for 32x32 inputs (He et al. 2015), one parameterised definition for the whole family.

* ``resnet18/34/50`` and ``preact_resnet18``: the CIFAR variant of the ImageNet ResNets (3x3 stem, no
  max-pool, widths 64-512). resnet18 for 10 classes has exactly 11,173,962 parameters.
* ``resnet20/32/44/56/110``: the CIFAR ResNets of the paper (3 stages of n blocks, widths 16/32/64).
  Shortcuts that change shape are 1x1 conv + BN ("option B"): resnet20 has 272,474 parameters.

Options shared by every builder: ``width`` (multiplier of all channel counts), ``conv``: the kind of the
blocks' 3x3 convolutions, one kind for all stages or a comma-separated kind per stage
(``standard``, ``depthwise``, ``grouped:G``; the stem and the 1x1 shortcuts stay standard), and ``blocks``:
the number of blocks in each stage, replacing the builder's depths, and ``channels``: the channels of each
stage, replacing the builder's widths (``width`` then scales them). Together they describe the small
students of the challenge (docs/models.md): ``create_model("resnet20", blocks=[2, 3, 3], conv="depthwise")``
is the ~41 k-parameter depthwise ResNet with widths 16/32/64, ``width=0.5`` halves every channel count.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EdlabError
from ..layers import conv1x1, conv3x3, stage_plan
from ._registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, conv: str):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, conv)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, conv)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: BN's and the sum's backward need neither output, so each ReLU and the residual sum
        # rewrite their input instead of allocating another activation (fewer passes over memory)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016): BN-ReLU before each conv, identity path left clean."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, conv: str):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride, conv)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, conv)
        self.shortcut = conv1x1(cin, planes, stride) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, conv: str):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, conv)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


BLOCKS = {"basic": BasicBlock, "preact": PreActBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Stem conv3x3 -> stages of blocks -> global average pool -> linear classifier."""

    def __init__(
        self,
        block: str,
        depths: list[int],
        widths: list[int],
        num_classes: int = 10,
        width: float = 1.0,
        conv: str = "standard",
        blocks: list[int] | None = None,
        channels: list[int] | None = None,
    ):
        super().__init__()
        block_cls = BLOCKS[block]
        widths, convs = stage_plan(stage_channels(widths, channels), width, conv)
        depths = stage_depths(depths, blocks)
        self.preact = block == "preact"
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0]) if not self.preact else nn.Identity()
        cin = widths[0]
        stages = []
        for i, (depth, planes, kind) in enumerate(zip(depths, widths, convs)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(cin, planes, stride, kind))
                cin = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.bn_final = nn.BatchNorm2d(cin) if self.preact else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:  # a pre-activation net applies BN-ReLU inside its first block
            x = F.relu(self.bn1(x), inplace=True)
        x = self.layers(x)
        if self.preact:
            x = F.relu(self.bn_final(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def stage_depths(depths: list[int], blocks) -> list[int]:
    """The builder's blocks per stage, or ``blocks`` in their place."""
    return _per_stage(depths, blocks, "blocks")


def stage_channels(widths: list[int], channels) -> list[int]:
    """The builder's channels per stage, or ``channels`` in their place: the knob that moves capacity between
    resolutions (a channel at 8x8 costs a sixteenth of the MACs of one at 32x32), which ``width`` cannot."""
    return _per_stage(widths, channels, "channels")


def _per_stage(own: list[int], given, key: str) -> list[int]:
    """``given`` (a list, or "2,3,3" from a command line) as one positive integer per stage; ``own`` if None."""
    if given is None:
        return list(own)
    values = [v.strip() for v in given.strip().strip("[]").split(",")] if isinstance(given, str) else given
    try:
        counts = [int(v) for v in values]
    except (TypeError, ValueError):
        counts = []
    if len(counts) != len(own) or min(counts) < 1 or any(isinstance(v, (bool, float)) for v in values):
        raise EdlabError(f"{key}: give {len(own)} positive integers, one per stage (e.g. {list(own)}), "
                         f"got {given!r}")
    return counts


IMAGENET_WIDTHS = [64, 128, 256, 512]
CIFAR_WIDTHS = [16, 32, 64]


@register_model
def resnet18(**kw) -> ResNet:
    return ResNet("basic", [2, 2, 2, 2], IMAGENET_WIDTHS, **kw)


@register_model
def resnet34(**kw) -> ResNet:
    return ResNet("basic", [3, 4, 6, 3], IMAGENET_WIDTHS, **kw)


@register_model
def resnet50(**kw) -> ResNet:
    return ResNet("bottleneck", [3, 4, 6, 3], IMAGENET_WIDTHS, **kw)


@register_model
def preact_resnet18(**kw) -> ResNet:
    return ResNet("preact", [2, 2, 2, 2], IMAGENET_WIDTHS, **kw)


def _cifar_resnet(depth: int):
    n = (depth - 2) // 6

    def build(**kw) -> ResNet:
        return ResNet("basic", [n, n, n], CIFAR_WIDTHS, **kw)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}: 3 stages of {n} basic blocks, widths 16/32/64."
    return register_model(build)


for _depth in (20, 32, 44, 56, 110):
    _cifar_resnet(_depth)
