"""Building blocks shared by the model families.

The block-convolution choice (``standard``, ``depthwise``, ``separable``, ``grouped:G``) is the one factorization knob
of the zoo, so it lives here and every family calls :func:`conv3x3` instead of ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdlabError

CONV_KINDS = ("standard", "depthwise", "separable", "grouped:G")


def parse_conv(kind: str) -> tuple[str, int]:
    """'standard' -> ('standard', 1); 'grouped:4' -> ('grouped', 4); 'depthwise' -> ('depthwise', 0)."""
    if kind == "standard":
        return "standard", 1
    if kind in ("depthwise", "separable"):
        return kind, 0
    if kind.startswith("grouped:"):
        try:
            g = int(kind.split(":", 1)[1])
        except ValueError:
            g = -1
        if g < 1 or g & (g - 1):
            raise EdlabError(f"conv '{kind}': G must be a power of two (grouped:2, grouped:4, ...)")
        return "grouped", g
    raise EdlabError(f"unknown conv kind '{kind}' (choices: {', '.join(CONV_KINDS)})")


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 + BN + ReLU + pointwise 1x1 (MobileNet factorization of a 3x3 conv); with
    ``inner_norm=False`` depthwise 3x3 + pointwise 1x1 straight (Xception's separable conv, which found no
    nonlinearity in between trains faster and ends better): half the block's BN + ReLU passes over the
    activations, the CPU student's costliest ops.

    The BN that follows the pointwise conv belongs to the enclosing block, as for a standard conv.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, inner_norm: bool = True):
        inner = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)] if inner_norm else []
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            *inner,
            nn.Conv2d(cin, cout, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, m in enumerate(self):
            x = _strided_depthwise_fp32(m, x) if i == 0 else m(x)
        return x


def _strided_depthwise_fp32(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A strided depthwise conv under CPU bf16 autocast runs in fp32: oneDNN's bf16 backward of a stride-2
    depthwise conv is ~10x its fp32 one (55 vs 5 ms, 128x16x32x32, one core, AVX512-BF16 host) and took a
    quarter of the depthwise student's step; the other convs keep bf16. Same weights, same result up to
    rounding; eval, export and counting see the plain conv."""
    if conv.stride == (1, 1) or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") \
            or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        return conv(x.float()).to(torch.bfloat16)


def stage_plan(widths: list[int], width: float, conv) -> tuple[list[int], list[str]]:
    """Channel counts scaled by the width multiplier, and one conv kind per stage (one kind given = all
    stages): the two knobs every family shares, checked once here."""
    if width <= 0:
        raise EdlabError(f"width must be > 0, got {width}")
    convs = [c.strip() for c in conv.split(",")] if isinstance(conv, str) else list(conv)
    if len(convs) == 1:
        convs = convs * len(widths)
    if len(convs) != len(widths):
        raise EdlabError(f"conv: give one kind or one per stage ({len(widths)} stages), got '{conv}'")
    return [max(1, round(w * width)) for w in widths], convs


def conv3x3(cin: int, cout: int, stride: int = 1, kind: str = "standard") -> nn.Module:
    """A 3x3 block convolution of the requested kind (no bias: a BN always follows)."""
    name, groups = parse_conv(kind)
    if name in ("depthwise", "separable"):
        return DepthwiseSeparable(cin, cout, stride, inner_norm=name == "depthwise")
    if cin % groups or cout % groups:
        raise EdlabError(f"conv '{kind}': {cin}->{cout} channels are not divisible by {groups} groups")
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's channels-first LayerNorm).

    A subclass of ``nn.LayerNorm`` rather than a wrapper, so that every tool that knows LayerNorm sees it as
    one: Torch-Pruning prunes its weight and bias with the channels it normalizes, the score charges it as a
    norm layer, and checkpoints describe it (``edlab.checkpoint`` registers it) so a pruned one reloads.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
