"""The course efficiency score, counted from the model as it is.

    score = [1 - (ps + pu)] * (qw/32) * w / 5.6e6  +  (1 - ps) * (max(qw, qa)/32) * f / 2.8e8

The formula is written for a dense model and its compression ratios; edlab instead *counts* each term from
the model in hand: one forward pass (batch of 1, eval mode, no grad) runs under a dispatch mode that sees
every aten op executed and charges its arithmetic to the innermost module running. Nothing depends on the
layer classes, so custom layers, grouped/depthwise convs and pruned (physically smaller) models count right.

* parameter term: sum over counted parameter tensors of nonzero entries x bits / 32, divided by 5.6e6;
* ops term: sum over executed conv/linear ops of MACs x max(weight bits, activation bits) / 32, / 2.8e8.
  Zero weights are not credited in the ops term (a dense kernel still multiplies them).

Bits come from the model's own state: a module's ``weight_bits`` / ``act_bits`` attribute (its own or the
nearest enclosing module's), else the dtype of the weight and of the activation seen in the trace.
``rules="micronet"`` counts by the NeurIPS 2019 MicroNet challenge rules instead. See docs/score.md.

This module counts; the table ``edlab score`` prints is drawn by edlab.score_table, and the score of a file
(checkpoint, packed, ONNX, run folder) is read by edlab.inspect_file.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import EdlabError
from .views import TTA_VIEWS

REF_PARAMS = 5.6e6  # half of CIFAR ResNet-18's 11,173,962 parameters
REF_MACS = 2.8e8  # half of its 555,422,720 conv + linear MACs on a 32x32 image
MICRONET_REF_PARAMS = 36.5e6  # WideResNet-28-10, the MicroNet CIFAR-100 baseline
MICRONET_REF_OPS = 10.49e9  # its math operations (multiplications + additions)
OP_KINDS = ("bn", "bias", "eltwise", "pool", "act")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)  # counted like BN: scale + shift
ARCH_PARAMS = ("weight", "bias")  # what a plain conv, linear or norm layer holds: the basis of ps and pu


@dataclass(frozen=True)
class Rules:
    """What is counted and how it is weighed. ``RULES`` holds the named sets; build others for what-ifs
    with ``dataclasses.replace(RULES["course"], ops=frozenset({"eltwise"}))``."""

    name: str
    bn: str = "count"  # "count": BN scale + shift are parameters; "fold": merged into the conv before it
    biases: bool = True  # bias vectors are parameters
    ops: frozenset[str] = frozenset()  # op kinds counted besides conv/linear MACs (subset of OP_KINDS)
    all_params: bool = False  # every parameter, not only those of conv, linear and norm layers
    split_macs: bool = False  # a MAC is 1 multiplication + 1 addition, weighed separately
    sparse_ops: bool = False  # multiplications by zero weights are skipped
    mask_bits: int = 0  # storage bits per entry of a tensor that has zeros (its sparsity mask)
    free16: bool = False  # when nothing is below 16 bits, wider data counts as 16 bits
    ref_params: float = REF_PARAMS
    ref_ops: float = REF_MACS

    def describe(self) -> str:
        """The one line printed with every score, so a number never travels without its counting rules."""
        w = "all parameters" if self.all_params else "parameters of conv, linear and norm (BN, LN, GN) layers"
        w += "; BN folded into the preceding conv" if self.bn == "fold" else "; BN scale+shift counted"
        w += "" if self.biases else "; biases excluded"
        w += f"; a tensor with zeros stores nonzeros + a {self.mask_bits}-bit mask" if self.mask_bits else ""
        f = "mults + adds of conv/linear" if self.split_macs else "conv/linear MACs"
        f += " plus " + ", ".join(k for k in OP_KINDS if k in self.ops) if self.ops else ""
        f += "; zero weights skipped" if self.sparse_ops else "; zero weights not credited"
        bits = "bits/32 (ops: max of weight and activation bits)"
        if self.split_macs:
            bits = "mults at max(input bits)/32, adds at 32 bits"
        if self.free16:
            bits += "; 32-bit counted as 16 unless something is below 16 bits"
        return (
            f"{self.name}: w = {w}; f = {f}; weighed by {bits}; "
            f"score = w/{self.ref_params:.4g} + f/{self.ref_ops:.4g}"
        )


RULES: dict[str, Rules] = {
    "course": Rules("course"),
    "micronet": Rules(
        "micronet",
        bn="fold",
        ops=frozenset(OP_KINDS),
        all_params=True,
        split_macs=True,
        sparse_ops=True,
        mask_bits=1,
        free16=True,
        ref_params=MICRONET_REF_PARAMS,
        ref_ops=MICRONET_REF_OPS,
    ),
}


@dataclass
class Row:
    """One module's share: its own parameters and the ops executed while it was the innermost module."""

    name: str
    type: str
    params: int
    nonzero: int
    macs: int
    ops: int  # what f counts for this row under the rules, rounded (= macs under the course rules)
    bits_w: float | None
    bits_a: float | None
    params_term: float
    ops_term: float
    share_params: float = 0.0
    share_ops: float = 0.0


