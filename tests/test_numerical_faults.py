"""Numerical faults: a non-finite loss stops the run keeping the last good epoch (and --resume finishes it),
or, with nan_policy=skip, skips only the bad step."""

import json

import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, invoke
from conftest import flat_weights as _weights

from edlab import EdlabError, load_checkpoint, save_checkpoint
from edlab.data import data_from_config
from edlab.resume import read_resume
from edlab.runs import Run
from edlab.train import fit, model_from_config, train

TINY = TINY_TRAIN  # (conftest's tiny run)


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
