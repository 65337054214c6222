"""What the tests share: helpers (invoke, assert_one_line_error, rewrite_header, kill_after_epoch, flat_weights),
configs (tiny_cfg, TINY_TRAIN) and the trained files that cost seconds to make, made once per run (session fixtures:
tiny_ckpt, tiny_run, int8_stage; ckpt is tiny_run's checkpoint) and read by every test that needs them. No test
module imports another."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cifar_dir() -> str | None:
    """The folder holding cifar-10-batches-py for real-data tests, or None (then they skip)."""
    d = os.environ.get("EDLAB_DATA_DIR")
    if d and (Path(d) / "cifar-10-batches-py").is_dir():
        return d
    return None


def kill_after_epoch(cfg, epoch: int, make_model=None):
    """Train ``cfg`` in its ``out`` folder as ``edlab train`` does (config written, the config's teacher
    loaded) and kill it when ``epoch`` has been saved: what the resume tests continue. ``make_model(cfg,
    data)`` builds the network (default: ``model_from_config``). Returns the Run."""
    from edlab.config import to_yaml
    from edlab.data import data_from_config
    from edlab.distill import load_teacher
    from edlab.runs import Run
    from edlab.train import fit, model_from_config

    run = Run.create("cut", cfg.out)
    run.write_text("config.yaml", to_yaml(cfg))
    data = data_from_config(cfg, torch.device("cpu"))
    model = make_model(cfg, data) if make_model else model_from_config(cfg, data.num_classes)
    teacher = load_teacher(cfg.distill.teacher, data.num_classes, cfg.data) if cfg.distill.teacher else None

    class Killed(Exception):
        pass

    def die(row):
        if row["epoch"] == epoch:
            raise Killed

    with pytest.raises(Killed):
        fit(model, data, cfg, run, teacher=teacher, on_epoch=die)
    return run


def invoke(*args):
    """Run an edlab command in process (click's runner): its exit code, output and stderr, no subprocess."""
    from click.testing import CliRunner

    from edlab.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(r, msg: str = "", code: int = 2):
    """The failure contract: exit code, one line on stderr naming the problem, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert msg in r.stderr, r.stderr


def rewrite_header(src: Path, dst: Path, edit) -> Path:
    """A copy of a valid checkpoint whose edlab JSON header went through ``edit`` (digest kept valid, so
    only the header's content is hostile)."""
    import json

    from safetensors.torch import save as st_save

    from edlab.checkpoint import header_digest, read_checkpoint

    header, tensors = read_checkpoint(src)
    new = edit(header)
    if isinstance(new, dict):  # the digest is no signature: a hostile file carries a valid one
        new["header_sha256"] = header_digest(new)
    meta = json.dumps(new) if not isinstance(new, str) else new
    dst.write_bytes(st_save(tensors, metadata={"edlab": meta}))
    return dst


@pytest.fixture
def tiny_cfg(tmp_path):
    """A TrainConfig that trains a small resnet20 on synthetic data in seconds."""
    from edlab.config import load_train_config

    def make(**sets):
        base = [
            "model.name=resnet20", "model.width=0.5", "data.dataset=synthetic", "data.val_size=200",
            "data.train_subset=512", "data.batch_size=64", "epochs=2", "optim.lr=0.05", "precision=fp32",
            f"out={tmp_path / 'run'}",
        ]
        return load_train_config(None, None, base + [f"{k}={v}" for k, v in sets.items()])

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A resnet20 (width 0.5) trained for 2 epochs on synthetic data and saved with its config, as by `edlab
    train`: trained once for the whole run, read by every test that needs trained weights (quantize, export,
    fold, distillation). Tests only read it and write their outputs elsewhere (``--out``); a test that writes
    beside the checkpoint copies its folder into its tmp_path first."""
    from edlab.config import load_train_config
    from edlab.train import train

    out = tmp_path_factory.mktemp("trained") / "tiny-src"
    train(load_train_config(None, None, [
        "model.name=resnet20", "model.width=0.5", "data.dataset=synthetic", "data.val_size=200",
        "data.train_subset=512", "data.batch_size=64", "epochs=2", "optim.lr=0.05", "precision=fp32",
        f"out={out}"]))
    return out / "model.ckpt"


@pytest.fixture(scope="session")
def int8_stage(tiny_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    """`edlab quantize --method int8` of ``tiny_ckpt`` (128 calibration images): its run folder (``int8``) and
    summary, made once for the whole run (test_export checks the stage, test_report draws it)."""
    pytest.importorskip("onnxruntime")
    from edlab.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("int8-stage") / "int8"
    return out, quantize_checkpoint(tiny_ckpt, "int8", calib_images=128, out=str(out))


# `edlab train`'s arguments for the smallest run the commands' tests drive (test_hostile_files,
# test_numerical_faults, test_resume_file, test_pipeline)
TINY_TRAIN = ["--model", "resnet20", "--dataset", "synthetic", "--train-subset", "128", "--batch-size", "64",
              "--precision", "fp32", "--threads", "1", "--set", "model.width=0.25", "--set", "data.val_size=64"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished `edlab train TINY_TRAIN --epochs 1` run folder (config.yaml, model.ckpt, resume.pt, ...),
    trained once for the whole run. Tests read it; one that writes into it (a --resume) copies it first:
    ``shutil.copytree(tiny_run, tmp_path / "run")`` (a run folder continues wherever it is copied)."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    r = invoke("train", *TINY_TRAIN, "--epochs", "1", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def ckpt(tiny_run):
    """A tiny trained checkpoint (1 epoch, synthetic) for the commands that take one: conftest's tiny run."""
    return tiny_run / "model.ckpt"


def flat_weights(model):
    """Every floating-point tensor of ``model``'s state, flattened into one float vector (to compare weights)."""
    return torch.cat([v.detach().flatten().float() for v in model.state_dict().values() if v.is_floating_point()])


@pytest.fixture
def threads_from_env():
    """Honour OMP_NUM_THREADS for torch in a test and restore the setting afterwards: on a shared 2-core machine
    a second thread makes tiny models up to 4x slower. Files whose tests train use it for all their tests
    (``pytestmark = pytest.mark.usefixtures("threads_from_env")``); not autouse for the whole run, where it
    would undo a module's ``one_thread``."""
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_ckpt(tmp_path):
    """An untrained resnet20 (width 0.25) saved as `edlab train --dataset synthetic` saves it (its config in
    the metadata), in a folder of its own: what eval, prune, quantize and export take, made in a second."""
    from edlab import create_model, save_checkpoint
    from edlab.config import load_train_config

    cfg = load_train_config(None, None, ["model.name=resnet20", "model.width=0.25", "data.dataset=synthetic",
                                         "data.val_size=128", "data.batch_size=64", "precision=fp32"])
    path = tmp_path / "src" / "model.ckpt"
    return save_checkpoint(create_model("resnet20", width=0.25), path, config=cfg.model_dump(mode="json"))


@pytest.fixture
def runs_unchanged(tmp_path, monkeypatch):
    """Work in a folder whose runs/ holds one earlier run that runs/latest points at; the returned check,
    called after a command refused its input, fails if a run folder was made or runs/latest moved."""
    home = tmp_path / "project"
    (home / "runs" / "earlier").mkdir(parents=True)
    (home / "runs" / "latest").symlink_to("earlier")
    monkeypatch.chdir(home)

    def check():
        assert sorted(p.name for p in (home / "runs").iterdir()) == ["earlier", "latest"]
        assert os.readlink(home / "runs" / "latest") == "earlier"

    return check


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a second thread on a shared 2-core machine costs 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Markers edlab keeps in ~/.cache (the md5 verdict per data folder) go to a folder of this session."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it on its xdist worker: a
    tolerance checked on randomly initialised weights (a 4-bit activation code flipping near a threshold)
    would otherwise pass or fail with the test order."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_teacher_tables(tmp_path, monkeypatch):
    """Each test its own shared teacher-table cache (edlab.distill.shared_table_dir): a table another test
    left there would spare a test the teacher's pass it counts."""
    monkeypatch.setenv("EDLAB_TEACHER_CACHE", str(tmp_path / "teacher-tables"))


def write_fake_cifar(root: Path, n: int = 20, bad_label: bool = False, labels: list | None = None) -> Path:
    """A CIFAR-10 folder (cifar-10-batches-py, pickled batches) of ``n`` random images per batch: the layout
    the data reader takes, small enough to damage on purpose. ``labels``: every batch's labels; ``bad_label``:
    the first label out of range."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(rng.integers(0, 10, n)) if labels is None else labels
        if bad_label:
            labels[0] = 12
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels}, f)
    return folder
