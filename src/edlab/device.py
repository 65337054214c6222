"""Where a run computes: the device, the autocast precision, the memory format and the CPU threads.

Every stage resolves these the same way ("auto" picks what the hardware gains from), so they live apart from
the training loop that uses them most.
"""

from __future__ import annotations

import os

import torch

from .errors import EdlabError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': CUDA when present, else the CPU; a CUDA device asked for where there is none is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdlabError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """oneDNN has native bf16 kernels here (AVX512-BF16 or AMX): bf16 autocast then ~2x a training step."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# the flags that a CPU step's speed depends on
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def host() -> dict:
    """The machine a figure was measured on, as every summary.json and benchmark records it: speeds on these
    CPUs differ by 2-10x with their vector extensions (AMX, AVX512-BF16, AVX2 only), so a number without its
    host says little. ``kind`` is the short name docs use; ``threads`` the torch CPU threads in use."""
    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else \
        "AVX2" if "avx2" in flags else "unknown"
    info = {"cpu": model or "unknown", "kind": kind, "flags": [f for f in CPU_FLAGS if f in flags],
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, None = fp32. 'auto' picks bf16 on CUDA and on CPUs with native bf16 kernels."""
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_channels_last(choice: str, device: torch.device, amp: torch.dtype | None) -> bool:
    """'auto': channels_last where its kernels are faster (CUDA, and CPU autocast with oneDNN)."""
    if choice == "auto":
        return device.type == "cuda" or amp is not None
    return choice == "on"


def autocast(device: torch.device, amp: torch.dtype | None):
    """torch.autocast to ``amp``, or a no-op context for fp32 (amp None)."""
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def use_threads(threads: int | None) -> None:
    """Config ``threads``: torch's CPU threads, at most the cores this process may use. On a shared machine
    fewer threads than cores avoids OpenMP stalls; more than the cores only wait on each other (threads=1024
    made a tiny run 30x slower on 2 cores)."""
    if threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(min(threads, cores))

