"""Packed deployment files: a model stored as the score counts it.

A checkpoint keeps what training needs: fp32 latent weights behind a 4-bit or binary layer, BN running
statistics, masks. Its size therefore says nothing about the score's parameter term. ``edlab pack`` writes
what inference needs and the score charges, so that the file proves its score:

* k-bit weights (LSQ layers) as packed k-bit integer codes plus their per-channel steps;
* binary weights (BinaryConnect layers) as one bit each (plus the per-channel scale when the layer has one);
* weights with pruned (zero) entries as a bitmask plus the nonzero entries only;
* BN layers folded to the scale and shift they apply in eval mode (the two vectors the score counts);
* everything else in the dtype it has, which is the dtype the score charges.

The course rules charge no position information for unstructured zeros; the bitmask bytes are printed apart
(the MicroNet rules charge one bit per entry, as the mask here costs).

File layout: ``EDLABPK1`` | u32 header length | zlib(JSON header) | payload. The header holds the model's
architecture (as a checkpoint's does), one entry per stored tensor (how it is encoded, offset, length), the
checkpoint's metadata, and sha256 digests of itself and of the payload. Nothing in it is executed on load.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import arch_of, checked_metadata, describe_modules, load_checkpoint, model_from_header
from .errors import EdlabError
from .files import atomic_write_bytes
from .qlayers import QUANT_TYPES, BinaryLayer, LSQLayer
from .runs import resolve_model_path
from .scoring import RULES, profile

MAGIC = b"EDLABPK1"
_DTYPES = {str(t).replace("torch.", ""): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                   torch.bool)}


# ------------------------------------------------------------------------------------------- bit packing
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2**bits, ``bits`` bits each, little-endian bit order, no padding but the last byte."""
    v = values.astype(np.uint32).reshape(-1)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(raw: bytes, bits: int, n: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: n * bits]
    if flat.size != n * bits:
        raise EdlabError("packed file is truncated (a bit field is shorter than its entry count)")
    return (flat.reshape(n, bits).astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(1)


# ------------------------------------------------------------------------------------------------ packing
class _Writer:
    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.chunks: list[bytes] = []
        self.offset = 0
        self.bytes_by_kind: dict[str, int] = {}

    def add(self, name: str, kind: str, data: bytes, part: str, **info: Any) -> None:
        self.entries.append({"name": name, "kind": kind, "offset": self.offset, "length": len(data), **info})
        self.chunks.append(data)
        self.offset += len(data)
        self.bytes_by_kind[part] = self.bytes_by_kind.get(part, 0) + len(data)

    def raw(self, name: str, t: torch.Tensor, part: str = "values") -> None:
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.add(name, "raw", data, part, dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape))


