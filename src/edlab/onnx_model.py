"""ONNX files as first-class models: evaluated, scored and benchmarked through ONNX Runtime.

``edlab export`` and the int8 stage stamp each .onnx with what a reader needs besides the graph (an ``edlab``
entry in its metadata_props): the dataset and input normalisation, the input size, the source checkpoint's
config, and the inference the file runs per image. :class:`OrtModule` runs a file like an ``nn.Module`` (CPU);
:func:`onnx_profile` counts the course score from the graph itself: weights and biases of the conv and
matmul nodes at their stored bits (int8 initialisers: 8 bits, also behind a DequantizeLinear in the QDQ
format), MACs from the inferred shapes, activation bits from the tensor entering each node (uint8 in a
QOperator graph). Quantization scales and zero points are not counted, as the course rules count weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import EdlabError

_ELEM_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 1, 10: 16, 11: 64, 16: 16}  # onnx TensorProto
_CONV = {"Conv": (0, 1, 2), "ConvInteger": (0, 1, None), "QLinearConv": (0, 3, 8)}  # op -> (x, w, bias) inputs
_MATMUL = {"Gemm": (0, 1, 2), "QGemm": (0, 3, 6), "MatMul": (0, 1, None), "MatMulInteger": (0, 1, None),
           "QLinearMatMul": (0, 3, None)}
_NORMS = ("BatchNormalization", "LayerNormalization", "GroupNormalization")  # inputs 1, 2: scale, shift


def is_onnx(path: str | Path) -> bool:
    return str(path).endswith(".onnx")


def _load(path: str | Path):
    try:
        import onnx
    except ImportError:
        raise EdlabError("reading .onnx files needs onnx and onnxruntime: pip install 'edlab[onnx]'") from None
    p = Path(path)
    if not p.is_file():
        raise EdlabError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf's DecodeError and friends: one line
        raise EdlabError(f"{p} is not a valid ONNX file ({type(e).__name__})") from None


def stamp(path: str | Path, info: dict) -> None:
    """Write ``info`` (JSON) into the file's metadata_props under "edlab", replacing an earlier stamp."""
    import onnx

    from .files import atomic_write_bytes

    m = _load(path)
    for p in [p for p in m.metadata_props if p.key == "edlab"]:
        m.metadata_props.remove(p)
    entry = m.metadata_props.add()
    entry.key, entry.value = "edlab", json.dumps(info)
    atomic_write_bytes(path, onnx.ModelProto.SerializeToString(m))


def onnx_metadata(path: str | Path, model=None) -> dict:
    """The "edlab" stamp of a file ({} when it has none, e.g. an ONNX file from another tool)."""
    m = model if model is not None else _load(path)
    for p in m.metadata_props:
        if p.key == "edlab":
            try:
                value = json.loads(p.value)
            except ValueError:
                raise EdlabError(f"{path}: its edlab metadata is not valid JSON") from None
            if not isinstance(value, dict):
                return {}
            from .checkpoint import checked_metadata

            return checked_metadata(value, path)  # data from the file: checked, never followed
    return {}


