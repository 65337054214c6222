"""``edlab sweep`` as a call: claim the out folder, open the queue, run the workers, select, write study.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import EdlabError
from .queue import enqueue_missing, import_optuna, open_study, recover, redact, retry, storage_url, withdraw_unfinished
from .schema import Study, full_epochs, load_study, recipe_path, teacher_path
from .select import best, pack_winner, test_chosen, trial_rows
from .trial import ensure_teacher
from .worker import run_worker, spawn_workers


def describe(st: Study) -> list[str]:
    """What ``edlab sweep --dry-run`` prints: the study as read, and its points (or search space)."""
    lines = [f"study {st.name}: {st.mode}, {len(st.points) or st.trials} trials, base {st.kind} "
             f"{st.base or 'inline'}, objective {st.objective}, fixed {st.fixed}, out {st.out}, "
             f"test {st.test}" + (f", teacher {st.teacher}" if st.teacher else "")]
    lines.append(budget_line(st))
    lines += [f"  {i:04d} " + ", ".join(f"{k}={v}" for k, v in p.items()) for i, p in enumerate(st.points)]
    lines += [f"  {k}: " + ", ".join(f"{f}={v}" for f, v in spec.items()) for k, spec in st.params.items()]
    return lines


def budget(st: Study, rows: list[dict] | None = None) -> dict:
    """What the study spends: every trial at full fidelity (its trials times their epochs, all stages), the cap
    (``budget: {epochs: N}``) and, from ``rows``, the epochs its finished trials ran and how many were stopped."""
    try:
        full: float | None = full_epochs(st, {})[1] * st.trials if st.mode == "search" else \
            sum(full_epochs(st, p)[1] for p in st.points)
    except (EdlabError, OSError, KeyError, TypeError, ValueError):  # a count the file does not state plainly
        full = None
    out = {"full_fidelity_epochs": full, "cap_epochs": st.budget_epochs, "pruner": st.pruner}
    if rows is not None:
        done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r.get("epochs_run") is not None]
        out["spent_epochs"] = sum(r["epochs_run"] for r in done)
        out["pruned_trials"] = sum(r["state"] == "PRUNED" for r in done)
    return out


def budget_line(st: Study) -> str:
    """The budget in one line, printed before the trials start."""
    b = budget(st)
    n = len(st.points) if st.mode != "search" else st.trials
    full = b["full_fidelity_epochs"]
    line = f"budget: {n} trial(s), " + (f"{full:g} training epochs at full fidelity" if full is not None else
                                         "epochs at full fidelity not stated by the recipe")
    if st.pruner:
        p = st.pruner
        line += (f"; pruner {p['type']} (from epoch {p['min_epochs']}, reduction factor {p['reduction_factor']}) "
                 f"stops losing trials early")
    if st.budget_epochs:
        line += f"; no trial starts after {st.budget_epochs} epochs are spent"
    return line


def write_report(st: Study, study, url: str) -> dict:
    """Write <out>/study.json (the study as read, every trial, the selection, the budget) and return it."""
    from ..runs import write_json  # (runs loads torch, which `import edlab.study` does not need)

    rows = sorted(trial_rows(study), key=lambda r: (r["slot"] if r["slot"] is not None else -1, r["number"]))
    for r in rows:  # waiting grid/list trials: show their point before a worker has written it
        if r["point"] is None and r["slot"] is not None and st.mode != "search" and r["slot"] < len(st.points):
            r["point"] = st.points[r["slot"]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    report = {"name": st.name, "study_file": st.file, "mode": st.mode, "base": {st.kind: st.base or "inline"},
              "fixed": st.fixed, "objective": st.objective, "storage": redact(url),
              "size": len(st.points) if st.mode != "search" else st.trials, "counts": counts, "test": st.test,
              "teacher": teacher_path(st) if st.teacher else None,
              "winner": retry(lambda: study.user_attrs).get("winner") if st.pack else None,
              "best": best(st, rows), "budget": budget(st, rows), "trials": rows}
    write_json(st.out / "study.json", report)
    return report


def sweep(study_file: str, out: str | None = None, storage: str | None = None, workers: int = 1,
          quick: bool = False, sets: Sequence[str] = (), retry_failed: bool = False, stale_after: float = 600,
          floor: float | None = None, worker_index: int | None = None, dry_run: bool = False,
          echo=print, pruner: str | None = None, finish: bool = False) -> dict | None:
    """``edlab sweep`` as a call: run (or continue) a study, one training or pipeline run per point or trial,
    then test the chosen points (``test: chosen``), pack the winner (``pack: true``) and write
    <out>/study.json. Returns the study report (what study.json holds); None for a worker (``worker_index``,
    a process the sweep itself starts) and for ``dry_run`` (check the file, echo its points, run nothing).
    ``finish`` ends a study that ran out of time with what finished: no trial is started, the unfinished
    ones are withdrawn (queue.withdraw_unfinished), then the test, pack and report as at a normal end.
    ``echo(text)`` hears the progress lines."""
    if workers < 1:
        raise EdlabError(f"--workers must be >= 1, got {workers}")
    st = load_study(study_file, quick, tuple(sets), out, floor, pruner)
    if dry_run:
        for line in describe(st):
            echo(line)
        return None
    import_optuna()
    if finish and storage is None and not (st.out / "study.db").is_file():
        raise EdlabError(f"no study to finish in {st.out} (no study.db): --finish ends a sweep that was started")
    if worker_index is None:
        _claim_out(st.out)
    url = storage_url(st, storage)
    if finish:
        try:
            study = open_study(st, url, create=False)
        except KeyError:  # Optuna: no such study in the storage
            raise EdlabError(f"no study '{st.name}' in {redact(url)} to finish") from None
        echo(f"study {st.name} in {redact(url)} finished where it stands: "
             f"{withdraw_unfinished(study, stale_after)} unfinished trial(s) withdrawn (a later sweep runs them)")
        return _end(st, study, url, echo)
    if st.kind == "recipe":
        recipe_path(st)
    ensure_teacher(st, echo=echo)  # before any trial; a worker finds it made (or waits on its lock)
    if worker_index is not None:  # a worker started by the sweep below
        study = open_study(st, url, worker_index, create=False)
        run_worker(st, study, worker_index, echo=lambda m: print(m, flush=True))
        return None
    study = open_study(st, url)
    recovered = recover(study, stale_after)
    added = enqueue_missing(st, study, retry_failed)
    echo(budget_line(st))
    echo(f"study {st.name} in {redact(url)}: {recovered} interrupted trial(s) to re-run, "
         f"{added} point(s) enqueued, {workers} worker(s); logs in {st.out / 'logs'}")
    if workers == 1:
        run_worker(st, study, 0, echo=echo)
    else:
        spawn_workers(study_file, st, url, workers, quick, sets, stale_after, floor, pruner)
    recover(study, stale_after)  # a crashed worker left its trial RUNNING: not "still running" for the test below
    return _end(st, study, url, echo)


def _end(st: Study, study, url: str, echo) -> dict:
    """What every sweep does once no trial is left to run: test, pack, report."""
    if st.test == "chosen":  # the trials never read the test split: the selected points are read now, once
        test_chosen(st, study, echo=echo)
    if st.pack:
        pack_winner(st, study, echo=echo)
    return {**write_report(st, study, url), "out": str(st.out)}


STUDY_MARK = ".edlab-study"


def _claim_out(out: Path) -> None:
    """The study folder is the sweep's: it writes study.json, recipe.yaml, logs/ and trials/ there, so a
    folder with other files (a user's own study.json or recipe.yaml) is refused, never overwritten."""
    from ..runs import check_out_path

    check_out_path(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / STUDY_MARK).exists():
        legacy = (out / "study.db").exists() or (out / "trials").is_dir()  # made before the mark existed
        if not legacy:
            raise EdlabError(f"{out} exists and is not a sweep's folder (no {STUDY_MARK}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_MARK).touch()
