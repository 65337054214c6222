"""Self-describing, safe checkpoints: one safetensors file = tensors + a JSON architecture spec.

Why this format: ``torch.save`` pickles can run code when loaded; a safetensors file cannot. The spec
(in the file's metadata) names the builder of the base architecture (a registered edlab model, or an
allow-listed torchvision builder) and describes every leaf module (type + constructor arguments), so a
model whose layers were changed after it was built (pruned channels, quantized or factorized layers)
reloads in a fresh process without the code that changed it. A sha256 of the tensor bytes detects
corrupt or truncated files. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import EdlabError
from .files import atomic_write_bytes
from .layers import LayerNorm2d
from .models import create_model
from .scoring import dense_reference_of

FORMAT = "edlab-ckpt/2"  # /2 adds header_sha256 and dtypes/shapes to the tensor digest; /1 files still load
READABLE_FORMATS = ("edlab-ckpt/1", FORMAT)
# Builders a checkpoint may name besides the edlab registry: importing them runs no code from the file.
ALLOWED_BUILDER_MODULES = ("torchvision.models",)

# How to describe and rebuild a leaf module: type name -> (class, kwargs-from-module).
_LEAF_TYPES: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict]]] = {}


def register_leaf(cls: type[nn.Module], describe: Callable[[nn.Module], dict], name: str | None = None):
    """Teach checkpoints a module type: ``describe(m)`` returns kwargs such that ``cls(**kwargs)``
    rebuilds a module with the same shapes (weights come from the tensors)."""
    _LEAF_TYPES[name or cls.__name__] = (cls, describe)


def conv_kwargs(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                stride=list(m.stride), padding=list(m.padding) if not isinstance(m.padding, str) else m.padding,
                dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


register_leaf(nn.Conv2d, conv_kwargs)
register_leaf(nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                        bias=m.bias is not None))
register_leaf(nn.BatchNorm2d, lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum,
                                             affine=m.affine, track_running_stats=m.track_running_stats))
register_leaf(nn.BatchNorm1d, lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum,
                                             affine=m.affine, track_running_stats=m.track_running_stats))
register_leaf(nn.Identity, lambda m: {})


def layer_norm_kwargs(m: nn.LayerNorm) -> dict:
    return dict(normalized_shape=list(m.normalized_shape), eps=m.eps, elementwise_affine=m.elementwise_affine,
                bias=m.bias is not None)


register_leaf(nn.LayerNorm, layer_norm_kwargs)
register_leaf(LayerNorm2d, layer_norm_kwargs)
register_leaf(nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps,
                                           affine=m.affine))


# Modules that register leaf types (the quantized layers, ...): imported when a checkpoint needs them.
LEAF_PROVIDERS = ("edlab.qlayers", "edlab.prune")


def _import_leaf_providers() -> None:
    for name in LEAF_PROVIDERS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def describe_modules(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, m in model.named_modules():
        for tname, (cls, describe) in _LEAF_TYPES.items():
            if type(m) is cls:
                out[name] = {"type": tname, "kwargs": describe(m)}
                break
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_base(arch: dict) -> nn.Module:
    builder = arch.get("builder", "edlab")
    if builder == "edlab":
        return create_model(arch["name"], arch.get("num_classes", 10), **arch.get("options", {}))
    module, _, fn = builder.rpartition(".")
    if module not in ALLOWED_BUILDER_MODULES:
        raise EdlabError(f"checkpoint names builder '{builder}', which is not allowed "
                         f"(allowed: edlab models, {', '.join(m + '.*' for m in ALLOWED_BUILDER_MODULES)})")
    mod = importlib.import_module(module)
    kwargs = arch.get("kwargs", {})
    # only the registered model builders (not get_model, get_weight, ...), and no pretrained-weights argument:
    # the weights come from this file, and loading a checkpoint must not download anything
    if fn not in getattr(mod, "list_models", lambda: [])() or \
            any("weights" in k and v is not None for k, v in kwargs.items()):
        raise EdlabError(f"checkpoint names builder '{builder}' with {sorted(kwargs)}, which is not allowed "
                         f"(a registered {module} model, without pretrained weights)")
    model = getattr(mod, fn)(**kwargs)
    model.edlab_spec = dict(arch)
    return model


def arch_of(model: nn.Module) -> dict:
    spec = getattr(model, "edlab_spec", None)
    if spec is None:
        raise EdlabError("model has no architecture spec: build it with edlab.create_model, or pass "
                         "arch={'builder': 'torchvision.models.NAME', 'kwargs': {...}} to save_checkpoint")
    return dict(spec)


def tensor_digest(tensors: dict[str, torch.Tensor], dtypes_and_shapes: bool = True) -> str:
    """sha256 of names and bytes (and, from format /2 on, dtypes and shapes: a flipped dtype letter or a
    reshaped tensor of the same size must not load silently)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        if dtypes_and_shapes:
            h.update(f"|{tensors[k].dtype}|{list(tensors[k].shape)}".encode())
        t = tensors[k].detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def header_digest(header: dict) -> str:
    """sha256 of the JSON header without this digest: metadata and architecture are verified too."""
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_checkpoint(model: nn.Module, path: str | Path, arch: dict | None = None, **metadata: Any) -> Path:
    """Save ``model`` (weights in their own dtype) with its architecture spec and JSON-able metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # tied/shared tensors must be distinct for safetensors
    seen: dict[int, str] = {}
    for k, v in list(state.items()):
        if v.data_ptr() in seen and v.numel():
            state[k] = v.clone()
        seen[v.data_ptr()] = k
    header = {
        "format": FORMAT,
        "arch": arch or arch_of(model),
        "modules": describe_modules(model),
        "dense_reference": getattr(model, "edlab_dense_reference", None),
        "sha256": tensor_digest(state),
        "metadata": metadata,
    }
    try:
        header = json.loads(json.dumps(header))  # the digest is of what a reader will parse
        header["header_sha256"] = header_digest(header)
        blob = st_save(state, metadata={"edlab": json.dumps(header)})
    except TypeError as e:
        raise EdlabError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    atomic_write_bytes(path, blob)
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a checkpoint file, verified; one clear EdlabError if anything is off."""
    p = Path(path)
    if p.is_dir():
        raise EdlabError(f"{p} is a folder, not a checkpoint file (a run folder holds model.ckpt)")
    if not p.is_file():
        raise EdlabError(f"checkpoint not found: {p}")
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    # u64 header length, then JSON: a '{' at byte 8 is safetensors even when truncated (its length's first
    # byte may then be 0x80, which alone would look like a pickle)
    looks_safetensors = 0 < n and raw[8:9] == b"{"
    if not looks_safetensors and (raw[:2] == b"PK" or raw[:1] == b"\x80"):  # zip (torch.save) or pickle
        raise EdlabError(f"{p} is a pickle/torch.save file; edlab refuses to unpickle checkpoints "
                         f"(they can run code). Convert it with edlab.save_checkpoint in a trusted session")
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then JSON header
        header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["edlab"])
    except (SafetensorError, KeyError, ValueError, OSError, TypeError, json.JSONDecodeError) as e:
        raise EdlabError(f"{p} is not a valid edlab checkpoint (corrupt or truncated?): "
                         f"{type(e).__name__}") from None
    except RecursionError:
        raise EdlabError(f"{p} is not a valid edlab checkpoint (its header is nested too deeply)") from None
    if not isinstance(header, dict):
        raise EdlabError(f"{p} is not a valid edlab checkpoint (its header is not a JSON object)")
    fmt = header.get("format")
    if fmt not in READABLE_FORMATS:
        raise EdlabError(f"{p}: unsupported checkpoint format {fmt!r} (expected {FORMAT})")
    if (fmt == FORMAT or "header_sha256" in header) and header.get("header_sha256") != header_digest(header):
        raise EdlabError(f"{p}: header checksum mismatch, the architecture or metadata are corrupt")
    if tensor_digest(tensors, dtypes_and_shapes=fmt == FORMAT) != header.get("sha256"):
        raise EdlabError(f"{p}: checksum mismatch, the weights are corrupt")
    return header, tensors


