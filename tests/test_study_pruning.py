"""Multi-fidelity studies: a pruner stops losing trials at a rung, the study records where, and spends less."""

import json
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from click.testing import CliRunner  # noqa: E402

from edlab.cli import cli  # noqa: E402
from edlab.errors import EdlabError  # noqa: E402
from edlab.study import load_study  # noqa: E402

TINY = """model: {name: resnet20, width: 0.25}
data: {dataset: synthetic, val_size: 128, train_subset: 256, batch_size: 64}
epochs: 3
precision: fp32
threads: 1
"""
# point 0 learns, points 1 and 2 barely move their weights: successive halving (factor 2, sequential) keeps
# a trial at a rung only when it is the best so far there, so both stop after their first epoch
STUDY = """name: mf
config: tiny.yaml
grid:
  optim.lr: [0.1, 0.000001, 0.0000001]
pruner: {type: successive-halving, min_epochs: 1, reduction_factor: 2}
"""


def write(tmp_path, study: str) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "study.yaml").write_text(study)
    return tmp_path / "study.yaml"


def test_pruner_stops_losing_trials_and_the_study_says_where(tmp_path, one_thread):
    study, out = write(tmp_path, STUDY), tmp_path / "out"
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "budget: 3 trial(s), 9 training epochs at full fidelity; pruner successive-halving" in r.output
    rep = json.loads((out / "study.json").read_text())
    by_slot = {t["slot"]: t for t in rep["trials"]}
    assert by_slot[0]["state"] == "COMPLETE" and by_slot[0]["epochs_run"] == 3
    for slot in (1, 2):
        t = by_slot[slot]
        assert t["state"] == "PRUNED" and t["pruned_at"] == 1 and t["epochs_run"] == 1
        assert (Path(t["run_dir"]) / "resume.pt").exists()  # its own run stays resumable
    assert rep["budget"]["spent_epochs"] == 5 and rep["budget"]["full_fidelity_epochs"] == 9
    assert rep["budget"]["pruned_trials"] == 2 and rep["best"]["slot"] == 0
    assert "stopped @1/3" in r.output and "epochs spent 5 of 9" in r.output
    from edlab.report import build_report

    build_report([out], tmp_path / "report")  # the page shows where each trial stopped
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("stopped after epoch 1") == 2 and "5 of 9 training epochs at full fidelity" in page
    again = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])  # a pruned trial is not re-run
    assert again.exit_code == 0 and "0 point(s) enqueued" in again.output
    assert len(json.loads((out / "study.json").read_text())["trials"]) == len(rep["trials"])


def test_budget_cap_stops_starting_trials(tmp_path, one_thread):
    study, out = write(tmp_path, STUDY.replace("pruner: {", "budget: {epochs: 3}\npruner: {")), tmp_path / "out"
    r = CliRunner().invoke(cli, ["sweep", str(study), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in rep["trials"]].count("COMPLETE") == 1  # 3 epochs spent: nothing else starts
    assert rep["budget"]["spent_epochs"] == 3 and "no trial starts after 3 epochs" in r.output


@pytest.mark.parametrize("text, msg", [
    ("pruner: quartiles\n", "pruner must be none or one of successive-halving, hyperband, median"),
    ("pruner: {type: median, patience: 3}\n", "unknown pruner key(s) patience"),
    ("pruner: {type: hyperband, reduction_factor: 1}\n", "pruner.reduction_factor must be an integer >= 2"),
    ("budget: {epochs: 0}\n", "budget must be {epochs: N}"),
    ("objective: pareto\npruner: median\n", "a pruner needs one objective"),
])
def test_bad_pruner_or_budget_is_one_line(tmp_path, text, msg):
    study = write(tmp_path, "name: b\nconfig: tiny.yaml\ngrid: {optim.lr: [0.1]}\n" + text)
    with pytest.raises(EdlabError, match=None) as e:
        load_study(str(study))
    assert msg in str(e.value)


def test_a_resumed_fit_shows_its_restored_epochs_to_the_observer_first(tiny_cfg, one_thread):
    from conftest import kill_after_epoch

    from edlab.train import observe_epochs, train

    cfg = tiny_cfg(epochs=3)
    run = kill_after_epoch(cfg, 2)
    seen = []
    with observe_epochs(lambda row, folder: seen.append((row["epoch"], folder))):
        train(cfg, resume=True)
    assert seen == [(1, str(run.path)), (2, str(run.path)), (3, str(run.path))]


def test_replaying_a_full_fidelity_study_gives_what_the_pruned_study_spends_and_chooses(tmp_path, one_thread):
    """benchmarks/bench_pruners.py stops a full-fidelity study's recorded curves where a pruner says: the
    same epochs and choice as the pruned study (5 of 9, point 0), which is what makes it a way to choose."""
    import importlib.util

    import optuna

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pruners.py"
    spec = importlib.util.spec_from_file_location("bench_pruners", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    study, out = write(tmp_path, STUDY), tmp_path / "full"
    r = CliRunner().invoke(cli, ["sweep", str(study), "--pruner", "none", "--out", str(out)])
    assert r.exit_code == 0, r.output
    runs, objective = bench.curves(out)
    assert objective == "val_accuracy" and [len(c) for c in runs] == [3, 3, 3]
    sh = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    assert bench.replay(sh, runs)[:2] == (5, 0)
    assert bench.replay(optuna.pruners.NopPruner(), runs)[0] == 9


def test_full_fidelity_counts_a_fine_tuning_after_each_pruning_step(tmp_path):
    """A prune stage fine-tunes after every step of each kind it prunes (structured, then unstructured): the
    budget at full fidelity counts them all (the challenge's --quick trials ran 6 epochs against 5 counted)."""
    from edlab.study import full_epochs

    (tmp_path / "tiny.yaml").write_text(TINY)
    study = tmp_path / "s.yaml"
    study.write_text("name: r\nrecipe:\n  - train: {config: tiny.yaml, epochs: 3}\n"
                     "  - prune: {finetune-epochs: 2, steps: 2}\n  - quantize: {method: qat, epochs: 1}\n"
                     "grid: {prune.structured: [0.2], prune.unstructured: [0.0, 0.3]}\n")
    st = load_study(str(study))
    assert full_epochs(st, {"prune.structured": 0.2, "prune.unstructured": 0.0}) == (3.0, 3 + 4 + 1)
    assert full_epochs(st, {"prune.structured": 0.2, "prune.unstructured": 0.3}) == (3.0, 3 + 8 + 1)
