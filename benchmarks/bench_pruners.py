"""Which pruner for a multi-fidelity study: replay a full-fidelity study's learning curves through Optuna's
pruners and print, for each setting, the epochs it would spend and the point it would choose.

A trial's curve does not depend on whether it is stopped (edlab's trials are seeded and a promoted trial
goes on with its own schedule), so stopping a recorded curve where a pruner says so is what the pruned
study would do, in the same trial order: the replay of successive halving (min 1, factor 3) over
`studies/multi-fidelity-students.yaml` gives the 72 epochs and the point its real run gave. Measure the
chosen setting for real afterwards (`edlab sweep STUDY.yaml`); Hyperband assigns trials to brackets by a
hash of the study name, so its replay can differ from a real run in which trial goes where.

    edlab sweep studies/multi-fidelity-students.yaml --pruner none --out runs/mf-full   # once, all epochs
    python benchmarks/bench_pruners.py runs/mf-full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna


def curves(study_dir: Path) -> tuple[list[list[float]], str]:
    """Each finished trial's validation accuracy per epoch of its watched (first) training stage, in the
    order the study ran them, and the study's objective."""
    study = json.loads((study_dir / "study.json").read_text())
    if study.get("objective") != "val_accuracy":
        sys.exit(f"bench_pruners: {study_dir} optimises {study.get('objective')!r}; replay needs val_accuracy")
    out = []
    for t in sorted(study["trials"], key=lambda t: t["number"]):
        if t["state"] != "COMPLETE":
            sys.exit(f"bench_pruners: trial {t['number']} is {t['state']}: replay needs a full-fidelity study")
        run = Path(t["run_dir"])
        if not run.is_dir():  # a study folder copied elsewhere (docs/results): its own trials/ folder
            run = study_dir / "trials" / run.name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out.append([r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None])
    return out, study["objective"]


def replay(pruner: optuna.pruners.BasePruner, runs: list[list[float]]) -> tuple[int, int, float]:
    """Epochs spent, the chosen trial and its final accuracy."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    spent, finished = 0, {}
    for i, curve in enumerate(runs):
        trial = study.ask()
        for epoch, val in enumerate(curve, 1):
            trial.report(val, epoch)
            if trial.should_prune():  # as the sweep asks: after every epoch, the last included
                spent += epoch
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            spent += len(curve)
            study.tell(trial, curve[-1])
            finished[i] = curve[-1]
    pick = max(finished, key=finished.get)
    return spent, pick, finished[pick]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path, help="a finished full-fidelity study folder (edlab sweep --pruner none)")
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs, _ = curves(a.study_dir)
    epochs = max(len(c) for c in runs)
    full = sum(len(c) for c in runs)
    best = max(range(len(runs)), key=lambda i: runs[i][-1])
    print(f"{a.study_dir}: {len(runs)} trials, {full} epochs at full fidelity, "
          f"its choice: trial {best} (val {100 * runs[best][-1]:.2f} %)")
    settings = []
    for rf in (2, 3, 4):
        for m in (1, 2):
            settings.append((f"successive-halving min {m} factor {rf}",
                             optuna.pruners.SuccessiveHalvingPruner(min_resource=m, reduction_factor=rf)))
            settings.append((f"hyperband min {m} max {epochs} factor {rf}",
                             optuna.pruners.HyperbandPruner(min_resource=m, max_resource=epochs, reduction_factor=rf)))
    for startup in (5, 9):
        settings.append((f"median startup {startup}", optuna.pruners.MedianPruner(n_startup_trials=startup)))
    print(f"{'pruner':40} {'epochs':>7} {'of full':>7}  choice")
    for name, pruner in settings:
        spent, pick, val = replay(pruner, runs)
        same = "same" if pick == best else f"worse by {100 * (runs[best][-1] - val):.2f}"
        print(f"{name:40} {spent:7d} {spent / full:7.3f}  trial {pick} (val {100 * val:.2f} %, {same})")


if __name__ == "__main__":
    main()
