"""The command line as a user drives it: subprocesses, exit codes, one-line errors, files left intact."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from edlab.cli import cli

TINY = ["--model", "resnet20", "--dataset", "synthetic", "--train-subset", "256", "--batch-size", "64",
        "--precision", "fp32", "--set", "model.width=0.5", "--set", "data.val_size=128"]


def edlab(*args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "edlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_train_eval_score_info(tmp_path):
    out = tmp_path / "run"
    r = edlab("train", *TINY, "--epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in ["test_accuracy", "val_accuracy", "params", "macs", "epochs", "seconds", "command", "score",
                "score_params_term", "score_ops_term", "nonzero_params", "bits_w", "bits_a", "ps", "pu"]:
        assert key in s, key
    assert s["command"].startswith("edlab train")
    r = edlab("eval", out / "model.ckpt", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-6)
    r = edlab("score", out / "model.ckpt", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["score"] == pytest.approx(s["score"])
    assert edlab("info", "resnet20").returncode == 0


@pytest.mark.parametrize("args,msg", [
    (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--set", "data.batch_size=0"], "data.batch_size"),
    (["train", "missing.yaml"], "config file not found"),
    (["train", "--model", "resnet99", "--dataset", "synthetic"], "unknown model 'resnet99'"),
    (["eval", "nope.ckpt"], "checkpoint not found"),
    (["score", "not-a-model"], "neither a checkpoint file nor a model"),
    (["train", "--resume"], "--resume needs --out"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, tmp_path, monkeypatch):
    """In process (click's runner, as edlab's entry point runs it); the next test checks one case from a real
    process, interpreter start-up and warnings included."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*args), msg)


def test_eval_threads_sets_torchs_cpu_threads(tmp_path, monkeypatch):
    """`edlab eval --threads 1` beside a training on a shared machine: torch gets 1 thread before any work."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.chdir(tmp_path)
    r = invoke("eval", "nope.ckpt", "--threads", "1")
    assert calls == [1] and r.exit_code == 2
    assert_one_line_error(invoke("eval", "nope.ckpt", "--threads", "0"), "threads must be >= 1, got 0")
    assert calls == [1]  # refused before anything runs


def test_bad_input_from_a_real_process_is_one_line_and_exit_2(tmp_path):
    r = edlab("train", "--set", "optim.lrr=1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "unknown config key 'optim.lrr'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_out_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = edlab("train", *TINY, "--epochs", "1", "--out", out)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_corrupt_checkpoint_is_reported_in_one_line(tmp_path):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = edlab("score", p)
    assert r.returncode == 2 and "not a valid edlab checkpoint" in r.stderr


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_sigkill_then_resume(tmp_path):
    """Kill the process in the middle of training (after the first epoch is logged), then --resume."""
    args = [*TINY, "--epochs", "3", "--seed", "1"]
    ref = tmp_path / "ref"
    assert edlab("train", *args, "--out", ref).returncode == 0
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.Popen([sys.executable, "-m", "edlab", "train", *args, "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists()
    r = edlab("train", *args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)
    strip = ("seconds", "train_seconds", "images_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in strip}
             for line in Path(d, "metrics.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert rows[0] == rows[1]


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_demo_runs_the_whole_workflow_offline(tmp_path):
    """The README's main job: train -> prune -> quantize -> score -> report, falling back to synthetic data."""
    r = edlab("demo", "--epochs", "1", "--train-subset", "256", "--data-dir", tmp_path / "none",
              "--out", tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "running the same pipeline on the synthetic dataset" in r.stdout
    stages = json.loads((tmp_path / "demo" / "pipeline.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["train", "prune", "quantize", "score"]
    assert stages[-1]["summary"]["score"] < stages[1]["summary"]["score"] < stages[0]["summary"]["score"]
    assert (tmp_path / "demo" / "report" / "index.html").exists()


def test_no_validation_split_is_said_not_shown_as_minus_100(tmp_path):
    """val_size 0 (airbench94.yaml trains on all 50,000 images): no fake "best val -100.00% @ epoch -1"."""
    from conftest import invoke

    from edlab.checkpoint import load_checkpoint

    out = tmp_path / "r"  # (in process: what train prints, not how a process exits)
    r = invoke("train", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "128",
               "--precision", "fp32", "--set", "model.width=0.25", "--set", "data.val_size=0", "--out", out)
    assert r.exit_code == 0, r.output
    assert "no validation split" in r.stdout and "-100" not in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["best_val_accuracy"] is None and s["best_epoch"] is None
    assert load_checkpoint(out / "model.ckpt").edlab_metadata["val_accuracy"] is None


def test_every_commands_dataset_and_tta_choices_are_the_configs():
    """The dataset and view names the commands offer (written out in cli/_common.py so that `edlab --help`
    loads no library) are the config's, and the library's own checks use the config's (edlab.config.DATASETS)."""
    from edlab.cli import _common
    from edlab.config import DATASETS, TrainConfig, choices
    from edlab.evaluation import AUTOCAST_AS
    from edlab.evaluation import DATASETS as EVAL_DATASETS

    assert _common.DATASETS == DATASETS == EVAL_DATASETS
    assert list(_common.TTA_NAMES) == choices(TrainConfig, "tta")
    assert _common.AUTOCAST_AS == AUTOCAST_AS


def test_options_are_consistent_across_commands():
    """--epochs where --finetune-epochs is; --train-subset and --threads on quantize and lr-find."""
    from click import Context

    def names(cmd):
        return {o for p in cli.get_command(Context(cli), cmd).params for o in p.opts}

    assert {"--epochs", "--finetune-epochs"} <= names("prune")
    for cmd in ("train", "prune", "quantize", "lr-find"):
        assert {"--train-subset", "--threads"} <= names(cmd), cmd
