"""Hostile and corrupt files: pickles that would run code, hostile checkpoint headers, hostile resume
state, broken dataset folders, flipped bytes and truncated checkpoints are refused or harmless.

Command lines run in-process through click's CliRunner (what `python -m edlab` runs, minus the interpreter
start-up), checking the contract of every failure: exit code != 0, one line on stderr, no traceback, and nothing
executed or destroyed."""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, invoke, rewrite_header, write_fake_cifar
from safetensors.torch import save as st_save

from edlab import EdlabError, load_checkpoint
from edlab.checkpoint import read_checkpoint, tensor_digest

TINY = TINY_TRAIN  # (conftest's tiny run)


class _Evil:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _EvilShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickles(tmp_path, marker) -> list[Path]:
    out = []
    for i, evil in enumerate([_Evil(marker), _EvilShell(marker)]):
        (tmp_path / f"evil{i}.pt").write_bytes(b"")
        torch.save({"model": evil}, tmp_path / f"evil{i}.pt")
        with open(tmp_path / f"evil{i}.ckpt", "wb") as f:
            pickle.dump(evil, f)
        out += [tmp_path / f"evil{i}.pt", tmp_path / f"evil{i}.ckpt"]
    return out


@pytest.mark.parametrize("command", [["eval"], ["score"], ["info"], ["prune", "--structured", "0.3"],
                                     ["quantize", "--method", "bf16"]])
def test_pickled_checkpoint_is_refused_by_every_command_without_running_it(command, tmp_path):
    marker = tmp_path / "pwned"
    for path in _pickles(tmp_path, marker):
        r = invoke(command[0], path, *command[1:], "--out", tmp_path / "o") if command[0] in ("prune", "quantize") \
            else invoke(*command, path)
        assert_one_line_error(r, "refuses to unpickle")
        assert not marker.exists()


@pytest.mark.parametrize("name,edit,msg", [
    ("os-system", lambda h: {**h, "arch": {"builder": "os.system", "kwargs": {"command": "touch MARKER"}}},
     "not allowed"),
    ("builtins-exec", lambda h: {**h, "arch": {"builder": "builtins.exec", "kwargs": {"source": "open('MARKER','w')"}}},
     "not allowed"),
    ("tv-get-model", lambda h: {**h, "arch": {"builder": "torchvision.models.get_model",
                                              "kwargs": {"name": "resnet18", "weights": "DEFAULT"}}}, "not allowed"),
    ("tv-pretrained", lambda h: {**h, "arch": {"builder": "torchvision.models.resnet18",
                                               "kwargs": {"weights": "IMAGENET1K_V1"}}}, "not allowed"),
    ("leaf-type", lambda h: {**h, "modules": {"fc": {"type": "os.system", "kwargs": {"command": "touch MARKER"}}}},
     "unknown type"),
    ("leaf-kwargs", lambda h: {**h, "modules": {"fc": {"type": "Linear", "kwargs": {"in_features": "x"}}}},
     "cannot be rebuilt"),
    ("huge-leaf", lambda h: {**h, "modules": {"fc": {"type": "Linear", "kwargs": {"in_features": 1 << 40,
                                                                                  "out_features": 1 << 40}}}},
     "cannot be rebuilt"),
    ("not-an-object", lambda h: "[1, 2]", "not a JSON object"),
    ("no-arch", lambda h: {k: v for k, v in h.items() if k != "arch"}, "malformed"),
    ("arch-list", lambda h: {**h, "arch": ["edlab"]}, "malformed"),
    ("bad-json", lambda h: "{not json", "not a valid edlab checkpoint"),
    ("other-format", lambda h: {**h, "format": "evil/9"}, "unsupported checkpoint format"),
])
def test_hostile_checkpoint_header_is_refused(ckpt, tmp_path, name, edit, msg):
    marker = tmp_path / "pwned"

    def hostile(h):
        e = edit(h)
        return json.loads(json.dumps(e).replace("MARKER", str(marker))) if not isinstance(e, str) else e

    p = rewrite_header(ckpt, tmp_path / f"{name}.ckpt", hostile)
    with pytest.raises(EdlabError, match=msg):
        load_checkpoint(p)
    assert_one_line_error(invoke("score", p), msg)
    assert not marker.exists()


