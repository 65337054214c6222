"""edlab sweep: studies recorded exactly once per point, resumable after SIGKILL, with clean errors."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error as one_line
from conftest import invoke

pytest.importorskip("optuna")

from click.testing import CliRunner  # noqa: E402

from edlab.cli import cli  # noqa: E402
from edlab.study import load_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = """model: {name: resnet20, width: 0.25}
data: {dataset: synthetic, val_size: 128, train_subset: 256, batch_size: 64}
epochs: 1
precision: fp32
threads: 1
"""


def write(tmp_path, study: str, config: str = TINY) -> Path:
    (tmp_path / "tiny.yaml").write_text(config)
    p = tmp_path / "study.yaml"
    p.write_text(study)
    return p


def sweep(*args, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "edlab", "sweep", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def trials(db: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial, read straight from the SQLite file as another process would."""
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def report(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def complete_slots(rep: dict) -> list[int]:
    return sorted(t["slot"] for t in rep["trials"] if t["state"] == "COMPLETE")


GRID4 = "name: g\nconfig: tiny.yaml\ngrid:\n  optim.lr: [0.05, 0.1]\n  data.augment: [none, crop-flip]\n"


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_two_workers_record_every_point_once(tmp_path):
    study = write(tmp_path, GRID4)
    out = tmp_path / "out"
    p = sweep(study, "--out", out, "--workers", "2")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    rep = report(out)
    assert complete_slots(rep) == [0, 1, 2, 3] and len(rep["trials"]) == 4
    assert rep["counts"] == {"COMPLETE": 4}
    assert all(line.startswith("[worker ") for line in stdout.splitlines() if " trial " in line)
    assert all(t["worker"] for t in rep["trials"])
    for t in rep["trials"]:
        s = json.loads((Path(t["run_dir"]) / "summary.json").read_text())
        assert t["val_accuracy"] == s["val_accuracy"] and t["test_accuracy"] == s["test_accuracy"]
        assert t["score"] == s["score"] and t["run_dir"].endswith(f"trials/{t['slot']:04d}")
    assert rep["trials"][0]["point"] == {"optim.lr": 0.05, "data.augment": "none"}
    assert len(trials(out / "study.db")) == 4


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_sigkill_then_same_command_finishes_only_the_rest(tmp_path):
    config = TINY.replace("epochs: 1", "epochs: 3").replace("train_subset: 256", "train_subset: 512")
    study = write(tmp_path, "name: k\nconfig: tiny.yaml\ngrid:\n  optim.lr: [0.02, 0.05, 0.1]\n", config)
    out, db = tmp_path / "out", tmp_path / "out" / "study.db"
    p = sweep(study, "--out", out, "--workers", "2", start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            states = [s for _, s in trials(db)] if db.exists() else []
        except sqlite3.OperationalError:  # the file exists before Optuna has made its tables
            states = []
        if "COMPLETE" in states and "RUNNING" in states:
            break
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the sweep and its workers, mid-trial
    p.communicate()
    before = dict(trials(db))
    finished = [n for n, s in before.items() if s == "COMPLETE"]
    assert finished and "RUNNING" in before.values()
    run_dirs = {n: out / "trials" / f"{n:04d}" for n in range(3)}  # grid points are enqueued in order
    stamps = {n: (run_dirs[n] / "summary.json").stat().st_mtime_ns for n in finished}

    p = sweep(study, "--out", out)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    rep = report(out)
    assert complete_slots(rep) == [0, 1, 2]  # each point COMPLETE exactly once
    after = dict(trials(db))
    assert all(after[n] == "COMPLETE" for n in finished)  # the finished trials, never repeated
    assert [s for s in after.values()].count("COMPLETE") == 3
    interrupted = [t for t in rep["trials"] if t["interrupted"]]
    assert interrupted and all(t["state"] == "FAIL" for t in interrupted)
    assert {n: (run_dirs[n] / "summary.json").stat().st_mtime_ns for n in finished} == stamps


HOLD_A_TRIAL = """
import sys, time
from edlab.study import claim, load_study, open_study, storage_url
st = load_study(sys.argv[1], out=sys.argv[2])
study = open_study(st, storage_url(st, None), worker=1, create=False)
assert claim(study) is not None
print("claimed", flush=True)
time.sleep(600)
"""


def _wait_for_state(pid: int, state: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != state:
        assert time.time() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through Linux /proc")
def test_a_killed_worker_not_yet_reaped_does_not_hold_its_trial(tmp_path):
    """A SIGKILLed worker is a zombie until its parent reaps it; once the sweep itself is killed too that
    parent is init, which reaps when it gets to it (one container's init: every 2 s). A re-run in that window must
    count the worker dead and re-run its trial, not leave it RUNNING forever and report the point missing."""
    from edlab.study import enqueue_missing, open_study, storage_url

    study = write(tmp_path, "name: z\nconfig: tiny.yaml\ngrid:\n  optim.lr: [0.05]\n")
    out = tmp_path / "out"
    st = load_study(str(study), out=str(out))
    enqueue_missing(st, open_study(st, storage_url(st, None)))
    worker = subprocess.Popen([sys.executable, "-c", HOLD_A_TRIAL, str(study), str(out)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert worker.stdout.readline().strip() == "claimed"
        assert [s for _, s in trials(out / "study.db")] == ["RUNNING"]
        worker.kill()
        _wait_for_state(worker.pid, "Z")  # dead, and not reaped: this test is its parent and waits for it later
        r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])
    finally:
        worker.kill()
        worker.wait()
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert complete_slots(rep) == [0]
    assert [(t["state"], t["interrupted"]) for t in rep["trials"]] == [("FAIL", True), ("COMPLETE", False)]


CLAIM_ALL = """
import json, sys, time
from edlab.study import claim, load_study, open_study, storage_url
st = load_study(sys.argv[1], out=sys.argv[2])
study = open_study(st, storage_url(st, None), worker=1, create=False)
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
got = []
while (t := claim(study)) is not None:
    got.append(t.number)
print(json.dumps(got))
"""


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_workers_claiming_at_once_take_each_waiting_trial_once(tmp_path):
    """Optuna checks WAITING and sets RUNNING in two statements, atomic through row locks on PostgreSQL but
    not on SQLite: unguarded, two workers sometimes both took one trial and ran its point twice in the same
    run directory (then one failed it for real, so no re-run redid it). Three workers race for 60 trials."""
    from edlab.study import enqueue_missing, open_study, storage_url

    lrs = ", ".join(str(round(0.01 + 0.001 * i, 3)) for i in range(60))
    study = write(tmp_path, f"name: c\nconfig: tiny.yaml\ngrid:\n  optim.lr: [{lrs}]\n")
    out = tmp_path / "out"
    st = load_study(str(study), out=str(out))
    assert enqueue_missing(st, open_study(st, storage_url(st, None))) == 60
    start = time.time() + 6  # all three have imported Optuna by then and start claiming together
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_ALL, str(study), str(out), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in results]
    claimed = [n for o, _ in results for n in json.loads(o)]
    assert sorted(claimed) == list(range(60))  # every trial claimed, none by two workers
    assert [s for _, s in trials(out / "study.db")] == ["RUNNING"] * 60


def test_search_reruns_an_interrupted_draw_with_its_params(tmp_path):
    import optuna

    study = write(tmp_path, """name: s
config: tiny.yaml
search:
  params:
    optim.lr: {type: float, low: 0.01, high: 0.2, log: true}
    model.width: {type: categorical, choices: [0.25, 0.5]}
  trials: 3
objective: {min_score_with_val_at_least: 0.0}
""")
    out = tmp_path / "out"
    # a draw left RUNNING by a process that no longer exists
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    s = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="s", directions=["minimize"])
    t = s.ask()
    lr, width = t.suggest_float("optim.lr", 0.01, 0.2, log=True), t.suggest_categorical("model.width", [0.25, 0.5])
    t.set_user_attr("slot", t.number)
    import socket

    t.set_user_attr("owner", {"host": socket.gethostname(), "pid": dead.pid, "pid_start": None})
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert len(complete_slots(rep)) == 3 and complete_slots(rep)[0] == 0  # slot = number of the first draw
    redo = next(t for t in rep["trials"] if t["slot"] == 0 and t["state"] == "COMPLETE")
    assert redo["point"] == {"optim.lr": lr, "model.width": width} and redo["number"] > 0
    assert "slot" in rep["best"] and rep["best"]["rule"].startswith("lowest score")
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])  # finished: nothing runs again
    assert r.exit_code == 0 and len(report(out)["trials"]) == len(rep["trials"])


