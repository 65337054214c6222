"""A worker: claims trials from the queue and runs them until none is left, with a heartbeat while each runs
and, in a multi-fidelity study, the Optuna pruner watching each epoch. ``spawn_workers`` starts N of them as
processes (``edlab sweep --workers N``)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EdlabError
from .queue import missing_inputs, next_trial, retry
from .schema import TRAINS, Study, directions, full_epochs, recipe_path, set_args, val_floor
from .trial import run_point

HEARTBEAT_S = 30  # a running trial refreshes its heartbeat attribute this often


class TrialStopped(Exception):
    """Raised inside a trial's training when the study's pruner stops it (not an EdlabError: no stage wraps it)."""

    def __init__(self, epoch: int, val_accuracy: float):
        super().__init__(f"stopped by the pruner after epoch {epoch} (val {100 * val_accuracy:.2f}%)")
        self.epoch, self.val_accuracy = epoch, val_accuracy


def _watched_folder(st: Study, run_dir: Path) -> Path:
    """The folder of the training stage whose epochs the pruner judges: the trial's run, or its recipe's first
    train/prune/quantize stage (later stages are short fine-tunings that a trial reaching them runs whole)."""
    if st.kind == "config":
        return run_dir
    from ..pipeline import load_recipe

    stages = load_recipe(recipe_path(st), set_args(st.fixed))["stages"]
    i, name = next(((i, n) for i, (n, _) in enumerate(stages) if n in TRAINS), (0, "train"))
    return run_dir / f"{i:02d}-{name}"


def _pruning_observer(st: Study, trial, run_dir: Path):
    """Report each epoch's validation accuracy of the watched stage to Optuna and stop the trial when the
    pruner says so. A trial already at or above the study's floor is never stopped: it is feasible, and the
    objective then ranks it by its score, which the pruner does not see."""
    watched = _watched_folder(st, run_dir).resolve()
    sign = -1.0 if directions(st) == ["minimize"] else 1.0  # the pruner ranks by the study's direction
    floor = val_floor(st)

    def observe(row: dict, folder: str | None) -> None:
        val = row.get("val_accuracy")
        if folder is None or Path(folder).resolve() != watched or val is None:
            return
        retry(trial.report, sign * val, int(row["epoch"]))
        if retry(trial.should_prune) and not (floor is not None and val >= floor):
            raise TrialStopped(int(row["epoch"]), val)

    return observe


def _is_duplicate(study, trial) -> bool:
    """Two processes may enqueue the same point at once; only the lowest-numbered live copy runs."""
    from optuna.trial import TrialState

    slot = trial.user_attrs.get("slot")
    for t in retry(study.get_trials, deepcopy=False):
        if t.number == trial.number or t.user_attrs.get("slot") != slot:
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number):
            return True
    return False


def _suggest(st: Study, trial) -> dict[str, Any]:
    """The trial's point: fixed by the enqueued params (grid/list, retries) or drawn by the sampler."""
    if st.mode != "search":
        slot = trial.user_attrs["slot"]
        point = st.points[slot]
        for k in point:
            choices = list(dict.fromkeys(p[k] for p in st.points if k in p))
            trial.suggest_categorical(k, choices)
        return dict(point)
    point = {}
    for k, s in st.params.items():
        if s["type"] == "categorical":
            point[k] = trial.suggest_categorical(k, s["choices"])
        elif s["type"] == "int":
            point[k] = trial.suggest_int(k, int(s["low"]), int(s["high"]), step=int(s.get("step", 1)),
                                         log=bool(s.get("log", False)))
        else:
            v = trial.suggest_float(k, float(s["low"]), float(s["high"]), step=s.get("step"),
                                    log=bool(s.get("log", False)))
            point[k] = round(v, 12) if s.get("step") else v  # 0.35, not 0.35000000000000003
    return point


