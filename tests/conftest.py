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
