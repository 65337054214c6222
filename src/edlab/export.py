"""ONNX export, and post-training static int8 that really runs faster, through ONNX Runtime.

What makes ONNX Runtime fast in int8 on an x86 CPU (measured in docs/quantization.md):

* **uint8 activations x int8 weights (U8S8).** ORT's MLAS kernels use AVX512-VNNI (``vpdpbusd``: unsigned x
  signed bytes) or AMX for U8S8 only; signed activations (S8S8, ``quantize_static``'s default) have VNNI
  kernels only on CPUs with AVX-VNNI-INT8, and elsewhere are several times slower.
* **QOperator format** (QLinearConv, QLinearAdd, QLinearGlobalAveragePool): the whole network stays in
  uint8 between layers. The QDQ format reaches the same kernels after ORT fuses the QuantizeLinear /
  DequantizeLinear pairs, but leaves a little glue; both are offered.
* **Graph optimisation level ALL**: its NHWC transformer runs the quantized convs in channels-last with no
  transposes between them.
* **BN folded into the conv** before quantization: the exporter folds it in eval mode with
  ``do_constant_folding``, and ``quant_pre_process`` (shape inference + ORT's optimizer) cleans the graph.
* per-channel weight scales for accuracy; ``reduce_range`` (7-bit) is only for CPUs without VNNI, whose
  non-VNNI U8S8 path can saturate: off by default.

Calibration reads training images (never test images), normalised and unaugmented.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EdlabError
from .onnx_model import export_stamp, ort_session, stamp
from .runs import check_out_path

QUANT_FORMATS = ("qoperator", "qdq")


def _require_ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise EdlabError("ONNX export needs onnx and onnxruntime: pip install 'edlab[onnx]'") from None
    return onnxruntime


def _images(batches: Iterable, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` images from an iterable of tensors or (images, labels) pairs, as float32 numpy batches."""
    out, n = [], 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        x = x[: limit - n].detach().float().cpu().contiguous().numpy()
        out.append(x)
        n += len(x)
        if n >= limit:
            break
    if not out:
        raise EdlabError("int8 export needs calibration images (calib_loader gave none)")
    return out


