import json
import math
from pathlib import Path

import pytest
import torch
from conftest import kill_after_epoch

from edlab import EdlabError, load_checkpoint
from edlab.config import SchedConfig
from edlab.data import data_from_config
from edlab.lr_find import lr_range_test
from edlab.optim import LRSchedule
from edlab.runs import Run
from edlab.train import fit, model_from_config, train


def test_training_learns_and_writes_a_run_directory(tiny_cfg):
    cfg = tiny_cfg(epochs=4)
    model, s = train(cfg)
    run = cfg.out
    for f in ["config.yaml", "metrics.jsonl", "summary.json", "model.ckpt", "resume.pt", "tb"]:
        assert (Path(run) / f).exists(), f
    assert s["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert s["epochs"] == 4 and s["params"] > 0 and s["macs"] > 0
    rows = Run.open(run).metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    reloaded = load_checkpoint(f"{run}/model.ckpt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-5)


def _final_weights(model):
    return torch.cat([p.detach().flatten().float() for p in model.state_dict().values()
                      if p.is_floating_point()])


@pytest.mark.parametrize("extra", [pytest.param({}, id="plain"),  # ema-tta: CI runs it (slow), the default suite not
                                   pytest.param({"data.mixup": 0.4, "data.cutmix": 1.0}, id="mixup-cutmix"),
                                   pytest.param({"ema": 0.9, "tta": "flip-shift"}, id="ema-tta",
                                                marks=pytest.mark.slow)])
def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path, extra):
    full = tiny_cfg(epochs=3, out=str(tmp_path / "full"), **extra)
    m_full, s_full = train(full)

    cut = tiny_cfg(epochs=3, out=str(tmp_path / "cut"), **extra)
    kill_after_epoch(cut, 2)
    m_res, s_res = train(cut, resume=True)
    assert s_res["test_accuracy"] == s_full["test_accuracy"]
    assert torch.equal(_final_weights(m_res), _final_weights(m_full))
    strip = ("seconds", "train_seconds", "images_per_s")
    a = [{k: v for k, v in r.items() if k not in strip} for r in Run.open(full.out).metrics()]
    b = [{k: v for k, v in r.items() if k not in strip} for r in Run.open(cut.out).metrics()]
    assert a == b


def test_a_copied_run_folder_resumes_elsewhere_to_the_same_weights(tiny_cfg, tmp_path):
    """Portable runs: a run stopped after epoch 2, its folder copied to another path and the original
    removed, continues there with --out <new path> --resume to the weights of the uninterrupted run."""
    import shutil

    full = tiny_cfg(epochs=3, out=str(tmp_path / "A"))
    m_full, _ = train(full)
    kill_after_epoch(tiny_cfg(epochs=3, out=str(tmp_path / "B")), 2)
    shutil.copytree(tmp_path / "B", tmp_path / "elsewhere" / "C")
    shutil.rmtree(tmp_path / "B")
    moved = tiny_cfg(epochs=3, out=str(tmp_path / "elsewhere" / "C"))
    m_res, s_res = train(moved, resume=True)
    assert torch.equal(_final_weights(m_res), _final_weights(m_full))
    assert [r["epoch"] for r in Run.open(moved.out).metrics()] == [1, 2, 3]
    assert s_res["run_dir"] == moved.out and not (tmp_path / "B").exists()


def test_a_small_students_resume_state_is_under_a_megabyte(tiny_cfg, tmp_path):
    """The depthwise challenge student's resume.pt (weights, momentum, history) is small enough to commit."""
    cfg = tiny_cfg(epochs=1, out=str(tmp_path / "s"), **{"model.width": 1.0, "model.blocks": "[2,3,3]",
                                                          "model.conv": "depthwise", "data.train_subset": 128})
    train(cfg)
    size = (Path(cfg.out) / "resume.pt").stat().st_size
    assert size < 1_000_000, size


def test_resume_with_a_different_config_is_refused(tiny_cfg):
    cfg = tiny_cfg(epochs=1)
    train(cfg)
    with pytest.raises(EdlabError, match="config differs"):
        train(tiny_cfg(epochs=1, **{"model.width": 0.25}), resume=True)


def _nan_model(cfg):
    data = data_from_config(cfg, torch.device("cpu"))
    model = model_from_config(cfg, data.num_classes)
    with torch.no_grad():
        model.bn1.weight[0] = float("nan")  # every forward now produces NaN logits
    return model, data


def test_non_finite_loss_stops_with_a_clear_message(tiny_cfg):
    cfg = tiny_cfg(epochs=1)
    model, data = _nan_model(cfg)
    with pytest.raises(EdlabError, match=r"loss became non-finite \(nan/inf\) at epoch 1 step 1;"):
        fit(model, data, cfg)


def test_non_finite_loss_skip_policy(tiny_cfg):
    cfg = tiny_cfg(epochs=1, nan_policy="skip")
    model, data = _nan_model(cfg)
    state = fit(model, data, cfg)
    assert state.skipped_steps == len(data.train)


def test_distillation_and_mixup_and_options_run(tiny_cfg, tmp_path):
    teacher_cfg = tiny_cfg(epochs=2, out=str(tmp_path / "teacher"))
    train(teacher_cfg)
    cfg = tiny_cfg(epochs=1, out=str(tmp_path / "student"), **{
        "distill.teacher": f"{tmp_path}/teacher/model.ckpt", "data.mixup": 0.2, "data.cutout": 8,
        "label_smoothing": 0.1, "grad_clip": 1.0, "optim.name": "adamw", "optim.lr": 0.003,
        "sched.name": "onecycle", "keep": "best", "data.augment": "fancy"})
    _, s = train(cfg)
    assert math.isfinite(s["test_loss"]) and (tmp_path / "student" / "best.ckpt").exists()


@pytest.mark.parametrize("name", ["cosine", "onecycle", "step", "plateau", "none"])
def test_schedules(name):
    s = LRSchedule(SchedConfig(name=name, warmup_epochs=1 if name != "onecycle" else 0, step_size=2,
                               patience=0), epochs=4, steps_per_epoch=10)
    f = [s.factor(i) for i in range(40)]
    assert all(0 <= v <= 1.0 + 1e-9 for v in f)
    if name in ("cosine", "step", "plateau", "none"):
        assert f[0] == pytest.approx(1 / 25) and f[10] == pytest.approx(1.0)  # linear warm-up
    if name == "cosine":
        assert f[39] < 0.01
    if name == "onecycle":
        assert max(f) == pytest.approx(1.0, abs=0.05) and f[-1] < 0.01
    if name == "plateau":
        s.epoch_end(1.0)
        s.epoch_end(1.0)  # no improvement with patience 0 -> decay
        assert s.factor(35) == pytest.approx(0.1)


def test_lr_range_test_restores_weights(tiny_cfg):
    cfg = tiny_cfg()
    data = data_from_config(cfg, torch.device("cpu"))
    model = model_from_config(cfg, data.num_classes)
    before = _final_weights(model).clone()
    r = lr_range_test(model, data, cfg, steps=30)
    assert 1e-6 <= r["suggested_lr"] <= 10 and len(r["lrs"]) == len(r["losses"]) > 5
    assert torch.equal(before, _final_weights(model))


def test_ema_is_the_running_average_of_the_weights():
    from edlab.tricks import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # warm-up decay min(0.5, 2/11): the average moves 9/11 of the way
    assert torch.allclose(ema.model.weight, start + 9 / 11)
    ema.update()  # warm-up decay min(0.5, 3/12): 3/4 of the remaining 2/11
    assert torch.allclose(ema.model.weight, start + 1 - (2 / 11) * 0.25)
    assert not ema.model.weight.requires_grad


def test_test_time_views_are_the_trained_symmetries():
    from edlab.views import shift, tta_logits

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert torch.equal(shift(x, 1, 1)[..., 1:, 1:], x[..., :-1, :-1])  # content moves down-right
    assert torch.equal(shift(x, -1, -1)[..., :-1, :-1], x[..., 1:, 1:])

    class LeftHalf(torch.nn.Module):  # not flip-invariant: TTA must change its output
        def forward(self, x):
            return x[..., :4].mean((1, 2, 3))[:, None].repeat(1, 2)

    m = LeftHalf()
    assert torch.equal(tta_logits(m, x, "none"), m(x))
    assert torch.allclose(tta_logits(m, x, "flip"), (m(x) + m(x.flip(3))) / 2)
    assert tta_logits(m, x, "flip-shift").shape == (2, 2)


def test_train_prints_the_one_view_score_beside_the_charged_one(tmp_path):
    """A config that tests with 6 views (resnet20-cifar10.yaml: tta airbench) is charged 6 forward passes per
    image; the last line of `edlab train` said only "score 0.9232" for the model the demo scored 0.1944 at one
    view. It now prints both, and the one-view figure is `edlab score --tta none` of the same checkpoint."""
    import json

    from click.testing import CliRunner

    from edlab.cli import cli

    out = tmp_path / "r"
    r = CliRunner().invoke(cli, ["train", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "0.5",
                                 "--train-subset", "64", "--threads", "1", "--precision", "fp32", "--out", str(out),
                                 "--set", "model.width=0.25", "--set", "data.val_size=16", "--set", "tta=airbench"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    one = json.loads(CliRunner().invoke(cli, ["score", str(out / "model.ckpt"), "--tta", "none", "--json"]).stdout)
    assert s["views"] == 6 and s["score_one_view"] == pytest.approx(one["score"]) and one["score"] < s["score"]
    assert f"score {s['score']:.4f} (6 test-time views charged; one view {one['score']:.4f})" in \
        " ".join(r.output.split())


@pytest.mark.parametrize("keep", ["last", "best"])
def test_the_saved_model_records_the_validation_accuracy_of_its_own_weights(tiny_cfg, keep):
    """keep=last saved the last epoch's weights with the best epoch's val accuracy in their metadata, so
    `edlab info` read 87.70 % for a model that validated at 86.50 % (the 300-epoch challenge student)."""
    cfg = tiny_cfg(epochs=4, **{"optim.lr": 0.3, "sched.name": "none", "keep": keep})  # val peaks before the end
    _, s = train(cfg)
    vals = [json.loads(line)["val_accuracy"] for line in open(f"{cfg.out}/metrics.jsonl")]
    want = vals[-1] if keep == "last" else max(vals)
    assert load_checkpoint(f"{cfg.out}/model.ckpt").edlab_metadata["val_accuracy"] == want
    assert s["val_accuracy"] == want and s["last_val_accuracy"] == vals[-1]  # a recipe study ranks by the first


def test_eval_reproduces_an_accuracy_tested_under_bf16_autocast(tiny_cfg):
    """A run tested under bf16 autocast is re-measured under it by `edlab eval` (the accuracy beside its score
    is reproduced, not a float32 neighbour of it); --autocast fp32 measures it in float32."""
    from edlab.evaluation import evaluate_checkpoint

    cfg = tiny_cfg(epochs=1, precision="bf16")
    _, s = train(cfg)
    assert s["inference"]["precision"] == "bfloat16"
    again = evaluate_checkpoint(f"{cfg.out}/model.ckpt", batch_size=64)
    assert again["precision"].startswith("bfloat16 autocast")
    assert again["test_accuracy"] == s["test_accuracy"]
    assert again["test_loss"] == pytest.approx(s["test_loss"], rel=1e-4)  # (another batch size: bf16 sums differ)
    fp32 = evaluate_checkpoint(f"{cfg.out}/model.ckpt", batch_size=64, autocast_as="fp32")
    assert fp32["precision"] == "fp32" and fp32["test_loss"] != again["test_loss"]
    with pytest.raises(EdlabError, match="unknown autocast 'fp8'"):
        evaluate_checkpoint(f"{cfg.out}/model.ckpt", autocast_as="fp8")