def test_recipe_study_records_the_last_stage(tmp_path):
    study = write(tmp_path, """name: r
recipe:
  - train: {config: tiny.yaml}
  - prune: {finetune-epochs: 0, train-subset: 256, precision: fp32}
grid:
  prune.unstructured: [0.3, 0.6]
objective: pareto
""")
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the recipe's config path is relative, as in a project directory
    try:
        r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert complete_slots(rep) == [0, 1]
    a, b = (next(t for t in rep["trials"] if t["slot"] == i) for i in (0, 1))
    assert b["score"] < a["score"]  # more zeros, lower score: the prune stage's figures, not train's
    prune = json.loads((out / "trials" / "0001" / "01-prune" / "summary.json").read_text())
    assert b["val_accuracy"] == prune["val_accuracy"] and prune["pu"] == pytest.approx(0.6, abs=0.01)
    assert set(rep["best"]["pareto_front"]) <= {0, 1}


@pytest.mark.parametrize("text,msg", [
    ("config: tiny.yaml\ngrid: {optim.lr: [0.1]}\nbogus: 1\n", "unknown key(s) bogus"),
    ("config: tiny.yaml\ngrid: {optim.lrr: [0.1]}\n", "unknown config key 'optim.lrr'"),
    ("config: tiny.yaml\ngrid: {optim.name: [sgd, sgdx]}\n", "optim.name=sgdx"),
    ("config: tiny.yaml\ngrid: {optim.lr: 0.1}\n", "non-empty list"),
    ("config: tiny.yaml\ngrid: {optim.lr: [0.1]}\nlist: [{epochs: 1}]\n", "exactly one of"),
    ("grid: {optim.lr: [0.1]}\n", "exactly one base"),
    ("config: tiny.yaml\nsearch: {params: {optim.lr: {type: loguniform}}, trials: 2}\n", "type: int"),
    ("config: tiny.yaml\nsearch: {params: {optim.lr: {type: float, low: 1, high: 0}}, trials: 2}\n", "low <= high"),
    ("config: tiny.yaml\ngrid: {optim.lr: [0.1]}\nobjective: accuracy\n", "objective must be"),
    ("recipe: [{train: {config: tiny.yaml}}]\ngrid: {prune.structured: [0.1]}\n", "name a stage"),
    ("recipe: [{train: {config: tiny.yaml}}]\ngrid: {train.epochz: [1]}\n", "No such option"),
    ("config: tiny.yaml\ngrid: {" + ", ".join(f"k{i}: [{', '.join(map(str, range(10)))}]" for i in range(12)) + "}\n",
     "the grid has 1,000,000,000,000 points"),
])
def test_bad_study_file_is_one_line_exit_2(tmp_path, text, msg):
    study = write(tmp_path, text)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("edlab: error: study") and msg in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_optuna_says_how_to_install(tmp_path, monkeypatch):
    study = write(tmp_path, "config: tiny.yaml\ngrid: {optim.lr: [0.1]}\n")
    monkeypatch.setitem(sys.modules, "optuna", None)
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "pip install 'edlab[study]'" in r.stderr