def export_stamp(model: nn.Module, dataset: str | None, input_size, precision: str) -> dict:
    """What an exported file records: data, normalisation, the source's config and metadata, and its inference
    (one view per image: the exported graph is one forward pass)."""
    from .data import STATS
    from .scoring import profile

    meta = getattr(model, "edlab_metadata", None) or {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    dataset = dataset or (config.get("data") or {}).get("dataset") or "cifar10"
    mean, std = STATS.get(dataset, STATS["cifar10"])
    dense = getattr(model, "edlab_dense_reference", None)
    # ps of the source: the graph cannot show structured pruning as such (the pruned model is physically
    # smaller, and the exporter folds BN, so its parameters are not on the dense reference's footing)
    ps = profile(model, tuple(input_size), views=1).ps if dense else None
    return {"dataset": dataset, "mean": list(mean), "std": list(std), "input_size": list(input_size),
            "config": config, "dense_reference": dense, "ps": ps,
            "inference": {"tta": "none", "views": 1, "precision": precision},
            "source_test_accuracy": meta.get("test_accuracy")}


OPT_LEVELS = ("basic", "extended", "all")


def ort_session(path: str | Path, threads: int = 1, level: str = "all"):
    """An ONNX Runtime CPU session with ``threads`` threads, at graph optimisation level ALL by default (its
    NHWC transformer keeps the int8 convs channels-last, without transposes between them)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        raise EdlabError("ONNX export needs onnx and onnxruntime: pip install 'edlab[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like a model: normalised float images in, logits
    out. ``edlab_metadata`` is its stamp, so that eval finds its dataset and score its views."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        meta = onnx_metadata(path)
        self.path = str(path)
        try:
            self.session = ort_session(path, threads or torch.get_num_threads())
        except EdlabError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdlabError(f"ONNX Runtime cannot run {path}: {first}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.edlab_metadata = meta
        self.edlab_onnx = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out))


# -------------------------------------------------------------------------------------------- counting
_NUMPY_ELEM = {np.dtype("float32"): 1, np.dtype("uint8"): 2, np.dtype("int8"): 3, np.dtype("int32"): 6,
               np.dtype("int64"): 7, np.dtype("float16"): 10, np.dtype("bool"): 9}


def _run_shapes(model, graph_input, input_size, path) -> tuple[dict, dict]:
    """Shape and element type of every tensor, from one batch-of-one pass through ONNX Runtime with every node
    output exposed (ONNX's own shape inference stops at the com.microsoft int8 ops)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o for n in m.graph.node for o in n.output if o]
    known = {o.name for o in m.graph.output}
    m.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names if n not in known])
    dims = graph_input.type.tensor_type.shape.dim
    size = list(input_size) if input_size else [d.dim_value or 1 for d in dims[1:]]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {graph_input.name: np.zeros([1, *size], dtype=np.float32)})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdlabError(f"{path}: ONNX Runtime cannot run the graph to count it: {first}") from None
    shapes = {graph_input.name: [1, *size]}
    elem = {graph_input.name: 1}
    for o, v in zip(sess.get_outputs(), outs):
        v = np.asarray(v)
        shapes[o.name], elem[o.name] = list(v.shape), _NUMPY_ELEM.get(v.dtype, 1)
    return shapes, elem

