"""What a newcomer and an attacker found (issue 15): each case failed before its fix and passes now.

Fast by design: tiny models, synthetic data, in-process commands (click's CliRunner) unless a separate
process is the point (concurrency)."""

import errno
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edlab import EdlabError, save_checkpoint
from edlab.cli import cli
from edlab.config import SchedConfig, load_train_config
from edlab.models import create_model

ROOT = Path(__file__).resolve().parents[1]
from conftest import TINY_TRAIN as TINY  # noqa: E402  (the same tiny run and runner)
from conftest import assert_one_line_error as one_line  # noqa: E402
from conftest import invoke  # noqa: E402


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """An untrained resnet20 checkpoint (no training needed for scoring and pipeline bookkeeping)."""
    p = tmp_path_factory.mktemp("ck") / "model.ckpt"
    save_checkpoint(create_model("resnet20", 10, width=0.25), p)
    return p


# ------------------------------------------------------------------------------------------ pipelines
def score_recipe(tmp_path, ckpt) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"name: s\nstages:\n  - score: {{checkpoint: {ckpt}}}\n")
    return p


def test_run_on_an_existing_out_with_another_recipe_is_refused_naming_the_key(tmp_path, small_ckpt):
    recipe, out = score_recipe(tmp_path, small_ckpt), tmp_path / "p"
    assert invoke("run", recipe, "--out", out).exit_code == 0
    assert invoke("run", recipe, "--out", out).exit_code == 0  # the same recipe: continues (all done)
    r = invoke("run", recipe, "--out", out, "--set", "score.rules=micronet")
    one_line(r, "stage 0 (score) option 'rules' was 'unset', now 'micronet'")
    recipe.write_text(recipe.read_text() + f"  - info: {{checkpoint: {small_ckpt}}}\n")  # a stage added: continues
    assert invoke("run", recipe, "--out", out).exit_code == 0


def test_two_runs_on_one_out_do_not_both_proceed(tmp_path, small_ckpt):
    recipe, out = score_recipe(tmp_path, small_ckpt), tmp_path / "p"
    out.mkdir()
    with open(out / ".edlab-pipeline.lock", "a") as f:  # what a running `edlab run` holds
        fcntl.flock(f, fcntl.LOCK_EX)
        one_line(invoke("run", recipe, "--out", out), "another edlab run")
    assert not (out / "00-score").exists()
    assert invoke("run", recipe, "--out", out).exit_code == 0  # lock released: it runs


def test_every_stage_is_checked_before_any_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - train: {dataset: synthetic, epochs: 1}\n"
                      "  - prune: {structured: 0.3, bogus-option: 1}\n")
    r = invoke("run", recipe, "--out", tmp_path / "p")
    one_line(r, "stage 1 (prune)")
    assert not (tmp_path / "p" / "00-train").exists()
    recipe.write_text("stages:\n  - train: {dataset: synthetic, epochs: 1}\n  - prune: {optim.lrr: 0.1}\n")
    one_line(invoke("run", recipe, "--out", tmp_path / "q"), "did you mean optim.lr")