def _heartbeat(trial, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            trial.set_user_attr("heartbeat", time.time())
        except Exception:  # a busy database: the next beat will do
            pass


def _values(st: Study, r: dict) -> list[float]:
    if r.get("val_accuracy") is None or r.get("score") is None:
        raise EdlabError("the trial's summary has no val_accuracy or score (validation split empty?)")
    if st.objective == "pareto":
        return [r["val_accuracy"], r["score"]]
    return [r["score"]] if isinstance(st.objective, dict) else [r["val_accuracy"]]


def run_worker(st: Study, study, index: int = 0, echo=print) -> int:
    """Claim and run trials until none is left; returns how many this worker finished."""
    from optuna.trial import TrialState

    done = 0
    tag = f"[worker {index}] " if index else ""
    while True:
        trial = next_trial(st, study)
        if trial is None:
            for t in retry(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)):
                slot = t.user_attrs.get("slot")
                if missing := missing_inputs(st, slot):
                    echo(f"{tag}point {slot:04d} waits for {', '.join(missing)} (not there yet): run the same "
                         f"command again when it is")
            return done
        slot = trial.user_attrs["slot"]
        if _is_duplicate(study, trial):
            retry(trial.set_user_attr, "duplicate", True)
            retry(study.tell, trial, state=TrialState.PRUNED, skip_if_finished=True)
            continue
        run_dir = st.out / "trials" / f"{slot:04d}"
        retry(trial.set_user_attr, "heartbeat", time.time())
        point = _suggest(st, trial)
        retry(trial.set_user_attr, "point", point)
        retry(trial.set_user_attr, "run_dir", str(run_dir))
        shown = ", ".join(f"{k}={v}" for k, v in point.items())
        echo(f"{tag}trial {trial.number} (point {slot:04d}) {shown}: running")
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(trial, stop), daemon=True)
        beat.start()
        t0 = time.perf_counter()
        if st.pruner is not None:
            retry(trial.set_user_attr, "full_epochs", full_epochs(st, point))
        observer = _pruning_observer(st, trial, run_dir) if st.pruner is not None else None
        try:
            r = run_point(st, point, run_dir, st.out / "logs" / f"{slot:04d}.log", observer)
            values = _values(st, r)
        except TrialStopped as stop_:  # a losing trial: its run keeps resume.pt and metrics up to the stop
            for k, v in {"pruned_at": stop_.epoch, "val_accuracy": stop_.val_accuracy,
                         "epochs_run": float(stop_.epoch), "wall_seconds": time.perf_counter() - t0}.items():
                retry(trial.set_user_attr, k, v)
            retry(study.tell, trial, state=TrialState.PRUNED, skip_if_finished=True)
            echo(f"{tag}trial {trial.number} (point {slot:04d}): {stop_} "
                 f"({time.perf_counter() - t0:.0f} s)")
            continue
        except KeyboardInterrupt:
            retry(trial.set_user_attr, "interrupted", True)
            retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:  # a bad point (e.g. ps + pu >= 1) fails its trial, not the study
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            retry(trial.set_user_attr, "error", msg)
            retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
            echo(f"{tag}trial {trial.number} (point {slot:04d}): failed: {msg}")
            continue
        finally:
            stop.set()
        for k, v in r.items():
            retry(trial.set_user_attr, k, v)
        retry(trial.set_user_attr, "wall_seconds", time.perf_counter() - t0)
        if val_floor(st) is not None:  # feasible when <= 0: TPE then prefers draws above the floor
            retry(trial.set_constraint, "val_floor", val_floor(st) - r["val_accuracy"])
        retry(study.tell, trial, values, skip_if_finished=True)
        done += 1
        echo(f"{tag}trial {trial.number} (point {slot:04d}): val {100 * r['val_accuracy']:.2f}%  "
             f"score {r['score']:.4f}  ({time.perf_counter() - t0:.0f} s)")


def spawn_workers(study_file: str, st: Study, url: str, workers: int, quick: bool, sets, stale_after: float,
           floor: float | None = None, pruner: str | None = None) -> None:
    """N worker processes in this process group (killing the group stops them all), then wait for them."""
    base = [sys.executable, "-m", "edlab", "sweep", study_file, "--out", str(st.out), "--storage", url,
            "--stale-after", str(stale_after)] + (["--quick"] if quick else []) + \
        [a for s in sets for a in ("--set", s)] + (["--floor", repr(floor)] if floor is not None else []) + \
        (["--pruner", pruner] if pruner is not None else [])
    procs = [subprocess.Popen(base + ["--worker", str(i + 1)]) for i in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
        raise
    bad = [i + 1 for i, c in enumerate(codes) if c != 0]
    if bad:
        raise EdlabError(f"worker(s) {', '.join(map(str, bad))} exited with an error (see above); run the same "
                         f"command again to finish the study")