@dataclass
class Profile:
    """The counted score of one model, with the per-layer rows it is the sum of."""

    rules: str
    rules_description: str
    input_size: tuple[int, ...]
    params: int  # parameter entries counted by the rules (w)
    nonzero_params: int
    macs: int
    ops: int
    bits_w: float
    bits_a: float
    ps: float
    pu: float
    score: float
    score_params_term: float
    score_ops_term: float
    rows: list[Row]
    arch_params: int = 0  # conv/linear/BN weights and biases as they are, whatever the rules: basis of ps, pu
    views: int = 1  # forward passes per image (test-time views): f = views x macs
    dense: dict[str, int] | None = None
    formula_view: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary keys first, then rules, dense reference, formula view, notes, rows."""
        d = asdict(self)
        keys = "score score_params_term score_ops_term params nonzero_params macs views bits_w bits_a ps pu ops"
        keys += " arch_params rules rules_description input_size dense formula_view notes rows"
        return {k: d[k] for k in keys.split()}


def score(w: float, f: float, ps: float = 0.0, pu: float = 0.0, qw: float = 32, qa: float = 32) -> float:
    """The course formula on its own: dense weights w, dense MACs f, pruned fractions, bit widths."""
    if w <= 0 or f < 0:
        raise EdlabError(f"score: need w > 0 and f >= 0, got w={w}, f={f}")
    if ps < 0 or pu < 0 or ps + pu >= 1:
        raise EdlabError(f"score: need ps, pu >= 0 and ps + pu < 1, got ps={ps}, pu={pu}")
    if qw <= 0 or qa <= 0:
        raise EdlabError(f"score: bits must be > 0, got qw={qw}, qa={qa}")
    return sum(_formula_terms(w, f, ps, pu, qw, qa))


def _formula_terms(w: float, f: float, ps: float, pu: float, qw: float, qa: float) -> tuple[float, float]:
    return (1 - ps - pu) * qw / 32 * w / REF_PARAMS, (1 - ps) * max(qw, qa) / 32 * f / REF_MACS


def what_if_table(
    w: float, f: float, ps_list: Iterable[float], pu_list: Iterable[float], bits_list: Iterable[Any]
) -> list[dict[str, float]]:
    """Formula scores over a grid, to see which lever pays before training anything. An entry of bits_list
    is qw = qa = b, or a (qw, qa) pair. Combinations with ps + pu >= 1 are skipped."""
    rows = []
    for ps, pu, bits in itertools.product(list(ps_list), list(pu_list), list(bits_list)):
        qw, qa = bits if isinstance(bits, Sequence) else (bits, bits)
        if ps + pu >= 1:
            continue
        s = score(w, f, ps, pu, qw, qa)
        p, o = _formula_terms(w, f, ps, pu, qw, qa)
        rows.append({"ps": ps, "pu": pu, "qw": qw, "qa": qa, "params_term": p, "ops_term": o, "score": s})
    return rows


# ---------------------------------------------------------------- tracing

_CONV = {"convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "mkldnn_convolution"}
_CONV_T = {"convolution", "_convolution", "convolution_overrideable"}  # the ones with a `transposed` arg
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv"}  # the ops nn.Linear and matmul lower to
_ELTWISE = {"add": (0, 1), "sub": (0, 1), "rsub": (0, 1), "mul": (1, 0), "div": (1, 0)}
# (mults, adds) per element; transcendental functions count as one op (MicroNet), ReLU as one mult.
_ACT = {
    "relu": (1, 0), "hardtanh": (1, 0), "leaky_relu": (1, 0), "threshold": (1, 0), "tanh": (1, 0),
    "sigmoid": (2, 1), "silu": (3, 1), "hardsigmoid": (1, 1), "hardswish": (2, 1), "gelu": (4, 1),
    "exp": (1, 0), "clamp": (1, 0), "clamp_min": (1, 0), "clamp_max": (1, 0),  # a clamp is a hardtanh
}  # fmt: skip
_NORM = {"native_layer_norm": (2, 4), "native_group_norm": (1, 3)}  # where (weight, bias) are in the args
_WINDOW_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
}  # fmt: skip
_AVERAGE = {"mean", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d"}
_REDUCE = _AVERAGE | {"sum", "adaptive_max_pool2d", "adaptive_max_pool3d", "amax"}
_FREE = {  # data movement and allocation: no arithmetic
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "clone",
    "copy", "detach", "alias", "lift_fresh", "_to_copy", "contiguous", "flatten", "unsqueeze", "squeeze",
    "select", "slice", "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "as_strided",
    "index_select", "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like",
    "full", "fill", "zero", "new_empty", "new_zeros", "constant_pad_nd", "randn", "native_dropout", "dropout",
    "_local_scalar_dense",
}  # fmt: skip


def _norm_ops(numel: int, n: int, weight: bool, bias: bool) -> tuple[int, int]:
    """(mults, adds) of a LayerNorm/GroupNorm over ``numel`` elements in groups of ``n``: per group a mean
    (n - 1 adds, 1 division), centring (n subtractions), a variance (n squares, n - 1 adds, 1 division),
    eps and rsqrt (1 add, 1 op); per element the normalisation (1 mult), then the affine scale and shift
    (1 mult, 1 add) where the layer has them. BatchNorm at inference is only the affine part (its statistics
    are constants): 1 mult + 1 add per element."""
    groups = numel // n if n else 0
    mults = groups * (2 * n + 3) + numel * weight
    adds = groups * (3 * n - 1) + numel * bias
    return mults, adds


@dataclass
class _Count:
    macs: int = 0
    mac_mults: float = 0.0  # multiplications of the MAC ops, zero weights removed if the rules say so
    mac_adds: float = 0.0  # their additions: n - 1 per dot product of length n
    ew_mults: float = 0.0  # counted elementwise / pooling / activation ops
    ew_adds: float = 0.0
    ew_units: float = 0.0  # the same as MAC-equivalents (one fused multiply-add = 1) for the course view
    bits_mac: float = 0.0  # widest activation seen entering a MAC op
    bits_ew: float = 0.0
    weight_op: bool = False  # ran a conv, matmul or norm itself: a "weight layer"


def _dtype_bits(dtype: torch.dtype) -> int:
    if dtype.is_floating_point:
        return torch.finfo(dtype).bits
    return torch.iinfo(dtype).bits if dtype != torch.bool else 1


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


class _Tracer(TorchDispatchMode):
    """Charges the arithmetic of each executed aten op to the innermost running module (``stack[-1]``,
    kept by a pre-hook and a hook on every module). Only top-level ops reach a dispatch mode, so a kernel
    that calls other ops internally is counted once."""

    def __init__(self, rules: Rules, density: dict[str, float], act_attr: dict[str, int | None],
                 bits_a: int | None):  # fmt: skip
        super().__init__()
        self.rules, self.density, self.act_attr, self.bits_a = rules, density, act_attr, bits_a
        self.stack = [""]
        self.counts: dict[str, _Count] = {}
        self.folded: dict[str, bool] = {}  # BN folded into the op before it -> that op had a bias
        self.last_weight_op: tuple[torch.Tensor, bool] | None = None
        self.uncounted: set[str] = set()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled inside a trace. Without this, torch wraps __torch_dispatch__ in a dynamo guard
        # whose first call imports torch._dynamo: over a second, once per process.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1].rstrip("_")
        module = self.stack[-1]
        c = self.counts.setdefault(module, _Count())
        y = out[0] if isinstance(out, (tuple, list)) else out
        if name in _CONV:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 and isinstance(args[2], torch.Tensor) else None
            transposed = name in _CONV_T and len(args) > 6 and args[6] is True
            taps = math.prod(w.shape[1:])
            self._macs(c, module, (x.numel() if transposed else y.numel()) * taps, y, x, bias is not None)
        elif name in _MATMUL:
            x = args[1] if name.startswith(("add", "badd")) else args[0]
            self._macs(c, module, y.numel() * x.shape[-1], y, x, x is not args[0])
        elif "batch_norm" in name:
            c.weight_op = True
            prev = self.last_weight_op
            if self.rules.bn == "fold" and prev is not None and _same(prev[0], args[0]):
                self.folded[module] = prev[1]
                self._ew(c, module, "bias", 0, 0 if prev[1] else y.numel(), y)
            else:
                self._ew(c, module, "bn", y.numel(), y.numel(), y)
        elif name in _NORM:  # statistics computed at run time: nothing to fold, the whole norm is charged
            c.weight_op = True
            x, (weight, bias) = args[0], (args[i] for i in _NORM[name])
            n = x.numel() // (x.shape[0] * args[6]) if name == "native_group_norm" else math.prod(args[1])
            mults, adds = _norm_ops(y.numel(), n, weight is not None, bias is not None)
            self._ew(c, module, "bn", mults, adds, y)
        elif name in _ELTWISE:
            mults, adds = _ELTWISE[name]
            self._ew(c, module, "eltwise", mults * y.numel(), adds * y.numel(), y)
        elif name in _ACT:
            mults, adds = _ACT[name]
            self._ew(c, module, "act", mults * y.numel(), adds * y.numel(), y)
        elif name in _WINDOW_POOL:
            k = args[1] if len(args[1]) == y.dim() - 2 else list(args[1]) * (y.dim() - 2)
            taps, avg = math.prod(k), name.startswith("avg")
            self._ew(c, module, "pool", y.numel() * avg, y.numel() * (taps - 1), y)
        elif name in _REDUCE:
            mean = name in _AVERAGE
            self._ew(c, module, "pool", y.numel() * mean, args[0].numel() - y.numel(), y)
        elif name not in _FREE:
            self.uncounted.add(name)
        return out

    def _act_bits(self, module: str, t: torch.Tensor) -> float:
        if self.bits_a is not None:
            return self.bits_a
        attr = self.act_attr.get(module)
        return attr if attr is not None else _dtype_bits(t.dtype)

    def _macs(self, c: _Count, module: str, macs: int, y: torch.Tensor, x: torch.Tensor, bias: bool) -> None:
        c.weight_op = True
        c.macs += macs
        c.bits_mac = max(c.bits_mac, self._act_bits(module, x))
        mults = macs * (self.density.get(module, 1.0) if self.rules.sparse_ops else 1.0)
        c.mac_mults += mults
        c.mac_adds += max(mults - y.numel(), 0)
        if bias:
            self._ew(c, module, "bias", 0, y.numel(), y)
        self.last_weight_op = (y, bias)

    def _ew(self, c: _Count, module: str, kind: str, mults: float, adds: float, y: torch.Tensor) -> None:
        if kind not in self.rules.ops or mults + adds == 0:
            return
        c.ew_mults += mults
        c.ew_adds += adds
        c.ew_units += max(mults, adds)
        c.bits_ew = max(c.bits_ew, self._act_bits(module, y))


def _inherited(model: nn.Module, attr: str) -> dict[str, int | None]:
    """Module name -> the attribute on it or on its nearest enclosing module (so a wrapper or the whole
    model can declare bits for everything inside it)."""
    found: dict[str, int | None] = {}
    for name, m in model.named_modules():
        value = getattr(m, attr, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise EdlabError(f"{name or 'model'}.{attr} must be a positive int, got {value!r}")
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        found[name] = value if value is not None else (found.get(parent) if name else None)
    return found


def _own_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, effective tensor) of a module's own parameters. torch.nn.utils.prune keeps the dense tensor as
    ``weight_orig`` and applies a mask; the weight in use is the module's ``weight`` attribute."""
    out = []
    for pname, p in module.named_parameters(recurse=False):
        if pname.endswith("_orig") and isinstance(getattr(module, pname[:-5], None), torch.Tensor):
            pname, p = pname[:-5], getattr(module, pname[:-5])
        out.append((pname, p.detach()))
    return out


