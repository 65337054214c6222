"""Pruning that really shrinks the model, and the `edlab prune` recipe that fine-tunes after every step.

Two kinds, one meaning of the numbers: both targets are fractions of the *dense reference* (the model before
any pruning, stored as ``model.edlab_dense_reference``), which is exactly how the score reads ps and pu.

* Structured (:func:`prune_structured`): whole filters/channels are physically removed, so the layers are
  smaller, the checkpoint is smaller and inference is faster. The coupled channels (a residual sum ties the
  outputs of every conv that feeds it; a depthwise conv ties its inputs to its outputs; a grouped conv
  prunes every group alike) are found by Torch-Pruning's DependencyGraph, not by edlab. Torch-Pruning
  speaks in fractions of *channels*; edlab searches the channel fraction (bisection, on copies) that
  removes the requested fraction of the dense parameters (``target="params"``: ps) or MACs (``"macs"``).
* Unstructured (:func:`prune_unstructured`): the smallest-magnitude conv/linear weights are set to exactly
  zero, globally or per layer, so that zeros / dense params (the score's pu) is the requested sparsity
  exactly. Nothing gets faster on dense kernels; only the params term of the score drops.

Masks during fine-tuning: the mask *is* the zero pattern, held by two hooks per layer (:func:`hold_masks`):
a gradient hook zeroes the gradient of pruned entries (so momentum and Adam states never move them) and a
forward pre-hook re-zeroes them before every training forward (a guarantee whatever the optimizer does).
The state_dict stays plain (``weight`` only; the mask is a non-persistent buffer), so ``fit`` can save
checkpoints and resume state mid-fine-tune; :func:`fold_masks` removes the hooks at the end.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdlabError
from .options import IMPORTANCES, SCHEDULES, SCOPES, TARGETS, PruneOptions, PruneRecipe, takes
from .scoring import dense_reference, dense_reference_of, profile

if TYPE_CHECKING:
    from .stage import StageRun

WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# ---------------------------------------------------------------------------------------------- basics
def schedule(final: float, steps: int, kind: str = "linear", initial: float = 0.0) -> list[float]:
    """Cumulative targets after each of ``steps`` pruning steps, going from ``initial`` to exactly ``final``.

    linear: equal increments. cubic: the AGP schedule of Zhu & Gupta (2017),
    final + (initial - final) * (1 - k/steps)^3, which prunes most while the net is most redundant and
    takes small steps at the end, where each removal hurts more.
    """
    if steps < 1:
        raise EdlabError(f"steps must be >= 1, got {steps}")
    if kind not in SCHEDULES:
        raise EdlabError(f"unknown schedule '{kind}' (choices: {', '.join(SCHEDULES)})")
    out = []
    for k in range(1, steps + 1):
        t = k / steps
        out.append(initial + (final - initial) * (t if kind == "linear" else 1 - (1 - t) ** 3))
    out[-1] = final
    return out


def _check_fraction(label: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise EdlabError(f"{label} must be a fraction in [0, 1), got {value!r}")


def ensure_dense_reference(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> dict[str, int]:
    """The dense reference ps/pu are fractions of; computed now if the model has none. A model pruned
    before keeps its original one, so pruning a pruned model still reports ps/pu against the dense one."""
    ref = dense_reference_of(model)  # one set on the model is checked: counts, or one line (not KeyError 'params')
    if ref is None:
        ref = dense_reference(model, tuple(input_size))
        model.edlab_dense_reference = ref
    return ref


def removed_fraction(model: nn.Module, target: str = "params", input_size: Sequence[int] = (3, 32, 32)) -> float:
    """1 - params/dense params (= the score's ps) or 1 - MACs/dense MACs, as counted by the score."""
    ref = ensure_dense_reference(model, input_size)
    p = profile(model, tuple(input_size))
    return 1 - p.arch_params / ref["params"] if target == "params" else 1 - p.macs / ref["macs"]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _example(model: nn.Module, example_input: torch.Tensor | None, input_size: Sequence[int]) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    if example_input is None:
        return torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return example_input.to(device)


def output_layer(model: nn.Module, example_input: torch.Tensor) -> str:
    """Name of the last conv/linear layer executed in a forward pass: the classifier, whose outputs (the
    classes) structured pruning must never remove."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if not order:
        raise EdlabError("the model runs no conv or linear layer: nothing to prune")
    return order[-1]


def _resolve(model: nn.Module, names: Iterable[str | nn.Module]) -> list[str]:
    """Layer names (or modules) -> names, with one clear error for a name that is not in the model."""
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    out = []
    for item in names:
        name = by_id.get(id(item)) if isinstance(item, nn.Module) else str(item).strip()
        if name is None or name not in modules or name == "":
            top = ", ".join(n for n, _ in model.named_children())
            raise EdlabError(f"layer {item if isinstance(item, str) else type(item).__name__!r} to keep is not "
                             f"in the model (top-level layers: {top}; use dotted names like layers.0.0.conv1)")
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------ structured
def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "bn":
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise EdlabError(f"unknown importance '{kind}' (choices: {', '.join(IMPORTANCES)})")


def prune_channels(model: nn.Module, ratio: float, x: torch.Tensor, importance: str, global_pruning: bool,
                   keep: list[str], round_to: int | None) -> None:
    """One Torch-Pruning step that removes ``ratio`` of the channels (per group, or of all channels ranked
    globally), in place. Eval mode while tracing, so BN running statistics do not move."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    modes = {m: m.training for m in model.modules()}
    try:
        pruner = tp.pruner.BasePruner(
            model, x, importance=_importance(importance), pruning_ratio=ratio, global_pruning=global_pruning,
            ignored_layers=[modules[n] for n in keep], round_to=round_to,
            # fresh dicts: Torch-Pruning's defaults are shared mutable dicts that would keep every copy alive
            in_channel_groups={}, out_channel_groups={}, num_heads={}, channel_groups={},
        )
        order_split_outputs(pruner.DG)
        pruner.step()
    finally:
        for m, mode in modes.items():
            m.training = mode


def order_split_outputs(graph) -> int:
    """Fix Torch-Pruning's reading of ``torch.split``/``chunk``; returns the number of splits reordered.

    Torch-Pruning lists a split's outputs in the order its walk of the graph meets their consumers, and maps
    the i-th listed output to the i-th part of the split. When the walk meets the parts out of order (the
    blocks of ``models/convnext.py`` split the channels in four parts), the channels of one part are pruned
    from another's layers. Each consumer's autograd node says which output of the split it reads
    (``output_nr``): the outputs are sorted by it and the shapes and index mappings recomputed. A split
    whose consumers cannot be told apart (one reads two parts, or reads through other ops) is left as traced.
    """
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping, shape_infer

    changed = 0
    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.SPLIT:
            continue
        part = {}
        for out in node.outputs:
            reads = [nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn]
            if len(reads) != 1:
                break
            part[out] = reads[0]
        else:
            order = sorted(node.outputs, key=part.__getitem__)
            if order != node.outputs:
                node.outputs[:] = order
                changed += 1
    if changed:
        shape_infer.init_shape_information(graph)
        index_mapping.update_index_mapping(graph)
    return changed


def _valid(model: nn.Module) -> bool:
    """Every layer kept at least one channel (global pruning may try to empty a layer at extreme ratios;
    the forward pass that counts the result checks the rest)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and min(m.in_channels, m.out_channels) < 1:
            return False
        if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) < 1:
            return False
    return True


def _copy_with_grads(model: nn.Module) -> nn.Module:
    c = copy.deepcopy(model)  # deepcopy drops .grad; Taylor importance reads it
    for (_, p), (_, q) in zip(model.named_parameters(), c.named_parameters()):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return c


def taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Accumulate loss gradients over calibration batches (eval mode: BN statistics untouched) for the
    first-order Taylor importance |w * dL/dw| of Molchanov et al. (2019)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    model.zero_grad(set_to_none=True)
    n = 0
    try:
        for x, y in batches:
            F.cross_entropy(model(x).float(), y).backward()
            n += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise EdlabError("importance 'taylor' needs at least one calibration batch (x, y)")


def _structured_step(model: nn.Module, goal: float, x: torch.Tensor, importance: str, target: str,
                     global_pruning: bool, keep: list[str], round_to: int | None,
                     input_size: Sequence[int], tolerance: float) -> tuple[float, float]:
    """Prune ``model`` in place until ``goal`` of the dense params/MACs are gone. Bisection on the channel
    ratio, each trial on a copy (removal grows with the ratio, in steps: channels are discrete, so the closest
    achievable value is kept); then the chosen ratio is applied to the model itself. -> (ratio, achieved)."""
    now = removed_fraction(model, target, input_size)
    if goal <= now + 1e-9:
        return 0.0, now

    failures: list[str] = []

    def trial(r: float) -> float | None:
        c = _copy_with_grads(model)
        try:
            prune_channels(c, r, x, importance, global_pruning, keep, round_to)
            return removed_fraction(c, target, input_size) if _valid(c) else None
        except Exception as e:  # a ratio Torch-Pruning cannot apply (e.g. a layer emptied): search lower
            failures.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            return None

    # Bracketed search on the channel ratio r. First guess: widths scale both params and MACs about
    # quadratically, so keeping (1 - goal) / (1 - now) of them means keeping its square root of the channels.
    # Then interpolation between the bracket ends alternating with bisection (a step function can stall
    # interpolation): about 3-5 trials on a ResNet instead of 9 for plain bisection.
    best_r, best, top = 0.0, now, now
    lo, f_lo, hi, f_hi = 0.0, now, 0.99, None
    r = min(0.98, max(0.01, 1 - math.sqrt((1 - goal) / (1 - now))))
    for i in range(24):
        got = trial(r)
        if got is not None and abs(got - goal) < abs(best - goal):
            best_r, best = r, got
        top = max(top, got if got is not None else top)
        if got is None or got > goal:
            hi, f_hi = r, got
        else:
            lo, f_lo = r, got
        if hi - lo <= 2e-3 or abs(best - goal) <= tolerance / 4:
            break
        r = (lo + hi) / 2
        if i % 2 == 0 and f_hi is not None and f_hi > f_lo:
            r = lo + (goal - f_lo) / (f_hi - f_lo) * (hi - lo)
            r = min(max(r, lo + 0.05 * (hi - lo)), hi - 0.05 * (hi - lo))
    if top <= now and failures:
        raise EdlabError(f"Torch-Pruning cannot prune this model at any ratio (first failure: {failures[0]})")
    if top < goal - tolerance:  # nothing came close from below or above: the target is out of reach
        raise EdlabError(f"structured pruning cannot remove {goal:.3f} of the dense {target} (the most reached "
                         f"was {top:.3f}; layers kept: {', '.join(keep)}): lower the ratio or keep fewer layers")
    if abs(best - goal) > tolerance:
        warnings.warn(f"structured pruning: {best:.3f} of the dense {target} removed, the closest to {goal:.3f} "
                      f"that whole channels allow here (round_to={round_to}, kept: {', '.join(keep)})",
                      stacklevel=3)
    prune_channels(model, best_r, x, importance, global_pruning, keep, round_to)
    model.zero_grad(set_to_none=True)
    return best_r, removed_fraction(model, target, input_size)


def prune_structured(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor | None = None,
    importance: str = "l1",
    target: str = "params",
    global_pruning: bool = False,
    ignore: Sequence[str | nn.Module] = (),
    steps: int = 1,
    round_to: int | None = None,
    schedule_kind: str = "linear",
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    callback: Callable[[nn.Module, dict], None] | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    tolerance: float = 0.01,
) -> nn.Module:
    """Physically remove channels, in place, until ``ratio`` of the dense reference is gone; returns the model.

    ``ratio`` is a *total*: the fraction of the dense reference's parameters (``target="params"``, i.e. the
    score's ps) or MACs (``"macs"``) removed once this call returns, counting what earlier pruning removed.
    ``importance``: l1/l2 (group norm of the coupled weights), bn (BN scale, network slimming) or taylor
    (|w * grad|, needs ``batches`` of (x, y) for the gradients). ``global_pruning``: rank channels of all
    layers together (layers shrink unequally) instead of the same fraction per layer. ``ignore``: layer
    names/modules whose output channels stay (the classifier is always kept). ``steps`` > 1: cumulative
    targets on ``schedule_kind``; ``callback(model, info)`` runs after each step (e.g. fine-tuning).
    ``round_to``: keep channel counts multiples of this (fast kernels like multiples of 8).
    """
    _check_fraction("structured ratio", ratio)
    if target not in TARGETS:
        raise EdlabError(f"unknown target '{target}' (choices: {', '.join(TARGETS)})")
    _importance(importance)  # validates the name
    if round_to is not None and round_to < 1:
        raise EdlabError(f"round_to must be >= 1, got {round_to}")
    input_size = tuple(example_input.shape[1:]) if example_input is not None else tuple(input_size)
    x = _example(model, example_input, input_size)
    ensure_dense_reference(model, input_size)
    keep = sorted(set(_resolve(model, ignore)) | {output_layer(model, x)})
    if importance == "taylor" and batches is None:
        raise EdlabError("importance 'taylor' needs calibration batches: pass batches=[(x, y), ...]")
    batches = list(batches) if batches is not None else None
    held = has_masks(model)
    start = removed_fraction(model, target, input_size)
    for k, goal in enumerate(schedule(ratio, steps, schedule_kind, initial=min(start, ratio)), 1):
        if held:
            fold_masks(model)  # parameters are replaced by smaller ones; the masks are re-derived after
        if importance == "taylor":
            taylor_gradients(model, batches)
        r, achieved = _structured_step(model, goal, x, importance, target, global_pruning, keep, round_to,
                                       input_size, tolerance)
        if held:
            hold_masks(model)
        if callback is not None:
            callback(model, {"kind": "structured", "step": k, "steps": steps, "target": goal,
                             "achieved": achieved, "channel_ratio": r})
    return model


# ---------------------------------------------------------------------------------------- unstructured
def prunable_layers(model: nn.Module, ignore: Sequence[str | nn.Module] = ()) -> dict[str, nn.Module]:
    """Conv and linear layers whose weights unstructured pruning may zero (``ignore`` and their children
    excluded)."""
    skip = _resolve(model, ignore)
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)
            and not any(n == s or n.startswith(s + ".") for s in skip)}


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global",
                    ignore: Sequence[str | nn.Module] = (), relative_to: str = "dense",
                    input_size: Sequence[int] = (3, 32, 32)) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = kept) that make the model's zeros exactly ``sparsity`` x the dense params.

    ``relative_to="dense"``: zeros in all conv/linear weights / dense reference params = sparsity (the
    score's pu). ``"weights"``: zeros / the prunable weights = sparsity. Existing zeros count and stay zero.
    ``scope="global"``: the smallest |w| over all prunable layers; ``"layer"``: the same fraction of each
    layer (ranked by within-layer quantile, so the total is still exact).
    """
    _check_fraction("unstructured sparsity", sparsity)
    if scope not in SCOPES:
        raise EdlabError(f"unknown scope '{scope}' (choices: {', '.join(SCOPES)})")
    if relative_to not in ("dense", "weights"):
        raise EdlabError(f"relative_to must be 'dense' or 'weights', got {relative_to!r}")
    layers = prunable_layers(model, ignore)
    if not layers:
        raise EdlabError("no conv or linear weights left to prune (all ignored?)")
    weights = {n: m.weight.detach() for n, m in layers.items()}
    total = sum(w.numel() for w in weights.values())
    if relative_to == "dense":
        ref = ensure_dense_reference(model, input_size)
        outside = sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                      if isinstance(m, WEIGHT_LAYERS) and n not in layers)
        k = round(sparsity * ref["params"]) - outside
        if k > total:
            raise EdlabError(f"unstructured sparsity {sparsity:.3f} of the dense params is not reachable: the "
                             f"prunable conv/linear weights are only {total / ref['params']:.3f} of it "
                             f"(after structured pruning, ps + pu must stay below what is left)")
    else:
        k = round(sparsity * total)
    scores = []
    for w in weights.values():
        a = w.abs().float().flatten()
        a[a == 0] = -1.0  # existing zeros go first and stay zero
        if scope == "layer":  # within-layer quantile: every layer gets the same fraction
            rank = torch.empty_like(a)
            rank[torch.argsort(a, stable=True)] = torch.arange(a.numel(), device=a.device, dtype=a.dtype)
            a = torch.where(a < 0, a, (rank + 0.5) / a.numel())
        scores.append(a)
    flat = torch.cat(scores)
    k = max(k, int((flat < 0).sum()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    keep &= torch.cat([w.flatten() != 0 for w in weights.values()])  # never revive a zero
    masks, i = {}, 0
    for n, w in weights.items():
        masks[n] = keep[i:i + w.numel()].view_as(w)
        i += w.numel()
    return masks


def _remask(module: nn.Module, _args) -> None:
    """Forward pre-hook: re-zero pruned entries before a training forward (module-level, not a closure,
    so a deepcopy of the model masks its own weights)."""
    if module.training and hasattr(module, "edlab_weight_mask"):
        with torch.no_grad():
            module.weight.mul_(module.edlab_weight_mask)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights where the mask is False (once; :func:`hold_masks` keeps them zero)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n, mask in masks.items():
            w = modules[n].weight
            if mask.shape != w.shape:
                raise EdlabError(f"mask for '{n}' has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
            w.mul_(mask.to(w.device))


def hold_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> None:
    """Keep pruned weights at zero through training: mask = ``masks`` or, by default, the current zero
    pattern of every conv/linear weight. A bool non-persistent buffer (moves with .to(), not saved), a
    gradient hook (pruned entries get zero gradient) and a forward pre-hook (re-zero before training
    forwards). Calling it again replaces the masks."""
    fold_masks(model)
    if masks is None:
        masks = {n: m.weight.detach() != 0 for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    apply_masks(model, masks)
    modules = dict(model.named_modules())
    for n, mask in masks.items():
        m = modules[n]
        m.register_buffer("edlab_weight_mask", mask.to(m.weight.device).bool(), persistent=False)
        hooks = [m.register_forward_pre_hook(_remask)]
        if m.weight.requires_grad:
            hooks.append(m.weight.register_hook(lambda g, m=m: g * m.edlab_weight_mask))
        m._edlab_mask_hooks = tuple(hooks)


def has_masks(model: nn.Module) -> bool:
    return any(hasattr(m, "edlab_weight_mask") for m in model.modules())


def fold_masks(model: nn.Module) -> int:
    """End of fine-tuning: write the masks into the weights for good and remove every hook and mask, so
    the state_dict and checkpoint hold plain ``weight`` tensors. Also folds torch.nn.utils.prune
    reparametrisations (``weight_orig`` + ``weight_mask``). Returns the number of layers folded."""
    from torch.nn.utils import prune as torch_prune

    n = 0
    for m in model.modules():
        if hasattr(m, "edlab_weight_mask"):
            with torch.no_grad():
                m.weight.mul_(m.edlab_weight_mask)
            for h in getattr(m, "_edlab_mask_hooks", ()):
                h.remove()
            for key, hook in list(m._forward_pre_hooks.items()):
                if hook is _remask:
                    del m._forward_pre_hooks[key]
            del m._buffers["edlab_weight_mask"]
            m.__dict__.pop("_edlab_mask_hooks", None)
            n += 1
        for name in [k[:-5] for k, _ in m.named_parameters(recurse=False) if k.endswith("_orig")]:
            torch_prune.remove(m, name)
            n += 1
    return n


def sparsity_of(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> float:
    """Zeros in conv/linear weights / dense reference params: the score's pu."""
    ref = ensure_dense_reference(model, input_size)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, WEIGHT_LAYERS))
    return zeros / ref["params"]


def prune_unstructured(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    ignore: Sequence[str | nn.Module] = (),
    relative_to: str = "dense",
    steps: int = 1,
    schedule_kind: str = "linear",
    hold: bool = True,
    callback: Callable[[nn.Module, dict], None] | None = None,
    input_size: Sequence[int] = (3, 32, 32),
) -> nn.Module:
    """Zero the smallest-magnitude conv/linear weights, in place, until zeros are ``sparsity`` of the dense
    reference params (the score's pu; see :func:`magnitude_masks` for ``scope``/``relative_to``). Returns
    the model with its masks held (``hold``) so that fine-tuning keeps the zeros; call :func:`fold_masks`
    when done. ``steps`` > 1: cumulative sparsities on ``schedule_kind``, ``callback(model, info)`` after
    each step (where fine-tuning goes)."""
    _check_fraction("unstructured sparsity", sparsity)
    start = sparsity_of(model, input_size) if relative_to == "dense" else 0.0
    for k, goal in enumerate(schedule(sparsity, steps, schedule_kind, initial=min(start, sparsity)), 1):
        masks = magnitude_masks(model, goal, scope, ignore, relative_to, input_size)
        if hold:
            held = {n: m.weight.detach() != 0 for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
            hold_masks(model, {**held, **masks})
        else:
            apply_masks(model, masks)
        if callback is not None:
            callback(model, {"kind": "unstructured", "step": k, "steps": steps, "target": goal,
                             "achieved": sparsity_of(model, input_size)})
    return model


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh random weights at the pruned widths (the "rethinking the value of network pruning" baseline):
    every layer's own reset, then He init (fan_out) for convs as the zoo models are built."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


# -------------------------------------------------------------------------------------------- recipe
Recipe = PruneRecipe  # its options, checks and defaults: edlab.options


def finetune_config(model: nn.Module, flags: dict | None = None, sets: Sequence[str] = (), epochs: int = 5,
                    scratch: bool = False):
    """The fine-tuning TrainConfig: the checkpoint's own training config (``edlab.stage.inherit_config``) with
    epochs = ``epochs``, a cosine schedule without warm-up and, unless given, one tenth of its learning rate
    (0.01 after the default SGD 0.1), then the flags and ``--set`` overrides. For training from scratch the
    original schedule and learning rate are kept."""
    from .stage import inherit_config

    over: dict = {"epochs": epochs, "keep": "last", "early_stop": None}
    if scratch:
        return inherit_config(model, over, flags or {}, sets=sets)
    return inherit_config(model, lambda base: {**over, "optim": {"lr": base.optim.lr / 10},
                                               "sched": {"name": "cosine", "warmup_epochs": 0}},
                          flags or {}, sets=sets)


def _row(model: nn.Module, step: int, kind: str, target: float | None, val_before: float | None,
         val_after: float | None, epochs: int, seconds: float) -> dict:
    p = profile(model)
    return {"step": step, "kind": kind, "target": target, "ps": p.ps, "pu": p.pu,
            "ps_macs": p.formula_view["ps_macs"] if p.formula_view else None, "params": p.arch_params,
            "nonzero_params": p.nonzero_params, "macs": p.macs, "score": p.score,
            "score_params_term": p.score_params_term, "score_ops_term": p.score_ops_term,
            "val_accuracy_pruned": val_before, "val_accuracy": val_after, "finetune_epochs": epochs,
            "seconds": seconds}


def run_recipe(model: nn.Module, recipe: Recipe, cfg, data=None, run=None, console=None, scratch_cfg=None,
               source: str | None = None, name: str | None = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` by ``recipe``, fine-tuning with ``cfg`` (a TrainConfig) after every step; write one
    metrics line per step, finetune.jsonl (the epochs), model.ckpt and summary.json into ``run`` (made, as
    ``name``, when not given; ``data`` likewise, from ``cfg``)."""
    from .stage import run_model_stage

    if recipe.distill and cfg.distill.teacher:
        raise EdlabError("give --distill (the unpruned model teaches) or --teacher CKPT, not both")

    def algorithm(s: StageRun, model: nn.Module) -> tuple[nn.Module, dict]:
        return _prune_stage(s, model, recipe, scratch_cfg, source)

    return run_model_stage("prune", cfg, algorithm, model.float(), name=name, run=run, data=data, console=console,
                           source_teaches=recipe.distill)


def _prune_stage(s: StageRun, model: nn.Module, recipe: Recipe, scratch_cfg,
                 source: str | None) -> tuple[nn.Module, dict]:
    """The pruning stage's algorithm: the recipe's steps, each fine-tuned; test once; save."""
    from .device import resolve_precision
    from .evaluation import evaluate, final_test
    from .stage import inference_record
    from .train import fit

    cfg, data, run, console, device, teacher = s.cfg, s.data, s.run, s.console, s.device, s.teacher
    t_start = time.perf_counter()
    amp = resolve_precision(cfg.precision, device)
    inference = inference_record(cfg, amp)  # every score below charges the views this stage evaluates with
    model.edlab_metadata = {**(getattr(model, "edlab_metadata", None) or {}), "inference": inference}
    model.to(device).float()
    ensure_dense_reference(model)
    if sparsity_of(model) > 1e-4:
        hold_masks(model)  # a sparse checkpoint: its zeros are pruned weights, kept through fine-tuning
    epochs_done = 0

    def val() -> float | None:
        return evaluate(model, data.val, amp, cfg.tta)["accuracy"] if data.val is not None else None

    def log(row: dict) -> None:
        run.log_metrics({**row, "epoch": epochs_done})
        if console is not None:
            val_text = _pct(row["val_accuracy"])
            if row["val_accuracy_pruned"] is not None and row["finetune_epochs"]:
                val_text = f"{_pct(row['val_accuracy_pruned'])} -> {val_text} fine-tuned"
            console.print(f"[bold]step {row['step']} {row['kind']:<12}[/bold] target {_fmt(row['target'])}  "
                          f"ps {row['ps']:.3f}  pu {row['pu']:.3f}  params {row['params']:,}  "
                          f"MACs {row['macs']:,}  score {row['score']:.4f}  val {val_text}")

    def finetune(step: int, c) -> float | None:
        nonlocal epochs_done
        if c.epochs == 0:
            return val()

        def on_epoch(r: dict) -> None:
            with open(run.file("finetune.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **r}) + "\n")

        state = fit(model, data, c, run=None, teacher=teacher, console=console, on_epoch=on_epoch)
        epochs_done += state.epoch
        return state.history[-1]["val_accuracy"] if state.history else val()

    if console is not None:
        kinds = [f"structured {recipe.structured:g} of the dense {recipe.target_kind}"] if recipe.structured else []
        kinds += [f"unstructured {recipe.unstructured:g} of the dense params"] if recipe.unstructured else []
        tuning = (f"then train from scratch for {(scratch_cfg or cfg).epochs} epochs" if recipe.from_scratch else
                  f"fine-tuning {cfg.epochs} epochs per step at lr {cfg.optim.lr:g}"
                  + (" with distillation" if teacher is not None else ""))
        console.print(f"pruning: {' then '.join(kinds)}, {recipe.steps} step(s) each ({recipe.schedule}), "
                      f"{tuning}; {cfg.data.dataset} on {device}")
    dense_val = val()
    log(_row(model, 0, "dense", None, None, dense_val, 0, 0.0))
    step = 0
    tune = not recipe.from_scratch
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)

    def after(kind: str):
        def cb(m: nn.Module, info: dict) -> None:
            nonlocal step
            t0 = time.perf_counter()
            step += 1
            before = val()
            after_val = finetune(step, cfg) if tune else before
            log(_row(m, step, kind, info["target"], before, after_val, cfg.epochs if tune else 0,
                     time.perf_counter() - t0))
        return cb

    if recipe.structured:
        batches = None
        if recipe.importance == "taylor":
            batches = [b for _, b in zip(range(recipe.calib_batches), data.train)]
        prune_structured(model, recipe.structured, x, recipe.importance, recipe.target_kind, recipe.global_pruning,
                         recipe.keep, recipe.steps, recipe.round_to, recipe.schedule, batches, after("structured"))
    if recipe.unstructured:
        prune_unstructured(model, recipe.unstructured, recipe.scope, recipe.keep, steps=recipe.steps,
                           schedule_kind=recipe.schedule, callback=after("unstructured"))
    if recipe.from_scratch:
        t0 = time.perf_counter()
        masks = {n: m.weight.detach() != 0 for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
        fold_masks(model)
        reinitialize(model, cfg.seed)
        hold_masks(model, masks)  # unstructured: the same zeros, fresh values elsewhere
        step += 1
        sc = scratch_cfg or cfg
        after_val = finetune(step, sc)
        log(_row(model, step, "scratch", None, None, after_val, sc.epochs, time.perf_counter() - t0))
    fold_masks(model)
    test = final_test(model, data, amp, cfg)  # the only time the test split is read
    model = model.to("cpu").to(memory_format=torch.contiguous_format).float().eval()
    p = profile(model)
    last = run.metrics()[-1]
    stored = dict(getattr(model, "edlab_metadata", {}).get("config") or cfg.model_dump(mode="json"))
    stored["data"] = cfg.data.model_dump(mode="json")
    entry = s.entry({"structured": recipe.structured, "unstructured": recipe.unstructured, "ps": p.ps,
                     "pu": p.pu}, test, inference)
    s.save(model, entry, config=stored, prune=recipe.record(), finetune_config=cfg.model_dump(mode="json"),
           test_accuracy=test["accuracy"], val_accuracy=last["val_accuracy"], source=source, inference=inference)
    return model, {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "val_accuracy": last["val_accuracy"],
        "dense_val_accuracy": dense_val, "finetune_epochs_total": epochs_done, "steps": run.metrics(),
        "recipe": recipe.record(), "source": source, "device": str(device),
        "precision": inference["precision"], "inference": inference, **p.to_dict(),
        "seconds": time.perf_counter() - t_start,
    }  # the skeleton adds the command, the run folder and the teacher's leak record


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


@takes(PruneOptions)
def prune_checkpoint(target: str, out: str | None = None, sets: Sequence[str] = (), console=None,
                     **options) -> dict:
    """``edlab prune`` as a call: prune a checkpoint (structured, then unstructured), fine-tuning after every
    step; write a run directory (metrics.jsonl, finetune.jsonl, config.yaml, summary.json, model.ckpt) and
    return its summary. ``options``: the fields of edlab.options.PruneOptions (``structured=0.3``,
    ``unstructured=0.2``, ``finetune_epochs``, ..., and the fine-tuning run's ``train_subset``, ``threads``,
    ``teacher``, ``lr``, ...); ``sets``: any fine-tuning config key ("optim.lr=0.01")."""
    from .loader import load_model
    from .qlayers import is_quantized

    o = PruneOptions.of(options)
    recipe = o.recipe()
    model = load_model(target, refuse_onnx="ONNX models are exported, not pruned: prune the checkpoint it was "
                                           "exported from")
    if is_quantized(model):  # Torch-Pruning would fail on its layers, after the run folder was made
        raise EdlabError(f"{target} is a quantized model: models are pruned before quantization (prune the float "
                         f"checkpoint, then quantize the pruned one)")
    _resolve(model, recipe.keep)  # a wrong --keep fails now, not after the data is loaded
    tree = o.config_tree()
    sets = list(sets) + ([f"out={out}"] if out else [])
    cfg = finetune_config(model, tree, sets, recipe.finetune_epochs)
    scratch = finetune_config(model, tree, sets, recipe.finetune_epochs if recipe.scratch_epochs is None
                              else recipe.scratch_epochs, scratch=True) if recipe.from_scratch else None
    spec = getattr(model, "edlab_spec", {}) or {}
    name = spec.get("name") or spec.get("builder", "model").rsplit(".", 1)[-1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch_pruning")
        _, s = run_recipe(model, recipe, cfg, console=console, scratch_cfg=scratch, source=target,
                          name=f"{name}-pruned")
    return s


__all__ = [
    "Recipe", "apply_masks", "ensure_dense_reference", "finetune_config", "fold_masks", "has_masks",
    "hold_masks", "magnitude_masks", "output_layer", "prunable_layers", "prune_checkpoint", "prune_structured",
    "prune_unstructured", "reinitialize", "removed_fraction", "run_recipe", "schedule", "sparsity_of",
    "taylor_gradients",
]
