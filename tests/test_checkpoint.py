import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error as one_line
from conftest import invoke

from edlab import EdlabError, create_model, load_checkpoint, save_checkpoint
from edlab.checkpoint import read_checkpoint


def same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_round_trip_with_metadata(tmp_path):
    m = create_model("resnet20", conv="depthwise")
    save_checkpoint(m, tmp_path / "m.ckpt", note="hello", acc=0.5)
    r = load_checkpoint(tmp_path / "m.ckpt")
    assert same_outputs(m, r) and r.edlab_metadata == {"note": "hello", "acc": 0.5}


def test_modified_architecture_reloads_without_the_code_that_changed_it(tmp_path):
    m = create_model("resnet20")
    blk = m.layers[0][0]
    blk.conv1, blk.bn1, blk.conv2 = nn.Conv2d(16, 5, 3, 1, 1, bias=False), nn.BatchNorm2d(5), \
        nn.Conv2d(5, 16, 3, 1, 1, bias=False)
    m.edlab_dense_reference = {"params": 272474, "macs": 40813184}
    save_checkpoint(m, tmp_path / "p.ckpt")
    r = load_checkpoint(tmp_path / "p.ckpt")
    assert r.layers[0][0].conv1.out_channels == 5 and same_outputs(m, r)
    assert r.edlab_dense_reference["params"] == 272474


def test_half_checkpoint_stays_half(tmp_path):
    m = create_model("resnet20").half()
    save_checkpoint(m, tmp_path / "h.ckpt")
    assert (tmp_path / "h.ckpt").stat().st_size < 700_000  # fp32 would be ~1.1 MB
    assert next(load_checkpoint(tmp_path / "h.ckpt").parameters()).dtype == torch.float16


def test_torchvision_model(tmp_path):
    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    save_checkpoint(m, tmp_path / "tv.ckpt", arch={"builder": "torchvision.models.resnet18",
                                                    "kwargs": {"num_classes": 10}})
    assert same_outputs(m, load_checkpoint(tmp_path / "tv.ckpt"))


def test_disallowed_builder_is_refused(tmp_path):
    m = create_model("resnet20")
    save_checkpoint(m, tmp_path / "x.ckpt", arch={"builder": "os.system", "kwargs": {"command": "true"}})
    with pytest.raises(EdlabError, match="not allowed"):
        load_checkpoint(tmp_path / "x.ckpt")


def test_corrupt_and_truncated_files_are_detected(tmp_path):
    p = tmp_path / "m.ckpt"
    save_checkpoint(create_model("resnet20"), p)
    raw = bytearray(p.read_bytes())
    (tmp_path / "trunc.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EdlabError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.ckpt")
    raw[-100] ^= 0xFF  # flip bits inside the tensor data
    (tmp_path / "flip.ckpt").write_bytes(raw)
    with pytest.raises(EdlabError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "flip.ckpt")
    with pytest.raises(EdlabError, match="not found"):
        load_checkpoint(tmp_path / "none.ckpt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for name, writer in [("evil.pt", lambda f: torch.save({"x": _Evil(str(marker))}, f)),
                         ("evil.pkl", lambda f: pickle.dump(_Evil(str(marker)), f))]:
        with open(tmp_path / name, "wb") as f:
            writer(f)
        with pytest.raises(EdlabError):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.ckpt"
    save_checkpoint(create_model("resnet20"), p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(create_model("resnet32"), p)
    assert p.read_bytes() == before and read_checkpoint(p)[0]["arch"]["name"] == "resnet20"
    assert [f.name for f in tmp_path.iterdir()] == ["m.ckpt"]  # no temp file left behind


@pytest.mark.parametrize("edit,msg", [
    (lambda meta: [1, 2], "checkpoint metadata must be a mapping, not a list"),
    (lambda meta: "odd", "checkpoint metadata must be a mapping, not a string"),
    (lambda meta: {**meta, "config": "odd"}, "checkpoint metadata.config must be a mapping, not a string"),
    (lambda meta: {**meta, "config": [1, 2]}, "checkpoint metadata.config must be a mapping, not a list"),
    (lambda meta: {**meta, "config": {**meta["config"], "data": 5}},
     "checkpoint metadata.config.data must be a mapping, not a number"),
])
def test_metadata_that_is_not_a_mapping_is_refused_by_every_command(synthetic_ckpt, runs_unchanged, edit, msg):
    """Before, such a file was evaluated, pruned, quantized and exported with the defaults (cifar10, its
    normalisation) in place of the dataset it records."""
    from conftest import assert_one_line_error, invoke, rewrite_header

    bad = rewrite_header(synthetic_ckpt, synthetic_ckpt.with_name("bad.ckpt"),
                          lambda h: {**h, "metadata": edit(h["metadata"])})
    with pytest.raises(EdlabError, match=msg):
        load_checkpoint(bad)
    for args in (["eval", bad], ["prune", bad, "--structured", "0.3"], ["quantize", bad, "--method", "bf16"],
                 ["export", bad, "--out", "m.onnx"]):
        assert_one_line_error(invoke(*args), f"bad.ckpt: {msg}")
    runs_unchanged()


def _ckpt_with(tmp_path, **metadata) -> Path:
    p = tmp_path / "m.ckpt"
    save_checkpoint(create_model("resnet20", 10, width=0.25), p, **metadata)
    return p


def test_checkpoint_metadata_never_makes_eval_create_folders_or_download(tmp_path, monkeypatch):
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil" / "deep"
    p = _ckpt_with(tmp_path, config={"data": {"dataset": "cifar10", "data_dir": str(evil), "download": True},
                                     "tta": "rm -rf"})
    one_line(invoke("eval", p), "not found")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("metadata", [{"config": {"tta": [1]}}, {"config": {"tta": "rm -rf"}}])
def test_odd_checkpoint_metadata_is_ignored(tmp_path, metadata):
    """An odd value is dropped (a config that is not a mapping is refused: test_checkpoint.py)."""
    r = invoke("eval", _ckpt_with(tmp_path, **metadata), "--dataset", "synthetic", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tta"] == "none"


def test_deep_checkpoint_metadata_is_one_line(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    one_line(invoke("eval", _ckpt_with(tmp_path, config=deep), "--dataset", "synthetic"), "nested")


def test_a_folder_given_as_a_checkpoint_is_one_line(tmp_path):
    one_line(invoke("quantize", tmp_path, "--method", "bf16"), "is a folder")
    one_line(invoke("export", tmp_path, "--out", tmp_path / "x.onnx"), "is a folder")


def test_odd_config_sections_in_metadata_are_one_line_for_prune(tmp_path):
    """Dropped once (AttributeError before), refused now: the defaults would stand in for the recorded data."""
    p = _ckpt_with(tmp_path, config={"model": 5, "data": 5, "optim": [1], "sched": "x"})
    r = invoke("prune", p, "--structured", "0.2", "--epochs", "1", "--dataset", "synthetic", "--train-subset", "64",
               "--threads", "1", "--precision", "fp32", "--set", "data.val_size=64", "--out", tmp_path / "p")
    one_line(r, "checkpoint metadata.config.model must be a mapping, not a number")
    assert not (tmp_path / "p").exists()
