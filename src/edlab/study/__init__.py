"""Studies: many training (or pipeline) runs over a grid, a list or an Optuna search, resumable at any point.

A study file names a base and how to vary it::

    name: lr                       # Optuna study name; out dir default runs/study-<name>
    config: configs/resnet20-cifar10.yaml   # base = one `edlab train` per trial ...
    # recipe: recipes/r20-compress.yaml     # ... or one `edlab run` pipeline per trial (keys STAGE.KEY)
    set: {epochs: 15}              # fixed overrides of every trial
    grid: {optim.lr: [0.05, 0.1, 0.2]}      # or list: [{...}, ...], or search: {params: ..., trials: N}
    objective: val_accuracy        # | pareto | {min_score_with_val_at_least: 0.9}
    quick: {epochs: 1, data.train_subset: 2000}   # overrides used with --quick (a separate study)
    test: chosen                   # trials never read the test split; the selected points are tested once after
    teacher: {config: configs/resnet20-cifar10.yaml}   # trained once into <out>/teacher, distils every trial
    pack: true                     # the best point's final checkpoint -> <out>/winner.pack

Every trial is one Optuna trial in a storage shared by all workers (SQLite file in the out dir by
default). Grid and list points are enqueued once each as WAITING trials that workers claim; a trial
left RUNNING by a killed process is marked FAIL and its point enqueued again, so the same command
finishes a study without repeating finished trials. A point's run directory is
``<out>/trials/<NNNN>`` (NNNN: its index, or the number of the trial that first drew it in a search),
so a re-run continues what the killed one left (resume.pt, finished pipeline stages). Selection uses
validation accuracy only (``objective.floor_margin`` raises the floor it must reach; ``--floor`` replaces the
floor, as a separate study); test accuracy is recorded for the report, or, with ``test: chosen``, read only
for the selected points.

The package, one concept a file: ``schema`` (the study file and its checks), ``queue`` (the Optuna storage and
the trials claimed from it), ``trial`` (one trial's run, the teacher), ``worker`` (the claim-and-run loop, its
heartbeat, the pruner's watch, worker processes), ``select`` (the best point, the chosen test, the winner pack)
and ``driver`` (``sweep``: all of it, and study.json).
"""

from .driver import budget, budget_line, describe, sweep, write_report
from .queue import claim, enqueue_missing, make_pruner, open_study, recover, retry, spent_epochs, storage_url
from .schema import Study, full_epochs, load_study, teacher_path, trial_config, validate
from .select import best, chosen_slots, pack_winner, test_chosen, trial_rows
from .trial import ensure_teacher, run_point
from .worker import TrialStopped, run_worker

__all__ = ["Study", "TrialStopped", "best", "budget", "budget_line", "chosen_slots", "claim", "describe",
           "enqueue_missing", "ensure_teacher", "full_epochs", "load_study", "make_pruner", "open_study",
           "pack_winner", "recover", "retry", "run_point", "run_worker", "spent_epochs", "storage_url", "sweep",
           "teacher_path", "test_chosen", "trial_config", "trial_rows", "validate", "write_report"]