def test_changed_study_is_refused(tmp_path):
    study = write(tmp_path, "config: tiny.yaml\nset: {epochs: 0}\ngrid: {optim.lr: [0.1]}\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out), "--set", "seed=1"])
    assert r.exit_code == 2 and "different definition" in r.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_studies_are_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for quick in (False, True):
        st = load_study(str(path.relative_to(ROOT)), quick=quick)
        assert st.points or st.trials
        if quick:
            assert st.fixed != load_study(str(path.relative_to(ROOT))).fixed, "quick: must change something"


def test_locked_sqlite_is_retried_other_errors_are_not():
    import sqlite3

    from edlab.study import retry

    calls = []

    def flaky(fail_times: int, message: str):
        calls.append(1)
        if len(calls) <= fail_times:
            try:
                raise sqlite3.OperationalError(message)
            except sqlite3.OperationalError as e:  # as Optuna wraps it
                raise RuntimeError("An exception is raised during the commit.") from e
        return "ok"

    assert retry(flaky, 2, "database is locked") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError):
        retry(flaky, 1, "no such table: trials")
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["challenge", "ps-pu"])
def test_a_study_run_from_another_folder_finds_the_paths_it_names(name, tmp_path, monkeypatch):
    """`edlab sweep /path/to/edlab/studies/challenge.yaml` from any folder: its configs/... paths are read from
    the study file's folder and its ancestors (the repo root), not the working directory."""
    monkeypatch.chdir(tmp_path)
    st = load_study(str(ROOT / "studies" / f"{name}.yaml"), out=str(tmp_path / "out"))
    named = [st.base] + ([st.teacher["config"]] if st.teacher and "config" in st.teacher else [])
    for stage in (st.inline_recipe or {}).get("stages", []):
        named += [o["config"] for o in stage.values() if isinstance(o, dict) and "config" in o]
    assert named and all(Path(p).is_file() for p in named if p)


