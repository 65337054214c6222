"""One trial's work: its training run (or pipeline) in its run folder, continuing what a killed attempt left
there, and the study's teacher, trained once before any trial."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ..config import TrainConfig, build, read_yaml, resolve_named_options
from .schema import TRAINS, Study, nested, recipe_path, set_args, study_edits, teacher_path, trial_config


@contextmanager
def _flock(path: str | Path):
    """An exclusive lock on a file (created if missing), released by the kernel if the process dies."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_teacher(st: Study, echo=print) -> str | None:
    """The study's teacher checkpoint, trained into <out>/teacher first if it is not there yet. A lock file
    orders processes sharing the folder: the first trains, the others wait and reuse its model.ckpt; a run
    killed mid-training is resumed from its resume.pt by the next sweep."""
    if st.teacher is None:
        return None
    if "checkpoint" in st.teacher:
        return st.teacher["checkpoint"]
    from ..train import train

    folder = st.out / "teacher"
    st.out.mkdir(parents=True, exist_ok=True)
    with _flock(st.out / "teacher.lock"):
        if (folder / "model.ckpt").exists():
            return teacher_path(st)
        cfg = build(TrainConfig, read_yaml(st.teacher["config"]), nested(st.teacher["set"]), {"out": str(folder)},
                    {"final_test": False} if st.test != "all" else {})
        resume = (folder / "resume.pt").exists()
        if not resume and folder.exists() and any(folder.iterdir()):
            folder.rename(folder.with_name(f"teacher.interrupted-{time.strftime('%H%M%S')}"))
        echo(f"training the teacher once: {st.teacher['config']} {set_args(st.teacher['set'])} -> {folder} "
             f"(log {st.out / 'logs' / 'teacher.log'})")
        console = _log_console(st.out / "logs" / "teacher.log")
        try:
            train(cfg, resume=resume, console=console)
        finally:
            console.file.close()
    return teacher_path(st)


def _log_console(path: Path):
    from rich.console import Console

    path.parent.mkdir(parents=True, exist_ok=True)
    return Console(file=open(path, "a"), highlight=False, soft_wrap=True, force_terminal=False)


def _command(*words: str) -> str:
    import shlex

    return shlex.join(words)


def run_point(st: Study, point: dict[str, Any], run_dir: Path, log: Path, observer=None) -> dict:
    """Run one trial's training (or pipeline) in run_dir, continuing whatever a killed attempt left there.
    ``observer``: shown every epoch (edlab.train.observe_epochs); the pruner's, which may stop the trial."""
    from ..train import observe_epochs

    point = resolve_named_options(point, st.file)  # a point's paths, like set:'s, from the study file's folder
    console = _log_console(log)
    try:
        with observe_epochs(observer) if observer is not None else nullcontext():
            if st.kind == "config":
                return _run_train(st, point, run_dir, console)
            return _run_recipe(st, point, run_dir, console)
    finally:
        console.file.close()


def _run_train(st: Study, point: dict, run_dir: Path, console) -> dict:
    from ..train import train

    cfg = trial_config(st, point, str(run_dir))
    summary_path = run_dir / "summary.json"
    if summary_path.exists():  # finished, but the process died before the trial was recorded
        s = json.loads(summary_path.read_text())
    else:
        resume = (run_dir / "resume.pt").exists()
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%H%M%S')}"))
        _, s = train(cfg, resume=resume, console=console)
    val = s.get("best_val_accuracy") if cfg.keep == "best" else s.get("val_accuracy")
    return {"val_accuracy": val, "epochs_run": float(s.get("epochs") or 0),
            "test_accuracy": s.get("test_accuracy"), "score": s.get("score"),
            "macs": s.get("macs"), "params": s.get("params"), "views": s.get("views"), "seconds": s.get("seconds"),
            "model_file": str(run_dir / "model.ckpt"),
            "command": _command("edlab", "train", st.base, *(a for x in set_args({**st.fixed, **point,
                                                                               **study_edits(st, "train")})
                                                                for a in ("--set", x)), "--out", str(run_dir))}


def _run_recipe(st: Study, point: dict, run_dir: Path, console) -> dict:
    from ..pipeline import load_recipe, run_pipeline
    from ..quantize import STAGE_DEFAULTS

    recipe = recipe_path(st)
    sets = set_args({**st.fixed, **point})
    stage_sets = {}
    for i, (name, opts) in enumerate(load_recipe(recipe, sets)["stages"]):
        if name in TRAINS:  # distil where the stage fine-tunes (quantize: its method) and not from its own source
            trains = not opts.get("distill") and (name != "quantize" or opts.get("method") in STAGE_DEFAULTS)
            stage_sets[i] = set_args(study_edits(st, name, trains))
    r = run_pipeline(recipe, sets, str(run_dir), echo=console.print, stage_sets=stage_sets)
    summaries = [s["summary"] or {} for s in r["stages"]]
    out: dict[str, Any] = {}
    for key in ("val_accuracy", "test_accuracy", "score", "macs", "params", "views"):
        out[key] = next((s[key] for s in reversed(summaries) if s.get(key) is not None), None)
    out["seconds"] = sum(s.get("seconds") or 0.0 for s in r["stages"])
    out["epochs_run"] = float(sum(s.get("finetune_epochs_total") or s.get("epochs") or 0 for s in summaries))
    # the command line form of stage_sets (for stages that have no set: of their own in the recipe)
    stage = [f"{i}.set={json.dumps(edits)}" for i, edits in stage_sets.items() if edits]
    out["command"] = _command("edlab", "run", recipe, *(a for x in [*sets, *stage] for a in ("--set", x)),
                              "--out", str(run_dir))
    out["model_file"] = _final_model(r)
    return out


def _final_model(r: dict) -> str | None:
    """The pipeline's deployed model: the last stage's model.ckpt, or the int8 ONNX file of a quantize stage."""
    for s in reversed(r["stages"]):
        for name in ("model.ckpt", "model.int8.onnx"):
            if (Path(s["dir"]) / name).exists():
                return str(Path(s["dir"]) / name)
    return r.get("checkpoint")
