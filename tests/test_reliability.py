"""Reliability and security, proven by breaking things on purpose: hostile and corrupt files, absurd configs,
broken datasets, non-finite losses and concurrent runs. Interruption (SIGKILL) tests: tests/test_resume_after_kill.py.

Most command lines run in-process through click's CliRunner (what `python -m edlab` runs, minus the
interpreter start-up), checking the contract of every failure: exit code != 0, one line on stderr, no
traceback, and nothing executed or destroyed."""

import json
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, invoke, rewrite_header
from killtest import env
from safetensors.torch import save as st_save

from edlab import EdlabError, load_checkpoint, save_checkpoint
from edlab.checkpoint import _tensor_digest, read_checkpoint
from edlab.data import data_from_config
from edlab.models import create_model
from edlab.resume import read_resume
from edlab.runs import Run
from edlab.train import fit, model_from_config, train

TINY = TINY_TRAIN  # (conftest's tiny run)


@pytest.fixture
def ckpt(tiny_run):
    """A tiny trained checkpoint (1 epoch, synthetic) for the commands that take one: conftest's tiny run."""
    return tiny_run / "model.ckpt"


# ------------------------------------------------------------------------------------------ hostile files
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


def _fake_cifar(root: Path, n: int = 8) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": list(rng.integers(0, 10, n))}, f)
    return folder


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
    folder = _fake_cifar(tmp_path / "data")
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