def test_the_run_commands_in_the_docs_parse(tmp_path):
    """Every `edlab run RECIPE ... --set ...` line of the docs names options its stages take."""
    from edlab.pipeline import check_stages, load_recipe

    found = 0
    for doc in [*ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        for line in doc.read_text().splitlines():
            words = line.split("#")[0].split()
            if words[:2] != ["edlab", "run"] or not words[2].startswith("recipes/"):
                continue
            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            check_stages(load_recipe(str(ROOT / words[2]), sets))
            found += 1
    assert found >= 2


@pytest.mark.parametrize("kind", ["file", "dangling-link", "other-folder"])
def test_a_bad_out_is_one_line(tmp_path, small_ckpt, kind):
    out = tmp_path / "o"
    if kind == "file":
        out.write_text("mine")
    elif kind == "dangling-link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    one_line(invoke("run", score_recipe(tmp_path, small_ckpt), "--out", out), str(out))
    if kind != "other-folder":
        one_line(invoke("train", *TINY, "--epochs", "1", "--out", out), str(out))
        (tmp_path / "runs" / "a").mkdir(parents=True)
        (tmp_path / "runs" / "a" / "summary.json").write_text('{"val_accuracy": 0.5}')
        one_line(invoke("report", tmp_path / "runs", "--out", out), str(out))
    if kind == "file":  # (issue 29: NotADirectoryError / FileExistsError tracebacks)
        one_line(invoke("demo", "--out", out), str(out))
        one_line(invoke("export", small_ckpt, "--no-eval", "--out", out), str(out))
    assert kind != "file" or out.read_text() == "mine"


def test_a_failed_first_attempt_leaves_out_free(tmp_path, monkeypatch):
    """Missing data stops the run before training: the same command works once the data is there."""
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    out = tmp_path / "run"
    args = ["--model", "resnet20", "--dataset", "cifar10", "--data-dir", tmp_path / "nodata", "--set",
            "data.download=false", "--epochs", "1", "--out", out]
    one_line(invoke("train", *args), "not found")
    assert not out.exists() or not any(out.iterdir())
    r = invoke("train", *args)  # no "exists and is not empty": the same error again
    one_line(r, "not found")


# ------------------------------------------------------------------------------------------ resume.pt
def _resume_file(tmp_path, **state):
    from edlab.optim import LRSchedule
    from edlab.resume import FitState, save_resume

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = LRSchedule(SchedConfig(), 3, 10)
    path = tmp_path / "resume.pt"
    save_resume(path, model, opt, sched, FitState(**state), None)
    return path, model, opt, sched


def _load(path, epochs=3):
    from edlab.optim import LRSchedule
    from edlab.resume import load_resume

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return load_resume(path, model, opt, LRSchedule(SchedConfig(), 3, 10), None, None, epochs), model


def test_resume_state_is_checksummed(tmp_path):
    path, model, *_ = _resume_file(tmp_path, epoch=1, history=[{"epoch": 1}])
    state, loaded = _load(path)
    assert state.epoch == 1 and torch.equal(loaded.weight, model.weight)
    raw = path.read_bytes()
    rng = random.Random(0)
    for pos in rng.sample(range(len(raw)), 60):  # before the checksum, 21 of 60 random flips loaded
        bad = bytearray(raw)
        bad[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        with pytest.raises(EdlabError, match="resume state"):
            _load(path)


@pytest.mark.parametrize("state,msg", [
    ({"epoch": -1}, "malformed"),
    ({"epoch": 7, "history": [{}] * 7}, "malformed"),  # more epochs than the run has
    ({"epoch": 2, "history": [{}]}, "malformed"),
    ({"epoch": "2"}, "malformed"),
])
def test_malformed_resume_state_is_one_line(tmp_path, state, msg):
    path, *_ = _resume_file(tmp_path, **state)
    with pytest.raises(EdlabError, match=msg):
        _load(path)


def test_resume_with_missing_keys_is_one_line(tmp_path):
    import hashlib
    import io

    from edlab.resume import RESUME_MAGIC

    buf = io.BytesIO()
    torch.save({"model": {}, "state": {"epoch": 1}}, buf)
    body = buf.getvalue()
    (tmp_path / "resume.pt").write_bytes(RESUME_MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(EdlabError, match="malformed"):
        _load(tmp_path / "resume.pt")


def test_resume_says_from_which_epoch(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    r = invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume")
    assert r.exit_code == 0 and "resuming from epoch 1 of 1" in r.output, r.output


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("sets,msg", [
    (["data.mixup=inf"], "data.mixup"),
    (["data.mixup=1e9"], "data.mixup"),
    (["sched.warmup_epochs=inf"], "sched.warmup_epochs"),
    (["sched.min_lr=inf"], "sched.min_lr"),
    (["sched.min_lr=0.5"], "must not exceed optim.lr"),
    (["name=../escape"], "name"),
    (["name=/etc"], "name"),
    (["optim.betas=[0.9, 1.5]"], "beta"),
    (["optim.betas=[-0.1, 0.9]"], "beta"),
    (["seed=99999999999999999999999"], "seed"),
    (["seed=-1"], "seed"),
    (["lr=0.1"], "did you mean optim.lr"),
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    (["a." * 100 + "b=1"], "section.key=value"),
])
def test_absurd_values_are_refused(sets, msg):
    with pytest.raises(EdlabError, match=msg.replace(".", r"\.").replace("[", r"\[")):
        load_train_config(None, None, sets)


def test_min_lr_is_the_floor_of_cosine():
    from edlab.optim import LRSchedule

    s = LRSchedule(SchedConfig(name="cosine", min_lr=0.01), epochs=2, steps_per_epoch=10, lr=0.1)
    assert s.factor(0) == pytest.approx(1.0) and s.factor(20) == pytest.approx(0.1)
    assert s.factor(10) == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize("text,msg", [
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                                                 for p, c in zip("abcdefgh", "bcdefghi")), "too large"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    ("a: " + "[" * 60 + "]" * 60 + "\n", "nested"),
    ("a: 1\n" + "#" * (2 << 20) + "\n", "larger than"),
])
def test_hostile_yaml_is_refused_fast(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(EdlabError, match=msg):
        load_train_config(str(p))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("command", ["train", "run", "sweep"])
def test_non_utf8_and_folder_files_are_one_line(tmp_path, command):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"epochs: 1\nname: \xff\xfe\n")
    one_line(invoke(command, p), "not UTF-8")
    one_line(invoke(command, tmp_path), "is a folder")


# ------------------------------------------------------------------------------------------ checkpoints
def _ckpt_with(tmp_path, **metadata) -> Path:
    p = tmp_path / "m.ckpt"
    save_checkpoint(create_model("resnet20", 10, width=0.25), p, **metadata)
    return p


def test_checkpoint_metadata_never_makes_eval_create_folders_or_download(tmp_path, monkeypatch):
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil" / "deep"
    p = _ckpt_with(tmp_path, config={"data": {"dataset": "cifar10", "data_dir": str(evil), "download": True},
                                     "tta": "rm -rf"})
    one_line(invoke("eval", p), "not found")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("metadata", [{"config": {"tta": [1]}}, {"config": {"tta": "rm -rf"}}])
def test_odd_checkpoint_metadata_is_ignored(tmp_path, metadata):
    """An odd value is dropped (a config that is not a mapping is refused: test_checkpoint.py)."""
    r = invoke("eval", _ckpt_with(tmp_path, **metadata), "--dataset", "synthetic", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tta"] == "none"


def test_deep_checkpoint_metadata_is_one_line(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    one_line(invoke("eval", _ckpt_with(tmp_path, config=deep), "--dataset", "synthetic"), "nested")


def test_a_folder_given_as_a_checkpoint_is_one_line(tmp_path):
    one_line(invoke("quantize", tmp_path, "--method", "bf16"), "is a folder")
    one_line(invoke("export", tmp_path, "--out", tmp_path / "x.onnx"), "is a folder")


def test_float_labels_are_refused(tmp_path):
    import pickle

    import numpy as np

    from edlab.data import load_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0.5, 1.7, 2.0, 3.9]}, f)
    with pytest.raises(EdlabError, match="labels must be integers"):
        load_cifar("cifar10", str(tmp_path), download=False)


# ------------------------------------------------------------------------------------------ machine
def test_disk_full_is_one_line_and_keeps_what_was_written(tiny_run, tmp_path, monkeypatch):
    import edlab.files as files

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    before = (out / "model.ckpt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    one_line(invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume"), "No space left on device")
    assert (out / "model.ckpt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ studies
STUDY = "name: s\nconfig: tiny.yaml\ngrid: {optim.lr: [0.05]}\n"
TINY_CFG = ("model: {name: resnet20, width: 0.25}\ndata: {dataset: synthetic, val_size: 64, train_subset: 128, "
            "batch_size: 64}\nepochs: 1\nprecision: fp32\nthreads: 1\n")


def _study(tmp_path, text=STUDY) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY_CFG)
    (tmp_path / "study.yaml").write_text(text)
    return tmp_path / "study.yaml"


@pytest.mark.parametrize("mine", ["study.json", "recipe.yaml"])
def test_sweep_never_overwrites_a_users_files(tmp_path, mine):
    pytest.importorskip("optuna")
    study = _study(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / mine).write_text("my own")
    one_line(invoke("sweep", study, "--out", out), "not a sweep's folder")
    assert (out / mine).read_text() == "my own" and sorted(p.name for p in out.iterdir()) == [mine]


@pytest.mark.parametrize("field,msg", [
    ("seed: -1\n", "seed"),
    ("seed: abc\n", "seed"),
    ("seed: 1e30\n", "seed"),
    ("search: {params: {optim.lr: {type: float, low: 0.01, high: 0.1, step: 0}}, trials: 2}\n", "step"),
    ("search: {params: {optim.lr: {type: float, low: 0.01, high: 0.1}}, trials: 2, startup_trials: -3}\n",
     "startup_trials"),
    ("search: {params: {optim.lr: {type: float, low: 0.01, high: 0.1}}, trials: 2, startup_trials: x}\n",
     "startup_trials"),
    ("name: ../../escape\n", "name"),
])
def test_bad_study_fields_are_refused_by_dry_run(tmp_path, field, msg):
    pytest.importorskip("optuna")
    base = "config: tiny.yaml\n" + ("grid: {optim.lr: [0.05]}\n" if "search" not in field else "")
    one_line(invoke("sweep", _study(tmp_path, base + field), "--dry-run"), msg)


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_sweeps_started_at_the_same_instant_share_a_new_storage(tmp_path):
    """Sweeps creating the same SQLite storage at once: one died on 'table studies already exists'."""
    pytest.importorskip("optuna")
    study, out, go = _study(tmp_path), tmp_path / "out", tmp_path / "go"
    code = ("import sys, time, pathlib, optuna\nfrom edlab.study import load_study, open_study, storage_url\n"
            "st = load_study(sys.argv[1], out=sys.argv[2])\nurl = storage_url(st, None)\nprint('ready', flush=True)\n"
            "while not pathlib.Path(sys.argv[3]).exists(): time.sleep(0.001)\nopen_study(st, url)\nprint('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(study), str(out), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # all four create the storage's tables at the same instant
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0 and o.strip() == "ok", e[-500:]


def test_one_bad_run_folder_does_not_abort_the_report(tmp_path):
    runs = tmp_path / "runs"
    for name, text in {"good": '{"test_accuracy": 0.5, "val_accuracy": 0.4, "score": 0.1}',
                       "deep": "[" * 5000 + "]" * 5000, "odd": '{"test_accuracy": "x", "score": [1], "params": "a"}'
                       }.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(text)
    (runs / "binary").mkdir()
    (runs / "binary" / "summary.json").write_bytes(b"\xff\xfe{")
    (runs / "odd" / "metrics.jsonl").write_text('{"epoch": "a", "train_loss": [1]}\n' + "[" * 5000 + "\n")
    (runs / "odd" / "config.yaml").write_text("optim: 5\ndata: [1]\n")
    r = invoke("report", runs, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "left out deep" in r.stderr and "left out binary" in r.stderr
    assert (tmp_path / "rep" / "index.html").is_file()


def test_md5_warning_once_per_data_folder(tmp_path):
    import pickle
    import warnings

    import numpy as np

    from edlab import data

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}, f)

    def command() -> int:
        """One command, as a new process would run it: no memo in the process, every warning shown."""
        data._MD5_CHECKED.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.load_cifar("cifar10", str(tmp_path), download=False)
        return sum("md5" in str(w.message) for w in caught)

    assert [command() for _ in range(3)] == [1, 0, 0]
    os.utime(folder / "data_batch_1", ns=(1, 1))  # the file changed (its mtime): checked anew
    assert command() == 1


def test_runs_latest_points_at_the_newest_run(tmp_path):
    from edlab.runs import Run

    a = Run.create("m", root=str(tmp_path))
    b = Run.create("m", root=str(tmp_path))
    assert (tmp_path / "latest").resolve() == b.path.resolve() != a.path.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")]


def test_options_are_consistent_across_commands():
    """--epochs where --finetune-epochs is; --train-subset and --threads on quantize and lr-find."""
    from click import Context

    def names(cmd):
        return {o for p in cli.get_command(Context(cli), cmd).params for o in p.opts}

    assert {"--epochs", "--finetune-epochs"} <= names("prune")
    for cmd in ("train", "prune", "quantize", "lr-find"):
        assert {"--train-subset", "--threads"} <= names(cmd), cmd


def test_resume_says_which_key_differs(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    one_line(invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume", "--set", "optim.momentum=0.5"),
             "optim.momentum: 0.9 saved, 0.5 now")


def test_pyproject_gives_setuptools_nothing_to_warn_about():
    """The licence as an SPDX string: a TOML table made setup print 15-line deprecation warnings."""
    import warnings

    from setuptools.config import pyprojecttoml
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyprojecttoml.apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert [str(w.message).splitlines()[0] for w in caught] == []


def test_report_stays_readable_with_many_runs_and_datasets(tmp_path, monkeypatch):
    """15 runs, one with a diverged loss, two datasets, a pruned run with steps and odd bits."""
    from matplotlib.colors import to_rgba

    from edlab import report

    runs = tmp_path / "runs"
    for i in range(15):
        d = runs / f"r{i:02d}"
        d.mkdir(parents=True)
        ds = "synthetic" if i < 5 else "cifar10"
        (d / "config.yaml").write_text(f"data: {{dataset: {ds}}}\n")
        (d / "summary.json").write_text(json.dumps({"val_accuracy": 0.5 + i / 100, "test_accuracy": 0.5,
                                                    "score": 1.0 / (i + 1), "bits_w": 7.9999999, "bits_a": 4.03125}))
        loss = 1e4 if i == 3 else 1.0
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "train_loss": loss / e, "val_loss": loss / e, "train_accuracy": 0.5, "val_accuracy": 0.5,
             **({"step": 1 + e // 3} if i == 7 else {})}) + "\n" for e in range(1, 6)))
    figs = []
    real = report._figure
    monkeypatch.setattr(report, "_figure", lambda *a: figs.append(real(*a)) or figs[-1])
    r = report.build_report([runs], tmp_path / "rep")
    curves, pareto = figs[0], figs[1]
    acc, loss, _ = curves.axes[:3]
    legend = curves.legends[0] if curves.legends else acc.get_legend()
    assert legend is not None and len(legend.get_texts()) == 15
    colors = {to_rgba(line.get_color()) for line in acc.get_lines() if line.get_label() and
              not line.get_label().startswith("_")}
    assert len(colors) == 15
    assert loss.get_yscale() == "log"
    assert all(float(t).is_integer() for t in acc.get_xticks())
    assert any(line.get_linestyle() == ":" for line in acc.get_lines())  # r07's pruning steps
    assert len(pareto.axes[0].texts) >= 1  # front points are named
    assert r["best_per_dataset"] == {"cifar10": "r14", "synthetic": "r04"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Best on synthetic: **r04**" in md and "| dataset |" in md.replace("|dataset|", "| dataset |")
    assert "8/4.03" in md and "7.9999" not in md


def test_recipe_keys_take_either_spelling(tmp_path):
    from edlab.pipeline import check_stages, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - train: {dataset: synthetic, data.train_subset: 64, threads: 1}\n"
                 "  - prune: {structured: 0.2, epochs: 1, train-subset: 64, threads: 1}\n"
                 "  - quantize: {method: qat, data.train_subset: 64, train_subset: 64, threads: 1}\n")
    check_stages(load_recipe(str(p)))


def test_odd_config_sections_in_metadata_are_one_line_for_prune(tmp_path):
    """Dropped once (AttributeError before), refused now: the defaults would stand in for the recorded data."""
    p = _ckpt_with(tmp_path, config={"model": 5, "data": 5, "optim": [1], "sched": "x"})
    r = invoke("prune", p, "--structured", "0.2", "--epochs", "1", "--dataset", "synthetic", "--train-subset", "64",
               "--threads", "1", "--precision", "fp32", "--set", "data.val_size=64", "--out", tmp_path / "p")
    one_line(r, "checkpoint metadata.config.model must be a mapping, not a number")
    assert not (tmp_path / "p").exists()


def test_a_pipeline_whose_first_stage_failed_can_be_run_again(tmp_path, monkeypatch):
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - train: {{dataset: cifar10, data-dir: {tmp_path / 'nodata'}, "
                      f"data.download: false, epochs: 1}}\n")
    for _ in range(2):  # the second attempt meets the same cause, not "not a pipeline's folder"
        r = invoke("run", recipe, "--out", tmp_path / "p")
        assert r.exit_code == 2 and "not found" in r.stderr and "not a pipeline" not in r.stderr, r.stderr


def test_the_failed_stage_of_a_pipeline_may_be_fixed_in_the_recipe(tmp_path, small_ckpt):
    """Only finished stages are held to the recorded recipe: the stage that failed can be corrected."""
    recipe, out = tmp_path / "r.yaml", tmp_path / "p"
    recipe.write_text(f"stages:\n  - score: {{checkpoint: {small_ckpt}}}\n"
                      f"  - score: {{checkpoint: {tmp_path / 'missing.ckpt'}}}\n")
    r = invoke("run", recipe, "--out", out)
    assert r.exit_code == 2 and "stage 1 (score) failed" in r.stderr, r.stderr
    recipe.write_text(f"stages:\n  - score: {{checkpoint: {small_ckpt}}}\n  - score: {{checkpoint: {small_ckpt}}}\n")
    r = invoke("run", recipe, "--out", out)
    assert r.exit_code == 0 and "done earlier, skipped" in r.output, (r.output, r.stderr)