def _mask_bytes(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little").tobytes()


def _pack_lsq(w: _Writer, name: str, m: nn.Module) -> None:
    """k-bit codes of the weight the layer computes with: round(clip(w / s, qn, qp)), s = |step| + 1e-12."""
    step = (m.weight_step.detach().abs() + 1e-12).view(-1, *([1] * (m.weight.dim() - 1)))
    with torch.no_grad():
        codes = (m.weight.detach() / step).clamp(m.qn_w, m.qp_w).round().to(torch.int64)
    mask = m.weight_mask if m.weight_mask is not None else None
    k = m.weight_bits
    shifted = (codes - m.qn_w).reshape(-1)
    info = {"bits": k, "zero": m.qn_w, "shape": list(m.weight.shape), "dtype": _dt(m.weight)}
    if mask is not None:  # pruned entries: a bitmask, then the codes of the kept ones
        keep = mask.reshape(-1).cpu()
        w.add(f"{name}.weight#mask", "mask", _mask_bytes(keep), "mask")
        shifted = shifted[keep]
        info["masked"] = True
    w.add(f"{name}.weight", "codes", pack_bits(shifted.cpu().numpy(), k), "weights", count=int(shifted.numel()),
          **info)


def _pack_binary(w: _Writer, name: str, m: nn.Module) -> None:
    """One bit per kept weight: 1 for +1, 0 for -1 (sign of the clipped latent weight, 0 -> +1)."""
    signs = (m.weight.detach() >= 0).reshape(-1).cpu()
    info = {"shape": list(m.weight.shape), "dtype": _dt(m.weight), "scale": bool(m.scale)}
    if m.weight_mask is not None:
        keep = m.weight_mask.reshape(-1).cpu()
        w.add(f"{name}.weight#mask", "mask", _mask_bytes(keep), "mask")
        signs = signs[keep]
        info["masked"] = True
    w.add(f"{name}.weight", "signs", pack_bits(signs.numpy().astype(np.uint32), 1), "weights",
          count=int(signs.numel()), **info)


def _pack_float(w: _Writer, name: str, t: torch.Tensor) -> None:
    """A float weight as it is, or its nonzeros plus a bitmask when that is smaller (pruned entries)."""
    t = t.detach().cpu().contiguous()
    nz = int(torch.count_nonzero(t))
    item = t.element_size()
    if nz < t.numel() and (t.numel() + 7) // 8 + nz * item < t.numel() * item:
        keep = (t != 0).reshape(-1)
        w.add(f"{name}#mask", "mask", _mask_bytes(keep), "mask")
        values = t.reshape(-1)[keep].contiguous()
        w.add(name, "sparse", values.view(torch.uint8).numpy().tobytes(), "weights", dtype=_dt(t),
              shape=list(t.shape), count=nz)
    else:
        w.raw(name, t, "weights")


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def pack_model(model: nn.Module, metadata: dict | None = None) -> tuple[bytes, dict]:
    """The packed bytes of ``model`` (eval-mode inference form) and a breakdown of their sizes."""
    model = model.eval()
    w = _Writer()
    done: set[str] = set()  # state-dict keys already written
    folded = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, QUANT_TYPES):
            (_pack_lsq if isinstance(m, LSQLayer) else _pack_binary)(w, prefix[:-1], m)
            done.update({f"{prefix}weight", f"{prefix}weight_mask"})
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            _pack_float(w, f"{prefix}weight", m.weight)
            done.add(f"{prefix}weight")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            # eval-mode BN is x * scale + shift: store those two vectors (what the score counts as BN params)
            with torch.no_grad():  # the kernel's own alpha and beta (equal outputs up to float rounding)
                scale = m.weight * (1 / torch.sqrt(m.running_var + m.eps))
                shift = m.bias - m.running_mean * scale
            w.raw(f"{prefix}weight", scale.to(m.weight.dtype), "values")
            w.raw(f"{prefix}bias", shift.to(m.bias.dtype), "values")
            done.update(f"{prefix}{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked"))
            folded.append(name)
        if isinstance(m, BinaryLayer) and m.scale:
            done.add(f"{prefix}weight_scale")  # recomputed from the rebuilt latent weights, but stored too:
            w.raw(f"{prefix}weight_scale", m.weight_scale, "values")
    for key, t in model.state_dict().items():
        if key not in done:
            w.raw(key, t, "values" if t.is_floating_point() else "other")
    payload = b"".join(w.chunks)
    header = {"format": "edlab-pack/1", "arch": arch_of(model), "modules": describe_modules(model),
              "dense_reference": getattr(model, "edlab_dense_reference", None), "bn_folded": folded,
              "tensors": w.entries, "payload_sha256": hashlib.sha256(payload).hexdigest(),
              "metadata": metadata if metadata is not None else getattr(model, "edlab_metadata", {})}
    try:
        text = json.dumps(header, sort_keys=True)
    except TypeError as e:
        raise EdlabError(f"pack metadata must be JSON-serialisable: {e}") from None
    head = zlib.compress(json.dumps({"header": header, "header_sha256": hashlib.sha256(text.encode()).hexdigest()},
                                    sort_keys=True).encode(), 9)
    blob = MAGIC + len(head).to_bytes(4, "little") + head + payload
    sizes = {"file": len(blob), "header": len(MAGIC) + 4 + len(head), **w.bytes_by_kind}
    return blob, sizes