def model_from_header(header: dict) -> nn.Module:
    """The model a verified header describes (weights not loaded). A header whose fields have the wrong
    shape or type (a hand-edited or hostile file) is one EdlabError, not a traceback."""
    try:
        return _model_from_header(header)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EdlabError(f"checkpoint header is malformed ({type(e).__name__}: {first})") from None


def _model_from_header(header: dict) -> nn.Module:
    model = build_base(header["arch"])
    current = describe_modules(model)
    for name, desc in header.get("modules", {}).items():
        if current.get(name) == desc:
            continue
        if desc["type"] not in _LEAF_TYPES:
            _import_leaf_providers()
        if desc["type"] not in _LEAF_TYPES:
            raise EdlabError(f"checkpoint module '{name}' has unknown type {desc['type']!r}")
        cls, _ = _LEAF_TYPES[desc["type"]]
        try:
            _set_module(model, name, cls(**desc["kwargs"]))
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise EdlabError(f"checkpoint module '{name}' cannot be rebuilt: {first}") from None
    if header.get("dense_reference") is not None:  # the basis of ps/pu: counts, or one line (score's rule)
        try:
            model.edlab_dense_reference = dense_reference_of(model, header["dense_reference"])
        except EdlabError as e:
            raise EdlabError(f"checkpoint header is malformed ({e})") from None
    return model


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (in eval mode); never executes code from the file. This format
    only: ``edlab.load_checkpoint`` (edlab.loader) also takes a packed deployment file."""
    header, tensors = read_checkpoint(path)
    model = model_from_header(header)
    dtypes = {v.dtype for k, v in tensors.items() if v.is_floating_point()}
    if len(dtypes) == 1 and (dt := dtypes.pop()) != torch.float32:
        model.to(dt)  # a truly half checkpoint reloads as half
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise EdlabError(f"{path}: weights do not fit the architecture: {first[-1].strip()}") from None
    model.edlab_metadata = checked_metadata(header.get("metadata"), path)
    return model.to(map_location).eval()


_JSON_KINDS = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}  # else a number


def checked_metadata(meta: Any, path) -> dict:
    """Metadata is data from the file: a mapping, not too deep, its config and the config's sections
    mappings, else one line naming the field (with defaults in their place, a command would evaluate or
    fine-tune on another dataset and normalisation than the model was trained with); a data folder it names
    is used but never downloaded into (a file must not make a command create folders or fetch)."""
    from .config import check_tree

    if meta is None:  # a file written without metadata
        return {}
    fields = [("metadata", meta)]
    if isinstance(meta, dict) and isinstance(cfg := meta.get("config"), dict):
        fields += [(f"metadata.config.{k}", cfg[k]) for k in ("model", "data", "optim", "sched", "distill")
                   if k in cfg]  # TrainConfig's sections
    elif isinstance(meta, dict) and "config" in meta:
        fields.append(("metadata.config", meta["config"]))
    for name, value in fields:
        if not isinstance(value, dict):
            kind = _JSON_KINDS.get(type(value), "a number")
            raise EdlabError(f"{path}: checkpoint {name} must be a mapping, not {kind} (the file is malformed)")
    check_tree(meta, f"{path}: checkpoint metadata")
    cfg = meta.get("config")
    if cfg is None:
        return meta
    data = cfg.get("data")
    if isinstance(data, dict) and data.get("data_dir") is not None:
        meta = {**meta, "config": {**cfg, "data": {**data, "download": False}}}
    return meta


def trained_with(model: nn.Module) -> dict:
    """What a checkpoint's metadata says it was trained with (dataset, data folder, test-time views), each
    checked: metadata is data from the file, so an odd value is dropped, never followed (it must not make
    a command create folders or download elsewhere)."""
    meta = getattr(model, "edlab_metadata", None)
    cfg = meta.get("config") if isinstance(meta, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    dataset, data_dir, tta = data.get("dataset"), data.get("data_dir"), cfg.get("tta")
    return {"dataset": dataset if dataset in ("cifar10", "cifar100", "synthetic") else None,
            "data_dir": data_dir if isinstance(data_dir, str) and Path(data_dir).is_dir() else None,
            "tta": tta if tta in ("none", "flip", "flip-shift", "airbench") else "none"}


def stage_history(metadata: dict) -> list[dict]:
    """The stages a model went through, oldest first: the ``stages`` its checkpoint records, or, for a
    checkpoint written before edlab recorded them, what its metadata shows (a prune recipe, a quantization)."""
    stages = metadata.get("stages") if isinstance(metadata, dict) else None
    if isinstance(stages, list) and all(isinstance(s, dict) for s in stages):
        return stages
    out: list[dict] = []
    if not isinstance(metadata, dict):
        return out
    if isinstance(metadata.get("config"), dict):
        out.append({"stage": "train", "model": (metadata["config"].get("model") or {}).get("name")})
    if isinstance(metadata.get("prune"), dict):
        p = metadata["prune"]
        out.append({"stage": "prune", "structured": p.get("structured"), "unstructured": p.get("unstructured")})
    if isinstance(metadata.get("quantization"), dict):
        out.append({"stage": "quantize", **{k: v for k, v in metadata["quantization"].items()
                                            if k in ("method", "bits_w", "bits_a", "first_last_bits")}})
    return out


def upstream_val_leak(model: nn.Module) -> int:
    """Validation images that the teacher of any stage ``model`` went through had trained on (each stage records
    its teacher's count as ``teacher_val_leak``). What a teacher carried into a model stays in every model made
    from it, so a later stage validating on the same split reads high as well."""
    counts = [s.get("teacher_val_leak") for s in stage_history(getattr(model, "edlab_metadata", None) or {})]
    return max((int(c) for c in counts if isinstance(c, int | float) and not isinstance(c, bool) and c > 0),
               default=0)


def with_stage(model: nn.Module, entry: dict) -> list[dict]:
    """The model's stage history (from the checkpoint it was loaded from) plus ``entry``: what a stage saves."""
    return [*stage_history(getattr(model, "edlab_metadata", None) or {}), entry]
