"""Experiment trackers: W&B and MLflow get the same metrics as TensorBoard, behind `tracker:`.

Fake ``wandb`` / ``mlflow`` modules injected into sys.modules record the calls, so these tests need neither
package nor network; one test talks to a real MLflow file store when mlflow(-skinny) is installed.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml
from click.testing import CliRunner

from edlab.cli import cli
from edlab.errors import EdlabError
from edlab.runs import Run

ROW = {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.25, "val_loss": float("nan"), "val_accuracy": 0.5,
       "lr": 0.1}


class FakeWandbRun:
    def __init__(self, calls: list):
        self.id = "wb123"
        self.calls = calls

    def log(self, values, step):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    mod = types.ModuleType("wandb")

    def init(**kw):
        calls.append(("init", kw))
        return FakeWandbRun(calls)

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


class FakeMlflowClient:
    calls: list = []

    def __init__(self, tracking_uri):
        self.calls.append(("client", tracking_uri))

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return "7"

    def create_run(self, exp_id, run_name):
        self.calls.append(("run", exp_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="ml456"))

    def log_param(self, run_id, key, value):
        self.calls.append(("param", key, value))

    def log_metric(self, run_id, key, value, step):
        self.calls.append(("metric", run_id, key, value, step))

    def set_terminated(self, run_id):
        self.calls.append(("end", run_id))


def _run_with(tmp_path, tracker: str) -> Run:
    run = Run.create("t", str(tmp_path / "run"))
    run.write_text("config.yaml", yaml.safe_dump({"tracker": tracker, "optim": {"lr": 0.1}}))
    return run


def test_wandb_gets_metrics_and_resumes(tmp_path, fake_wandb):
    run = _run_with(tmp_path, "wandb")
    run.log_metrics(ROW)
    run.close()
    (_, init), (_, values, step), (end,) = fake_wandb
    assert init["name"] == "run" and init["config"]["optim"]["lr"] == 0.1 and init["id"] is None
    assert step == 1 and values == {"train/loss": 2.0, "train/accuracy": 0.25, "val/accuracy": 0.5, "lr": 0.1}
    assert end == "finish"
    assert json.loads((tmp_path / "run" / "tracker.json").read_text()) == {"tracker": "wandb", "id": "wb123"}
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard is written as well
    fake_wandb.clear()
    again = Run.open(tmp_path / "run")  # a resumed run continues the same W&B run
    again.write_text("config.yaml", yaml.safe_dump({"tracker": "wandb"}))
    assert fake_wandb[0][1]["id"] == "wb123" and fake_wandb[0][1]["resume"] == "allow"
    again.close()


def test_mlflow_gets_params_and_metrics(tmp_path, monkeypatch):
    mod = types.ModuleType("mlflow")
    mod.MlflowClient = FakeMlflowClient
    FakeMlflowClient.calls = []
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///somewhere")
    run = _run_with(tmp_path, "mlflow")
    run.log_metrics(ROW)
    run.close()
    calls = FakeMlflowClient.calls
    assert calls[:3] == [("client", "file:///somewhere"), ("experiment", "edlab"), ("run", "7", "run")]
    assert ("param", "optim.lr", 0.1) in calls and ("param", "tracker", "mlflow") in calls
    assert ("metric", "ml456", "val/accuracy", 0.5, 1) in calls
    assert not any(c[0] == "metric" and c[2] == "val/loss" for c in calls)  # NaN is not sent
    assert calls[-1] == ("end", "ml456")


def test_tensorboard_only_needs_no_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = _run_with(tmp_path, "tensorboard")
    run.log_metrics(ROW)
    run.close()
    assert not (tmp_path / "run" / "tracker.json").exists()


def test_missing_package_or_failed_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(EdlabError, match=r"pip install edlab\[wandb\]"):
        _run_with(tmp_path, "wandb")
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
    mod = types.ModuleType("wandb")

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty)\nmore lines")

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    with pytest.raises(EdlabError, match=r"^tracker 'wandb' could not start: api_key not configured \(no-tty\)$"):
        _run_with(tmp_path / "second", "wandb")  # the first attempt's folder stays claimed (.edlab-run)


def test_train_flag(tmp_path, fake_wandb, monkeypatch, one_thread):
    args = ["train", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "128",
            "--precision", "fp32", "--set", "model.width=0.25", "--set", "data.val_size=64", "--threads", "1"]
    r = CliRunner().invoke(cli, args + ["--tracker", "wandb", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert [c[0] for c in fake_wandb] == ["init", "log", "finish"] and fake_wandb[1][2] == 1
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["tracker"] == "wandb"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    r = CliRunner().invoke(cli, args + ["--tracker", "mlflow", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and r.output == ("edlab: error: tracker 'mlflow' needs the mlflow package: "
                                             "pip install edlab[mlflow]\n")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_real_mlflow_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow not installed (pip install edlab[mlflow])")
    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # set then unset: restored to unset afterwards
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # edlab opts in to the file store itself
    uri = (tmp_path / "mlruns").as_uri()
    run = _run_with(tmp_path, "mlflow")
    run.log_metrics(ROW)
    run.log_metrics({**ROW, "epoch": 2, "val_accuracy": 0.75})
    run.close()
    again = Run.open(tmp_path / "run")  # resumed: the same MLflow run goes on
    again.write_text("config.yaml", yaml.safe_dump({"tracker": "mlflow", "optim": {"lr": 0.1}}))
    again.log_metrics({**ROW, "epoch": 3, "val_accuracy": 0.8})
    again.close()
    run_id = json.loads((tmp_path / "run" / "tracker.json").read_text())["id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "val/accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75), (3, 0.8)]
    info = client.get_run(run_id)
    assert info.data.params["optim.lr"] == "0.1" and info.info.status == "FINISHED"