def test_hostile_resume_state_is_refused_without_running_it(tmp_path):
    """resume.pt is read with torch.load(weights_only=True): a pickle that would run code is an error."""
    marker = tmp_path / "pwned"
    for i, evil in enumerate([_Evil(marker), _EvilShell(marker)]):
        out = tmp_path / f"run{i}"
        out.mkdir()
        torch.save({"model": evil, "state": {"epoch": 1}}, out / "resume.pt")
        r = invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume")
        assert_one_line_error(r, "resume state")
    assert not marker.exists()


@pytest.mark.parametrize("damage,msg", [
    ("evil", "refused global"),
    ("evil-shell", "refused global"),
    ("missing", "missing data_batch_2"),
    ("truncated", "malformed dataset file"),
    ("not-a-dict", "malformed dataset file"),
    ("wrong-shape", "malformed dataset file"),
    ("label-count", "images but"),
    ("label-range", "labels outside"),
])
def test_broken_dataset_folder_is_one_line(tmp_path, damage, msg):
    folder = write_fake_cifar(tmp_path / "data", n=8)
    marker = tmp_path / "pwned"
    batch = folder / "data_batch_2"
    good = batch.read_bytes()
    if damage == "evil":
        batch.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}))
    elif damage == "evil-shell":
        batch.write_bytes(pickle.dumps(_EvilShell(marker)))
    elif damage == "missing":
        batch.unlink()
    elif damage == "truncated":
        batch.write_bytes(good[: len(good) // 2])
    elif damage == "not-a-dict":
        batch.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "wrong-shape":
        batch.write_bytes(pickle.dumps({"data": np.zeros((8, 100), np.uint8), "labels": [0] * 8}))
    elif damage == "label-count":
        batch.write_bytes(pickle.dumps({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 5}))
    else:
        batch.write_bytes(pickle.dumps({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 7 + [10]}))
    r = invoke("train", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--set", "data.download=false",
               "--set", "data.val_size=8", "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(r, msg)
    assert not marker.exists()


def test_every_single_byte_flip_is_detected_or_harmless(ckpt, tmp_path):
    """300 seeded random byte flips anywhere in a checkpoint: each one either raises one EdlabError or
    loads exactly the same weights and metadata (a flip in the header's alignment padding)."""
    raw = ckpt.read_bytes()
    header, tensors = read_checkpoint(ckpt)
    rng = random.Random(0)
    n_header = 8 + int.from_bytes(raw[:8], "little")
    offsets = [rng.randrange(n_header) for _ in range(150)] + [rng.randrange(n_header, len(raw)) for _ in range(150)]
    outcomes = {"detected": 0, "harmless": 0}
    for off in offsets:
        bad = bytearray(raw)
        bad[off] ^= 1 << rng.randrange(8)
        p = tmp_path / "flip.ckpt"
        p.write_bytes(bytes(bad))
        try:
            m = load_checkpoint(p)
        except EdlabError:
            outcomes["detected"] += 1
            continue
        h2, t2 = read_checkpoint(p)
        assert h2 == header, f"flip at {off} silently changed the header"
        assert t2.keys() == tensors.keys() and all(torch.equal(t2[k], tensors[k]) for k in t2), off
        assert all(v.dtype == tensors[k].dtype for k, v in m.state_dict().items() if k in tensors), off
        outcomes["harmless"] += 1
    assert outcomes["detected"] >= 280, outcomes


def test_format_1_checkpoints_still_load(ckpt, tmp_path):
    """Files written before the header digest (format /1: tensor names and bytes digested) load as before."""
    header, tensors = read_checkpoint(ckpt)
    old = {k: v for k, v in header.items() if k != "header_sha256"}
    old.update(format="edlab-ckpt/1", sha256=tensor_digest(tensors, dtypes_and_shapes=False))
    (tmp_path / "v1.ckpt").write_bytes(st_save(tensors, metadata={"edlab": json.dumps(old)}))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_checkpoint(tmp_path / "v1.ckpt")(x), load_checkpoint(ckpt)(x))


@pytest.mark.parametrize("command", ["eval", "score", "info"])
def test_truncated_or_empty_checkpoint_is_one_line(ckpt, tmp_path, command):
    raw = ckpt.read_bytes()
    for name, data in [("trunc", raw[: len(raw) // 3]), ("empty", b""), ("header-only", raw[:200])]:
        p = tmp_path / f"{name}.ckpt"
        p.write_bytes(data)
        assert_one_line_error(invoke(command, p), "corrupt or truncated")
