"""airbench94's training tricks (Jordan 2024), as functions the one training loop calls when configured.

Each one is a named config option and works with any zoo model where it makes sense:

- ``init.whiten``: the first conv (3 input channels) starts as a whitening filter bank: ± the eigenvectors
  of the training images' patch covariance, scaled by 1/sqrt(eigenvalue). Its first layer then sees
  decorrelated, unit-variance inputs from step 0, which a random init takes epochs to learn. The weight
  stays frozen; the bias trains for ``init.whiten_bias_epochs``.
- ``init.dirac``: 3x3 convs start as identities, so the fresh deep net passes its input through and trains
  like a shallow one first.
- ``optim.freeze_bn_weight``: BN scales stay at 1 (fewer parameters; the next conv can scale instead).
- ``lookahead``: every N steps the weights move to a running average and the network restarts from it.
- ``ema``: the weights the run keeps are an exponential moving average of the trained ones (``EMA``).

The BN-bias lr multiplier is in optim.build_optimizer; alternating flip and reflected translation in augment.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import EdlabError


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The conv that reads the image: the first Conv2d with 3 input channels."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return m
    raise EdlabError("init.whiten: the model has no conv reading the 3 image channels")


def patch_whitening(images: torch.Tensor, kh: int, kw: int, eps: float = 5e-4) -> torch.Tensor:
    """Filters (c*kh*kw of them, largest variance first) that whiten kh x kw patches of ``images``
    (normalised floats, N x C x H x W): eigenvectors of the patch covariance over sqrt(eigenvalue + eps)."""
    c = images.shape[1]
    patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
    cov = flat.T @ flat / len(flat)  # second moment about 0, as airbench: the data are already normalised
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval.flip(0), eigvec.flip(1)
    filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps).unsqueeze(1)).reshape(-1, c, kh, kw)
    return filters.float()


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> nn.Conv2d:
    """Set the image-reading conv to ± whitening filters (the top out/2 eigen-directions), freeze its
    weight and zero its bias. Needs out_channels even and <= 2 x the patch size (airbench94: 2x2x3 -> 24)."""
    conv = first_conv(model)
    kh, kw = conv.kernel_size
    k = conv.in_channels * kh * kw
    out = conv.out_channels
    if out % 2 or out > 2 * k or conv.groups != 1:
        raise EdlabError(f"init.whiten: the first conv has {out} output channels; whitening fills an even number "
                         f"up to 2 x {k} (its {kh}x{kw}x{conv.in_channels} patch size)")
    filters = patch_whitening(images.to(conv.weight.device), kh, kw, eps)[: out // 2]
    conv.weight.copy_(torch.cat([filters, -filters]))
    conv.weight.requires_grad_(False)
    if conv.bias is not None:
        conv.bias.zero_()
    return conv


def set_whiten_bias_trainable(model: nn.Module, epoch: int, epochs: int) -> None:
    """The whitening conv's bias trains for the first ``epochs`` epochs only (then frozen, as airbench94)."""
    conv = first_conv(model)
    if conv.bias is not None:
        conv.bias.requires_grad_(epoch < epochs)


@torch.no_grad()
def dirac_init(model: nn.Module) -> int:
    """Make every 3x3 conv an identity on its first min(cin, cout) channels (per group); the other output
    channels keep their random init. Returns how many convs were set."""
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    n = 0
    for m in model.modules():
        if not isinstance(m, nn.Conv2d) or m.kernel_size != (3, 3) or m is stem:
            continue
        w, g = m.weight, m.groups
        per_group = w.shape[0] // g
        keep = min(per_group, w.shape[1])
        for i in range(g):
            nn.init.dirac_(w[i * per_group: i * per_group + keep])
        n += 1
    return n


def freeze_bn_weights(model: nn.Module) -> int:
    """BN scales are not trained (they stay at their value, 1 for a fresh model). Returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.requires_grad_(False)
            n += 1
    return n


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Weight of each new batch in BN's running statistics (airbench94 uses 0.4 where PyTorch defaults to 0.1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def bn_biases(model: nn.Module) -> set[int]:
    """ids of the BN bias (shift) parameters: the group airbench94 trains at 64x the lr."""
    return {id(m.bias) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}


class Lookahead:
    """airbench94's lookahead: every ``every`` steps the average moves towards the weights by 1 - decay and
    the network is reset to the average. decay = decay_per_step^every x (step/total)^3, so there is no
    averaging early (the weights change fast) and strong averaging near the end; after the last step the
    network is the average. BN running statistics are averaged too (every float tensor of the state)."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int):
        self.every, self.decay, self.total = every, decay, max(1, total_steps)
        sd = model.state_dict()
        self.keys = [k for k, v in sd.items() if v.dtype.is_floating_point]
        self.avg = {k: sd[k].detach().clone() for k in self.keys}
        self._cur = [sd[k] for k in self.keys]  # the model's own tensors, updated in place

    @torch.no_grad()
    def step(self, steps_done: int) -> None:
        """Call after each optimizer step with the number of steps done so far."""
        if steps_done % self.every:
            return
        d = self.decay ** self.every * (min(steps_done, self.total) / self.total) ** 3
        avg = [self.avg[k] for k in self.keys]
        torch._foreach_lerp_(avg, self._cur, 1 - d)
        torch._foreach_copy_(self._cur, avg)

    @torch.no_grad()
    def finish(self) -> None:
        """The end of training: the network becomes the average."""
        torch._foreach_copy_(self._cur, [self.avg[k] for k in self.keys])

    def state_dict(self) -> dict:
        return {"avg": self.avg}

    def load_state_dict(self, s: dict) -> None:
        for k in self.keys:
            self.avg[k].copy_(s["avg"][k])


class EMA:
    """Exponential moving average of the weights and BN statistics (Polyak averaging).

    The average of the last ~1/(1-decay) steps sits nearer the centre of the basin SGD bounces around in,
    so it validates better than the last iterate; the warm-up (1+t)/(10+t) keeps the random initial
    weights from lingering in the average early on."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # (average, source) tensor pairs, found once: the step loop only updates them in place
        avg, cur = self.model.state_dict(), model.state_dict()
        self._floats = ([avg[k] for k, v in avg.items() if v.dtype.is_floating_point],
                        [cur[k].detach() for k, v in avg.items() if v.dtype.is_floating_point])
        self._ints = [(avg[k], cur[k]) for k, v in avg.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights of the model it was made from (call after each step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self._floats, 1 - d)
        for a, c in self._ints:  # integer buffers (BN's num_batches_tracked): the current value
            a.copy_(c)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.updates = s["updates"]
