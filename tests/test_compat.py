"""Files written by an earlier edlab (tests/data/compat, made by its make.py at the commit in made_by.json)
load, score and resume as they did then: a refactor must not strand a user's checkpoints, packed files,
ONNX files, killed runs or study folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPAT = Path(__file__).parent / "data" / "compat"
EXPECTED = json.loads((COMPAT / "expected.json").read_text())
MODELS = [name for name in EXPECTED if not name.endswith(".json")]


def edlab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("name", MODELS)
def test_an_earlier_file_gives_the_same_outputs_and_score(name):
    import edlab

    want = EXPECTED[name]
    model = edlab.load_model(str(COMPAT / name))
    with torch.no_grad():
        logits = model(torch.load(COMPAT / "images.pt"))
    torch.testing.assert_close(logits.float(), torch.tensor(want["logits"]), rtol=1e-4, atol=1e-4)
    prof = edlab.score_file(str(COMPAT / name))
    for key in ["params", "nonzero_params", "macs", "views"]:
        assert getattr(prof, key) == want[key], key
    for key in ["score", "bits_w", "bits_a", "ps", "pu"]:
        assert getattr(prof, key) == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_an_earlier_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    from edlab import load_checkpoint

    run = tmp_path / "moved"
    shutil.copytree(COMPAT / "train-killed", run)
    r = edlab("train", run / "config.yaml", "--out", run, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from epoch 1 of 2" in r.stdout
    got = load_checkpoint(run / "model.ckpt").state_dict()
    want = load_checkpoint(COMPAT / "train-full" / "model.ckpt").state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-3, atol=1e-4, msg=key)


def test_an_earlier_study_folder_is_finished_and_selects_the_same_point(tmp_path):
    for name in ["study.yaml", "train.yaml"]:
        shutil.copy(COMPAT / name, tmp_path / name)
    shutil.copytree(COMPAT / "study", tmp_path / "study")
    r = edlab("sweep", "study.yaml", "--out", "study", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "running" not in r.stdout, r.stdout  # every trial was finished: nothing is run again
    got = json.loads((tmp_path / "study" / "study.json").read_text())
    want = EXPECTED["study/study.json"]
    assert got["best"]["slot"] == want["best"]["slot"]
    assert got["winner"]["score"] == pytest.approx(want["winner"]["score"])
    assert got["winner"]["test_accuracy"] == want["winner"]["test_accuracy"]  # read once, then; not again
    assert [t["val_accuracy"] for t in got["trials"]] == [t["val_accuracy"] for t in want["trials"]]