def _export_fp32(model: nn.Module, path: Path, input_size: tuple[int, ...]) -> None:
    """Eval-mode export with constant folding (BN folded into the convs), dynamic batch size."""
    m = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(2, *input_size)
    kw = dict(input_names=["input"], output_names=["logits"], do_constant_folding=True, opset_version=17)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but exact and 20x faster here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(m, (x,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
        except Exception:  # a torch without the TorchScript exporter: the dynamo one
            torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **kw)


def export_onnx(model: nn.Module, path: str | Path, int8: bool = False, calib_loader: Iterable | None = None,
                calib_images: int = 1024, input_size: tuple[int, ...] = (3, 32, 32),
                quant_format: str = "qoperator", per_channel: bool = True, reduce_range: bool = False,
                activations: str = "uint8", dataset: str | None = None) -> Path:
    """Write ``model`` as ONNX (input "input": N x C x H x W float32 normalised images, output "logits").

    ``int8``: post-training static quantization with ONNX Runtime, calibrated (min/max) on up to
    ``calib_images`` images of ``calib_loader`` (training images: tensors or (images, labels) batches), uint8
    activations and int8 weights (see the module docstring for why those choices; ``activations="int8"`` is
    quantize_static's default, fast on ARM with I8MM and on x86 with AVX-VNNI-INT8 only). The file is stamped
    with its dataset, input normalisation and source config (edlab.onnx_model), so that edlab eval, score and
    bench read it like a checkpoint."""
    info = export_stamp(model, dataset, input_size, "int8" if int8 else "fp32")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if quant_format not in QUANT_FORMATS:
        raise EdlabError(f"unknown quant format '{quant_format}' (choices: {', '.join(QUANT_FORMATS)})")
    if activations not in ("uint8", "int8"):
        raise EdlabError(f"activations must be uint8 or int8, got '{activations}'")
    for m in model.modules():  # LSQ layers set their activation steps on the first batch, not while exporting
        if hasattr(m, "act_ready") and not bool(m.act_ready):
            raise EdlabError("the model has uncalibrated k-bit layers: run one batch through it first "
                             "(edlab.quantize.calibrate)")
    if not int8:
        _require_ort()
        _export_fp32(model, path, input_size)
        stamp(path, info)
        return path
    _require_ort()
    if calib_loader is None:
        raise EdlabError("int8 export needs calibration images (calib_loader)")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = _images(calib_loader, calib_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        _export_fp32(model, fp32, input_size)
        quant_pre_process(str(fp32), str(pre))
        fmt = QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ
        act = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
        quantize_static(str(pre), str(path), Reader(), quant_format=fmt, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=act, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    stamp(path, info)
    return path


def ort_evaluate(session, loader) -> dict:
    """Mean cross-entropy and accuracy of an ONNX Runtime session over a loader of (images, labels)."""
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = torch.from_numpy(session.run(None, {"input": x.float().cpu().contiguous().numpy()})[0])
        y = y.cpu()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return {"loss": loss / max(1, n), "accuracy": correct / max(1, n)}


def latency_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds (median: robust to a machine shared with other jobs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def compare_latency(model: nn.Module, fp32_onnx: str | Path, int8_onnx: str | Path, batch: int = 64,
                    threads: int = 1, reps: int = 20, input_size: tuple[int, ...] = (3, 32, 32)) -> dict:
    """Latency (ms per batch) of PyTorch fp32, ORT fp32 and ORT int8 on the same input, same thread count."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    m = copy.deepcopy(model).float().cpu().eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            t_torch = latency_ms(lambda: m(x), reps)
    finally:
        torch.set_num_threads(before)
    s32, s8 = ort_session(fp32_onnx, threads), ort_session(int8_onnx, threads)
    t32 = latency_ms(lambda: s32.run(None, {"input": xn}), reps)
    t8 = latency_ms(lambda: s8.run(None, {"input": xn}), reps)
    return {"batch": batch, "threads": threads, "torch_fp32_ms": t_torch, "ort_fp32_ms": t32, "ort_int8_ms": t8,
            "speedup_vs_torch_fp32": t_torch / t8, "speedup_vs_ort_fp32": t32 / t8}


def plain_batches(data, n: int, batch: int = 256):
    """The first ``n`` training images, normalised, unaugmented, in batches (calibration data)."""
    from .augment import Augment

    plain = Augment("none", data.mean, data.std)
    images = data.train.split.images[:n]
    for i in range(0, len(images), batch):
        yield plain(images[i:i + batch], None)


def int8_stage(model: nn.Module, data, run, calib_images: int = 1024, quant_format: str = "qoperator",
               per_channel: bool = True, reduce_range: bool = False, batch: int = 64, threads: int = 1,
               console=None, test: bool = True) -> dict:
    """The ``edlab quantize --method int8`` stage: export fp32 and int8 ONNX into the run directory, measure
    ORT accuracy (validation, then test once per model, unless ``test`` is off) and latency against fp32.
    Returns summary fields."""
    fp32_path, int8_path = run.file("model.fp32.onnx"), run.file("model.int8.onnx")
    dataset = getattr(data, "dataset", None)
    export_onnx(model, fp32_path, dataset=dataset)
    export_onnx(model, int8_path, int8=True, calib_loader=plain_batches(data, calib_images),
                calib_images=calib_images, quant_format=quant_format, per_channel=per_channel,
                reduce_range=reduce_range, dataset=dataset)
    s32, s8 = ort_session(fp32_path, threads), ort_session(int8_path, threads)
    val = ort_evaluate(s8, data.val) if data.val is not None else {"accuracy": None}
    untested = {"accuracy": None, "loss": None}
    test8, test32 = (ort_evaluate(s8, data.test), ort_evaluate(s32, data.test)) if test else (untested, untested)
    lat = compare_latency(model, fp32_path, int8_path, batch=batch, threads=threads)
    if console is not None:
        console.print(f"int8 latency at batch {batch}, {threads} thread(s): {lat['ort_int8_ms']:.1f} ms vs "
                      f"{lat['torch_fp32_ms']:.1f} ms PyTorch fp32 ({lat['speedup_vs_torch_fp32']:.2f}x), "
                      f"{lat['ort_fp32_ms']:.1f} ms ORT fp32 ({lat['speedup_vs_ort_fp32']:.2f}x)")
    return {"onnx": str(int8_path), "onnx_fp32": str(fp32_path), "test_accuracy": test8["accuracy"],
            "test_loss": test8["loss"], "val_accuracy": val["accuracy"],
            "ort_fp32_test_accuracy": test32["accuracy"], "latency": lat,
            "options": {"calib_images": calib_images, "quant_format": quant_format, "per_channel": per_channel,
                        "reduce_range": reduce_range, "activations": "uint8", "weights": "int8"}}


def export_checkpoint(checkpoint: str, fmt: str = "onnx", int8: bool = False, calib_images: int = 1024,
                      quant_format: str = "qoperator", per_channel: bool = True, reduce_range: bool = False,
                      out: str | None = None, dataset: str | None = None, data_dir: str | None = None,
                      do_eval: bool = True, threads: int = 1) -> dict:
    """``edlab export`` as a call: write a checkpoint as ONNX (``int8``: static int8, calibrated on
    ``calib_images`` training images) and, with ``do_eval``, measure its test accuracy under ONNX Runtime.
    ``out``: the .onnx file, or a folder for model[.int8].onnx (default: next to the checkpoint). Returns
    {path, bytes, test_accuracy, images} (the last two None without ``do_eval``)."""
    from .config import DATASETS
    from .data import get_data
    from .loader import load_checkpoint

    if fmt != "onnx":
        raise EdlabError(f"unknown export format '{fmt}' (choices: onnx)")
    if dataset is not None and dataset not in DATASETS:
        raise EdlabError(f"unknown dataset '{dataset}' (choices: {', '.join(DATASETS)})")
    if calib_images < 1 or threads < 1:
        raise EdlabError("--calib-images and --threads must be >= 1")
    _require_ort()
    model = load_checkpoint(checkpoint)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # a half checkpoint exports as fp32 (ONNX Runtime's CPU kernels are fp32/int8)
    cfg = getattr(model, "edlab_metadata", {}).get("config") or {}
    data = None
    path = Path(out) if out else Path(checkpoint).with_suffix(".int8.onnx" if int8 else ".onnx")
    if out and (path.is_dir() or path.suffix != ".onnx"):  # a folder (e.g. a pipeline stage's): file inside it
        check_out_path(path, "--out")  # a file that is not .onnx: one line, before any work
        path = path / ("model.int8.onnx" if int8 else "model.onnx")
    if int8 or do_eval:  # the data the user names (or the default): never a folder the checkpoint's config names
        d = cfg.get("data", {})
        data = get_data(dataset or d.get("dataset", "cifar10"), data_dir, batch_size=256,
                        augment="none", val_size=0, eval_batch_size=500)
    export_onnx(model, path, int8=int8, calib_loader=plain_batches(data, calib_images) if int8 else None,
                calib_images=calib_images, quant_format=quant_format, per_channel=per_channel,
                reduce_range=reduce_range, dataset=dataset or (cfg.get("data") or {}).get("dataset"))
    result = {"path": str(path), "bytes": path.stat().st_size, "test_accuracy": None, "images": None}
    if do_eval:
        r = ort_evaluate(ort_session(path, threads), data.test)
        result.update(test_accuracy=r["accuracy"], images=len(data.test.split))
    return result