def onnx_profile(path: str | Path, views: int | None = None, input_size=None):
    """The course score of an ONNX file, counted from its graph (see the module docstring)."""
    from onnx import numpy_helper

    from .scoring import RULES, Profile, Row

    model = _load(path)
    meta = onnx_metadata(path, model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs:
        raise EdlabError(f"{path}: the graph has no input")
    shapes, elem = _run_shapes(model, inputs[0], input_size, path)
    for name, t in inits.items():
        elem[name] = t.data_type
    producer = {o: n for n in graph.node for o in n.output}

    def source(name: str) -> str:
        """Through a DequantizeLinear (QDQ format) to the stored tensor or activation it reads."""
        n = producer.get(name)
        return n.input[0] if n is not None and n.op_type == "DequantizeLinear" else name

    def bits(name: str) -> int:
        return _ELEM_BITS.get(elem.get(source(name), 1), 32)

    rows, notes = [], []
    course = RULES["course"]
    n_views = views if views is not None else int((meta.get("inference") or {}).get("views") or 1)
    for node in graph.node:
        op = node.op_type
        spec = _CONV.get(op) or _MATMUL.get(op)
        if spec is None:
            continue
        xi, wi, bi = spec
        if len(node.input) <= wi:
            continue
        x_name, w_name = node.input[xi], source(node.input[wi])
        if w_name not in inits and op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            x_name, w_name = node.input[wi], source(node.input[xi])  # the weight may come first
        if w_name not in inits:
            notes.append(f"{node.name or op}: weight is not an initializer, not counted")
            continue
        w = numpy_helper.to_array(inits[w_name])
        y = shapes.get(node.output[0])
        if not y or not all(y):
            raise EdlabError(f"{path}: no inferred shape for the output of {node.name or op}")
        if op in _CONV:
            macs = math.prod(y) * math.prod(w.shape[1:])
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w.shape[1] if (op in ("Gemm", "QGemm") and trans_b) else w.shape[0]
            macs = math.prod(y) * k
        entries = [(w.size, int(np.count_nonzero(w)), bits(w_name))]
        if bi is not None and len(node.input) > bi and node.input[bi] and source(node.input[bi]) in inits:
            b = numpy_helper.to_array(inits[source(node.input[bi])])
            entries.append((b.size, b.size, bits(node.input[bi])))
        bw, ba = entries[0][2], bits(x_name)
        storage = sum(nz * b for _, nz, b in entries)
        rows.append(Row(name=node.name or op, type=op, params=sum(e[0] for e in entries),
                        nonzero=sum(e[1] for e in entries), macs=macs, ops=macs * n_views, bits_w=bw, bits_a=ba,
                        params_term=storage / 32 / course.ref_params,
                        ops_term=macs * max(bw, ba) / 32 * n_views / course.ref_ops))
    for node in graph.node:  # an unfolded norm: its scale and shift are parameters (BN's mean and variance are not)
        names = [i for i in node.input[1:3] if i]  # LayerNormalization's shift is optional
        if node.op_type in _NORMS and names and all(i in inits for i in names):
            n = sum(numpy_helper.to_array(inits[i]).size for i in names)
            rows.append(Row(name=node.name or node.op_type, type=node.op_type, params=n,
                            nonzero=n, macs=0, ops=0, bits_w=bits(node.input[1]), bits_a=None,
                            params_term=n * bits(node.input[1]) / 32 / course.ref_params, ops_term=0.0))
    if not rows:
        raise EdlabError(f"{path}: no conv or matmul node with stored weights to count")
    p_term, o_term = sum(r.params_term for r in rows), sum(r.ops_term for r in rows)
    for r in rows:
        r.share_params = r.params_term / p_term if p_term else 0.0
        r.share_ops = r.ops_term / o_term if o_term else 0.0
    params, nonzero, macs = sum(r.params for r in rows), sum(r.nonzero for r in rows), sum(r.macs for r in rows)
    weight_bits = sum(r.nonzero * (r.bits_w or 32) for r in rows) / nonzero if nonzero else 32.0
    mac_rows = [r for r in rows if r.macs]
    act_bits = sum(r.macs * r.bits_a for r in mac_rows) / macs if macs else 32.0
    notes.append("counted from the ONNX graph: BN folded into the convs by the exporter is counted as their "
                 "bias; quantization scales and zero points are not counted")
    if n_views > 1:
        notes.append(f"{n_views} forward passes per image (test-time views): f = {n_views} x the MACs of one pass")
    size = tuple(shapes[inputs[0].name][1:])
    dense, ps, pu = _fractions(meta, params, nonzero)
    return Profile(rules="course", rules_description=course.describe(), input_size=size, params=params,
                   nonzero_params=nonzero, macs=macs, ops=macs * n_views, bits_w=weight_bits, bits_a=act_bits,
                   ps=ps, pu=pu, score=p_term + o_term,
                   score_params_term=p_term, score_ops_term=o_term, rows=rows, arch_params=params, views=n_views,
                   dense=dense, formula_view=None, notes=notes)


def _fractions(meta: dict, params: int, nonzero: int) -> tuple[dict | None, float, float]:
    """(dense reference, ps, pu) of a graph: relative to the dense model its stamp records, as the checkpoint
    it was exported from reads (ps recorded at export, pu = zero weights / dense weights); a file without
    that record (another tool's, or an unpruned model's) reads ps 0 and pu relative to its own weights."""
    ref, ps = meta.get("dense_reference"), meta.get("ps")
    ok = isinstance(ref, dict) and all(isinstance(ref.get(k), int) and ref[k] > 0 for k in ("params", "macs"))
    if not ok:
        return None, 0.0, (params - nonzero) / params if params else 0.0
    ps = float(ps) if isinstance(ps, int | float) and 0 <= ps < 1 else 0.0
    return {"params": ref["params"], "macs": ref["macs"]}, ps, (params - nonzero) / ref["params"]
