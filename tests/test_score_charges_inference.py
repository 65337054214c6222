"""A score describes the inference that produced the accuracy printed beside it (docs/score.md): test-time
views multiply f everywhere a score is reported, stages measure their source as they measure themselves, the
validation split is inherited, and ps/pu count architecture weights only."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edlab.checkpoint import load_checkpoint
from edlab.cli import cli
from edlab.config import load_train_config
from edlab.models import create_model
from edlab.prune import prune_structured, prune_unstructured
from edlab.quantize import binarize, calibrate, quantize_checkpoint, quantize_qat, stage_config
from edlab.scoring import profile, views_of
from edlab.train import train
from edlab.views import TTA_VIEWS

TINY = ["model.name=resnet20", "model.width=0.25", "data.dataset=synthetic", "data.val_size=128",
        "data.train_subset=256", "data.batch_size=64", "epochs=1", "precision=fp32", "threads=1"]


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    """A tiny run validated and tested with the 6 flip-shift views."""
    out = tmp_path_factory.mktemp("tta") / "run"
    _, s = train(load_train_config(None, None, TINY + ["tta=flip-shift", f"out={out}"]))
    return out, s


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_views_multiply_f_in_summary_checkpoint_and_score_command(tta_run):
    out, s = tta_run
    single = profile(create_model("resnet20", width=0.25), views=1)
    assert s["views"] == 6 and s["inference"] == {"tta": "flip-shift", "views": 6, "precision": "fp32"}
    assert s["macs"] == single.macs  # one forward pass...
    assert s["ops"] == 6 * single.ops  # ...charged six times
    assert s["score_ops_term"] == pytest.approx(6 * single.score_ops_term)
    assert s["score_params_term"] == pytest.approx(single.score_params_term)
    model = load_checkpoint(out / "model.ckpt")
    assert views_of(model) == 6 and model.edlab_metadata["inference"]["views"] == 6
    r = invoke("score", out / "model.ckpt", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["score"] == pytest.approx(s["score"])
    r = invoke("score", out / "model.ckpt", "--json", "--tta", "none")  # another protocol, asked for
    assert json.loads(r.stdout)["score"] == pytest.approx(single.score)
    r = invoke("score", out / "model.ckpt")
    assert "6 views per image" in r.output and "f = 6 x the MACs" in r.output


def test_views_are_known_for_every_tta_and_formula_view_charges_them():
    m = create_model("resnet20", width=0.25)
    for tta, n in TTA_VIEWS.items():
        p = profile(m, views=n)
        assert p.formula_view["f"] == n * p.macs and p.formula_view["score"] == pytest.approx(p.score)
        m.edlab_metadata = {"config": {"tta": tta}}  # an older checkpoint: the views of its config's tta
        assert views_of(m) == n
    with pytest.raises(Exception, match="views must be a positive int"):
        profile(m, views=0)


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_quantize_stage_charges_and_compares_with_the_same_views(tta_run, tmp_path):
    out, s = tta_run
    q = quantize_checkpoint(out / "model.ckpt", "bf16", out=str(tmp_path / "bf16"))
    assert q["views"] == 6 and q["inference"]["views"] == 6 and q["reference_views"] == 6
    # the reference is the float source with the same 6 views: its accuracy is the training run's test figure
    assert q["reference_test_accuracy"] == pytest.approx(s["test_accuracy"])
    q1 = quantize_checkpoint(out / "model.ckpt", "bf16", out=str(tmp_path / "bf16-1"), sets=["tta=none"])
    assert q1["views"] == 1 and q1["reference_views"] == 1
    assert q1["score_ops_term"] == pytest.approx(q["score_ops_term"] / 6)


def test_pipeline_score_stage_report_and_study_charge_the_views(tta_run, tmp_path):
    pytest.importorskip("optuna")
    (tmp_path / "tiny.yaml").write_text("model: {name: resnet20, width: 0.25}\n"
                                        "data: {dataset: synthetic, val_size: 128, train_subset: 256, batch_size: 64}\n"
                                        "epochs: 1\nprecision: fp32\nthreads: 1\ntta: flip-shift\n")
    (tmp_path / "study.yaml").write_text("name: v\nrecipe:\n  - train: {config: tiny.yaml}\n  - score: {}\n"
                                         "grid:\n  train.optim.lr: [0.05]\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = invoke("sweep", "study.yaml", "--out", "sv")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    trial = json.loads((tmp_path / "sv" / "study.json").read_text())["trials"][0]
    stage = tmp_path / "sv" / "trials" / "0000"
    scored = json.loads((stage / "01-score" / "result.json").read_text())
    trained = json.loads((stage / "00-train" / "summary.json").read_text())
    assert scored["views"] == trained["views"] == trial["views"] == 6
    assert trial["score"] == pytest.approx(scored["score"]) == pytest.approx(trained["score"])
    r = invoke("report", stage, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| run |"))
    row = next(line for line in lines if line.startswith("| 00-train |"))
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["views"] == "6" and float(cells["score"]) == pytest.approx(trained["score"], rel=1e-3)


def qat_model(bits=4):
    m = create_model("resnet20", width=0.25)
    quantize_qat(m, bits, bits)
    calibrate(m, torch.randn(8, 3, 32, 32))
    return m


@pytest.mark.parametrize("make", ["qat", "binaryconnect", "pruned+qat"])
def test_ps_pu_count_architecture_weights_only(make):
    m = create_model("resnet20", width=0.25)
    x = torch.randn(1, 3, 32, 32)
    if make == "pruned+qat":
        prune_structured(m, 0.3, x)
        prune_unstructured(m, 0.2)
    dense_pu = profile(m).pu
    ps = profile(m).ps
    if make == "binaryconnect":
        binarize(m, scale=True)
    else:
        quantize_qat(m, 4, 4)
        calibrate(m, torch.randn(8, 3, 32, 32))
    p = profile(m)
    assert p.ps >= 0 and p.ps == pytest.approx(ps, abs=1e-9)  # the step sizes / scales are not architecture
    assert p.pu == pytest.approx(dense_pu, abs=1e-9)
    if make == "qat":
        assert p.ps == 0.0


def test_stages_inherit_the_validation_split(tta_run):
    out, _ = tta_run
    model = load_checkpoint(out / "model.ckpt")
    assert model.edlab_metadata["config"]["data"]["split_seed"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the split is the source's
        cfg = stage_config(model, out / "model.ckpt", "qat", {}, ["seed=3"])
    assert cfg.seed == 3 and cfg.data.split_seed == 0  # a new seed re-draws training randomness, not the split
    with pytest.warns(UserWarning, match=r"were training images of the source model"):
        cfg = stage_config(model, out / "model.ckpt", "qat", {}, ["data.split_seed=5"])
    assert cfg.data.split_seed == 5


def test_the_split_seed_selects_the_same_images_as_before(tmp_path):
    """Runs from before split_seed existed drew the split from `seed`: the same images now."""
    from edlab.data import get_data

    a = get_data("synthetic", val_size=100, seed=4)
    b = get_data("synthetic", val_size=100, seed=9, split_seed=4)
    assert torch.equal(a.val.split.images, b.val.split.images)


def test_older_config_resumes_without_split_seed(tmp_path):
    from edlab.stage import same_run_config, with_split_seed

    cfg = with_split_seed(load_train_config(None, None, TINY + ["seed=2"]))
    saved = Path(tmp_path / "config.yaml")
    d = cfg.model_dump(mode="json")
    d["data"].pop("split_seed")
    import yaml

    saved.write_text(yaml.safe_dump(d))
    assert same_run_config(saved, cfg)


def test_commands_take_a_run_folder(tta_run, tmp_path):
    out, s = tta_run
    r = invoke("score", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["score"] == pytest.approx(s["score"])
    r = invoke("info", out)
    assert r.exit_code == 0 and "measured with tta flip-shift (6 views per image)" in r.output, r.output
    assert "stages: train" in r.output
    r = invoke("eval", out, "--json", "--tta", "none")
    assert r.exit_code == 0, r.output
    (tmp_path / "empty").mkdir()
    for cmd in ("score", "eval", "info", "pack"):
        args = [cmd, tmp_path / "empty"] + (["--out", tmp_path / "x.pack"] if cmd == "pack" else [])
        r = invoke(*args)
        assert r.exit_code == 2 and "is a folder without a model file" in r.output, (cmd, r.output)
        assert len(r.output.strip().splitlines()) == 1
