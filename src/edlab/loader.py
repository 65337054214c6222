"""One loader for every model a command takes: ``load_model(target)`` turns a checkpoint, packed or .onnx
path, a run folder or a zoo name into an ``nn.Module``.

Each file format is read by its own module (edlab.checkpoint, edlab.pack, edlab.onnx_model), which knows
nothing of the others; this module is the one place that tells them apart and dispatches, so that the format
modules never import each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint
from .errors import EdlabError
from .models import create_model, list_models
from .onnx_model import OrtModule
from .pack import is_packed, read_pack_header, unpack_model
from .runs import resolve_model_path

__all__ = ["checkpoint_info", "load_checkpoint", "load_model", "resolve_model_path"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (in eval mode); never executes code from the file. A packed
    deployment file (``edlab pack``, edlab.pack) loads too."""
    if Path(path).is_file() and is_packed(path):
        return unpack_model(Path(path).read_bytes(), path).to(map_location)
    return checkpoint.load_checkpoint(path, map_location)


def checkpoint_info(path: str | Path) -> dict:
    """The verified header of a checkpoint or packed file: arch, modules, metadata."""
    if Path(path).is_file() and is_packed(path):
        return read_pack_header(path)
    header, _ = checkpoint.read_checkpoint(path)
    return header


def load_model(target: str | Path, refuse_onnx: str = "") -> nn.Module:
    """A checkpoint, packed file or .onnx path, a run folder, or a registered model name -> nn.Module
    (an .onnx file runs through ONNX Runtime, wrapped as a module; a model name gets fresh weights).
    ``refuse_onnx``: why the caller cannot take an ONNX model (prune and quantize change the weights of a
    checkpoint); given, an .onnx target is that one line, before the file is read."""
    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        if refuse_onnx:
            raise EdlabError(f"{target} is an ONNX model: {refuse_onnx}")
        return OrtModule(target)
    if Path(target).exists() or target.endswith(".ckpt"):
        return load_checkpoint(target)
    if target in list_models():
        return create_model(target)
    raise EdlabError(f"'{target}' is neither a checkpoint file nor a model (models: {', '.join(list_models())})")
