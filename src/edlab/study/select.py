"""The selection, on validation accuracy only: the best point (or the Pareto front), then, with ``test:
chosen``, the test split read once for each selected point, and with ``pack: true`` the winner packed."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdlabError
from .queue import retry
from .schema import Study, val_floor


def trial_rows(study) -> list[dict]:
    """One row per trial (duplicates and surplus draws left out) with what study.json lists; a point tested
    after the trials (test: chosen) carries that figure."""
    rows = []
    tested = retry(lambda: study.user_attrs)
    for t in retry(study.get_trials, deepcopy=False):
        a = dict(t.user_attrs)
        if t.state.name == "COMPLETE" and f"tested:{a.get('slot')}" in tested:  # test: chosen, read after the trials
            a["tested"] = tested[f"tested:{a['slot']}"]
            a["test_accuracy"] = a["tested"]["test_accuracy"]
        if a.get("duplicate") or a.get("surplus"):
            continue
        rows.append({"number": t.number, "slot": a.get("slot"), "state": t.state.name, "point": a.get("point"),
                     "val_accuracy": a.get("val_accuracy"), "test_accuracy": a.get("test_accuracy"),
                     "score": a.get("score"), "macs": a.get("macs"), "params": a.get("params"),
                     "views": a.get("views"), "seconds": a.get("seconds"), "wall_seconds": a.get("wall_seconds"),
                     "run_dir": a.get("run_dir"), "model_file": a.get("model_file"),
                     "tested": a.get("tested"),
                     "command": a.get("command"),
                     "error": a.get("error"), "interrupted": bool(a.get("interrupted")),
                     "pruned_at": a.get("pruned_at"), "epochs_run": a.get("epochs_run"),
                     "full_epochs": a.get("full_epochs"),
                     "worker": "{host}:{pid}".format(**a["owner"]) if a.get("owner") else None})
    return rows


def best(st: Study, rows: list[dict]) -> dict:
    """The selection, on validation accuracy only: best val, the Pareto front, or lowest score above the floor."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        return {}
    if st.objective == "pareto":
        front = [r for r in done if not any(o["val_accuracy"] >= r["val_accuracy"] and o["score"] <= r["score"] and
                                            (o["val_accuracy"], o["score"]) != (r["val_accuracy"], r["score"])
                                            for o in done)]
        return {"pareto_front": sorted((r["slot"] for r in front), key=lambda s: s)}
    floor = val_floor(st)
    if floor is not None:
        ok = [r for r in done if r["val_accuracy"] >= floor]
        if ok:
            return {"slot": min(ok, key=lambda r: r["score"])["slot"], "rule": f"lowest score with val >= {floor:g}"}
        return {"slot": max(done, key=lambda r: r["val_accuracy"])["slot"],
                "rule": f"no trial reached val {floor:g}: highest val"}
    return {"slot": max(done, key=lambda r: r["val_accuracy"])["slot"], "rule": "highest val accuracy"}


def chosen_slots(selection: dict) -> list[int]:
    """The points a selection (``best``) names: the best one, or the Pareto front."""
    return [*selection.get("pareto_front", []), *([selection["slot"]] if "slot" in selection else [])]


def test_chosen(st: Study, study, echo=print) -> list[int]:
    """``test: chosen``: after the trials, read the test split once for each selected point's final model file,
    with the views it was validated with (``edlab eval``'s default: the ones its metadata records). The figure
    is stored in the study (``tested:<slot>``), so a re-run does not test the same point again; a point that a
    later run of a grown study selects instead is tested then, and both figures stay on record.

    Several processes may share the study (a second command on the same ``--out``, other machines on one
    PostgreSQL storage): while any trial is still waiting or running, the selection is provisional, and
    testing it would read the test split for a point the finished study may not choose. So only the process
    that ends with no trial left unfinished tests; the others say so and test nothing."""
    from optuna.trial import TrialState

    from ..evaluation import evaluate_checkpoint

    unfinished = retry(study.get_trials, deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    if unfinished:
        echo(f"test split not read: {len(unfinished)} trial(s) still waiting or running in another process "
             f"(trial {', '.join(str(t.number) for t in unfinished)}); the sweep that finishes the last one "
             f"tests the chosen point")
        return []
    rows = trial_rows(study)
    done = retry(lambda: study.user_attrs)
    tested = []
    for slot in chosen_slots(best(st, rows)):
        row = next(r for r in rows if r["slot"] == slot and r["state"] == "COMPLETE")
        if f"tested:{slot}" in done:
            continue
        path = row.get("model_file") or str(Path(row["run_dir"]) / "model.ckpt")
        echo(f"testing chosen point {slot:04d} once: edlab eval {path}")
        try:
            r = evaluate_checkpoint(path)
        except EdlabError as e:
            raise EdlabError(f"testing point {slot:04d} ({path}) failed: {e}; run the same command again to "
                             f"retry") from None
        retry(study.set_user_attr, f"tested:{slot}", {k: r[k] for k in ("test_accuracy", "test_loss", "views",
                                                                          "tta", "images", "checkpoint")})
        tested.append(slot)
    return tested


def pack_winner(st: Study, study, echo=print) -> dict | None:
    """``pack: true``: the best point's final checkpoint packed (edlab.pack) into <out>/winner.pack, with its
    sizes, score and accuracies recorded in the study (``winner``). Packed again at each sweep's end, so the
    file always holds the current best; an int8 ONNX winner is recorded, not packed (pack takes checkpoints)."""
    from ..pack import pack

    rows = trial_rows(study)
    selection = best(st, rows)
    if "slot" not in selection:
        return None
    row = next(r for r in rows if r["slot"] == selection["slot"] and r["state"] == "COMPLETE")
    path = row.get("model_file") or str(Path(row["run_dir"]) / "model.ckpt")
    winner = {"slot": row["slot"], "rule": selection["rule"], "file": path, "score": row["score"],
              "val_accuracy": row["val_accuracy"],
              "test_accuracy": row["test_accuracy"], "views": row["views"], "command": row["command"]}
    if path.endswith(".onnx"):
        winner["error"] = "an int8 ONNX file: edlab pack takes checkpoints"
    else:
        try:
            tested = {k: row[k] for k in ("test_accuracy", "views") if row.get(k) is not None}
            sizes = pack(path, st.out / "winner.pack", metadata=tested)
            winner.update(pack=sizes.pop("out"), sizes=sizes)
            echo(f"packed point {row['slot']:04d} -> {winner['pack']} ({sizes['file']:,} bytes, score "
                 f"{row['score']:.4f})")
        except EdlabError as e:  # recorded, so that study.json is still written
            winner["error"] = str(e)
    retry(study.set_user_attr, "winner", winner)
    return winner