def _run(model: nn.Module, input_size: tuple[int, ...], make: Any) -> _Tracer:
    """One forward pass of a batch of 1 under the tracer, in eval mode and no_grad, on the model's device;
    each module's training flag is restored afterwards. CPU fp16 kernels are slow, so a CPU fp16 model is
    traced with bf16 stand-ins for its tensors (same width, same ops; the model itself is not touched)."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    tracer = make()

    def leave(_m: nn.Module, _i: Any, _o: Any) -> None:
        tracer.stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: tracer.stack.append(n)))
        handles.append(m.register_forward_hook(leave, always_call=True))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if device.type == "cpu" and dtype == torch.float16:
                try:
                    named = itertools.chain(model.named_parameters(), model.named_buffers())
                    swap = {k: v.to(torch.bfloat16) if v.dtype == torch.float16 else v for k, v in named}
                    with tracer:
                        torch.func.functional_call(model, swap, (x.to(torch.bfloat16),))
                    return tracer
                except Exception:
                    tracer = make()  # fall back to the real fp16 kernels below
            with tracer:
                model(x.to(device=device, dtype=dtype))
        return tracer
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdlabError(f"cannot trace the model at input size {tuple(input_size)}: {first}") from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def dense_reference_of(model: nn.Module, dense: Any = None) -> dict[str, int] | None:
    """The dense reference ps and pu are counted against, checked: ``dense`` ({"params", "macs"} or a
    Profile), else the model's ``edlab_dense_reference``; None when there is neither."""
    ref = dense if dense is not None else getattr(model, "edlab_dense_reference", None)
    if ref is None:
        return None
    if isinstance(ref, Profile):
        return {"params": ref.arch_params, "macs": ref.macs}
    if not isinstance(ref, Mapping) or not all(
        isinstance(ref.get(k), int) and ref[k] > 0 for k in ("params", "macs")
    ):
        raise EdlabError(f"dense reference must be {{'params': int > 0, 'macs': int > 0}}, got {ref!r}")
    return {"params": int(ref["params"]), "macs": int(ref["macs"])}


