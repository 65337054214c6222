"""Batched data augmentation on whole uint8/float batches, on the batch's device.

Per-image PIL transforms are the bottleneck of a plain CIFAR loop; here each transform is a few tensor
ops on the whole batch, driven by an explicit ``torch.Generator`` so a run is reproducible (and a
resumed run sees the same images) for a given seed and epoch.

Named policies: ``none``; ``crop-flip`` (pad 4, random 32x32 crop, horizontal flip); ``scale-rotate``
(random scale 0.9-1.1 and rotation +-15 degrees); ``fancy`` (all four). ``cutout``, ``mixup`` and ``cutmix``
are independent options (``mix`` applies the last two, one per batch when both are on). crop-flip's shift,
border fill and flip rule are options too: airbench94 shifts by at most 2 pixels over a reflected border and
mirrors each image on alternate epochs (``alternate_mirror``). ``crop_pool`` fixes K crops per image instead
(distillation with the teacher's logits cached for each).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POLICIES = ("none", "crop-flip", "scale-rotate", "fancy")
SCALE = (0.9, 1.1)
DEGREES = 15.0
PAD = 4


def _rand(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def random_crop(x: torch.Tensor, gen: torch.Generator, pad: int = PAD, fill: str = "zeros") -> torch.Tensor:
    """Pad by ``pad`` (zeros, or the reflected border) and take one random HxW window per image."""
    if pad == 0:
        return x
    b = x.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    return crop_at(x, dy, dx, pad, fill)


def crop_at(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, fill: str = "zeros") -> torch.Tensor:
    """The HxW window at offset (dy, dx) in 0..2*pad of each image padded by ``pad`` (a strided view, then
    one gather): what random_crop draws, and what a fixed crop pool (``crop_pool``) replays."""
    b, c, h, w = x.shape
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if fill == "reflect" else "constant")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # b, c, 2p+1, 2p+1, h, w
    return windows[torch.arange(b, device=x.device), :, dy, dx]


def crop_pool(n: int, k: int, pad: int, seed: int) -> torch.Tensor:
    """``k`` fixed crop offsets per image, [n, k, 2] (dy, dx in 0..2*pad), drawn once from the run's seed (on
    the CPU, so every device and every resume gets the same pool): distillation's teacher answers once for
    each of these crops and its mirror (``distill.crop_pool``), and each step shows one of them."""
    gen = torch.Generator().manual_seed(seed * 100003 + 91)
    return torch.randint(0, 2 * pad + 1, (n, k, 2), generator=gen)


def flip_mask(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Which of n images random flipping mirrors (each with probability 1/2)."""
    return _rand(n, gen, device) < 0.5


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return mirror_where(x, flip_mask(x.shape[0], gen, x.device))


def mirror_where(x: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    return torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)


def alternate_mirror(index: torch.Tensor, n: int, epoch: int, seed: int) -> torch.Tensor:
    """Which images of a batch to mirror under alternating flip (airbench94): a seeded random half of the
    dataset is mirrored on even epochs and the other half on odd ones, so every image is seen both ways in
    any two consecutive epochs (random flipping leaves ~1/4 of them one way only). ``index``: dataset
    positions of the batch's images; ``n``: dataset size."""
    gen = torch.Generator(device=index.device).manual_seed(seed * 100003 + 77)  # one draw per run, not per epoch
    base = torch.rand(n, generator=gen, device=index.device) < 0.5
    return base[index] ^ bool(epoch % 2)


def random_scale_rotate(x: torch.Tensor, gen: torch.Generator, scale=SCALE, degrees=DEGREES,
                        pad: int = 0, flip: bool = False) -> torch.Tensor:
    """One affine warp per image (bilinear, zero fill); x must be floating point.

    With ``pad``/``flip`` the random crop (integer shift of up to ``pad`` pixels) and the horizontal flip are
    folded into the same matrix, so ``fancy`` costs one warp instead of a crop, a flip and a warp.
    """
    b, _, h, w = x.shape
    s = scale[0] + (scale[1] - scale[0]) * _rand(b, gen, x.device)
    a = (2 * _rand(b, gen, x.device) - 1) * math.radians(degrees)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s  # grid maps output -> input, hence 1/s
    sign = torch.where(_rand(b, gen, x.device) < 0.5, -1.0, 1.0) if flip else torch.ones_like(cos)
    if pad:  # crop window offset, in normalised units (2 / size per pixel)
        tx = (torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device) - pad) * (2.0 / w)
        ty = (torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device) - pad) * (2.0 / h)
    else:
        tx = ty = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([sign * cos, -sign * sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = affine_grid(theta.to(x.dtype), h, w)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (b, c, h, w), align_corners=False) by broadcasting: ~7x faster on CPU."""
    ys = ((torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    xs = ((torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    t = theta.reshape(-1, 6, 1, 1)
    return torch.stack([t[:, 0] * xs + t[:, 1] * ys + t[:, 2], t[:, 3] * xs + t[:, 4] * ys + t[:, 5]], -1)


def cutout(x: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """Erase one size x size square per image (centre anywhere, clipped at the border)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=x.device).view(b, 1, 1)
    cx = torch.randint(0, w, (b,), generator=gen, device=x.device).view(b, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - size // 2, cx - size // 2
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator):
    """Mix each image with a random partner: returns (mixed x, y, y_partner, lam)."""
    lam = beta_draw(alpha, gen, x.device)
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator):
    """CutMix (Yun et al. 2019): paste one box of a random partner into each image (the same box for the
    whole batch, as the paper's code does). The box's side is sqrt(1 - lam) of the image's, lam ~ Beta(a, a),
    centred anywhere and clipped at the border; the returned weight is the exact kept area, 1 - box area /
    image area, so the labels mix as the pixels do. Returns (mixed x, y, y_partner, lam)."""
    lam = beta_draw(alpha, gen, x.device)
    b, _, h, w = x.shape
    perm = torch.randperm(b, generator=gen, device=x.device)
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = torch.randint(0, h, (1,), generator=gen, device=x.device).item(), \
        torch.randint(0, w, (1,), generator=gen, device=x.device).item()
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    return mixed, y, y[perm], 1 - (bottom - top) * (right - left) / (h * w)


