"""Tiny ConvNeXt-like nets for 32x32 inputs, after xvel/cifar10-tiniest (97,530 parameters, 43.9 M MACs,
94.4 % on CIFAR-10 reported there: mean of 5 runs, 200 epochs, final EMA weights; not reproduced here).

Why it is in the zoo: every ResNet of the zoo is a stack of dense 3x3 convs; this family spends almost
nothing on spatial mixing (depthwise kernels on three quarters of the channels) and nearly all of its
parameters and MACs on 1x1 convs, with large receptive fields at once (7x7 and a dilated 7x7). It is the
other end of the design space for the score challenge.

Layout of ``convnext_tiniest`` (the reference's net, widths 48/80):

    stage 1 (32x32)  3x3 conv 3 -> 48, LayerNorm, 3 blocks of width 48
    stage 2 (16x16)  4x4 conv stride 2, 16 groups, 48 -> 80, LayerNorm, 3 blocks of width 80
    head             global average pool -> linear

    block(x): the channels in four parts: [untouched | depthwise 3x3 | depthwise 7x7 |
              3x3 average pool -> depthwise 7x7 dilated 3], concatenated again
              -> LayerNorm -> fc_out(act(fc_gate(.)) * fc_value(.))  (a gated 1x1 feed-forward)
              -> + skip(x)   (skip: a learned per-channel scale of the residual path)

Each piece is an ordinary module, so that the score counter, Torch-Pruning, the QAT quantizer and the
checkpoint see it: the gate and value halves of the feed-forward are two 1x1 convs (the reference's one
conv with twice the outputs, chunked: same weights and MACs, but nothing to tell Torch-Pruning that the
halves are paired), the per-channel skip scale is a 1x1 depthwise conv (initialised to 1), the norms are
:class:`edlab.layers.LayerNorm2d`, the activation is :class:`TanhExp` (x tanh(e^x), the reference's).
The parts of a block are split by the channel counts of its depthwise convs, so a pruned block (parts of
unequal sizes) still runs (``edlab.prune.order_split_outputs`` makes Torch-Pruning map the parts right).

Options: ``width`` multiplies the channel counts (snapped to multiples of 4), ``blocks`` and ``channels``
replace the blocks and the channels per stage (as for the ResNets), ``skip_scale=False`` drops the per-channel
skip scale; ``conv`` is accepted for the shared config but only ``standard`` (the kernels are the family's design).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import EdlabError
from ..layers import LayerNorm2d, stage_plan
from ._registry import register_model
from .resnet import stage_channels, stage_depths


class TanhExp(nn.Module):
    """x * tanh(exp(x)) (Liu et al. 2020), the reference's gate activation. The exponent is clamped at 10:
    tanh(e^10) is 1 in every float format, and without the clamp exp overflows (in fp16 above 11) and
    turns the gradient into 0 * inf = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(torch.exp(x.clamp(max=10.0)))


class Block(nn.Module):
    """Mixed-kernel depthwise token mixing, LayerNorm, gated 1x1 feed-forward, scaled residual."""

    def __init__(self, dim: int, hidden: int, skip_scale: bool = True):
        super().__init__()
        q = dim // 4  # the first part (dim - 3q channels) passes untouched
        self.mix3 = nn.Conv2d(q, q, 3, padding=1, groups=q)
        self.mix7 = nn.Conv2d(q, q, 7, padding=3, groups=q)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.mix7d = nn.Conv2d(q, q, 7, padding=9, dilation=3, groups=q)
        self.norm = LayerNorm2d(dim)
        self.fc_gate = nn.Conv2d(dim, hidden, 1)
        self.fc_value = nn.Conv2d(dim, hidden, 1)
        self.act = TanhExp()
        self.fc_out = nn.Conv2d(hidden, dim, 1)
        self.skip = nn.Conv2d(dim, dim, 1, groups=dim, bias=False) if skip_scale else nn.Identity()
        if skip_scale:
            nn.init.ones_(self.skip.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [self.mix3.in_channels, self.mix7.in_channels, self.mix7d.in_channels]
        x0, x1, x2, x3 = torch.split(x, [x.shape[1] - sum(sizes), *sizes], dim=1)
        y = self.norm(torch.cat([x0, self.mix3(x1), self.mix7(x2), self.mix7d(self.pool(x3))], dim=1))
        y = self.fc_out(self.act(self.fc_gate(y)) * self.fc_value(y))
        return y + self.skip(x)


class TinyConvNeXt(nn.Module):
    """Stages of [entry conv -> LayerNorm -> blocks]; the first entry is the stem (3x3, ``stem_stride``),
    the others halve the resolution (4x4 stride-2 grouped conv); then global average pool and a linear."""

    def __init__(self, dims: list[int], depths: list[int], num_classes: int = 10, width: float = 1.0,
                 blocks: list[int] | None = None, skip_scale: bool = True, conv: str = "standard",
                 stem_stride: int = 1, channels: list[int] | None = None):
        super().__init__()
        if conv != "standard":  # every config passes conv; the kernels of this family are its design
            raise EdlabError(f"conv '{conv}': the convnext blocks have fixed (depthwise) kernels, "
                             f"only conv=standard applies")
        dims = [max(4, 4 * round(d / 4)) for d in stage_plan(stage_channels(dims, channels), width, "standard")[0]]
        depths = stage_depths(depths, blocks)
        stages, cin = [], 3
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            entry = nn.Conv2d(3, dim, 3, stem_stride, 1) if i == 0 else \
                nn.Conv2d(cin, dim, 4, 2, 1, groups=_down_groups(cin, dim))
            stages.append(nn.Sequential(entry, LayerNorm2d(dim), *(Block(dim, dim, skip_scale) for _ in range(depth))))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(x)
        return self.fc(x.mean((2, 3)))


def _down_groups(cin: int, cout: int) -> int:
    """The reference's 16 groups (48 -> 80), or fewer where the widths need: a divisor of both, and at least
    2 input channels a group (Torch-Pruning fails on grouped convs with one input channel a group)."""
    g = math.gcd(cin, cout, 16)
    while g > 1 and cin // g < 2:
        g //= 2
    return g


@register_model
def convnext_tiniest(**kw) -> TinyConvNeXt:
    """xvel/cifar10-tiniest's net: widths 48/80 at 32x32/16x16, 3 + 3 blocks; 97,530 parameters."""
    return TinyConvNeXt([48, 80], [3, 3], **kw)


@register_model
def convnext_nano(**kw) -> TinyConvNeXt:
    """The score-challenge size: stride-2 stem, widths 32/64 at 16x16/8x8, 2 + 2 blocks."""
    return TinyConvNeXt([32, 64], [2, 2], stem_stride=2, **kw)