def profile(
    model: nn.Module,
    input_size: Sequence[int] = (3, 32, 32),
    rules: str | Rules = "course",
    bits_w: int | None = None,
    bits_a: int | None = None,
    dense: Mapping[str, int] | Profile | None = None,
    views: int | None = None,
) -> Profile:
    """Count the score of ``model`` as it is (see the module docstring and docs/score.md).

    ``views`` is the number of forward passes an image costs at inference (test-time views): it multiplies
    f, because a score describes the inference that produced the accuracy printed beside it. None reads it
    from the model's recorded inference (:func:`views_of`: a checkpoint's metadata), else 1.

    ``bits_w``/``bits_a`` override every layer's bits, for what-if estimates only. ``dense`` is the
    reference of the model this one was derived from ({"params", "macs"}, or its Profile); it defaults to
    ``model.edlab_dense_reference``, which the pruning code sets, and only feeds ps and the formula view.
    """
    rule = RULES.get(rules) if isinstance(rules, str) else rules
    if not isinstance(rule, Rules):
        raise EdlabError(f"unknown rules '{rules}' (choices: {', '.join(RULES)})")
    if not rule.ops <= set(OP_KINDS) or rule.bn not in ("count", "fold"):
        raise EdlabError(f"rules '{rule.name}': ops must be among {OP_KINDS} and bn 'count' or 'fold'")
    for label, b in (("bits_w", bits_w), ("bits_a", bits_a)):
        if b is not None and (not isinstance(b, int) or b < 1):
            raise EdlabError(f"{label} must be a positive int, got {b!r}")
    if not input_size or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise EdlabError(f"input_size must be positive ints (C, H, W), got {input_size!r}")
    ref = dense_reference_of(model, dense)
    n_views = views_of(model) if views is None else views
    if not isinstance(n_views, int) or isinstance(n_views, bool) or n_views < 1:
        raise EdlabError(f"views must be a positive int (forward passes per image), got {n_views!r}")
    w_attr, a_attr = _inherited(model, "weight_bits"), _inherited(model, "act_bits")
    modules = dict(model.named_modules())
    own = {n: _own_params(m) for n, m in modules.items()}
    # Only conv/linear weights can be sparse: a zero BN shift or bias is a value (BN shifts start at 0).
    nnz = {n: int(torch.count_nonzero(t)) for n, ts in own.items() for p, t in ts if p == "weight"}
    density = {n: nnz[n] / t.numel() for n, ts in own.items() for p, t in ts if p == "weight" and t.numel()}
    tracer = _run(model, tuple(input_size), lambda: _Tracer(rule, density, a_attr, bits_a))

    def tensor_bits(name: str, pname: str, t: torch.Tensor) -> int:
        if bits_w is not None:
            return bits_w
        attr = w_attr[name] if pname == "weight" else None
        return attr if attr is not None else _dtype_bits(t.dtype)

    # Counted parameter tensors per module: (entries, nonzero, bits). The architecture's params (conv, linear
    # and BN as they are) and its pruned zeros are summed apart, so that ps and pu do not depend on the rules.
    stored: dict[str, list[tuple[int, int, int]]] = {}
    arch = zeros = 0
    for name, m in modules.items():
        c = tracer.counts.get(name, _Count())
        mac_layer = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or c.macs > 0
        weight_layer = mac_layer or c.weight_op or isinstance(m, NORM_LAYERS)
        nonzero = {p: nnz[name] if p == "weight" and mac_layer else t.numel() for p, t in own[name]}
        if weight_layer:  # the architecture is weights and biases: a quantizer's step sizes are not (ps >= 0)
            arch += sum(t.numel() for p, t in own[name] if p in ARCH_PARAMS)
            zeros += sum(t.numel() - nonzero[p] for p, t in own[name] if p in ARCH_PARAMS)
        if not (weight_layer or rule.all_params):
            continue
        entries = []
        for pname, t in own[name]:
            if pname == "bias" and not rule.biases:
                continue
            if name in tracer.folded:  # scale merged into the conv; shift becomes its bias (if it had none)
                if pname == "bias" and not tracer.folded[name]:
                    entries.append((t.numel(), t.numel(), tensor_bits(name, pname, t)))
                continue
            entries.append((t.numel(), nonzero[pname], tensor_bits(name, pname, t)))
        stored[name] = entries
    all_bits = [b for es in stored.values() for n, _, b in es if n]
    all_bits += [b for c in tracer.counts.values() for b in (c.bits_mac, c.bits_ew) if b]
    free = rule.free16 and min(all_bits, default=32) >= 16

    rows = []
    for name, m in modules.items():
        c, entries = tracer.counts.get(name, _Count()), stored.get(name, [])
        if not entries and not (c.macs or c.ew_units):
            continue
        weight = dict(own[name]).get("weight")
        bw = tensor_bits(name, "weight", weight) if weight is not None else None
        if bw is None and entries:
            bw = entries[0][2]
        storage = 0.0
        for n, nz, b in entries:
            storage += nz * (min(b, 16) if free else b) + (n * rule.mask_bits if nz < n else 0)
        mb = max(bw or 0, c.bits_mac)
        if rule.split_macs:
            if bw == 1 and a_attr[name] is None and bits_a is None:
                mb = 1  # binary weight times a sign-bit (float) activation: a sign flip, 1/32 op (MicroNet)
            eb = min(c.bits_ew, 16) if free else c.bits_ew
            mb = min(mb, 16) if free else mb
            ops = c.mac_mults + c.mac_adds + c.ew_mults + c.ew_adds
            weighted = c.mac_mults * mb / 32 + c.ew_mults * eb / 32 + c.mac_adds + c.ew_adds
        else:
            ops = c.macs + c.ew_units
            weighted = c.macs * mb / 32 + c.ew_units * c.bits_ew / 32
        rows.append(Row(
            name=name or "(model)", type=type(m).__name__, params=sum(e[0] for e in entries),
            nonzero=sum(e[1] for e in entries), macs=c.macs, ops=round(ops * n_views), bits_w=bw,
            bits_a=(c.bits_mac if c.macs else c.bits_ew) or None,
            params_term=storage / 32 / rule.ref_params, ops_term=weighted * n_views / rule.ref_ops,
        ))  # fmt: skip

    p_term, o_term = sum(r.params_term for r in rows), sum(r.ops_term for r in rows)
    for r in rows:
        r.share_params = r.params_term / p_term if p_term else 0.0
        r.share_ops = r.ops_term / o_term if o_term else 0.0
    params, nonzero = sum(r.params for r in rows), sum(r.nonzero for r in rows)
    macs = sum(r.macs for r in rows)
    nz_bits = sum(nz * b for es in stored.values() for _, nz, b in es)
    q_w = nz_bits / nonzero if nonzero else float(bits_w or 32)
    mac_rows = [r for r in rows if r.macs]
    q_a = sum(r.macs * r.bits_a for r in mac_rows) / macs if macs else float(bits_a or 32)
    dense_w = ref["params"] if ref else arch
    ps, pu = 1 - arch / dense_w if dense_w else 0.0, zeros / dense_w if dense_w else 0.0
    ps = max(ps, 0.0)  # a reference counted by an older edlab (step sizes included) can sit a hair below

    notes = []
    view = None
    if not rule.split_macs and dense_w:
        dense_f = ref["macs"] if ref else macs
        fp, fo = _formula_terms(dense_w, dense_f * n_views, ps, pu, q_w, q_a)
        view = {"w": dense_w, "f": dense_f * n_views, "ps": ps, "pu": pu, "qw": q_w, "qa": q_a,
                "ps_macs": 1 - macs / dense_f if dense_f else 0.0,
                "params_term": fp, "ops_term": fo, "score": fp + fo}  # fmt: skip
        if abs(view["ps_macs"] - ps) > 1e-3:
            notes.append(
                f"formula view applies (1 - ps) = {1 - ps:.4f} to f, but the MACs executed are "
                f"{1 - view['ps_macs']:.4f} of the dense f: the counted ops term is the exact one"
            )
    if n_views > 1:
        notes.append(f"{n_views} forward passes per image (test-time views): f = {n_views} x the MACs of one pass")
    if free:
        notes.append("MicroNet 16-bit freebie applied: nothing is below 16 bits, so wider data counts as 16")
    skipped = sum(t.numel() for n, ts in own.items() if n not in stored for _, t in ts)
    if skipped:
        notes.append(
            f"{skipped:,} parameters outside conv, linear and norm layers are not counted by these rules"
        )
    if tracer.uncounted:
        notes.append("ops executed but not counted: " + ", ".join(sorted(tracer.uncounted)))
    return Profile(
        rules=rule.name, rules_description=rule.describe(), input_size=tuple(input_size), params=params,
        nonzero_params=nonzero, macs=macs, ops=sum(r.ops for r in rows), bits_w=q_w, bits_a=q_a, ps=ps, pu=pu,
        score=p_term + o_term, score_params_term=p_term, score_ops_term=o_term, rows=rows, arch_params=arch,
        views=n_views, dense=ref, formula_view=view, notes=notes,
    )  # fmt: skip


def views_of(model: nn.Module) -> int:
    """Forward passes per image of the inference recorded with the model: the ``inference.views`` of its
    checkpoint metadata, else the views of the ``tta`` its saved config evaluated with, else 1."""
    meta = getattr(model, "edlab_metadata", None)
    meta = meta if isinstance(meta, dict) else {}
    inference = meta.get("inference")
    if isinstance(inference, dict) and isinstance(inference.get("views"), int) and inference["views"] >= 1:
        return inference["views"]
    config = meta.get("config")
    tta = config.get("tta") if isinstance(config, dict) else None
    return TTA_VIEWS.get(tta, 1) if isinstance(tta, str) else 1


def dense_reference(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> dict[str, int]:
    """What pruning code stores as ``model.edlab_dense_reference`` before it removes anything."""
    p = profile(model, input_size)
    return {"params": p.arch_params, "macs": p.macs}


def parse_size(text: str | Sequence[int]) -> tuple[int, ...]:
    """"3,32,32" (or a sequence) -> (3, 32, 32): the C,H,W of one input image."""
    try:
        size = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise EdlabError(f"--input-size expects C,H,W (e.g. 3,32,32), got '{text}'")
    return size