def mix(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, switch: float,
        gen: torch.Generator):
    """The batch's mixing (``data.mixup``, ``data.cutmix``): mixup, CutMix, or with both on one of them per
    batch, CutMix with probability ``switch`` (timm's mixup_switch_prob). The switch is drawn only when both
    are on, so a mixup-only run draws what it drew before CutMix existed. Off: (x, y, y, 1.0)."""
    if cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand(1, generator=gen, device=x.device).item() < switch):
        return cutmix(x, y, cutmix_alpha, gen)
    if mixup_alpha > 0:
        return mixup(x, y, mixup_alpha, gen)
    return x, y, y, 1.0


def beta_draw(alpha: float, gen: torch.Generator, device) -> float:
    """A Beta(a, a) draw from our generator (torch's Beta sampler takes no generator), at a cost that does not
    grow with a. Up to a = 1, Johnk's method (accepted with probability >= 1/2 there; the draws of every
    earlier run with such an alpha are unchanged, so they resume exactly); above, Johnk's acceptance vanishes
    (about 1e-11 at a = 20), so Beta = G1 / (G1 + G2) from two Gamma(a) draws (Marsaglia-Tsang, accepted
    with probability > 0.95)."""
    if alpha > 1:
        g1, g2 = _gamma(alpha, gen, device), _gamma(alpha, gen, device)
        return g1 / (g1 + g2)
    u1, u2 = torch.rand(2, generator=gen, device=device).clamp_min(1e-12).tolist()
    g1, g2 = u1 ** (1 / alpha), u2 ** (1 / alpha)  # Johnk's method, accepted when g1 + g2 <= 1
    while g1 + g2 > 1:
        u1, u2 = torch.rand(2, generator=gen, device=device).clamp_min(1e-12).tolist()
        g1, g2 = u1 ** (1 / alpha), u2 ** (1 / alpha)
    return g1 / (g1 + g2)


def _gamma(a: float, gen: torch.Generator, device) -> float:
    """A Gamma(a, 1) draw for a >= 1 (Marsaglia and Tsang 2000) from our generator."""
    d = a - 1 / 3
    c = 1 / (9 * d) ** 0.5
    while True:
        z, u = torch.randn(1, generator=gen, device=device).item(), torch.rand(1, generator=gen, device=device).item()
        v = (1 + c * z) ** 3
        if v > 0 and math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


class Augment:
    """A named policy plus options, applied to a uint8 NCHW batch; returns normalised float."""

    def __init__(self, policy: str, mean, std, cutout: int = 0, crop_pad: int = PAD, crop_fill: str = "zeros",
                 flip: str = "random"):
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation '{policy}' (choices: {', '.join(POLICIES)})")
        self.policy, self.cutout = policy, cutout
        self.crop_pad, self.crop_fill, self.flip = crop_pad, crop_fill, flip
        self.mirrored: torch.Tensor | None = None  # which images of the last batch were mirrored (None: no flip)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None, mirror: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
        """``mirror``: which images to flip (alternating flip); None = crop-flip flips at random. The mask used
        is kept in ``self.mirrored``: with crop_pad 0 an image and its mirror are the only two views, so a
        teacher's logits can be cached for both and read by (index, mirrored). ``shift``: crop-flip's crop
        offsets ([b, 2], dy and dx) instead of random ones (a crop pool's); with ``gen`` None it needs
        ``mirror`` (the teacher's pass over a pool: the exact view a step will show)."""
        self.mirrored = None
        if (gen is not None or shift is not None) and self.policy == "crop-flip":  # on uint8: cheap gathers
            x = random_crop(x, gen, self.crop_pad, self.crop_fill) if shift is None else \
                crop_at(x, shift[:, 0], shift[:, 1], self.crop_pad, self.crop_fill)
            self.mirrored = flip_mask(x.shape[0], gen, x.device) if mirror is None else mirror
            x = mirror_where(x, self.mirrored)
        x = x.float()
        if gen is not None and self.policy in ("scale-rotate", "fancy"):  # before normalising: black fill
            fancy = self.policy == "fancy"  # crop and flip folded into the same warp
            x = random_scale_rotate(x, gen, pad=PAD if fancy else 0, flip=fancy)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if gen is not None and self.cutout:
            x = cutout(x, gen, self.cutout)
        return x
