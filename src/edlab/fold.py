"""BN folding: the deployment form of a network merges each BatchNorm into the conv (or linear) before it.

In eval mode a BN is a per-channel affine map, y = s * (z - mean) + beta with s = gamma / sqrt(var + eps), so
the conv that produces z can absorb it: W' = s * W and b' = beta + s * (b - mean). The folded network computes
the same function without the BN layers: the score no longer counts their 4 numbers per channel (2 in the
course rules, which count scale and shift) but one bias per channel of the conv, and inference skips a pass
over every activation map (docs/quantization.md, "BN folding").

Which pairs fold: a BN whose input is exactly the output of a conv/linear module, which nothing else reads
(found by running the model once with hooks). A BN after a pooling, an addition or an activation (airbench's
conv -> pool -> BN, the pre-activation blocks) stays.

Quantized layers: an LSQ layer's per-channel weight step scales with |s| (W' = s W, step' = |s| step), so its
integer codes stay the same; the activation quantizer of its *input* is untouched. A channel whose BN scale
is negative flips the sign of its codes, and the code -2^(b-1) has no positive twin in b bits: such a pair is
left unfolded (and listed), as are BinaryConnect layers (their binary weights have no per-channel scale to
absorb s). The order for a quantized deployment: fine-tune (QAT) with BN, then fold what folds exactly
(``edlab quantize --fold-bn`` does so after fine-tuning). Folding first and fine-tuning the BN-free quantized
network diverged at the stage's learning rate (docs/quantization.md has the measurement).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .checkpoint import build_base
from .errors import EdlabError
from .qlayers import BinaryLayer, LSQLayer, QuantLayer

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FoldReport:
    """What ``fold_bn`` did: the (layer, BN) pairs folded and the BNs left in place, with why."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _pairs(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], dict[str, str], dict]:
    """Run ``model`` once (eval, no grad); return the (layer, BN) pairs where the BN reads exactly the layer's
    output and no other module reads it, the BNs that do not qualify, and each pair's (layer input, BN
    output) for the exactness check."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    # Every tensor seen is kept alive until the end, so that an id() is never reused for another one; values
    # are cloned, since an in-place op (ReLU(inplace=True) after a BN) changes a tensor after its hook ran.
    produced: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}  # id(output) -> (layer, input, output)
    readers: dict[int, list[str]] = {}
    bn_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # BN -> (its input, a copy of its output)
    alive: list[torch.Tensor] = []
    handles = []

    def on_layer(name):
        def hook(m, inp, out):
            produced[id(out)] = (name, inp[0].clone(), out)
        return hook

    def on_input(name):
        def hook(m, inp):
            if inp and isinstance(inp[0], torch.Tensor):
                alive.append(inp[0])
                readers.setdefault(id(inp[0]), []).append(name)
        return hook

    def on_bn(name):
        def hook(m, inp, out):
            bn_io[name] = (inp[0], out.clone())
        return hook

    for name, m in model.named_modules():
        if name and not list(m.children()):  # leaves: who reads which tensor
            handles.append(m.register_forward_pre_hook(on_input(name)))
    handles += [m.register_forward_hook(on_layer(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(on_bn(n)) for n, m in bns.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    pairs, kept, io = [], {}, {}
    for name, bn in bns.items():
        if name not in bn_io:
            kept[name] = "not run by a forward pass"
            continue
        inp, out = bn_io[name]
        src = id(inp)
        if src not in produced:
            kept[name] = "its input is not a conv/linear output"
        elif readers.get(src) != [name]:
            kept[name] = f"the output of {produced[src][0]} is also read by {readers.get(src)}"
        elif not bn.track_running_stats or bn.running_var is None:
            kept[name] = "no running statistics (batch statistics at inference)"
        else:
            pairs.append((produced[src][0], name))
            io[name] = (produced[src][1], out)
    return pairs, kept, io


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> str | None:
    """Merge ``bn`` into ``layer`` in place; return why not (and leave both unchanged) when it cannot."""
    if isinstance(layer, BinaryLayer):
        return "BinaryConnect layer: no per-channel weight scale to absorb the BN scale"
    s = bn.running_var.add(bn.eps).rsqrt()
    if bn.affine:
        s = s * bn.weight
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    if isinstance(layer, LSQLayer):
        codes = (layer.weight * (layer.weight_mask if layer.weight_mask is not None else 1)) / \
            (layer.weight_step.abs() + 1e-12).view(shape)
        at_min = (codes.clamp(layer.qn_w, layer.qp_w).round() == layer.qn_w).flatten(1).any(1)
        if (at_min & (s < 0)).any():
            return f"negative BN scale on a channel using the code {layer.qn_w} ({layer.weight_bits}-bit)"
        layer.weight_step.mul_(s.abs())
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    new_bias = shift + (bias - bn.running_mean) * s
    layer.weight.mul_(s.view(shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias)
    if isinstance(layer, QuantLayer):
        layer.drop_weight_cache()
    return None


def _has_act_quantizers(model: nn.Module) -> bool:
    return any(getattr(m, "act_bits", None) is not None for m in model.modules())


def fold_bn(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> tuple[nn.Module, FoldReport]:
    """A copy of ``model`` (eval mode) with every foldable BN merged into the conv/linear before it and
    replaced by ``nn.Identity``; ``model`` itself is not changed. Returns (folded copy, report).

    Each fold is checked on the traced batch (the folded layer must reproduce the BN's output); a float model
    is also checked end to end, so a conv output read by a plain function besides its BN cannot fold
    silently. The copy keeps the checkpoint spec and metadata, so it saves and reloads like any model."""
    folded = copy.deepcopy(model).eval()
    params = list(folded.parameters())
    if not params:
        raise EdlabError("fold_bn: the model has no parameters")
    dtype, device = params[0].dtype, params[0].device
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.no_grad():
        reference = folded(x)
    pairs, kept, io = _pairs(folded, x)
    report = FoldReport(kept=kept)
    modules = dict(folded.named_modules())
    whole = not _has_act_quantizers(folded)  # (activation quantizers would turn float noise into code flips)
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        backup = copy.deepcopy(layer)
        why = _fold_pair(layer, bn)
        if why is None:
            inp, out = io[bn_name]
            with torch.no_grad():
                got = layer(inp)
            if not _close(got, out, 1e-4):
                why = "folding did not reproduce the BN output"
        if why is None:
            _set(folded, bn_name, nn.Identity())
            with torch.no_grad():
                if whole and not _close(folded(x), reference, 1e-3):
                    why = f"the output of {layer_name} is also read outside the BN (e.g. an identity shortcut)"
                    _set(folded, bn_name, bn)
        if why is not None:
            _set(folded, layer_name, backup)
            report.kept[bn_name] = why
            continue
        report.folded.append((layer_name, bn_name))
    ref = _folded_reference(model, report.folded)
    if ref is not None:
        folded.edlab_dense_reference = ref
    return folded.eval(), report


def _folded_reference(model: nn.Module, pairs: list[tuple[str, str]]) -> dict | None:
    """The dense reference of a pruned model (``edlab_dense_reference``, the basis of ps) folded like the
    model: the same BNs folded in the dense architecture (rebuilt from the spec), so that folding does not
    pass for structured pruning. None when the model has no reference to adjust."""
    ref = getattr(model, "edlab_dense_reference", None)
    spec = getattr(model, "edlab_spec", None)
    if not ref or not spec or not pairs:
        return None
    dense = dict(build_base(spec).named_modules())
    removed = 0
    for layer_name, bn_name in pairs:
        layer, bn = dense.get(layer_name), dense.get(bn_name)
        if layer is None or not isinstance(bn, _BN):
            raise EdlabError(f"fold_bn: {layer_name}/{bn_name} are not in the dense architecture; cannot "
                             f"adjust the dense reference of this pruned model")
        removed += sum(p.numel() for p in bn.parameters()) - (layer.out_channels if isinstance(layer, nn.Conv2d)
                                                             else layer.out_features) * (layer.bias is None)
    return {**ref, "params": ref["params"] - removed}


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    return torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-6)
