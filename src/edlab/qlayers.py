"""Quantized layers: what a BinaryConnect or k-bit (LSQ) model is made of, apart from the algorithms that
make and train them (edlab.quantize).

A module of its own because the modules that read quantized models (checkpoints rebuild them, edlab.pack
packs their codes, edlab.fold folds BN into them, the score reads their bits) need the layer types, not the
training stage; they import this leaf and nothing of the stage.

Why the layers look the way they do. A quantized layer is a subclass of ``nn.Conv2d`` / ``nn.Linear`` that
keeps the real-valued weight as its ``weight`` Parameter and quantizes it inside ``forward`` through a
straight-through estimator (STE). The optimizer therefore always steps the real weights with the gradient
computed at the quantized ones, which is exactly BinaryConnect's order, in the one training loop
(``edlab.train.fit``) and without any hook in it. BinaryConnect's clip of the real weights to [-1, 1] "after
each step" is done at the start of the next training forward (nothing reads the weights in between, so it is
the same thing) and by ``edlab.quantize.clip_latent_`` once more after training. Layers declare
``weight_bits`` / ``act_bits`` for the score. In eval mode the quantized weight is computed once and cached
(recomputed when the real weight changes), so inference, export and the score's trace see only the
convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import conv_kwargs, register_leaf


# ------------------------------------------------------------------------------------- the estimators
def binarize_ste(w: torch.Tensor, stochastic: bool = False, h: float = 1.0) -> torch.Tensor:
    """sign(w) forward (0 -> +1); backward passes the gradient straight through where |w| <= 1 and cancels it
    where |w| > 1 (hard-tanh STE, Courbariaux et al.). ``stochastic``: +1 with probability
    hard_sigmoid(w / h) = clip((w / h + 1) / 2, 0, 1), else -1 (``h``: the layer's weight scale, see
    :func:`glorot_h`)."""
    if stochastic:
        p = ((w.detach() / h + 1) / 2).clamp(0, 1)
        b = (torch.rand_like(p) < p).to(w.dtype) * 2 - 1
    else:
        b = (w.detach() >= 0).to(w.dtype) * 2 - 1
    # value b; gradient 1 where |w| <= 1, boundary included (torch's clamp/hardtanh give 0 at +-1, which would
    # freeze every weight the clip has put on the boundary)
    inside = (w.detach().abs() <= 1).to(w.dtype)
    return b + (w - w.detach()) * inside


def glorot_h(weight: torch.Tensor) -> float:
    """BinaryConnect's H for stochastic signs (Courbariaux et al. 2015, as their code sets it): sqrt(1.5 /
    (fan_in + fan_out)), the scale of a layer's weights (Glorot's, receptive field counted for a conv). With
    hard_sigmoid(w) alone, a trained layer's weights (|w| ~ 0.05) made every sign a coin toss: the stochastic
    fine-tuning of the deck's trained resnet20 stayed at chance (val 9.9 %) while the deterministic one reached
    83.7 %."""
    field = weight[0, 0].numel() if weight.dim() > 2 else 1
    return math.sqrt(1.5 / ((weight.shape[0] + weight.shape[1]) * field))


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """round(clip(x / s, qn, qp)) * s with the LSQ gradients (Esser et al. 2020): straight through round, zero
    where clipped, and the step's gradient scaled by ``grad_scale`` = 1 / sqrt(elements x qp) so that it learns
    at the pace of the weights. s = |step| (a step that an update pushed below zero acts as its magnitude).

    One autograd node (:class:`_LSQ`) instead of the dozen that the same formula written with detach() makes:
    those elementwise passes over every activation, not the convolutions, were 3/4 of a QAT step of the
    depthwise challenge student (0.65 s against 0.15 s in float, batch 128, one thread;
    ``benchmarks/bench_qat_step.py``). Without a gradient (validation, eval, export) it is four passes."""
    if torch.is_grad_enabled() and (x.requires_grad or step.requires_grad):
        return _LSQ.apply(x, step, qn, qp, grad_scale)
    s = _lsq_step(step, grad_scale)
    return (x / s).clamp_(qn, qp).round_().mul_(s)


def _lsq_step(step: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """The step as the quantizer divides by. The value of s * g + (s - s * g), exactly as the detach() form
    of the gradient scaling computed it (it may differ from s in the last bit), so that models trained or
    saved before the fused form compute the same codes, bit for bit."""
    s = step.detach().abs() + 1e-12
    return s * grad_scale + (s - s * grad_scale)


class _LSQ(torch.autograd.Function):
    """LSQ's quantizer as one node. Every pass is a vectorised elementwise kernel: the masks are
    ``hardtanh_backward`` (gradient where qn < v < qp, strictly, as LSQ and torch's clamp have it), since
    comparisons and ``where`` on bf16 activations ran 3-4x slower than a clamp on this project's CPUs."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale):
        s = _lsq_step(step, grad_scale)
        xs = x / s
        q = xs.clamp(qn, qp).round_()
        ctx.save_for_backward(xs, q, step)
        ctx.bounds, ctx.grad_scale = (qn, qp), grad_scale
        return q * s

    @staticmethod
    def backward(ctx, g):
        xs, q, step = ctx.saved_tensors
        qn, qp = ctx.bounds
        inside_only = torch.ops.aten.hardtanh_backward
        gx = inside_only(g, xs, qn, qp) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            # d(q s)/ds per element: round(v/s) - v/s inside the range (exact: an integer minus a nearby
            # float), qn or qp where clipped
            prod = (q - inside_only(xs, xs, qn, qp)).mul_(g)
            if step.dim() == 0:
                gs = prod.sum(dtype=torch.float32)
            else:  # one step per output channel: sum over the other dimensions
                dims = [d for d in range(prod.dim()) if d >= step.dim() or step.shape[d] == 1]
                gs = prod.sum(dim=dims, keepdim=True, dtype=torch.float32).reshape(step.shape)
            gs = (gs * ctx.grad_scale * step.sign()).to(step.dtype)  # d|step|/dstep = sign(step)
        return gx, gs, None, None, None


def init_step(x: torch.Tensor, qn: int, qp: int, dim: int | None = None) -> torch.Tensor:
    """The step minimising the mean squared quantization error of ``x`` over 40 clipping ranges (5-100% of
    max |x|), per slice along ``dim`` (per output channel for weights) or for the whole tensor. On a trained
    resnet20's weights its error is below that of LSQ's 2 mean|x| / sqrt(qp) at every k (1.5x lower at 2 bits,
    35x at 8 bits, where LSQ's start clips far too much) and of max|x| / qp below 8 bits."""
    x = x.detach().float()
    flat = x.reshape(x.shape[dim], -1) if dim is not None else x.reshape(1, -1)
    if dim is None and flat.shape[1] > 1 << 18:  # activations: a strided sample is plenty
        flat = flat[:, :: flat.shape[1] // (1 << 18)]
    amax = flat.abs().amax(1, keepdim=True).clamp_min(1e-8)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / qp
    for r in torch.linspace(0.05, 1.0, 40).tolist():
        s = amax * r / qp
        err = (((flat / s).clamp(qn, qp).round() * s - flat) ** 2).sum(1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.reshape(-1) if dim is not None else best.reshape(())


# ---------------------------------------------------------------------------------------------- layers
class QuantLayer:
    """What the binary and k-bit layers share: the eval-mode cache of the quantized weight, and the mask of
    pruned weights. A layer made from a pruned one (exact zeros in its weight) keeps those weights at zero:
    its quantized weights are masked (zero there, and no gradient reaches those real weights), so fine-tuning
    keeps the sparsity and the score's count of zero weights stays true (a zero real weight would otherwise
    binarize to +1)."""

    _cache: tuple | None = None

    def _setup_mask(self, masked: bool) -> None:
        self.masked = masked
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool) if masked else None)

    def apply_mask_(self) -> None:
        """Re-zero the pruned real weights (after an optimizer step, or once training ends): the mask only
        zeroes the quantized weight, so without this a pruned real weight could drift and be saved non-zero."""
        if self.weight_mask is not None:
            with torch.no_grad():
                self.weight.mul_(self.weight_mask)

    def _cache_key(self) -> tuple:
        return tuple((t._version, t.data_ptr(), t.dtype) for t in self._weight_sources())

    def drop_weight_cache(self) -> None:
        """Forget the cached eval-mode weight, for code that rewrites the weights in place (BN folding, the
        clip after training): the cache key would notice, but the stale copy would be held until the next pass."""
        self._cache = None

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with (fresh in training; cached, without gradient, in eval)."""
        if self.training:
            return self.quantized_weight()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor (also outside inference_mode)
                self._cache = (key, self.quantized_weight())
        return self._cache[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self._cache = None
        if not mode:  # computed now, not inside the first inference pass (or the score's trace of it)
            self.effective_weight()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._cache = None
        self._act_range = None


class BinaryLayer(QuantLayer):
    """BinaryConnect weights: sign of the clipped real weight, optionally times alpha = mean |w| per output
    channel (XNOR-Net style). Activations and BN stay real."""

    weight_bits = 1

    def _setup(self, stochastic: bool, scale: bool, masked: bool) -> None:
        self.stochastic, self.scale = stochastic, scale
        self._setup_mask(masked)
        n = self.weight.shape[0]
        # a Parameter (never trained) rather than a buffer so that the score counts its storage at 32 bits
        self.weight_scale = nn.Parameter(torch.ones(n), requires_grad=False) if scale else None

    def _weight_sources(self) -> list[torch.Tensor]:
        return [self.weight]

    def quantized_weight(self) -> torch.Tensor:
        w, mask = self.weight, self.weight_mask
        if self.training:
            with torch.no_grad():  # BinaryConnect's clip, for the update of the previous step
                w.clamp_(-1, 1)
            self.apply_mask_()
        b = binarize_ste(w, self.stochastic and self.training, glorot_h(w) if self.stochastic else 1.0)
        if mask is not None:
            b = b * mask
        if not self.scale:
            return b
        dims = tuple(range(1, w.dim()))
        kept = mask.sum(dims).clamp_min(1) if mask is not None else w[0].numel()
        alpha = w.clamp(-1, 1).abs().sum(dims) / kept  # mean |w| of the kept weights; gradient flows through it
        with torch.no_grad():
            self.weight_scale.copy_(alpha.detach())
        return b * alpha.view(-1, *([1] * (w.dim() - 1)))


class BinaryConv2d(BinaryLayer, nn.Conv2d):
    """nn.Conv2d with BinaryConnect weights (see :class:`BinaryLayer`); ``weight`` holds the real weights."""

    def __init__(self, *args, stochastic: bool = False, scale: bool = False, masked: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(stochastic, scale, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class BinaryLinear(BinaryLayer, nn.Linear):
    """nn.Linear with BinaryConnect weights (see :class:`BinaryLayer`)."""

    def __init__(self, *args, stochastic: bool = False, scale: bool = False, masked: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(stochastic, scale, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class LSQLayer(QuantLayer):
    """k-bit weights (signed, one learned step per output channel) and, when ``bits_a`` is set, k-bit
    activations at the layer's input (one learned step; unsigned when the calibration batch has no negative
    value, as after a ReLU). Steps start at the MSE-best value (:func:`init_step`): the weight steps when the
    layer is made from a float one, the activation step at the first forward pass (calibration)."""

    _act_range: tuple[int, int] | None = None

    def _setup(self, bits_w: int, bits_a: int | None, masked: bool) -> None:
        self.weight_bits, self.act_bits = bits_w, bits_a
        self._setup_mask(masked)
        self.qn_w, self.qp_w = -(2 ** (bits_w - 1)), 2 ** (bits_w - 1) - 1
        self.weight_step = nn.Parameter(init_step(self.weight, self.qn_w, self.qp_w, dim=0))
        if bits_a is not None:
            self.act_step = nn.Parameter(torch.ones(()))
            self.register_buffer("act_ready", torch.zeros((), dtype=torch.bool))
            self.register_buffer("act_signed", torch.zeros((), dtype=torch.bool))

    def reset_steps(self) -> None:
        """Weight steps from the current weights; activation step at the next forward pass."""
        with torch.no_grad():
            self.weight_step.copy_(init_step(self.weight, self.qn_w, self.qp_w, dim=0))
            if self.act_bits is not None:
                self.act_ready.fill_(False)
        self._cache = self._act_range = None

    def _weight_sources(self) -> list[torch.Tensor]:
        return [self.weight, self.weight_step]

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight if self.weight_mask is None else self.weight * self.weight_mask  # no gradient there
        g = 1.0 / (w[0].numel() * self.qp_w) ** 0.5
        step = self.weight_step.view(-1, *([1] * (w.dim() - 1)))
        return lsq_quantize(w, step, self.qn_w, self.qp_w, g)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        if self._act_range is None:  # after construction or loading: one host read, then cached
            if not bool(self.act_ready):
                signed = bool(x.detach().min() < 0)
                qn, qp = (-(2 ** (self.act_bits - 1)), 2 ** (self.act_bits - 1) - 1) if signed else \
                    (0, 2 ** self.act_bits - 1)
                with torch.no_grad():
                    self.act_step.copy_(init_step(x, qn, qp))
                    self.act_signed.fill_(signed)
                    self.act_ready.fill_(True)
            b = self.act_bits
            self._act_range = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if bool(self.act_signed) else (0, 2 ** b - 1)
        qn, qp = self._act_range
        return lsq_quantize(x, self.act_step, qn, qp, 1.0 / (x[0].numel() * qp) ** 0.5)


class LSQConv2d(LSQLayer, nn.Conv2d):
    """nn.Conv2d with k-bit LSQ weights and (optionally) input activations; ``weight`` holds real weights."""

    def __init__(self, *args, bits_w: int = 8, bits_a: int | None = 8, masked: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(bits_w, bits_a, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.bias)


class LSQLinear(LSQLayer, nn.Linear):
    """nn.Linear with k-bit LSQ weights and (optionally) input activations."""

    def __init__(self, *args, bits_w: int = 8, bits_a: int | None = 8, masked: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(bits_w, bits_a, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)


QUANT_TYPES = (BinaryConv2d, BinaryLinear, LSQConv2d, LSQLinear)


def is_quantized(model: nn.Module) -> bool:
    """Binary (binaryconnect) or k-bit (qat) layers: a model that is not quantized again, nor pruned."""
    return any(isinstance(m, QUANT_TYPES) for m in model.modules())


def linear_kwargs(m: nn.Linear) -> dict:
    return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)


def _binary_kwargs(m: BinaryLayer) -> dict:
    return {"stochastic": m.stochastic, "scale": m.scale, "masked": m.masked}


def _lsq_kwargs(m: LSQLayer) -> dict:
    return {"bits_w": m.weight_bits, "bits_a": m.act_bits, "masked": m.masked}


register_leaf(BinaryConv2d, lambda m: {**conv_kwargs(m), **_binary_kwargs(m)})
register_leaf(BinaryLinear, lambda m: {**linear_kwargs(m), **_binary_kwargs(m)})
register_leaf(LSQConv2d, lambda m: {**conv_kwargs(m), **_lsq_kwargs(m)})
register_leaf(LSQLinear, lambda m: {**linear_kwargs(m), **_lsq_kwargs(m)})
