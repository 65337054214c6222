"""Quantization stages: half precision, BinaryConnect, k-bit quantization-aware training (LSQ), int8 export.

Every method is a stage that starts from a trained (possibly pruned) checkpoint and ends with a run
directory and a model scored with its real bits (docs/quantization.md):

* ``fp16`` / ``bf16``: cast, evaluate, save a truly half checkpoint (the score reads 16/16 from the dtype).
* ``binaryconnect`` (Courbariaux, Bengio, David 2015): binary weights, real-valued latent weights.
* ``qat``: k-bit weights (per output channel) and activations with learned step sizes (LSQ, Esser et al.
  2019).
* ``int8``: post-training static int8 through ONNX Runtime (``edlab.export``).

The quantized layers themselves (the straight-through estimators, BinaryConv2d/Linear, LSQConv2d/Linear)
are in ``edlab.qlayers``, which says why they look the way they do; this module makes and trains them. They
step the real weights with the gradient at the quantized ones, BinaryConnect's order. The seed instead stepped
the binarized weights and then restored the saved real ones: every update was overwritten and nothing learned
(``tests/test_quantize.py`` reproduces that).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .checkpoint import conv_kwargs
from .errors import EdlabError
from .evaluation import final_test
from .options import QuantizeOptions, takes
from .qlayers import (
    QUANT_TYPES,
    BinaryConv2d,
    BinaryLayer,
    BinaryLinear,
    LSQConv2d,
    LSQLinear,
    QuantLayer,
    is_quantized,
    linear_kwargs,
)
from .stage import inference_record
from .views import TTA_VIEWS

if TYPE_CHECKING:
    from .stage import StageRun

# Fine-tuning defaults of the training stages, between the checkpoint's saved config and the user's flags:
# a few epochs from a trained model at a tenth of the usual peak lr, no warm-up.
STAGE_DEFAULTS = {
    "binaryconnect": {"epochs": 5, "optim": {"lr": 0.02}, "sched": {"name": "cosine", "warmup_epochs": 0}},
    "qat": {"epochs": 5, "optim": {"lr": 0.01}, "sched": {"name": "cosine", "warmup_epochs": 0}},
}


# ------------------------------------------------------------------------------------------ conversion
def _replace_layers(model: nn.Module, make, keep: set[str] | None = None, keep_first_last: bool = True) -> list:
    """Replace every conv/linear (but the first and last, in registration order, when ``keep_first_last``)
    by ``make(layer, is_end, masked)``, which returns the new layer or None to leave it; ``masked``: the
    layer has pruned (exactly zero) weights to keep. Returns the names replaced."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if any(isinstance(m, QUANT_TYPES) for _, m in layers):
        raise EdlabError("the model is already quantized (it has binary or k-bit layers); start from a float model")
    if not layers:
        raise EdlabError("the model has no conv or linear layer to quantize")
    for n, m in layers:
        if "weight_orig" in dict(m.named_parameters(recurse=False)):
            raise EdlabError(f"layer '{n}' carries a torch.nn.utils.prune mask; make it permanent "
                             f"(torch.nn.utils.prune.remove) before quantizing")
    ends = {layers[0][0], layers[-1][0]} if keep_first_last else set()
    done = []
    for name, m in layers:
        new = make(m, name in ends, bool((m.weight == 0).any()), name)
        if new is None:
            continue
        new = new.to(device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if new.weight_mask is not None:
                new.weight_mask.copy_(m.weight != 0)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        if hasattr(new, "reset_steps"):
            new.reset_steps()
        new.train(m.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        done.append(name)
    return done


def _kwargs(m: nn.Module) -> dict:
    return conv_kwargs(m) if isinstance(m, nn.Conv2d) else linear_kwargs(m)


def binarize(model: nn.Module, keep_first_last: bool = True, scale: bool = False,
             stochastic: bool = False) -> nn.Module:
    """Replace the model's convs and linears (in place) by BinaryConnect layers that start from their weights.

    ``keep_first_last`` leaves the first and last conv/linear (the stem and the classifier) in full
    precision, as Courbariaux et al. and most binary networks do. ``scale`` multiplies each output channel's
    binary weights by alpha = mean |w| (XNOR-Net). ``stochastic`` samples the binary weights during training
    (evaluation always uses the deterministic sign). Returns the model."""

    def make(m, is_end, masked, name):
        if is_end:
            return None
        cls = BinaryConv2d if isinstance(m, nn.Conv2d) else BinaryLinear
        return cls(**_kwargs(m), stochastic=stochastic, scale=scale, masked=masked)

    _replace_layers(model, make, keep_first_last=keep_first_last)
    return model


def _check_bits(bits: int | None, what: str, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise EdlabError(f"{what} must be an integer from 2 to 16 (use binaryconnect for 1-bit weights), "
                         f"got {bits!r}")


def parse_layer_bits(spec: str | dict | None) -> list[tuple[str, int | None, int | None]]:
    """``"conv1=8,fc=8,layers.2.*=3/4"`` -> [(pattern, weight bits, activation bits)], in the given order.

    A pattern is a glob over conv/linear module names (``edlab score`` lists them), or ``first`` / ``last``;
    ``N`` sets weights and input activations to N bits, ``W/A`` sets them apart, ``A = 32`` keeps the
    activations float, and ``32`` (or ``float``) leaves the layer float. A dict {pattern: "W/A" or N} works too.
    """
    if not spec:
        return []
    items = spec.items() if isinstance(spec, dict) else \
        [part.split("=", 1) if "=" in part else (part, "") for part in str(spec).split(",") if part.strip()]
    rules = []
    for pattern, value in items:
        pattern, text = str(pattern).strip(), str(value).strip().lower()
        w_text, _, a_text = text.partition("/")
        try:
            if text in ("32", "float", "32/32"):
                rules.append((pattern, None, None))
                continue
            bw, ba = int(w_text), int(a_text or w_text)
        except ValueError:
            bw = ba = -1
        if not pattern or bw == -1:
            raise EdlabError(f"--layer-bits: '{pattern}={value}' is not PATTERN=BITS or PATTERN=W/A "
                             f"(e.g. 'first=8,last=8,layers.2.*=3/4')")
        _check_bits(bw, f"--layer-bits {pattern}: weight bits")
        if ba != 32:
            _check_bits(ba, f"--layer-bits {pattern}: activation bits")
        rules.append((pattern, bw, None if ba == 32 else ba))
    return rules


def layer_bits_plan(model: nn.Module, bits_w: int, bits_a: int | None, keep_first_last: bool = True,
                    first_last_bits: int | None = None, layer_bits: str | dict | None = None
                    ) -> dict[str, tuple[int, int | None] | None]:
    """Every conv/linear layer's (weight bits, activation bits), None = left float: the first ``layer_bits``
    rule matching its name, else ``first_last_bits`` (or float, when ``keep_first_last``) for the first and
    last layers, else the body's ``bits_w``/``bits_a``. A rule that matches no layer is an error (a typo
    must not quantize everything at the body's bits)."""
    from fnmatch import fnmatchcase

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise EdlabError("the model has no conv or linear layer to quantize")
    rules = parse_layer_bits(layer_bits)
    aliases = {"first": names[0], "last": names[-1]}
    for pattern, _, _ in rules:
        if pattern not in aliases and not any(fnmatchcase(n, pattern) for n in names):
            raise EdlabError(f"--layer-bits: '{pattern}' matches no conv/linear layer (layers: first, last, "
                             f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    plan: dict[str, tuple[int, int | None] | None] = {}
    for name in names:
        rule = next((r for r in rules if aliases.get(r[0]) == name or fnmatchcase(name, r[0])), None)
        if rule is not None:
            plan[name] = (rule[1], rule[2]) if rule[1] is not None else None
        elif name in (names[0], names[-1]) and (first_last_bits is not None or keep_first_last):
            plan[name] = (first_last_bits, first_last_bits) if first_last_bits is not None else None
        else:
            plan[name] = (bits_w, bits_a)
    return plan


def quantize_qat(model: nn.Module, bits_w: int, bits_a: int | None, keep_first_last: bool = True,
                 first_last_bits: int | None = None, layer_bits: str | dict | None = None) -> nn.Module:
    """Replace the model's convs and linears (in place) by LSQ layers with ``bits_w``-bit weights and
    ``bits_a``-bit input activations (None: activations stay float). The first and last layers stay float
    when ``keep_first_last``, or use ``first_last_bits`` for both weights and activations when given (8 is
    the usual choice: nearly free in accuracy, and the score then sees no 32-bit MAC). ``layer_bits`` gives
    any layer its own bits (:func:`parse_layer_bits`; mixed precision: e.g. 8-bit ends, a 3-bit last
    stage); each layer then carries its ``weight_bits``/``act_bits``, which the score, the checkpoint and
    the packer read. Activation steps are set by the first forward pass: run one batch of training images
    (``calibrate``) before training."""
    _check_bits(bits_w, "bits_w")
    _check_bits(bits_a, "bits_a", allow_none=True)
    _check_bits(first_last_bits, "first_last_bits", allow_none=True)
    plan = layer_bits_plan(model, bits_w, bits_a, keep_first_last, first_last_bits, layer_bits)

    def make(m, is_end, masked, name):
        if plan[name] is None:
            return None
        cls = LSQConv2d if isinstance(m, nn.Conv2d) else LSQLinear
        return cls(**_kwargs(m), bits_w=plan[name][0], bits_a=plan[name][1], masked=masked)

    _replace_layers(model, make, keep_first_last=False)
    return model


@torch.no_grad()
def dequantize_qat(model: nn.Module) -> list[tuple[str, int, int | None]]:
    """Turn a QAT model's LSQ layers back into float convs/linears holding their latent weights (in place), so
    that a lower-bit QAT stage can start from it: progressive QAT (32 -> 8 -> 4 -> 3 bits, as APoT trains),
    where each stage's steps are set afresh from the weights the previous stage learnt. Returns the bits each
    layer had (name, weight bits, activation bits)."""
    was = []
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (LSQConv2d, LSQLinear))]:
        new = nn.Conv2d(**_kwargs(m)) if isinstance(m, nn.Conv2d) else nn.Linear(**_kwargs(m))
        new = new.to(device=m.weight.device, dtype=m.weight.dtype)
        new.weight.copy_(m.weight if m.weight_mask is None else m.weight * m.weight_mask)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        new.train(m.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        was.append((name, m.weight_bits, m.act_bits))
    return was


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """One eval-mode forward pass on a batch of training images: sets the activation steps of LSQ layers."""
    was = model.training
    model.eval()
    model(x)
    model.train(was)


@torch.no_grad()
def clip_latent_(model: nn.Module) -> None:
    """After training: clip the real weights of BinaryConnect layers to [-1, 1] (the clip of the last
    optimizer step) and re-zero the pruned weights of every quantized layer."""
    for m in model.modules():
        if isinstance(m, BinaryLayer):
            m.weight.clamp_(-1, 1)
        if isinstance(m, QuantLayer):
            m.apply_mask_()
            m.drop_weight_cache()


def to_half(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the model in fp16 or bf16: parameters and buffers in that dtype (so they save as half)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise EdlabError(f"half precision means float16 or bfloat16, got {dtype}")
    return copy.deepcopy(model).to(dtype)


# ------------------------------------------------------------------------------------------- the stage
def stage_config(model: nn.Module, checkpoint: str | Path, method: str, flags: dict, sets: list[str]):
    """TrainConfig of a stage: the checkpoint's saved config (``edlab.stage.inherit_config``) < the stage's
    defaults < flags < --set."""
    from .stage import inherit_config

    spec = getattr(model, "edlab_spec", {}) or {}
    base = {"name": f"{spec.get('name', 'model')}-{method}", "model": {"checkpoint": str(checkpoint)}}
    return inherit_config(model, STAGE_DEFAULTS.get(method, {}), base, flags, sets=sets)


def _plain_batch(data, n: int) -> torch.Tensor:
    """The first ``n`` training images, normalised but not augmented (calibration data)."""
    from .augment import Augment

    images = data.train.split.images[:n]
    return Augment("none", data.mean, data.std)(images, None)


def _half(s: StageRun, source: nn.Module, method: str, options: dict) -> dict:
    """fp16/bf16: cast, evaluate (validation, then test once), save the truly half checkpoint."""
    from .evaluation import evaluate

    data, cfg = s.data, s.cfg

    model = to_half(source, torch.float16 if method == "fp16" else torch.bfloat16)
    runner, arithmetic = model, method
    if method == "fp16" and data.test.device.type == "cpu":
        # PyTorch's CPU fp16 convolutions are ~100x slower than fp32: evaluate the fp16-rounded weights with
        # fp32 arithmetic there (the rounding of the stored model), and say so
        runner, arithmetic = copy.deepcopy(model).float(), "fp32 on fp16-rounded weights (CPU)"
    val = evaluate(runner, data.val, tta=cfg.tta)["accuracy"] if data.val is not None else None
    ref_val = evaluate(source, data.val, tta=cfg.tta)["accuracy"] if data.val is not None else None
    test = final_test(runner, data, None, cfg)  # the same views as validation (cfg.tta)
    model = model.cpu()
    inference = inference_record(cfg, None, method)
    _save(s, model, test, val, options, inference)
    return {"scored": model, "test": test, "val_accuracy": val, "checkpoint": s.run.file("model.ckpt"),
            "inference": inference, "reference_tta": cfg.tta,
            "extra": {"reference_val_accuracy": ref_val, "eval_arithmetic": arithmetic}}


def _save(s: StageRun, model: nn.Module, test: dict, val: float | None, options: dict, inference: dict) -> None:
    """model.ckpt of a stage, with how its accuracy was measured (the score charges its views)."""
    entry = s.entry({k: v for k, v in options.items() if k != "source_checkpoint"}, test, inference)
    s.save(model, entry, test_accuracy=test["accuracy"], val_accuracy=val, config=s.cfg.model_dump(mode="json"),
           quantization=options, inference=inference)


def _train(s: StageRun, source: nn.Module, method: str, options: dict, **how) -> dict:
    """binaryconnect/qat: convert a copy, fine-tune with fit(), evaluate the test split once in fp32 (the
    fake-quantized arithmetic exactly as deployed; training used cfg.precision), save. On resume the
    conversion and calibration are deterministic, so redoing them and then loading the run's resume.pt
    (fit's per-epoch state) continues a killed stage."""
    from .device import resolve_precision
    from .loader import load_checkpoint
    from .train import fit

    data, run, cfg, teacher, device = s.data, s.run, s.cfg, s.teacher, s.device
    model = copy.deepcopy(source)
    if teacher is not None:
        options.update(teacher=s.leak["teacher"], teacher_val_leak=s.leak["teacher_val_leak"],
                       temperature=cfg.distill.temperature, alpha=cfg.distill.alpha)
    if method == "binaryconnect":
        options.update(keep_first_last=how["keep_first_last"], scale=how["scale"], stochastic=how["stochastic"])
        binarize(model, how["keep_first_last"], how["scale"], how["stochastic"])
    else:
        options.update(bits_w=how["bits_w"], bits_a=how["bits_a"], keep_first_last=how["keep_first_last"],
                       first_last_bits=how["first_last_bits"], layer_bits=how["layer_bits"])
        quantize_qat(model, how["bits_w"], how["bits_a"], how["keep_first_last"], how["first_last_bits"],
                     how["layer_bits"])
        calibrate(model, _plain_batch(data, min(how["calib_images"], 256)).to(device))
    state = fit(model, data, cfg, run, teacher=teacher, console=s.console, resume=s.resume)
    if cfg.keep == "best" and run.file("best.ckpt").exists():
        model = load_checkpoint(run.file("best.ckpt")).to(device)
    clip_latent_(model)
    model = model.to(memory_format=torch.contiguous_format).eval()
    if how["fold"]:  # step: fold after fine-tuning with BN (folding first made QAT diverge: docs/quantization.md)
        model = _fold(model, options)
    val = state.kept_val(cfg.keep)  # (keep: best reloaded best.ckpt above: its epoch's val, not the last's)
    test = final_test(model, data, None, cfg)  # the same views as fit's validation, fp32 arithmetic
    model = model.cpu()
    inference = inference_record(cfg, None)  # fp32 arithmetic
    _save(s, model, test, val, options, inference)
    precision = str(resolve_precision(cfg.precision, device) or "fp32").replace("torch.", "")
    return {"scored": model, "test": test, "val_accuracy": val, "checkpoint": run.file("model.ckpt"),
            "epochs": len(state.history), "inference": inference, "reference_tta": cfg.tta,
            "extra": {"best_val_accuracy": state.best_val, "training_precision": precision}}


def _fold(model: nn.Module, options: dict) -> nn.Module:
    """The BN-folded copy of ``model`` (``edlab.fold``); what was folded and what was kept go to ``options``."""
    from .fold import fold_bn

    folded, report = fold_bn(model)
    options["fold_bn"] = {"folded": len(report.folded), "kept": report.kept}
    return folded


def _int8(source: nn.Module, data, run, options: dict, console, calib_images: int, test: bool = True) -> dict:
    """int8: ONNX Runtime static quantization (edlab.export). The score is the int8 file's own, counted from
    its graph as ``edlab score model.int8.onnx`` counts it (int8 weights, uint8 activations, BN folded into
    int32 biases; ps and pu relative to the dense model the file records): one model, one reading. (It was
    counted on a torch copy with 8-bit conv/linear layers and BN unfolded, which read another score, and the
    file read ps 0.)"""
    from .export import int8_stage
    from .onnx_model import onnx_profile

    extra = int8_stage(source, data, run, calib_images=calib_images, console=console, test=test)
    options.update(extra.pop("options"))
    inference = {"tta": "none", "views": 1, "precision": "int8"}  # ONNX Runtime runs one view per image
    test = {"accuracy": extra.pop("test_accuracy"), "loss": extra.pop("test_loss")}
    return {"profile": onnx_profile(extra["onnx"]), "test": test, "val_accuracy": extra.pop("val_accuracy"),
            "checkpoint": extra["onnx"], "inference": inference, "reference_tta": "none",
            "extra": extra}


@takes(QuantizeOptions)
def quantize_checkpoint(checkpoint: str | Path, method: str | None = None, out: str | None = None,
                        sets: list[str] | tuple = (), console=None, resume: bool = False, **options) -> dict:
    """Run one quantization stage on a float32 checkpoint; write its run directory; return the summary.

    ``method`` and ``options``: the fields of edlab.options.QuantizeOptions (``bits_w``, ``bits_a``,
    ``epochs``, ``fold``, ``layer_bits``, ..., and the fine-tuning run's ``train_subset``, ``threads``,
    ``teacher``, ...). ``bits_a`` None means the same as ``bits_w`` (32: float activations). The summary holds
    the test accuracy of the result and of the float model on the same split, and the score counted on the
    result. ``resume``: continue the stage killed in ``out`` (binaryconnect/qat from their last finished epoch;
    the other methods, which do not train, are redone). ``distill`` (the float source teaches) or ``teacher``
    (a checkpoint), with ``temperature`` and ``alpha``: binaryconnect/qat fine-tune with distillation.
    ``layer_bits`` (qat): per-layer bits by name pattern, see :func:`parse_layer_bits`. ``fold``: merge the BN
    layers into the convs before them (``edlab.fold``): after fine-tuning (binaryconnect, qat) or before the
    cast (fp16, bf16, int8), so that what is tested, scored and saved is the deployment form."""
    from .loader import load_model
    from .stage import run_model_stage

    o = QuantizeOptions.of(options, method=method)
    method = o.method
    if resume and not out:
        raise EdlabError("--resume needs --out RUN_DIR: the quantize run to continue")
    source = load_model(checkpoint, refuse_onnx=f"an ONNX file cannot be quantized by --method {method} (int8 "
                        f"ONNX export is from a checkpoint: quantize the checkpoint it was exported from)")
    progressive = None
    if method == "qat" and any(isinstance(m, (LSQConv2d, LSQLinear)) for m in source.modules()) and \
            not any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in source.modules()):
        progressive = dequantize_qat(source)  # progressive QAT: this stage starts from the last one's weights
    if is_quantized(source) or \
            any(p.dtype != torch.float32 for p in source.parameters()):
        raise EdlabError(f"{checkpoint} is already quantized or half; quantize a float32 checkpoint")
    bits_a = o.bits_w if o.bits_a is None else o.bits_a
    if method == "qat":  # a bad rule fails now, before the data is loaded
        layer_bits_plan(source, o.bits_w, bits_a, o.keep_first_last, o.first_last_bits, o.layer_bits)
    flags = {**o.config_tree(), **({"out": out} if out else {})}
    cfg = stage_config(source, checkpoint, method, flags, list(sets))
    distill = o.distill
    if distill and cfg.distill.teacher:
        raise EdlabError("give --distill (the float source teaches) or --teacher CKPT, not both")
    if (distill or cfg.distill.teacher) and method not in STAGE_DEFAULTS:
        raise EdlabError(f"--distill/--teacher: method {method} does not train (use binaryconnect or qat)")
    options: dict = {"method": method, "source_checkpoint": str(checkpoint)}
    if progressive is not None:  # recorded: the stage fine-tuned a QAT model at new bits
        options["progressive_from"] = [{"layer": n, "bits_w": w, "bits_a": b} for n, w, b in progressive]
    how = dict(bits_w=o.bits_w, bits_a=o.activation_bits, keep_first_last=o.keep_first_last,
               first_last_bits=o.first_last_bits, scale=o.scale, stochastic=o.stochastic,
               calib_images=o.calib_images, layer_bits=o.layer_bits, fold=o.fold)

    def algorithm(s: StageRun, source: nn.Module) -> tuple[nn.Module, dict]:
        return source, _quantize_stage(s, source, method, options, how)

    return run_model_stage("quantize", cfg, algorithm, source, resume=resume, console=console,
                           source_teaches=distill, teacher_in_summary=False)[1]  # its teacher: in the options


def _quantize_stage(s: StageRun, source: nn.Module, method: str, options: dict, how: dict) -> dict:
    """The quantization stage's algorithm: the method, then the float source measured the same way."""
    from .evaluation import evaluate
    from .scoring import profile

    cfg, data, run = s.cfg, s.data, s.run
    if how["fold"] and method not in STAGE_DEFAULTS:  # step: BN folded into the float convs, then cast / int8
        source = _fold(source, options)
    source = source.to(s.device)
    t0 = time.perf_counter()
    if method == "int8":
        r = _int8(source, data, run, options, s.console, how["calib_images"], cfg.final_test)
    elif method in ("fp16", "bf16"):
        r = _half(s, source, method, options)
    else:
        r = _train(s, source, method, options, **how)
    seconds = time.perf_counter() - t0
    # the float source measured as the result was (same split, views and arithmetic), for the change
    reference = evaluate(source, data.test, tta=r["reference_tta"]) if cfg.final_test else {"accuracy": None}
    change = None if reference["accuracy"] is None else r["test"]["accuracy"] - reference["accuracy"]
    return {
        "method": method, "test_accuracy": r["test"]["accuracy"], "test_loss": r["test"]["loss"],
        "val_accuracy": r["val_accuracy"], "reference_test_accuracy": reference["accuracy"],
        "accuracy_change": change, "epochs": r.get("epochs", 0),
        "seconds": seconds, "device": str(s.device), "dataset": cfg.data.dataset,
        "model": getattr(source, "edlab_spec", {}).get("name"), "checkpoint": str(r["checkpoint"]),
        "options": options, "inference": r["inference"], "reference_views": TTA_VIEWS[r["reference_tta"]],
        **r["extra"], **(r.get("profile") or profile(r["scored"])).to_dict(),
    }  # the skeleton adds the command, the run folder and val_leak (this stage's teacher or an earlier one's)
