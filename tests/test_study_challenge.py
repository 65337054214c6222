"""The challenge study's parts: test read once for the chosen points, a teacher trained once, the winner packed,
floors from the command line. Tiny synthetic studies, a few seconds each."""

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from click.testing import CliRunner  # noqa: E402

from edlab.cli import cli  # noqa: E402

TINY = """model: {name: resnet20, width: 0.25}
data: {dataset: synthetic, val_size: 128, train_subset: 256, batch_size: 64}
epochs: 1
precision: fp32
threads: 1
tta: flip
"""


def sweep_in(tmp_path: Path, study: str, *args: str, config: str = TINY):
    """Write tiny.yaml and study.yaml in tmp_path and run `edlab sweep` there (relative paths as in a project)."""
    (tmp_path / "tiny.yaml").write_text(config)
    (tmp_path / "study.yaml").write_text(study)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(cli, ["sweep", "study.yaml", "--out", "out", *args])
    finally:
        os.chdir(cwd)


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "study.json").read_text())


def row(rep: dict, slot: int) -> dict:
    return next(t for t in rep["trials"] if t["slot"] == slot and t["state"] == "COMPLETE")


PRUNE2 = """name: c
recipe:
  - train: {config: tiny.yaml}
  - prune: {finetune-epochs: 0, train-subset: 256, precision: fp32}
grid:
  prune.unstructured: [0.3, 0.6]
objective: {min_score_with_val_at_least: 0.0}
"""


