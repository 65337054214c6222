"""Measured inference latency and throughput, against the dense parent: does pruning make it faster?

Counted MACs say what a model should cost; only a clock says what it costs on this machine. Each
measurement is the median over ``repeats`` timed runs, after warm-up, in eval mode under
``torch.inference_mode`` (CUDA: synchronised before and after each run). A run of a fast model repeats the
forward pass until it lasts ~10 ms, so the timer's resolution never dominates. When a parent is given, the
two models are measured alternately, run by run, so a change in the machine's load hits both alike and the
ratio stays fair on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from .errors import EdlabError


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdlabError(f"device '{name}' requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise EdlabError(f"unknown device '{name}' (choices: auto, cpu, cuda, cuda:N)")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(model: nn.Module, x: torch.Tensor, device: torch.device):
    """A callable that runs ``number`` forward passes and returns the seconds they took."""

    def run(number: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(number):
            model(x)
        _sync(device)
        return time.perf_counter() - t

    return run


def compare(models: dict[str, nn.Module], batch_sizes: Sequence[int] = (1, 32), threads: int | None = None,
            repeats: int = 20, device: str | None = "cpu", input_size: Sequence[int] = (3, 32, 32),
            warmup: int = 3, min_run_s: float = 0.01) -> list[dict]:
    """Latency of several models, measured alternately run by run. One row per (model, batch size):
    ``latency_ms`` (median per batch), ``p10_ms``/``p90_ms``, ``images_per_s``, plus the conditions."""
    if not models:
        raise EdlabError("nothing to benchmark")
    if not batch_sizes or min(batch_sizes) < 1:
        raise EdlabError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if repeats < 1:
        raise EdlabError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise EdlabError(f"threads must be >= 1, got {threads}")
    dev = _device(device)
    modes = {m: m.training for model in models.values() for m in model.modules()}
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                timers, numbers, times = {}, {}, {}
                for name, m in models.items():
                    m.eval().to(dev)
                    dtype = next(m.parameters(), torch.empty(0)).dtype  # ONNX Runtime: fp32 in
                    x = torch.randn(bs, *input_size, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
                    timers[name] = _timer(m, x, dev)
                    for _ in range(warmup):
                        timers[name](1)
                    one = max(timers[name](1), 1e-6)
                    numbers[name] = max(1, int(min_run_s / one))
                    times[name] = []
                for _ in range(repeats):
                    for name in models:
                        times[name].append(timers[name](numbers[name]) / numbers[name])
                for name in models:
                    t = sorted(times[name])
                    med = statistics.median(t)
                    rows.append({
                        "model": name, "batch_size": bs, "latency_ms": 1e3 * med,
                        "p10_ms": 1e3 * t[int(0.1 * (len(t) - 1))], "p90_ms": 1e3 * t[int(0.9 * (len(t) - 1))],
                        "images_per_s": bs / med, "repeats": repeats, "runs_per_repeat": numbers[name],
                        "threads": torch.get_num_threads() if dev.type == "cpu" else None, "device": str(dev),
                    })
    finally:
        torch.set_num_threads(before)
        for m, mode in modes.items():
            m.training = mode
    for r in rows:  # speed-up against the first model named "parent" (or the first model), same batch size
        base = next((b for b in rows if b["batch_size"] == r["batch_size"] and b["model"] == "parent"), None)
        if base is not None:
            r["speedup"] = base["latency_ms"] / r["latency_ms"]
    return rows


def benchmark(model: nn.Module, batch_sizes: Sequence[int] = (1, 32), threads: int | None = None,
              repeats: int = 20, device: str | None = "cpu", input_size: Sequence[int] = (3, 32, 32)) -> list[dict]:
    """Latency and throughput of one model per batch size (see :func:`compare` for the row fields)."""
    return compare({"model": model}, batch_sizes, threads, repeats, device, input_size)


def dense_parent(path: str, model: nn.Module) -> nn.Module | None:
    """The dense architecture the checkpoint at ``path`` (loaded as ``model``) was derived from, rebuilt
    from its arch spec with random weights (latency does not depend on them); None when the checkpoint is
    a plain dense model (same shapes and no dense reference)."""
    from .checkpoint import model_from_header
    from .loader import checkpoint_info

    parent = model_from_header({"arch": checkpoint_info(path)["arch"]})
    shapes = {k: v.shape for k, v in parent.state_dict().items()}
    pruned = shapes != {k: v.shape for k, v in model.state_dict().items()}
    return parent if pruned or getattr(model, "edlab_dense_reference", None) else None


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise EdlabError(f"--batch-sizes expects positive integers like 1,32, got '{text}'")
    return sizes


def bench_target(target: str, parent: str | None = None, no_parent: bool = False,
                 batch_sizes: str | Sequence[int] = "1,32", threads: int | None = None, repeats: int = 20,
                 device: str = "auto", input_size: str | Sequence[int] = "3,32,32", macs: bool = False) -> dict:
    """``edlab bench`` as a call: the latency of a model file (or run folder, or zoo name) against its dense
    parent (``parent``: a model to compare with; default: for a pruned checkpoint, its architecture rebuilt
    dense). Returns {target, parent, speedup (per batch size), rows (see :func:`compare`)}; with ``macs``,
    also {"macs": {row model name: MACs per image}}."""
    from pathlib import Path

    from .loader import load_model, resolve_model_path
    from .scoring import parse_size

    sizes = _sizes(batch_sizes) if isinstance(batch_sizes, str) else list(batch_sizes)
    shape = parse_size(input_size)
    target = resolve_model_path(target)
    model = load_model(target)
    onnx = getattr(model, "edlab_onnx", False)
    if onnx and device not in ("auto", "cpu"):
        raise EdlabError("an ONNX file is benchmarked with ONNX Runtime on the CPU (--device cpu)")
    device = "cpu" if onnx else device
    models = {}
    if parent and not no_parent:
        models["parent"] = load_model(parent)
    elif not no_parent and Path(target).is_file() and not onnx:
        dense = dense_parent(target, model)
        if dense is not None:
            models["parent"] = dense.to(next(model.parameters()).dtype)
    models["model"] = model
    rows = compare(models, sizes, threads, repeats, device, shape)
    parent_desc = parent or ("dense architecture of the checkpoint" if "parent" in models else None)
    speedups = {str(r["batch_size"]): r["speedup"] for r in rows if r["model"] == "model" and "speedup" in r}
    result = {"target": target, "parent": parent_desc, "speedup": speedups, "rows": rows}
    if macs:
        from .onnx_model import onnx_profile
        from .scoring import profile

        result["macs"] = {n: onnx_profile(m.path).macs if getattr(m, "edlab_onnx", False)
                          else profile(m.to("cpu"), shape).macs for n, m in models.items()}
    return result
