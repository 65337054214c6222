"""Interruption: SIGKILL a pipeline (train -> prune -> quantize qat) at chosen and at random points (inside a
checkpoint write, between stages, mid-epoch), run it again until it finishes, and compare every summary,
metrics line and checkpoint with an uninterrupted run. Harness: tests/killtest.py (reusable for a sweep)."""

import json
import subprocess
import sys

import pytest
import torch
from killtest import KillPoint, env, fingerprint, random_kill_points, run_edlab, run_until_done

from edlab import EdlabError, load_checkpoint, save_checkpoint
from edlab.checkpoint import read_checkpoint
from edlab.models import create_model
from edlab.resume import read_resume

# Tiny stages, 1 thread: train 2 epochs (resume.pt after each) -> prune (fine-tune 1 epoch per step; redone
# from the start when killed) -> qat 2 epochs (resume.pt after each). 17 atomic writes when uninterrupted:
# train config 1, resume 2-3, model 4, summary 5; pipeline.json 6; prune config 7, model 8, summary 9;
# pipeline.json 10; quantize config 11, resume 12-13, model 14, summary 15; pipeline.json 16, 17.
RECIPE = """\
name: kill
stages:
  - train: {model: resnet20, dataset: synthetic, epochs: 2, train-subset: 128, batch-size: 64, precision: fp32,
            threads: 1, seed: 3, model.width: 0.25, data.val_size: 64}
  - prune: {structured: 0.25, unstructured: 0.2, finetune-epochs: 1, train-subset: 128, precision: fp32,
            threads: 1}
  - quantize: {method: qat, bits-w: 4, epochs: 2}
"""


@pytest.fixture(scope="module")
def pipeline_ref(tmp_path_factory):
    """The uninterrupted pipeline: recipe path and fingerprint."""
    d = tmp_path_factory.mktemp("kill")
    (d / "recipe.yaml").write_text(RECIPE)
    r = run_edlab(["run", d / "recipe.yaml", "--out", d / "ref"])
    assert r.returncode == 0, r.stderr
    ref = fingerprint(d / "ref")
    assert {"00-train/model.ckpt", "01-prune/model.ckpt", "02-quantize/model.ckpt"} <= set(ref)
    return d / "recipe.yaml", ref


def _continue_after(recipe, out, kills: list[KillPoint]) -> list[str]:
    cmd = ["run", recipe, "--out", out]
    return run_until_done(cmd, cmd, kills)


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_pipeline_killed_at_chosen_points_ends_as_if_never_killed(pipeline_ref, tmp_path):
    recipe, ref = pipeline_ref
    out = tmp_path / "killed"
    # write numbers count per process. 3: train's second resume.pt, half written (train resumes from epoch
    # 1). 8: the resumed train writes config, metrics, resume.pt, model, summary, pipeline.json, then prune's
    # config and model.ckpt, half written (prune is redone). 7: the redone prune writes 4 files, then qat
    # its config and two resume.pt, the second half written (qat resumes from epoch 1).
    kills = [KillPoint(write=3), KillPoint(write=8), KillPoint(write=7)]
    log = _continue_after(recipe, out, kills)
    assert log[:3] == [f"{k}: killed" for k in kills], log
    assert (out / "01-prune.interrupted-1").is_dir()  # the half-done prune was kept aside, then redone
    assert fingerprint(out) == ref


@pytest.mark.stress
def test_pipeline_killed_at_many_random_points(pipeline_ref, tmp_path):
    """Chains of up to 4 seeded random kill points (inside a random write, or after a random delay) until
    at least 24 kills have landed; every chain must end with the uninterrupted pipeline's files."""
    recipe, ref = pipeline_ref
    landed, tried, chain = 0, 0, 0
    while landed < 24:
        kills = random_kill_points(4, seed=chain, max_write=17, max_seconds=8.0)
        log = _continue_after(recipe, tmp_path / f"chain{chain}", kills)
        tried += len(kills)
        landed += sum(line.endswith("killed") for line in log)
        print(f"chain {chain}: {', '.join(log)}")
        assert fingerprint(tmp_path / f"chain{chain}") == ref, log
        chain += 1
    print(f"{landed} kills landed out of {tried} kill points tried in {chain} chains")


