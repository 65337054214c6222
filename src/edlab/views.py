"""Test-time views: the view sets, their forward passes per image, and the logits averaged over them.

A leaf module (torch only): training evaluates with these views and the score charges them (f = views x
MACs of one pass), so both import them from here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Test-time view sets -> forward passes per image; the score charges them (f = views x MACs of one pass).
# airbench: the six flip-shift images, weighted as airbench94 weighs them.
TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6, "airbench": 6}


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate a batch by (dy, dx) pixels, filling with the reflected border (what crop-flip trains on)."""
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits averaged over test-time views: the mirror image (flip) and one-pixel translations
    (flip-shift, 6 views), the symmetries the network was trained with; costs 2x / 6x an evaluation."""
    out = model(x)
    if tta == "none":
        return out
    out = out.float() + model(x.flip(3)).float()
    if tta == "flip":
        return out / 2
    shifted = sum(model(s).float() + model(s.flip(3)).float() for s in (shift(x, 1, 1), shift(x, -1, -1)))
    if tta == "airbench":  # airbench94's weights of the same 6 views: the unshifted pair counts twice
        return out / 4 + shifted / 8
    return (out + shifted) / 6
