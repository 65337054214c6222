"""The stage skeleton (edlab.stage): a new stage is its algorithm plus one run_model_stage call, and gets the
run folder, the resume check, the teacher's leak record, the stage history and the summary from it."""

import json

import pytest
import torch
import torch.nn as nn

from edlab import EdlabError
from edlab.checkpoint import load_checkpoint, save_checkpoint
from edlab.evaluation import final_test
from edlab.models import create_model
from edlab.stage import StageRun, inference_record, inherit_config, run_model_stage


def _measure(s: StageRun, model: nn.Module) -> tuple[nn.Module, dict]:
    """A stage that only tests its model: the smallest algorithm the skeleton can run."""
    test = final_test(model, s.data, None, s.cfg)
    inference = inference_record(s.cfg, None)
    s.save(model, s.entry({"note": "measured"}, test, inference), test_accuracy=test["accuracy"],
           inference=inference)
    return model, {"test_accuracy": test["accuracy"]}


def test_a_new_stage_is_its_algorithm_plus_one_call(tiny_cfg, tmp_path):
    save_checkpoint(create_model("resnet20", width=0.25), tmp_path / "t.ckpt")
    cfg = tiny_cfg(**{"data.train_subset": 64, "distill.teacher": str(tmp_path / "t.ckpt")})
    model, summary = run_model_stage("measure", cfg, _measure, create_model("resnet20", width=0.25))
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert set(summary) == {"test_accuracy", "command", "run_dir", "host", "teacher", "teacher_val_leak", "val_leak"}
    assert summary["teacher"] == str(tmp_path / "t.ckpt") and summary["val_leak"] == 0
    # the machine it ran on: a figure's CPU kind and threads travel with it
    assert summary["host"]["threads"] == torch.get_num_threads() >= 1
    assert summary["host"]["kind"] in ("AMX", "AVX512-BF16, no AMX", "AVX2", "unknown")
    assert (run / "config.yaml").exists()
    saved = load_checkpoint(run / "model.ckpt").edlab_metadata
    assert saved["stages"][-1] == {"stage": "measure", "note": "measured", "train_subset": 64,
                                   "test_accuracy": summary["test_accuracy"], "views": 1,
                                   "teacher_val_leak": None}

    # resuming with another config is refused before anything runs; the same config continues
    with pytest.raises(EdlabError, match="config differs"):
        run_model_stage("measure", tiny_cfg(**{"data.train_subset": 32}), _measure, model, resume=True)
    run_model_stage("measure", cfg, _measure, model, resume=True)


def test_a_folder_the_stage_made_is_removed_when_it_fails_before_its_algorithm(tiny_cfg, tmp_path):
    save_checkpoint(create_model("resnet20", width=0.25, num_classes=100), tmp_path / "t100.ckpt")
    cfg = tiny_cfg(**{"distill.teacher": str(tmp_path / "t100.ckpt")})
    with pytest.raises(EdlabError, match="100 classes"):
        run_model_stage("measure", cfg, _measure, create_model("resnet20", width=0.25))
    assert not (tmp_path / "run").exists()


def test_inherit_config_keeps_the_sources_training_and_drops_its_run():
    model = create_model("resnet20", width=0.25)
    model.edlab_metadata = {"config": {"name": "src", "out": "runs/src", "final_test": False, "seed": 5,
                                       "optim": {"lr": 0.2}, "data": {"dataset": "synthetic"},
                                       "distill": {"teacher": "t.ckpt", "crop_pool": 4}}}
    cfg = inherit_config(model, lambda base: {"optim": {"lr": base.optim.lr / 10}}, {"epochs": 3},
                         sets=["data.cutout=8"])
    assert (cfg.optim.lr, cfg.epochs, cfg.data.cutout, cfg.seed, cfg.data.split_seed) == (0.02, 3, 8, 5, 5)
    assert cfg.name is None and cfg.out is None and cfg.final_test is True
    assert cfg.distill.teacher is None and cfg.distill.crop_pool == 0 and cfg.model.checkpoint is None