# ---------------------------------------------------------------------------------------- absurd configs
@pytest.mark.parametrize("args,msg", [
    (["train", "--lr", "-0.1"], "optim.lr"),
    (["train", "--lr", "0"], "optim.lr"),
    (["train", "--batch-size", "0"], "data.batch_size"),
    (["train", "--epochs", "-1"], "epochs"),
    (["train", "--set", "optim.momentum=1.5"], "optim.momentum"),
    (["train", "--set", "data.val_size=-5"], "data.val_size"),
    (["train", "--set", "optim.lr=fast"], "optim.lr"),
    (["train", "--set", "epochs=[1, 2]"], "epochs"),
    (["train", "--set", "optim=3"], "optim"),
    (["train", "--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
    (["train", "--set", "optim.lrate=0.1"], "unknown config key 'optim.lrate'"),
    (["train", "--set", "nan_policy=ignore"], "nan_policy"),
    (["train", "--set", "threads=0"], "threads"),
    (["train", "--set", "data.train_subset=0"], "data.train_subset"),
    (["quantize", "CKPT", "--method", "qat", "--bits-w", "0"], "--bits-w"),
    (["quantize", "CKPT", "--method", "qat", "--bits-w", "4", "--bits-a", "1"], "--bits-a"),
    (["quantize", "CKPT", "--method", "magic"], "unknown method"),
    (["quantize", "CKPT", "--method", "qat", "--epochs", "-1"], "epochs"),
    (["quantize", "CKPT", "--method", "qat", "--set", "optim.lr=-1"], "optim.lr"),
    (["quantize", "CKPT", "--method", "qat", "--resume"], "--resume needs --out"),
    (["prune", "CKPT", "--structured", "0.6", "--unstructured", "0.5"], "must be < 1"),
    (["prune", "CKPT", "--structured", "1.5"], "fraction"),
    (["prune", "CKPT", "--structured", "-0.2"], "fraction"),
    (["prune", "CKPT", "--structured", "0.3", "--steps", "0"], "steps"),
    (["prune", "CKPT", "--structured", "0.3", "--set", "data.batch_size=0"], "data.batch_size"),
])
def test_absurd_config_is_one_line_and_nonzero_exit(ckpt, tmp_path, args, msg):
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    out = tmp_path / "run"
    r = invoke(*args, "--out", out) if "--resume" not in args else invoke(*args)
    assert_one_line_error(r, msg)
    assert not out.exists() or not any(out.iterdir())  # nothing was started


def test_bad_recipe_is_one_clear_error(tmp_path):
    """Recipe errors are found before any stage runs (unknown command, YAML) or when the stage starts (its
    options): the stage's one line, then the pipeline's line saying which stage failed."""
    cases = {
        "unknown-stage": ("stages:\n  - train: {dataset: synthetic}\n  - trian: {epochs: 1}\n",
                          "stage 1 'trian' is not an edlab command"),
        "bad-flag-value": ("stages:\n  - train: {dataset: synthetic, epochs: many}\n", "epochs"),
        "bad-option": ("stages:\n  - train: {epochs: -1, dataset: synthetic}\n", "epochs"),
        "not-yaml": ("stages: [train: {\n", "not valid YAML"),
        "bad-override-type": ("stages:\n  - train: {dataset: synthetic, optim.lr: fast}\n", "optim.lr"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        r = invoke("run", tmp_path / f"{name}.yaml", "--out", tmp_path / name)
        assert r.exit_code != 0 and (r.exception is None or isinstance(r.exception, SystemExit)), name
        assert "Traceback" not in r.stderr and msg in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2, (name, r.stderr)  # the stage's line + the pipeline's


# ------------------------------------------------------------------------------------------ corruption
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
    old.update(format="edlab-ckpt/1", sha256=_tensor_digest(tensors, dtypes_and_shapes=False))
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


# ----------------------------------------------------------------------------------- numerical faults
def _weights(model):
    return torch.cat([v.detach().flatten().float() for v in model.state_dict().values() if v.is_floating_point()])


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the k-th training loss (1-based, counted over calls) NaN: a transient numerical fault."""
    def arm(k: int):
        real = torch.nn.CrossEntropyLoss.forward
        calls = {"n": 0}

        def forward(self, out, y):
            calls["n"] += 1
            loss = real(self, out, y)
            return loss * float("nan") if calls["n"] == k else loss

        monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
        return lambda: monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", real)
    return arm


def test_nan_stops_the_run_keeping_the_last_good_epoch_and_resume_finishes_it(tiny_cfg, tmp_path, nan_at_call,
                                                                                one_thread):
    """A NaN in epoch 2 stops the run; the epoch-1 resume state and best.ckpt stay valid; once the fault
    is gone, --resume ends exactly where an uninterrupted run ends."""
    small = {"data.train_subset": 192, "data.val_size": 64}
    ref_model, ref = train(tiny_cfg(epochs=3, keep="best", out=str(tmp_path / "ref"), **small))
    cfg = tiny_cfg(epochs=3, keep="best", out=str(tmp_path / "nan"), **small)
    steps = len(data_from_config(cfg, torch.device("cpu")).train)
    disarm = nan_at_call(steps + 2)  # epoch 2, step 2
    with pytest.raises(EdlabError, match="loss became non-finite \\(nan/inf\\) at epoch 2 step 2"):
        train(cfg)
    disarm()
    run = Run.open(cfg.out)
    assert [r["epoch"] for r in run.metrics()] == [1] and not run.file("summary.json").exists()
    assert read_resume(run.file("resume.pt"))["state"]["epoch"] == 1
    load_checkpoint(run.file("best.ckpt"))  # the best checkpoint so far is intact
    model, s = train(cfg, resume=True)
    assert s["test_accuracy"] == ref["test_accuracy"] and torch.equal(_weights(model), _weights(ref_model))


def test_nan_skip_policy_skips_only_the_bad_step(tiny_cfg, nan_at_call, one_thread):
    cfg = tiny_cfg(epochs=1, nan_policy="skip", out=None)
    data = data_from_config(cfg, torch.device("cpu"))
    model = model_from_config(cfg, data.num_classes)
    nan_at_call(2)
    state = fit(model, data, cfg)
    assert state.skipped_steps == 1 and torch.isfinite(_weights(model)).all()


def test_nan_via_the_cli_stop_and_skip(ckpt, tmp_path):
    """A checkpoint whose weights make every loss NaN: fine-tuning it stops with one line (train, quantize
    qat), or, with nan_policy=skip, finishes and reports the skipped steps."""
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        model.bn1.weight[0] = float("nan")
    bad = save_checkpoint(model, tmp_path / "nan.ckpt", **model.edlab_metadata)
    r = invoke("train", *TINY, "--epochs", "1", "--set", f"model.checkpoint={bad}", "--out", tmp_path / "t")
    assert_one_line_error(r, "loss became non-finite (nan/inf) at epoch 1 step 1")
    assert_one_line_error(invoke("quantize", bad, "--method", "qat", "--epochs", "1", "--out", tmp_path / "q"),
                          "loss became non-finite")
    r = invoke("train", *TINY, "--epochs", "1", "--set", f"model.checkpoint={bad}", "--set", "nan_policy=skip",
               "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["skipped_steps"] == 2


def test_resume_after_lowering_the_lr(tiny_cfg, tmp_path, nan_at_call, one_thread):
    small = {"data.train_subset": 128}  # (two steps an epoch: the NaN in epoch 2, the lowered lr resumes it)
    cfg = tiny_cfg(epochs=2, out=str(tmp_path / "r"), **small)
    nan_at_call(len(data_from_config(cfg, torch.device("cpu")).train) + 1)
    with pytest.raises(EdlabError):
        train(cfg)
    train(tiny_cfg(epochs=2, out=str(tmp_path / "r"), **{"optim.lr": 0.01}, **small), resume=True)


# ----------------------------------------------------------------------------------------- concurrency
def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    paths, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        paths.append(Run.create("same", root=str(tmp_path / "runs")).path)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8 and all(p.is_dir() for p in paths)


def test_two_runs_with_the_same_out_never_share_it(tmp_path):
    for trial in range(20):
        out, results, barrier = tmp_path / f"o{trial}", [], threading.Barrier(4)

        def start(out=out, results=results, barrier=barrier):
            barrier.wait()
            try:
                results.append(Run.create("x", str(out)).path)
            except EdlabError as e:
                results.append(e)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(isinstance(r, Path) for r in results) == 1, results


_TWIN = """
import sys, time, torch
from edlab import save_checkpoint
from edlab.models import create_model
from edlab.runs import Run
root, path, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(seed)
m = create_model("resnet20", width=0.25)
print("ready", flush=True)
t0 = float(sys.stdin.readline()) + 0.05  # the start, the same for both (+50 ms: time() lags a few ms)
while time.time() < t0:
    pass
print(Run.create("same", root=root).path, flush=True)
for _ in range(n):
    save_checkpoint(m, path, writer=seed)
"""


def test_twin_processes_same_second_same_name_same_checkpoint(tmp_path):
    """Two processes, released at the same whole second, create a run with the same name (distinct folders),
    then write the same checkpoint path 15 times each while this process reads it: every read sees one
    writer's whole checkpoint, never a torn or mixed file."""
    path = tmp_path / "shared.ckpt"
    save_checkpoint(create_model("resnet20", width=0.25), path, writer=-1)
    procs = [subprocess.Popen([sys.executable, "-c", _TWIN, str(tmp_path / "runs"), str(path), str(i), "15"],
                              env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    t0 = float(int(time.time()) + 1)
    for p in procs:
        p.stdin.write(f"{t0}\n")
        p.stdin.close()
    seen = set()
    while any(p.poll() is None for p in procs):
        seen.add(load_checkpoint(path).edlab_metadata["writer"])  # raises on a torn or mixed file
    dirs = [p.stdout.read().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(dirs)) == 2 and all(Path(d).is_dir() for d in dirs), dirs
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(t0))
    assert {Path(d).name[len("same-"):][:15] for d in dirs} == {stamp}, dirs  # really the same second
    final = load_checkpoint(path)
    torch.manual_seed(final.edlab_metadata["writer"])
    assert torch.equal(_weights(final), _weights(create_model("resnet20", width=0.25).eval()))
    assert seen & {0, 1}, seen