def test_a_path_beside_the_study_file_wins_over_the_working_directory(tmp_path, monkeypatch):
    """Both folders hold a tiny.yaml: the study's own is the one it means; an absolute path stays as it is."""
    (tmp_path / "s").mkdir()
    study = write(tmp_path / "s",
                  "config: tiny.yaml\nset: {epochs: 0}\ngrid: {optim.lr: [0.1]}\n")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "tiny.yaml").write_text(TINY.replace("width: 0.25", "width: 0.5"))
    monkeypatch.chdir(tmp_path / "cwd")
    assert Path(load_study(str(study)).base).resolve() == tmp_path / "s" / "tiny.yaml"
    assert load_study(str(study), sets=["distill.teacher=t.ckpt"]).fixed["distill.teacher"] == "t.ckpt"
    absolute = study.with_name("abs.yaml")
    absolute.write_text(f"config: {tmp_path / 'cwd' / 'tiny.yaml'}\nset: {{epochs: 0}}\ngrid: {{optim.lr: [0.1]}}\n")
    assert load_study(str(absolute)).base == str(tmp_path / "cwd" / "tiny.yaml")


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


def test_failed_trials_name_their_error_once_below_the_table(tmp_path):
    """A trial that fails says "fail [n]" in the table and its message is printed once under it, however many
    trials failed alike: a long message in a column made the table unreadable."""
    pytest.importorskip("optuna")
    study = _study(tmp_path, "name: f\nconfig: tiny.yaml\ngrid: {model.conv: ['grouped:3'], optim.lr: [0.05, 0.1]}\n")
    r = invoke("sweep", study, "--out", tmp_path / "out")
    assert r.output.count("fail [1]") == 2, r.output
    [line] = [x for x in r.output.splitlines() if x.startswith("[1] ")]
    assert "G must be a power of two" in line


def test_a_study_sets_a_stage_flag_and_a_config_key_under_its_name(tmp_path):
    """--set quantize.distill=false with --set quantize.distill.crop_pool=4 (the flag and the config section
    share a name) used to stop the study with "'distill' is not a section"."""
    st = load_study(str(ROOT / "studies" / "challenge-course.yaml"), out=str(tmp_path / "out"),
                    sets=["quantize.distill=false", "quantize.distill.crop_pool=4"])
    assert st.fixed["quantize.distill"] is False and st.fixed["quantize.distill.crop_pool"] == 4


def test_a_points_paths_are_read_from_the_study_files_folder(tmp_path, monkeypatch):
    """A list point naming quantize.checkpoint relative to the study file finds it from any working directory,
    as set:'s paths do; the point itself (the trial's identity in the storage) keeps the path as written."""
    import edlab.study.trial as trial

    (tmp_path / "s" / "student").mkdir(parents=True)
    (tmp_path / "s" / "student" / "model.ckpt").write_bytes(b"x")
    study = tmp_path / "s" / "study.yaml"
    study.write_text("name: p\nrecipe:\n  - quantize: {method: qat}\n"
                     "list:\n  - {quantize.checkpoint: student/model.ckpt}\n")
    st = load_study(str(study), out=str(tmp_path / "out"))
    seen = {}
    monkeypatch.setattr(trial, "_run_recipe", lambda st, point, run_dir, console: seen.update(point) or {})
    monkeypatch.chdir(tmp_path)
    trial.run_point(st, st.points[0], tmp_path / "run", tmp_path / "log.txt")
    assert Path(seen["quantize.checkpoint"]) == tmp_path / "s" / "student" / "model.ckpt"
    assert st.points[0]["quantize.checkpoint"] == "student/model.ckpt"