TRAIN = ["train", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "3", "--train-subset", "128",
         "--batch-size", "32", "--precision", "fp32", "--threads", "1", "--seed", "5", "--set", "model.width=0.25",
         "--set", "data.val_size=64", "--set", "ema=0.9"]


@pytest.mark.stress
def test_train_killed_at_many_random_points(tmp_path):
    """`edlab train --out D`, SIGKILLed at 16 seeded random points (inside a write: config, resume.pt of
    each epoch, model.ckpt, summary; or after a delay: mid-epoch), then `--resume` until done: the same
    metrics and weights as an uninterrupted run (EMA included, 4 steps per epoch)."""
    r = run_edlab([*TRAIN, "--out", tmp_path / "ref"])
    assert r.returncode == 0, r.stderr
    ref = fingerprint(tmp_path / "ref")
    landed = 0
    for chain in range(4):
        out = tmp_path / f"c{chain}"
        first = [*TRAIN, "--out", out]

        def again(first=first, out=out):  # a run killed before it made its folder is started again
            return [*first, "--resume"] if out.is_dir() else first

        log = run_until_done(first, again, random_kill_points(4, seed=100 + chain, max_write=7, max_seconds=6.0))
        landed += sum(line.endswith("killed") for line in log)
        print(f"train chain {chain}: {', '.join(log)}")
        assert fingerprint(out) == ref, log
    print(f"train: {landed} kills landed out of 16 kill points")
    assert landed >= 8


@pytest.mark.slow
def test_standalone_quantize_resume_after_a_kill(pipeline_ref, tmp_path):
    """`edlab quantize --resume` continues a qat run killed inside its second resume.pt write."""
    recipe, ref = pipeline_ref
    src = recipe.parent / "ref" / "01-prune" / "model.ckpt"
    args = ["quantize", src, "--method", "qat", "--bits-w", "4", "--epochs", "2", "--out", tmp_path / "q"]
    r = run_edlab(args, kill=KillPoint(write=3))
    assert r.returncode == -9
    blob = read_resume(tmp_path / "q" / "resume.pt")
    assert blob["state"]["epoch"] == 1  # the epoch-1 state survived the torn epoch-2 write
    r = run_edlab(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    got = fingerprint(tmp_path / "q")
    assert got["model.ckpt"]["sha256"] == ref["02-quantize/model.ckpt"]["sha256"]
    assert got["metrics.jsonl"] == ref["02-quantize/metrics.jsonl"]


_WRITER = """
import sys, torch
from edlab import save_checkpoint
from edlab.models import create_model
from edlab.runs import write_json
torch.manual_seed(int(sys.argv[2]))
save_checkpoint(create_model("resnet20", width=0.25), sys.argv[1] + "/m.ckpt")
write_json(sys.argv[1] + "/summary.json", {"new": True})
"""


def test_a_write_killed_halfway_leaves_the_previous_file_intact(tmp_path):
    old = create_model("resnet20", width=0.25)
    save_checkpoint(old, tmp_path / "m.ckpt")
    (tmp_path / "summary.json").write_text('{"old": true}')
    before = (tmp_path / "m.ckpt").read_bytes()
    p = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), "1"], env=env("kill-in-write:1"),
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # killed inside the checkpoint write
    assert (tmp_path / "m.ckpt").read_bytes() == before
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_checkpoint(tmp_path / "m.ckpt")(x), old.eval()(x))
    p = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), "1"], env=env("kill-in-write:2"),
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # the checkpoint was replaced whole, then killed inside the summary
    assert json.loads((tmp_path / "summary.json").read_text()) == {"old": True}
    assert (tmp_path / "m.ckpt").read_bytes() != before and load_checkpoint(tmp_path / "m.ckpt")
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert torn, "the killed writes left their half-written temp files (ignored by every reader)"
    for t in torn:  # the torn temp file really is broken, i.e. the kill did hit mid-write
        if t.name.startswith(".m.ckpt"):
            with pytest.raises(EdlabError, match="corrupt or truncated"):
                read_checkpoint(t)