def is_packed(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- unpacking
def _read(raw: bytes, path: str | Path) -> tuple[dict, bytes]:
    if raw[: len(MAGIC)] != MAGIC or len(raw) < len(MAGIC) + 4:
        raise EdlabError(f"{path} is not an edlab packed file")
    n = int.from_bytes(raw[len(MAGIC): len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    try:
        outer = json.loads(zlib.decompressobj().decompress(raw[start:start + n], 1 << 26))
        header = outer["header"]
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    except (zlib.error, ValueError, KeyError, TypeError, RecursionError) as e:
        raise EdlabError(f"{path} is not a valid edlab packed file (corrupt or truncated?): {type(e).__name__}") \
            from None
    if digest != outer.get("header_sha256"):
        raise EdlabError(f"{path}: header checksum mismatch, the packed file is corrupt")
    payload = raw[start + n:]
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise EdlabError(f"{path}: checksum mismatch, the packed weights are corrupt")
    return header, payload


def read_pack_header(path: str | Path) -> dict:
    """The verified header of a packed file (arch, modules, metadata, tensors)."""
    return _read(Path(path).read_bytes(), path)[0]


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise EdlabError(f"packed file names an unknown dtype {name!r}")
    return _DTYPES[name]


def _tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = _dtype(dtype)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return t.view(dt).reshape(shape).clone()


def _scatter(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    out = torch.zeros(mask.numel(), dtype=values.dtype)
    out[mask] = values
    return out.reshape(shape)


def unpack_model(raw: bytes, path: str | Path = "<bytes>") -> nn.Module:
    """Rebuild the model a packed file holds (eval mode; the outputs of the model it was packed from, up to
    float rounding: folded BN differs in the last bit, which can move a k-bit activation by one level).

    Latent weights are rebuilt from the codes: code x step for k-bit layers (a code 0 that was not pruned as a
    quarter step, which quantizes back to 0 and keeps the weight counted as stored), +-1 or +-scale for binary
    layers; BN layers take the folded scale and shift with running mean 0, variance 1 and eps 0."""
    header, payload = _read(raw, path)
    try:
        model = model_from_header(header)
        state: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        quantized = [e for e in header["tensors"] if e.get("kind") in ("codes", "signs")]
        # steps and scales first: the codes of a layer are rebuilt with them
        for e in [e for e in header["tensors"] if e.get("kind") not in ("codes", "signs")] + quantized:
            data = payload[e["offset"]: e["offset"] + e["length"]]
            if len(data) != e["length"]:
                raise EdlabError(f"{path} is truncated")
            name, kind = e["name"], e["kind"]
            if kind == "raw":
                state[name] = _tensor(data, e["dtype"], e["shape"])
            elif kind == "mask":
                n = _numel(model, state, name)
                masks[name] = torch.from_numpy(unpack_bits(data, 1, n).astype(bool))
            elif kind == "sparse":
                values = _tensor(data, e["dtype"], [e["count"]])
                state[name] = _scatter(masks[f"{name}#mask"], values, e["shape"])
            elif kind in ("codes", "signs"):
                _rebuild_quantized(model, state, masks, e, data)
            else:
                raise EdlabError(f"{path}: unknown tensor encoding {kind!r}")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EdlabError(f"{path}: packed file is malformed ({type(e).__name__}: {first})") from None
    for name in header.get("bn_folded", []):
        bn = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        dt = state[f"{prefix}weight"].dtype
        state[f"{prefix}running_mean"] = torch.zeros(bn.num_features, dtype=dt)
        state[f"{prefix}running_var"] = torch.ones(bn.num_features, dtype=dt)
        state[f"{prefix}num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        bn.eps = 0.0  # x * scale + shift exactly: 1 / sqrt(1 + 0) = 1
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) == 1 and (dt := floats.pop()) != torch.float32:
        model.to(dt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EdlabError(f"{path}: packed tensors do not fit the architecture: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None
    model.edlab_metadata = checked_metadata(header.get("metadata"), path)  # data from the file: checked
    model.edlab_packed = True
    return model.eval()


def _numel(model: nn.Module, state: dict, mask_name: str) -> int:
    key = mask_name.split("#")[0]
    module, _, pname = key.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, pname).numel()


def _rebuild_quantized(model: nn.Module, state: dict, masks: dict, e: dict, data: bytes) -> None:
    name = e["name"]
    module_name = name.rpartition(".")[0]
    m = model.get_submodule(module_name)
    shape, n = e["shape"], int(np.prod(e["shape"]))
    mask = masks.get(f"{name}#mask") if e.get("masked") else None
    if e["kind"] == "codes":
        codes = torch.from_numpy(unpack_bits(data, e["bits"], e["count"]).astype(np.int64)) + e["zero"]
        step = state[f"{module_name}.weight_step"].float()
        s = (step.abs() + 1e-12).view(-1, *([1] * (len(shape) - 1)))
        full = codes if mask is None else _scatter(mask, codes, [n])
        full = full.reshape(shape).float()
        latent = torch.where(full == 0, 0.25, full) * s  # a kept code 0: a quarter step, rounds back to 0
        if mask is not None:
            latent = latent * mask.reshape(shape)
    else:
        signs = torch.from_numpy(unpack_bits(data, 1, e["count"]).astype(np.float32)) * 2 - 1
        full = (signs if mask is None else _scatter(mask, signs, [n])).reshape(shape)
        if e["scale"]:
            scale = state[f"{module_name}.weight_scale"].float()
            full = full * scale.view(-1, *([1] * (len(shape) - 1)))
        latent = full
    state[name] = latent.to(_dtype(e["dtype"]))
    if mask is not None:
        state[f"{module_name}.weight_mask"] = mask.reshape(shape)
    elif getattr(m, "weight_mask", None) is not None:
        state[f"{module_name}.weight_mask"] = torch.ones(shape, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ files
def counted_bytes(model: nn.Module) -> float:
    """Bytes the score's parameter term stands for: sum of nonzero entries x bits / 8 (course rules)."""
    return profile(model).score_params_term * RULES["course"].ref_params * 32 / 8


def pack(checkpoint: str | Path, out: str | Path, metadata: dict | None = None) -> dict:
    """Pack a checkpoint (or a run folder's) into ``out``; returns the sizes (file, header, weights, values, mask,
    other bytes), the bytes the score counts, and a check that the packed model reloads with equal outputs.
    ``metadata`` is merged over the checkpoint's: a study that tested its chosen point after training (``test:
    chosen``) records that figure in the packed file, so `edlab info` on it shows the test accuracy."""
    checkpoint = resolve_model_path(checkpoint)
    if checkpoint.endswith(".onnx"):
        raise EdlabError("edlab pack packs an edlab checkpoint; an .onnx file is already a deployment file")
    src, dst = Path(checkpoint), Path(out)
    if dst.exists() and dst.resolve() == src.resolve():
        raise EdlabError("--out must not be the checkpoint itself")
    if dst.is_dir():
        raise EdlabError(f"--out {dst} is a folder; give a file name (e.g. {dst / 'model.pack'})")
    model = unpack_model(src.read_bytes(), src) if src.is_file() and is_packed(src) else load_checkpoint(src)
    meta = {**getattr(model, "edlab_metadata", {}), **(metadata or {})}
    blob, sizes = pack_model(model, meta)
    again = unpack_model(blob, dst)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x.to(_float(model))).float(), again(x.to(_float(again))).float()
    diff = float((ref - got).abs().max())
    # BN folding changes the last bit of float results; a k-bit activation on a rounding boundary can then move
    # one level: a few hundredths of a logit at most, predictions unchanged
    tol = 5e-2 * max(1.0, float(ref.abs().max()))
    if diff > tol:
        raise EdlabError(f"packing {src} changed its outputs (max difference {diff:.3g}); nothing written")
    atomic_write_bytes(dst, blob)
    return {**sizes, "counted": counted_bytes(model), "max_output_difference": diff, "out": str(dst)}


def _float(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