def test_test_chosen_reads_test_only_for_the_selected_point(tmp_path):
    r = sweep_in(tmp_path, PRUNE2 + "test: chosen\npack: true\n")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    assert rep["test"] == "chosen" and rep["best"]["slot"] == 1  # lowest score: more zeros
    for slot in (0, 1):  # no stage of any trial read the test split
        for stage in ("00-train", "01-prune"):
            s = json.loads((tmp_path / "out" / "trials" / f"{slot:04d}" / stage / "summary.json").read_text())
            assert s["test_accuracy"] is None and s["val_accuracy"] is not None
    chosen, other = row(rep, 1), row(rep, 0)
    assert other["test_accuracy"] is None and other["tested"] is None
    assert isinstance(chosen["test_accuracy"], float) and 0 <= chosen["test_accuracy"] <= 1
    assert chosen["tested"]["checkpoint"].endswith("0001/01-prune/model.ckpt")
    assert chosen["tested"]["views"] == 2 and chosen["tested"]["tta"] == "flip"  # the views it was validated with
    assert "final_test=false" in chosen["command"]
    assert r.output.count("testing chosen point") == 1
    winner = rep["winner"]  # the chosen point, packed; the packed file re-measures to the recorded figure
    pack = tmp_path / "out" / "winner.pack"
    assert winner["slot"] == 1 and winner["pack"] == "out/winner.pack"
    assert winner["sizes"]["file"] == pack.stat().st_size
    assert winner["score"] == chosen["score"] and winner["test_accuracy"] == chosen["test_accuracy"]
    assert "winner: point 0001" in r.output
    ev = CliRunner().invoke(cli, ["eval", str(pack), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["test_accuracy"] == chosen["test_accuracy"]
    from edlab.pack import read_pack_header  # the file itself records the figure read once (its checkpoint could not)
    assert read_pack_header(pack)["metadata"]["test_accuracy"] == chosen["test_accuracy"]
    # finished: nothing trains, nothing is tested again
    again = sweep_in(tmp_path, PRUNE2 + "test: chosen\npack: true\n")
    assert again.exit_code == 0 and "testing chosen point" not in again.output
    assert row(report(tmp_path), 1)["test_accuracy"] == chosen["test_accuracy"]


def test_only_the_process_that_ends_the_last_trial_reads_the_test_split(tmp_path, monkeypatch):
    """Two processes share a study (a second command on the same --out, or machines on one PostgreSQL
    storage): the one that ends while a trial still waits or runs elsewhere must not test its provisional best;
    the one that ends the last trial tests the finished study's choice."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from edlab import evaluation
    from edlab.study.schema import load_study
    from edlab.study.select import test_chosen

    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "study.yaml").write_text("name: two\nconfig: tiny.yaml\n"
                                         "list: [{optim.lr: 0.1}, {optim.lr: 0.2}]\ntest: chosen\n")
    st = load_study(str(tmp_path / "study.yaml"), out=str(tmp_path / "out"))
    study = optuna.create_study(direction="maximize")
    attrs = {"score": 0.1, "run_dir": str(tmp_path / "none")}
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5,
                                 user_attrs={**attrs, "slot": 0, "val_accuracy": 0.5}))
    study.enqueue_trial({})  # point 1, not yet taken by the other process
    tested = []
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda path: tested.append(path) or {
        "test_accuracy": 0.4, "test_loss": 1.0, "views": 1, "tta": "none", "images": 10, "checkpoint": path})
    said = []
    assert test_chosen(st, study, echo=said.append) == [] and tested == []
    assert "still waiting or running" in said[-1]
    other = study.ask()  # the other process runs point 1
    assert test_chosen(st, study, echo=said.append) == [] and tested == []
    for k, v in {**attrs, "slot": 1, "val_accuracy": 0.6}.items():
        other.set_user_attr(k, v)
    study.tell(other, 0.6)
    assert test_chosen(st, study, echo=said.append) == [1] and len(tested) == 1  # the finished study's choice


def test_test_none_reads_no_test_split_and_still_chooses_and_packs(tmp_path):
    """test: none, for a candidate to be weighed against an earlier study's winner: no trial and no chosen
    point reads the test split; the choice on validation and the pack still happen."""
    r = sweep_in(tmp_path, PRUNE2 + "test: none\npack: true\n")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    assert rep["test"] == "none" and all(t["test_accuracy"] is None for t in rep["trials"])
    assert "testing chosen point" not in r.output and "test split not read (test: none)" in r.output
    assert rep["best"]["slot"] == 1 and (tmp_path / "out" / "winner.pack").is_file()


def test_test_all_is_the_default_and_final_test_is_the_studys(tmp_path):
    r = sweep_in(tmp_path, "name: a\nconfig: tiny.yaml\ngrid: {optim.lr: [0.1]}\n")
    assert r.exit_code == 0, r.output
    t = row(report(tmp_path), 0)
    assert isinstance(t["test_accuracy"], float) and t["tested"] is None
    (tmp_path / "x").mkdir()
    bad = sweep_in(tmp_path / "x", "config: tiny.yaml\ngrid: {optim.lr: [0.1]}\nset: {final_test: false}\n")
    assert bad.exit_code == 2 and "test: chosen" in bad.stderr
    bad = sweep_in(tmp_path / "x", "config: tiny.yaml\ngrid: {optim.lr: [0.1]}\nobjective: pareto\npack: true\n")
    assert bad.exit_code == 2 and "one best point" in bad.stderr


def test_final_test_off_leaves_quantize_untested(tmp_path):
    from edlab.config import TrainConfig, build, read_yaml
    from edlab.quantize import quantize_checkpoint
    from edlab.train import train

    (tmp_path / "tiny.yaml").write_text(TINY)
    cfg = build(TrainConfig, read_yaml(str(tmp_path / "tiny.yaml")), {"out": str(tmp_path / "t"), "epochs": 0})
    _, s = train(cfg)
    assert isinstance(s["test_accuracy"], float)
    q = quantize_checkpoint(tmp_path / "t" / "model.ckpt", "bf16", out=str(tmp_path / "q"), sets=["final_test=false"])
    assert q["test_accuracy"] is None and q["reference_test_accuracy"] is None and q["accuracy_change"] is None
    assert q["val_accuracy"] is not None and q["score"] > 0


def saved_teacher(run_dir: Path):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]["teacher"]


TEACHER = """teacher: {config: tiny.yaml, set: {seed: 7}, quick: {data.train_subset: 128}}
"""


def test_teacher_is_trained_once_and_given_to_the_training_stages(tmp_path, monkeypatch):
    study = """name: t
recipe:
  - train: {config: tiny.yaml}
  - prune: {finetune-epochs: 1, unstructured: 0.3, train-subset: 128, precision: fp32}
  - quantize: {method: bf16}
grid:
  train.optim.lr: [0.05]
test: chosen
""" + TEACHER
    r = sweep_in(tmp_path, study)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    ckpt = out / "teacher" / "model.ckpt"
    assert ckpt.is_file() and r.output.count("training the teacher once") == 1
    teacher_summary = json.loads((out / "teacher" / "summary.json").read_text())
    assert teacher_summary["test_accuracy"] is None  # test: chosen holds for the teacher too
    assert report(tmp_path)["teacher"] == "out/teacher/model.ckpt"
    trial = out / "trials" / "0000"
    assert saved_teacher(trial / "00-train") == "out/teacher/model.ckpt"
    assert saved_teacher(trial / "01-prune") == "out/teacher/model.ckpt"
    assert saved_teacher(trial / "02-quantize") is None  # bf16 does not train: no teacher
    stamp = ckpt.stat().st_mtime_ns
    again = sweep_in(tmp_path, study)
    assert again.exit_code == 0 and "training the teacher" not in again.output and ckpt.stat().st_mtime_ns == stamp
    from edlab.study import load_study

    monkeypatch.chdir(tmp_path)
    quick = load_study("study.yaml", quick=True)  # its teacher takes teacher.quick
    assert quick.teacher["set"] == {"seed": 7, "data.train_subset": 128}


def test_teacher_checkpoint_is_reused_and_trained_once_under_contention(tmp_path, monkeypatch):
    import threading

    import edlab.train
    from edlab.study import ensure_teacher, load_study

    (tmp_path / "tiny.yaml").write_text(TINY.replace("epochs: 1", "epochs: 0"))
    (tmp_path / "s.yaml").write_text("config: tiny.yaml\ngrid: {optim.lr: [0.1]}\n" + TEACHER)
    st = load_study(str(tmp_path / "s.yaml"), out=str(tmp_path / "t"))
    calls = []
    real = edlab.train.train

    def slow_train(cfg, **kw):
        calls.append(cfg.out)
        time.sleep(0.5)  # the other thread arrives while this one trains
        return real(cfg, **kw)

    monkeypatch.setattr(edlab.train, "train", slow_train)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ensure_teacher(st, echo=lambda m: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [str(tmp_path / "t" / "teacher" / "model.ckpt")] * 2
    (tmp_path / "reuse.yaml").write_text(f"name: re\nconfig: tiny.yaml\ngrid: {{optim.lr: [0.1]}}\nteacher: {got[0]}\n")
    r = sweep_in(tmp_path, (tmp_path / "reuse.yaml").read_text())
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "out" / "teacher").exists() and calls[1:] == ["out/trials/0000"]  # the trial only
    assert saved_teacher(tmp_path / "out" / "trials" / "0000") == got[0]


def test_a_dry_run_writes_nothing(tmp_path):
    """--dry-run of an inline-recipe study counts its budget from the recipe without writing <out>/recipe.yaml:
    a folder it left behind would be refused by the real run as someone else's."""
    pytest.importorskip("optuna")
    r = sweep_in(tmp_path, PRUNE2, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "2 trial(s)" in r.output and not (tmp_path / "out").exists()


def test_floor_from_the_command_line_and_the_validation_margin(tmp_path):
    from edlab.study import best, load_study

    study = PRUNE2.replace("{min_score_with_val_at_least: 0.0}",
                           "{min_score_with_val_at_least: 0.9, floor_margin: 0.005}")
    r = sweep_in(tmp_path, study, "--floor", "0.865", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "study c-floor0.865" in r.output and "'min_score_with_val_at_least': 0.865" in r.output
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        st = load_study("study.yaml", floor=0.865)
        same = load_study("study.yaml", floor=0.9)  # the file's own floor: the same study
    finally:
        os.chdir(cwd)
    assert str(st.out) == "runs/study-c-floor0.865" and same.name == "c"
    rows = [{"slot": 0, "state": "COMPLETE", "val_accuracy": 0.868, "score": 0.01},  # above the floor, not the margin
            {"slot": 1, "state": "COMPLETE", "val_accuracy": 0.871, "score": 0.05},
            {"slot": 2, "state": "COMPLETE", "val_accuracy": 0.95, "score": 0.09}]
    assert best(st, rows) == {"slot": 1, "rule": "lowest score with val >= 0.87"}
    assert best(same, rows)["slot"] == 2
    bad = sweep_in(tmp_path, "config: tiny.yaml\ngrid: {optim.lr: [0.1]}\n", "--floor", "0.9")
    assert bad.exit_code == 2 and "--floor needs objective" in bad.stderr
    bad = sweep_in(tmp_path, study.replace("0.005}", "0.5}"), "--dry-run")
    assert bad.exit_code == 2 and "floor + margin <= 1" in bad.stderr


def test_report_draws_every_floor_and_selects_by_the_first(tmp_path):
    from edlab.report import build_report

    for name, val, score in (("narrow", 0.88, 0.01), ("wide", 0.92, 0.05)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(json.dumps(
            {"val_accuracy": val, "test_accuracy": val - 0.01, "score": score, "dataset": "synthetic"}))
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r1"),
                                 "--floor", "0.9", "--floor", "0.865"])
    assert r.exit_code == 0, r.output
    assert "best: wide" in r.output
    two = (tmp_path / "r1" / "pareto.png").read_bytes()
    again = build_report([tmp_path / "runs"], tmp_path / "r2", floor=[0.9, 0.865])
    one = build_report([tmp_path / "runs"], tmp_path / "r3", floor=[0.9])
    assert (tmp_path / "r2" / "pareto.png").read_bytes() == two  # the figure is deterministic ...
    assert (tmp_path / "r3" / "pareto.png").read_bytes() != two  # ... so the 86.5 % line is what differs
    assert again["floors"] == [0.9, 0.865] and one["best"].name == "wide"
    assert build_report([tmp_path / "runs"], tmp_path / "r4", floor=[0.865, 0.9])["best"].name == "narrow"


@pytest.mark.slow
def test_challenge_study_runs_end_to_end_on_tiny_data(tmp_path):
    """studies/challenge.yaml itself (configs swapped for a tiny synthetic one, one quick trial): teacher, a
    distilled student through train, prune and QAT, the chosen point tested once and packed."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "studies" / "challenge.yaml").read_text()
    for config in ("configs/resnet20-cifar10.yaml", "configs/student-dw233-distill.yaml"):
        assert config in text
        text = text.replace(config, "tiny.yaml")
    text = text.replace("2000", "256").replace("trials: 3", "trials: 1")
    r = sweep_in(tmp_path, text, "--quick", config=TINY.replace("tta: flip\n", ""))
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    t = row(rep, 0)
    assert t["tested"]["checkpoint"].endswith("0000/02-quantize/model.ckpt") and t["test_accuracy"] is not None
    for stage in ("00-train", "01-prune", "02-quantize"):
        assert saved_teacher(tmp_path / "out" / "trials" / "0000" / stage) == "out/teacher/model.ckpt"
    assert rep["winner"]["slot"] == 0 and (tmp_path / "out" / "winner.pack").is_file()


def test_a_run_saved_before_final_test_resumes(tmp_path):
    import yaml

    from edlab.config import TrainConfig, build
    from edlab.stage import config_change

    cfg = build(TrainConfig, yaml.safe_load(TINY), {"data": {"split_seed": 0}})  # as train saves it
    old = cfg.model_dump(mode="json")
    old.pop("final_test")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_change(tmp_path / "config.yaml", cfg) is None
    assert "final_test" in config_change(tmp_path / "config.yaml", build(TrainConfig, old, {"final_test": False}))


def test_report_shows_the_test_figure_a_study_read_for_its_chosen_point(tmp_path):
    from edlab.report import discover

    study = tmp_path / "study-x"
    for slot in ("0000", "0001"):
        (study / "trials" / slot).mkdir(parents=True)
        (study / "trials" / slot / "summary.json").write_text(json.dumps(
            {"val_accuracy": 0.5, "test_accuracy": None, "score": 0.01}))
    tested = {"checkpoint": "runs/study-x/trials/0001/model.ckpt", "test_accuracy": 0.42, "views": 1}
    (study / "study.json").write_text(json.dumps({"name": "x", "trials": [{"slot": 0, "tested": None},
                                                                          {"slot": 1, "tested": tested}]}))
    runs, _, _ = discover([tmp_path])
    got = {r.path.name: r.test for r in runs}
    assert got == {"0000": None, "0001": 0.42}


@pytest.mark.slow
def test_challenge_course_study_quantizes_one_student_and_packs_the_chosen_point(tmp_path):
    """studies/challenge-course.yaml on a tiny depthwise [2, 3, 3] student: its three bit-width points in the
    deployment form (first/last 8 bits, BN folded), the lowest-score point at the floor tested once, packed."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "studies" / "challenge-course.yaml").read_text().replace("2000", "256")
    student = TINY.replace("width: 0.25}", "width: 0.5, conv: depthwise, blocks: [2, 3, 3]}").replace("tta: flip\n", "")
    (tmp_path / "student.yaml").write_text(student)
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "student.yaml"), "--out", str(tmp_path / "student")])
    assert r.exit_code == 0, r.output
    ckpt = str(tmp_path / "student" / "model.ckpt")
    r = sweep_in(tmp_path, text, "--quick", "--floor", "0.0", "--set", f"quantize.checkpoint={ckpt}")
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    done = [t for t in rep["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3
    assert [t["tested"] is not None for t in sorted(done, key=lambda t: t["slot"])] == [False, False, True]
    scores = [t["score"] for t in sorted(done, key=lambda t: t["slot"])]
    assert scores[0] > scores[1] > scores[2]  # 5/5 > 4/5 > 4/4 bits
    assert rep["winner"]["slot"] == 2 and (tmp_path / "out" / "winner.pack").is_file()


LATE = """name: late
recipe:
  - quantize: {method: qat, bits-w: 4, bits-a: 4, epochs: 1, train-subset: 256, threads: 1}
list:
  - {quantize.checkpoint: one/model.ckpt}
  - {quantize.checkpoint: two/model.ckpt}
objective: val_accuracy
test: chosen
"""


def test_a_point_whose_checkpoint_is_not_there_yet_waits_and_runs_when_it_is(tmp_path):
    """A study of two long runs' QAT forms, started when only the first run has finished: the second point
    stays WAITING (not failed), no test is read while it waits, and the same command run again once its
    checkpoint exists runs it and tests the finished study's choice."""
    r = CliRunner().invoke(cli, ["train", *_tiny_train(tmp_path), "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    study = LATE
    r = sweep_in(tmp_path, study)
    assert r.exit_code == 0, r.output
    assert "point 0001 waits for two/model.ckpt (not there yet)" in r.output
    assert "test split not read" in r.output and "testing chosen point" not in r.output
    states = {t["slot"]: t["state"] for t in report(tmp_path)["trials"]}
    assert states == {0: "COMPLETE", 1: "WAITING"}
    r = CliRunner().invoke(cli, ["train", *_tiny_train(tmp_path), "--out", str(tmp_path / "two")])
    assert r.exit_code == 0, r.output
    r = sweep_in(tmp_path, study)
    assert r.exit_code == 0, r.output
    rep = report(tmp_path)
    assert {t["slot"]: t["state"] for t in rep["trials"]} == {0: "COMPLETE", 1: "COMPLETE"}
    assert r.output.count("testing chosen point") == 1 and row(rep, rep["best"]["slot"])["tested"] is not None


def test_finish_ends_a_stopped_study_with_what_finished_and_a_later_sweep_runs_the_rest(tmp_path):
    """`--finish` on a study with a point still waiting: nothing trains, the waiting point is withdrawn, the
    finished point is tested once and study.json written; the plain command later runs the withdrawn point."""
    r = CliRunner().invoke(cli, ["train", *_tiny_train(tmp_path), "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    study = LATE.replace("list:", "pack: true\nlist:")
    r = sweep_in(tmp_path, study)
    assert r.exit_code == 0 and "test split not read" in r.output, r.output
    r = sweep_in(tmp_path, study, "--finish")
    assert r.exit_code == 0, r.output
    assert "1 unfinished trial(s) withdrawn" in r.output and r.output.count("testing chosen point 0000") == 1
    assert "interrupted" in r.output  # the withdrawn point stays in the table
    rep = report(tmp_path)
    assert {t["slot"]: t["state"] for t in rep["trials"]} == {0: "COMPLETE", 1: "FAIL"}
    assert row(rep, 0)["tested"] is not None and (tmp_path / "out" / "winner.pack").is_file()
    r = CliRunner().invoke(cli, ["train", *_tiny_train(tmp_path), "--out", str(tmp_path / "two")])
    assert r.exit_code == 0, r.output
    r = sweep_in(tmp_path, study)
    assert r.exit_code == 0, r.output
    assert 1 in {t["slot"] for t in report(tmp_path)["trials"] if t["state"] == "COMPLETE"}


def test_finish_refuses_a_study_someone_still_works_on_and_one_never_started(tmp_path):
    import socket

    import optuna

    r = sweep_in(tmp_path, LATE, "--finish")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no study to finish" in r.output and not (tmp_path / "out").exists()
    r = CliRunner().invoke(cli, ["train", *_tiny_train(tmp_path), "--out", str(tmp_path / "one")])
    r = sweep_in(tmp_path, LATE)
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="late", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    live = study.ask()  # a trial held by a process that is alive: this one
    live.set_user_attr("owner", {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None})
    r = sweep_in(tmp_path, LATE, "--finish")
    assert r.exit_code != 0 and f"trial {live.number} (" in r.output and "still running" in r.output, r.output
    assert "testing chosen point" not in r.output


def _tiny_train(tmp_path: Path) -> list[str]:
    (tmp_path / "tiny.yaml").write_text(TINY)
    return [str(tmp_path / "tiny.yaml"), "--epochs", "0"]


ROOT = Path(__file__).resolve().parents[1]
ASSUMED_EPOCHS_PER_S = 0.45  # studies/challenge-gpu.yaml's sizing assumption (4 workers on the H200), not measured
TEACHER_S = 50  # configs/resnet18-94-gpu.yaml: 46.8 s on the H200 (docs/benchmarks.md), inside the sweep's time
SETUP_S = 40  # the script's own start: wheels, the data's preparation (an allowance)


def test_gpu_challenge_study_loads_both_ways_and_its_cap_fits_the_scripts_time(tmp_path, monkeypatch):
    """studies/challenge-gpu.yaml, normal and --quick, and the arithmetic its comment states: the epochs cap plus
    the trials still in flight on the other workers at their longest, at the assumed rate, fit the time that
    benchmarks/gpu_challenge.sh gives the sweep once the teacher is trained; the cap binds before the trials do."""
    import re

    from edlab.study import budget, budget_line, full_epochs, load_study

    monkeypatch.chdir(ROOT)
    full = load_study("studies/challenge-gpu.yaml", out=str(tmp_path / "s"), floor=0.90)
    quick = load_study("studies/challenge-gpu.yaml", quick=True, out=str(tmp_path / "q"), floor=0.90)
    assert full.mode == quick.mode == "search" and full.test == quick.test == "chosen" and full.pack
    assert full.pruner["type"] == "successive-halving" and full.objective["min_score_with_val_at_least"] == 0.9
    assert quick.trials < full.trials and quick.fixed != full.fixed

    b = budget(full)
    per_trial = full_epochs(full, {})[1]
    longest = full_epochs(full, {"prune.structured": 0.3, "prune.unstructured": 0.5})[1]  # two fine-tunings
    assert b["full_fidelity_epochs"] == per_trial * full.trials > b["cap_epochs"]
    assert f"{b['full_fidelity_epochs']:g} training epochs at full fidelity" in budget_line(full)
    assert f"no trial starts after {b['cap_epochs']} epochs" in budget_line(full)
    assert budget(quick)["full_fidelity_epochs"] <= budget(quick)["cap_epochs"]  # --quick runs all its trials

    script = (ROOT / "benchmarks" / "gpu_challenge.sh").read_text()
    limit = int(re.search(r'echo 1500 \|\| echo (\d+)', script).group(1))
    finish = int(re.search(r"FINISH_S=\$\{FINISH_S:-(\d+)\}", script).group(1))
    workers = int(re.search(r'echo 1 \|\| echo (\d+)', script).group(1))
    assert limit <= 600 - 30  # the device runs one command <= 600 s; 30 s to send $OUT back
    trials_s = limit - SETUP_S - finish - TEACHER_S
    assert (b["cap_epochs"] + (workers - 1) * longest) / ASSUMED_EPOCHS_PER_S <= trials_s
