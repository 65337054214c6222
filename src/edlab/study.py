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
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, _set_dotted, build, read_yaml, resolve_named, resolve_named_options, safe_name
from .errors import EdlabError
from .runs import check_out_path, write_json

STUDY_KEYS = ("name", "description", "out", "config", "recipe", "set", "quick", "grid", "list", "search",
              "objective", "seed", "test", "teacher", "pack", "pruner", "budget")
TEACHER_KEYS = ("config", "set", "quick", "stages")
TRAINS = ("train", "prune", "quantize")  # the stages that train (and test), as in edlab.pipeline
TEST_MODES = ("all", "chosen")  # test: all = every trial tests its model; chosen = only the selected points
SEARCH_KEYS = ("params", "trials", "startup_trials")
# multi-fidelity: an Optuna pruner watches each trial's validation accuracy per epoch of its training stage
PRUNERS = ("successive-halving", "hyperband", "median")
PRUNER_KEYS = ("type", "min_epochs", "reduction_factor", "startup_trials")
BUDGET_KEYS = ("epochs",)
PARAM_TYPES = {"int": ("low", "high", "step", "log"), "float": ("low", "high", "step", "log"),
               "categorical": ("choices",)}
MAX_GRID = 100_000  # grid points a study may enumerate
HEARTBEAT_S = 30  # a running trial refreshes its heartbeat attribute this often
Scalar = (str, int, float, bool, type(None))


@dataclass
class Study:
    """A study file resolved: base, fixed overrides (set + quick + --set), the points or search space."""

    name: str
    file: str
    out: Path
    kind: str  # "config" | "recipe"
    base: str  # the config or recipe path (an inline recipe is written to <out>/recipe.yaml)
    fixed: dict[str, Any]
    mode: str  # "grid" | "list" | "search"
    points: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, dict] = field(default_factory=dict)
    trials: int = 0
    startup_trials: int = 10
    objective: Any = "val_accuracy"
    seed: int = 0
    inline_recipe: dict | None = None
    test: str = "all"  # "chosen": trials run with final_test off; the selected points are tested after the trials
    teacher: dict | None = None  # {config, set, stages}: trained once into <out>/teacher; or {checkpoint, stages}
    pack: bool = False  # pack the best point's final model into <out>/winner.pack after the trials
    pruner: dict | None = None  # {type, min_epochs, reduction_factor, startup_trials}: stops losing trials early
    budget_epochs: int | None = None  # no trial starts once the study's trials have run this many epochs

    def fingerprint(self) -> str:
        """What must not change between a study's runs (trials may grow): base, overrides, space, goal."""
        base = self.inline_recipe if self.inline_recipe is not None else self.base
        spec = [self.kind, base, self.fixed, self.mode, self.points, self.params, self.objective]
        if self.test != "all":  # (studies made before test: existed keep their fingerprint)
            spec.append({"test": self.test})
        if self.teacher is not None:
            spec.append({"teacher": self.teacher})
        if self.pruner is not None:  # (the budget may change: it only says when to stop starting trials)
            spec.append({"pruner": self.pruner})
        return json.dumps(spec, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------- study file
def _fail(file: str, msg: str) -> EdlabError:
    return EdlabError(f"study {file}: {msg}")


def _find(path: str, study_file: str) -> str:
    """A path the study file names, read from the study file's folder (config.resolve_named)."""
    return resolve_named(path, study_file)


def _resolve_inline(recipe: Any, study_file: str) -> Any:
    """An inline recipe's stage paths read from the study file's folder: the sweep writes the recipe into its
    out folder, where they would no longer be found."""
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not isinstance(stages, list):
        return recipe  # (load_recipe says what is wrong with it)
    return {**recipe, "stages": [{n: resolve_named_options(o, study_file) if isinstance(o, dict) else o
                                  for n, o in st.items()} if isinstance(st, dict) else st for st in stages]}


def _flat(tree: Any, file: str, what: str) -> dict[str, Any]:
    """{'optim': {'lr': 1}} or {'optim.lr': 1} -> {'optim.lr': 1}."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise _fail(file, f"'{what}' must be a mapping of config keys to values")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v, file, what).items()})
        else:
            out[str(k)] = v
    return out


def load_study(path: str, quick: bool = False, sets: tuple[str, ...] | list[str] = (), out: str | None = None,
               floor: float | None = None, pruner: str | None = None) -> Study:
    """Read and check a study file; every point / range is validated against its base before anything runs.
    ``floor`` (``--floor``) replaces the objective's floor; a floor other than the file's is a separate study
    (name and default out get ``-floor<F>``), so both floors' searches keep their own records. ``pruner``
    (``--pruner``: none or a type) replaces the file's pruner, as a separate study too (``-pruner-<type>``): the
    same search at full fidelity beside the multi-fidelity one."""
    from .config import parse_overrides

    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(STUDY_KEYS)})")
    if ("config" in raw) == ("recipe" in raw):
        raise _fail(path, "give exactly one base: config: (a train config) or recipe: (a pipeline recipe)")
    modes = [m for m in ("grid", "list", "search") if m in raw]
    if len(modes) != 1:
        raise _fail(path, "give exactly one of grid:, list:, search:")
    objective = raw.get("objective", "val_accuracy")
    file_pruner = raw.get("pruner")
    suffix = "-quick" if quick else ""
    if floor is not None:
        if not isinstance(objective, dict) or "min_score_with_val_at_least" not in objective:
            raise _fail(path, "--floor needs objective: {min_score_with_val_at_least: FRACTION}")
        if floor != objective["min_score_with_val_at_least"]:
            objective = {**objective, "min_score_with_val_at_least": floor}
            suffix += f"-floor{floor:g}"
    if pruner is not None:
        if pruner not in ("none", *PRUNERS):
            raise _fail(path, f"--pruner must be none or one of {', '.join(PRUNERS)}, got {pruner!r}")
        given = (file_pruner or {}).get("type") if isinstance(file_pruner, dict) else (file_pruner or "none")
        if pruner != given:
            file_pruner = None if pruner == "none" else {**(file_pruner if isinstance(file_pruner, dict) else {}),
                                                         "type": pruner}
            suffix += f"-pruner-{pruner}"
    name = str(raw.get("name") or Path(path).stem) + suffix
    kind = "config" if "config" in raw else "recipe"
    inline = None
    if kind == "recipe" and isinstance(raw["recipe"], dict | list):
        inline = raw["recipe"] if isinstance(raw["recipe"], dict) else {"stages": raw["recipe"]}
        inline = _resolve_inline(inline, path)
        base = ""
    else:
        base = _find(str(raw[kind]), path)
        if not Path(base).is_file():
            raise _fail(path, f"{kind} file not found: {raw[kind]}")
    quick_block = _flat(raw.get("quick"), path, "quick")
    extra_trials = quick_block.pop("trials", None) if quick else None
    quick_pruner = {k.split(".", 1)[1]: quick_block.pop(k) for k in list(quick_block) if k.startswith("pruner.")}
    if quick and quick_pruner and isinstance(file_pruner, dict | str):  # e.g. quick: {pruner.min_epochs: 1}
        file_pruner = {**({"type": file_pruner} if isinstance(file_pruner, str) else file_pruner), **quick_pruner}
    fixed = _flat(raw.get("set"), path, "set")
    if quick:
        fixed.update(quick_block)
    fixed = resolve_named_options(fixed, path)  # (a --set's paths stay the working directory's)
    fixed.update(_flat(parse_overrides(list(sets)), path, "--set"))
    if out is None:
        out = str(raw["out"]) + suffix if raw.get("out") else f"runs/study-{name}"
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise _fail(path, f"seed must be an integer in 0..2147483647, got {seed!r}")
    try:
        safe_name(name)
    except ValueError as e:
        raise _fail(path, f"name {name!r}: {e}") from None
    test = raw.get("test", "all")
    if test not in TEST_MODES:
        raise _fail(path, f"test must be one of {', '.join(TEST_MODES)}, got {test!r}")
    if "final_test" in fixed or any(k.endswith(".final_test") for k in fixed):
        raise _fail(path, "final_test is the study's to set: use test: chosen (or all)")
    teacher = _parse_teacher(raw.get("teacher"), path, quick)
    if teacher and any(k == "distill.teacher" or k.endswith(".distill.teacher") for k in fixed):
        raise _fail(path, "give the study's teacher: or a distill.teacher override, not both")
    st = Study(name=name, file=path, out=Path(out), kind=kind, base=base, fixed=fixed, mode=modes[0],
               objective=objective, seed=seed, inline_recipe=inline, test=test,
               teacher=teacher, pack=raw.get("pack", False))
    if not isinstance(st.pack, bool):
        raise _fail(path, f"pack must be true or false, got {st.pack!r}")
    if st.pack and st.objective == "pareto":
        raise _fail(path, "pack: true needs one best point (objective val_accuracy or min_score_with_val_at_least)")
    st.pruner = _parse_pruner(file_pruner, path, st.objective)
    st.budget_epochs = _parse_budget(raw.get("budget"), path)
    if st.mode == "grid":
        grid = raw["grid"]
        if not isinstance(grid, dict) or not grid:
            raise _fail(path, "grid: must map config keys to lists of values")
        grid = _flat(grid, path, "grid")
        for k, values in grid.items():
            if not isinstance(values, list) or not values:
                raise _fail(path, f"grid key '{k}' needs a non-empty list of values, got {values!r}")
        size = math.prod(len(v) for v in grid.values())
        if size > MAX_GRID:  # counted before it is built: a huge product is refused, not a MemoryError
            raise _fail(path, f"the grid has {size:,} points (more than {MAX_GRID:,}); use search: with trials: N")
        st.points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    elif st.mode == "list":
        if not isinstance(raw["list"], list) or not raw["list"]:
            raise _fail(path, "list: must be a non-empty list of mappings {key: value}")
        st.points = [_flat(p, path, "list entry") for p in raw["list"]]
    else:
        _parse_search(st, raw["search"], path, extra_trials)
    for p in st.points:
        for k, v in p.items():
            if not isinstance(v, Scalar):
                raise _fail(path, f"value of '{k}' must be a number, string, boolean or null, got {v!r}")
            if k in st.fixed:
                raise _fail(path, f"'{k}' is both varied and fixed (set:/quick:/--set)")
    _check_objective(st)
    validate(st)
    return st


def _parse_teacher(t: Any, path: str, quick: bool) -> dict | None:
    """``teacher: CKPT`` (reused as is) or ``teacher: {config, set, quick, stages}`` (trained once by the sweep).
    ``stages``: the recipe stages that distil from it (default every train, prune and quantize stage)."""
    if t is None:
        return None
    if isinstance(t, str):
        ckpt = _find(t, path)
        if not Path(ckpt).is_file():
            raise _fail(path, f"teacher checkpoint not found: {t}")
        return {"checkpoint": ckpt, "stages": list(TRAINS)}
    if not isinstance(t, dict) or "config" not in t:
        raise _fail(path, "teacher: must be a checkpoint path or {config: TRAIN_CONFIG, set: {...}, stages: [...]}")
    unknown = sorted(set(t) - set(TEACHER_KEYS))
    if unknown:
        raise _fail(path, f"unknown teacher key(s) {', '.join(unknown)} (valid: {', '.join(TEACHER_KEYS)})")
    config = _find(str(t["config"]), path)
    if not Path(config).is_file():
        raise _fail(path, f"teacher config file not found: {t['config']}")

    def edits(v: Any, what: str) -> dict:  # {k: v} or ["k=v", ...]
        if isinstance(v, list):
            from .config import parse_overrides

            return _flat(parse_overrides([str(x) for x in v]), path, what)
        return _flat(v, path, what)

    sets = edits(t.get("set"), "teacher.set")
    if quick:
        sets.update(edits(t.get("quick"), "teacher.quick"))
    sets = resolve_named_options(sets, path)
    stages = t.get("stages", list(TRAINS))
    if not isinstance(stages, list) or not stages or not set(stages) <= set(TRAINS):
        raise _fail(path, f"teacher.stages must be a list of {', '.join(TRAINS)}, got {stages!r}")
    try:
        build(TrainConfig, read_yaml(config), _tree(sets))
    except EdlabError as e:
        raise _fail(path, f"teacher: {e}") from None
    return {"config": config, "set": sets, "stages": stages}


def _parse_pruner(p: Any, path: str, objective: Any) -> dict | None:
    """``pruner: successive-halving`` or ``{type, min_epochs: 1, reduction_factor: 3, startup_trials: 2}``."""
    if p is None or p == "none":
        return None
    if isinstance(p, str):
        p = {"type": p}
    if not isinstance(p, dict) or p.get("type") not in PRUNERS:
        raise _fail(path, f"pruner must be none or one of {', '.join(PRUNERS)} (or {{type: ..., min_epochs: N, "
                          f"reduction_factor: N}}), got {p!r}")
    unknown = sorted(set(p) - set(PRUNER_KEYS))
    if unknown:
        raise _fail(path, f"unknown pruner key(s) {', '.join(unknown)} (valid: {', '.join(PRUNER_KEYS)})")
    spec = {"type": p["type"], "min_epochs": p.get("min_epochs", 1), "reduction_factor": p.get("reduction_factor", 3),
            "startup_trials": p.get("startup_trials", 2)}
    for k, low in (("min_epochs", 1), ("reduction_factor", 2), ("startup_trials", 0)):
        v = spec[k]
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= 100000:
            raise _fail(path, f"pruner.{k} must be an integer >= {low}, got {v!r}")
    if objective == "pareto":
        raise _fail(path, "a pruner needs one objective: Optuna's pruners cannot compare Pareto (two-objective) "
                          "trials")
    return spec


def _parse_budget(b: Any, path: str) -> int | None:
    """``budget: {epochs: N}``: the most training epochs the study's trials spend, all stages counted."""
    if b is None:
        return None
    if not isinstance(b, dict) or set(b) - set(BUDGET_KEYS) or not isinstance(b.get("epochs"), int) \
            or isinstance(b.get("epochs"), bool) or b["epochs"] < 1:
        raise _fail(path, f"budget must be {{epochs: N}} with N a positive integer, got {b!r}")
    return b["epochs"]


def _parse_search(st: Study, search: Any, path: str, extra_trials: Any) -> None:
    if not isinstance(search, dict):
        raise _fail(path, "search: must be a mapping with params: and trials:")
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise _fail(path, f"unknown search key(s) {', '.join(unknown)} (valid: {', '.join(SEARCH_KEYS)})")
    params = search.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(path, "search.params must map config keys to {type: int|float|categorical, ...}")
    for k, spec in params.items():
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise _fail(path, f"search param '{k}' needs type: int, float or categorical")
        allowed = PARAM_TYPES[spec["type"]]
        bad = sorted(set(spec) - set(allowed) - {"type"})
        if bad:
            raise _fail(path, f"search param '{k}': unknown field(s) {', '.join(bad)} (valid: {', '.join(allowed)})")
        if spec["type"] == "categorical":
            ch = spec.get("choices")
            if not isinstance(ch, list) or not ch or not all(isinstance(c, Scalar) for c in ch):
                raise _fail(path, f"search param '{k}' needs choices: a list of numbers/strings")
        else:
            lo, hi = spec.get("low"), spec.get("high")
            if not isinstance(lo, int | float) or not isinstance(hi, int | float) or lo > hi:
                raise _fail(path, f"search param '{k}' needs numbers low <= high, got {lo!r}, {hi!r}")
            if spec.get("log") and lo <= 0:
                raise _fail(path, f"search param '{k}': log scale needs low > 0")
            step = spec.get("step")
            if step is not None and (not isinstance(step, int | float) or isinstance(step, bool) or not step > 0
                                     or (spec["type"] == "int" and not isinstance(step, int))):
                raise _fail(path, f"search param '{k}': step must be a positive {spec['type']}, got {step!r}")
            if step is not None and spec.get("log"):
                raise _fail(path, f"search param '{k}': give step or log, not both")
        if k in st.fixed:
            raise _fail(path, f"'{k}' is both searched and fixed (set:/quick:/--set)")
    st.params = params
    trials = extra_trials if extra_trials is not None else search.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise _fail(path, f"search.trials must be a positive integer, got {trials!r}")
    startup = search.get("startup_trials", 10)
    if not isinstance(startup, int) or isinstance(startup, bool) or startup < 0:
        raise _fail(path, f"search.startup_trials must be an integer >= 0, got {startup!r}")
    st.trials, st.startup_trials = trials, startup


def _check_objective(st: Study) -> None:
    o = st.objective
    if o in ("val_accuracy", "pareto"):
        return
    def fraction(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1

    if isinstance(o, dict) and set(o) <= {"min_score_with_val_at_least", "floor_margin"} and \
            fraction(o.get("min_score_with_val_at_least")):
        if not fraction(o.get("floor_margin", 0)) or o["min_score_with_val_at_least"] + o.get("floor_margin", 0) > 1:
            raise _fail(st.file, f"objective.floor_margin must be a fraction with floor + margin <= 1, got "
                                 f"{o.get('floor_margin')!r}")
        return
    raise _fail(st.file, f"objective must be val_accuracy, pareto or {{min_score_with_val_at_least: FRACTION, "
                         f"floor_margin: FRACTION}}, got {o!r}")


def _probe_values(st: Study) -> list[dict[str, Any]]:
    """One override set per varied value (grid/search) or per point (list), to validate without running."""
    if st.mode == "list":
        return st.points
    if st.mode == "grid":
        keys = st.points[0].keys()
        return [{k: v} for k in keys for v in dict.fromkeys(p[k] for p in st.points)]
    probes = []
    for k, spec in st.params.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        probes += [{k: v} for v in values]
    return probes


def validate(st: Study) -> None:
    """Each varied value with the fixed overrides must make a valid config (or recipe with valid stage options)."""
    for probe in _probe_values(st):
        try:
            if st.kind == "config":
                trial_config(st, probe, "probe")
            else:
                _check_recipe(st, probe)
        except EdlabError as e:
            shown = ", ".join(f"{k}={v}" for k, v in probe.items())
            raise _fail(st.file, f"{shown}: {e}") from None


def _tree(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        _set_dotted(tree, k, v)
    return tree


def trial_config(st: Study, point: dict[str, Any], out: str) -> TrainConfig:
    return build(TrainConfig, read_yaml(st.base), _tree(st.fixed), _tree(point), {"out": out},
                 _tree(_study_edits(st, "train")))


def _study_edits(st: Study, stage: str, trains: bool = True) -> dict[str, Any]:
    """Config edits the study makes to a training stage of every trial: no test read (test: chosen), and the
    study's teacher where it distils (``trains``: a quantize stage whose method fine-tunes)."""
    edits: dict[str, Any] = {"final_test": False} if st.test == "chosen" else {}
    if st.teacher and stage in st.teacher["stages"] and trains:
        edits["distill.teacher"] = teacher_path(st)
    return edits


def teacher_path(st: Study) -> str:
    return st.teacher.get("checkpoint") or str(st.out / "teacher" / "model.ckpt")


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
    from .train import train

    folder = st.out / "teacher"
    st.out.mkdir(parents=True, exist_ok=True)
    with _flock(st.out / "teacher.lock"):
        if (folder / "model.ckpt").exists():
            return teacher_path(st)
        cfg = build(TrainConfig, read_yaml(st.teacher["config"]), _tree(st.teacher["set"]), {"out": str(folder)},
                    {"final_test": False} if st.test == "chosen" else {})
        resume = (folder / "resume.pt").exists()
        if not resume and folder.exists() and any(folder.iterdir()):
            folder.rename(folder.with_name(f"teacher.interrupted-{time.strftime('%H%M%S')}"))
        echo(f"training the teacher once: {st.teacher['config']} {_sets(st.teacher['set'])} -> {folder} "
             f"(log {st.out / 'logs' / 'teacher.log'})")
        console = _log_console(st.out / "logs" / "teacher.log")
        try:
            train(cfg, resume=resume, console=console)
        finally:
            console.file.close()
    return teacher_path(st)


def _text(v: Any) -> str:
    """A value as --set text that YAML reads back as the same value ('on' is quoted, 'grouped:2' is not)."""
    import yaml

    if isinstance(v, str):
        try:
            if yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)  # JSON is YAML


def _sets(flat: dict[str, Any]) -> list[str]:
    return [f"{k}={_text(v)}" for k, v in flat.items()]


def _command(*words: str) -> str:
    import shlex

    return shlex.join(words)


def _recipe_path(st: Study) -> str:
    if st.inline_recipe is None:
        return st.base
    st.out.mkdir(parents=True, exist_ok=True)
    p = st.out / "recipe.yaml"
    import yaml

    text = yaml.safe_dump(st.inline_recipe, sort_keys=False)
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    return str(p)


def _check_recipe(st: Study, point: dict[str, Any]) -> None:
    """Parse every stage's command line as the CLI would (unknown options, bad types), without running it."""
    from .pipeline import check_stages, load_recipe

    if st.inline_recipe is not None:
        import tempfile

        import yaml

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(st.inline_recipe, f)
        try:
            recipe = load_recipe(f.name, _sets({**st.fixed, **point}))
        finally:
            os.unlink(f.name)
    else:
        recipe = load_recipe(st.base, _sets({**st.fixed, **point}))
    check_stages(recipe)


# ------------------------------------------------------------------------------------------- storage
def _optuna():
    try:
        import optuna
    except ImportError:
        raise EdlabError("edlab sweep needs Optuna: pip install 'edlab[study]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _retry(fn, *args, **kwargs):
    """SQLite shared by several processes answers 'database is locked' under contention: wait and retry."""
    delay = 0.1
    for attempt in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy OperationalError, or Optuna's StorageInternalError raised from it
            if "database is locked" not in f"{e} {e.__cause__}" or attempt == 11:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def storage_url(st: Study, storage: str | None) -> str:
    if storage:
        return storage
    st.out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(st.out / 'study.db').resolve()}"


def _directions(st: Study) -> list[str]:
    if st.objective == "pareto":
        return ["maximize", "minimize"]
    return ["minimize"] if isinstance(st.objective, dict) else ["maximize"]


def _floor(st: Study) -> float | None:
    """The validation accuracy a trial must reach: the floor plus its margin (validation estimates the test
    accuracy with an error: select val >= 0.905 to trust test >= 0.90)."""
    if not isinstance(st.objective, dict):
        return None
    return round(st.objective["min_score_with_val_at_least"] + st.objective.get("floor_margin", 0), 12)


INIT_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "Duplicate entry")


@contextmanager
def _init_lock(url: str):
    """Two sweeps started at the same instant on a new storage both create its tables: the loser failed
    with 'table studies already exists'. On SQLite a lock file beside the database orders them; other
    databases retry (see _open_storage)."""
    try:
        import fcntl

        from sqlalchemy.engine import make_url

        db = make_url(url).database if url.startswith("sqlite") else None
    except Exception:
        db = None
    if not db or db == ":memory:":
        yield
        return
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_storage(optuna, url: str):
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with _init_lock(url):
                return _retry(optuna.storages.RDBStorage, url, **kwargs)
        except Exception as e:
            if attempt < 4 and any(m in f"{e} {e.__cause__}" for m in INIT_RACE):
                time.sleep(0.2 * (attempt + 1))  # another process was creating the tables: they exist now
                continue
            raise EdlabError(f"cannot open study storage {_redact(url)}: {str(e).splitlines()[0]}") from None


def open_study(st: Study, url: str, worker: int = 0, create: bool = True):
    """Create or load the Optuna study; refuse one that was started from a different study definition."""
    optuna = _optuna()
    storage = _open_storage(optuna, url)
    if st.mode == "search":
        sampler = optuna.samplers.TPESampler(seed=st.seed + worker, n_startup_trials=st.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=st.seed)  # every parameter is fixed by the enqueued point
    pruner = make_pruner(optuna, st)
    if create:
        study = _retry(optuna.create_study, storage=storage, study_name=st.name, directions=_directions(st),
                       sampler=sampler, pruner=pruner, load_if_exists=True)
    else:
        study = _retry(optuna.load_study, storage=storage, study_name=st.name, sampler=sampler, pruner=pruner)
    saved = study.user_attrs.get("edlab_spec")
    if saved is None:
        _retry(study.set_user_attr, "edlab_spec", st.fingerprint())
        _retry(study.set_user_attr, "study_file", st.file)
    elif saved != st.fingerprint():
        raise EdlabError(f"study '{st.name}' in {_redact(url)} was started from a different definition (base, "
                         f"overrides, points or objective changed); choose another --out or --storage")
    if [d.name.lower() for d in study.directions] != _directions(st):
        raise EdlabError(f"study '{st.name}' in {_redact(url)} has other objectives; choose another --out")
    return study


def make_pruner(optuna, st: Study):
    """The study's Optuna pruner over the epochs of each trial's training stage (NopPruner without one).
    Successive halving keeps the top 1/reduction_factor of the trials that reached each rung (min_epochs x
    reduction_factor^k epochs); Hyperband runs several such brackets of different min_epochs; median stops a
    trial whose accuracy is below the median of the earlier trials' at the same epoch."""
    p = st.pruner
    if p is None:
        return optuna.pruners.NopPruner()
    if p["type"] == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_epochs"],
                                                      reduction_factor=p["reduction_factor"])
    if p["type"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p["min_epochs"], max_resource=max(
            p["min_epochs"], math.ceil(full_epochs(st, {})[0])), reduction_factor=p["reduction_factor"])
    return optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"], n_warmup_steps=p["min_epochs"] - 1)


def full_epochs(st: Study, point: dict[str, Any]) -> tuple[float, float]:
    """(epochs of the trial's first training stage, epochs of all its stages) at full fidelity, as the config
    or recipe states them: what a trial that no pruner stops spends."""
    if st.kind == "config":
        e = float(trial_config(st, point, "probe").epochs)
        return e, e
    from .pipeline import load_recipe
    from .prune import Recipe
    from .quantize import STAGE_DEFAULTS

    stages = load_recipe(_recipe_path(st), _sets({**st.fixed, **point}))["stages"]
    counts = []
    for name, opts in stages:
        if name == "train":
            cfg = read_yaml(str(opts["config"])) if opts.get("config") else {}
            counts.append(float(opts.get("epochs", cfg.get("epochs", TrainConfig().epochs))))
        elif name == "prune":  # fine-tuning after each step of each kind (structured, then unstructured)
            kinds = sum(float(opts.get(k) or 0) > 0 for k in ("structured", "unstructured"))
            counts.append(float(opts.get("finetune-epochs", opts.get("epochs", Recipe.finetune_epochs)))
                          * int(opts.get("steps", Recipe.steps)) * max(kinds, 1))
        elif name == "quantize" and opts.get("method", "qat") in STAGE_DEFAULTS:
            counts.append(float(opts.get("epochs", STAGE_DEFAULTS[opts.get("method", "qat")]["epochs"])))
    return (counts[0] if counts else 0.0), sum(counts)


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


# ------------------------------------------------------------------------------------ trial life cycle
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from Linux /proc, or None where there is no /proc entry."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc), so a reused pid is not taken for the worker that died."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def _alive(owner: dict) -> bool:
    """Whether the owner process still runs. A killed process stays in the process table as a zombie
    until its parent reaps it, and the parent of a sweep's workers is init once the sweep itself was
    killed, which reaps when it gets to it: signal 0 still reaches a zombie, so /proc's state decides."""
    pid = owner.get("pid")
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    stat = _proc_stat(int(pid))
    if stat is None:  # gone meanwhile, or no /proc (not Linux, no start time recorded): signal 0 decides
        return owner.get("pid_start") is None
    state, start = stat
    if state in ("Z", "X", "x"):  # zombie or dead: it will never write to its trial again
        return False
    return owner.get("pid_start") is None or start == owner.get("pid_start")


def _claim_key(owner: dict) -> str:
    return f"claim:{owner['host']}|{owner['pid']}|{owner['pid_start']}"


def _from_claim_key(key: str) -> dict:
    host, pid, start = key[len("claim:"):].rsplit("|", 2)
    return {"host": host, "pid": int(pid), "pid_start": None if start == "None" else start}


def _stale(t, stale_after: float) -> bool:
    """A RUNNING trial is dead when its process is gone (same machine) or its heartbeat is old (elsewhere).

    The process is the trial's owner, or, if it died between claiming and writing that, every process
    that tried to claim it (each writes claim:<host|pid|start> before claiming, and clears it on losing)."""
    a = t.user_attrs
    owners = [a["owner"]] if a.get("owner") else [_from_claim_key(k) for k, v in a.items()
                                                  if k.startswith("claim:") and v is not None]
    started = t.datetime_start.timestamp() if t.datetime_start else 0.0
    if not owners:  # asked by a search worker that died before its first write
        return time.time() - started > 30
    here = socket.gethostname()
    if any(o.get("host") != here for o in owners):
        return time.time() - (a.get("heartbeat") or started) > stale_after
    return not any(_alive(o) for o in owners)


def recover(study, stale_after: float) -> int:
    """Mark trials whose process died while RUNNING as FAIL (interrupted); enqueue_missing re-runs them."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    n = 0
    storage = study._storage
    study_id = _retry(storage.get_study_id_from_name, study.study_name)
    for t in _retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if not _stale(t, stale_after):
            continue
        tid = _retry(storage.get_trial_id_from_study_id_trial_number, study_id, t.number)
        try:
            _retry(storage.set_trial_user_attr, tid, "interrupted", True)
            if _retry(storage.set_trial_state_values, tid, TrialState.FAIL):
                n += 1
        except UpdateFinishedTrialError:  # it finished meanwhile, or another process recovered it
            pass
    return n


def _slot_states(study, retry_failed: bool) -> tuple[set[int], dict[int, dict]]:
    """Slots that are done or in progress, and for search the params of every slot drawn so far."""
    from optuna.trial import TrialState

    busy: set[int] = set()
    drawn: dict[int, dict] = {}
    for t in _retry(study.get_trials, deepcopy=False):
        slot = t.user_attrs.get("slot")
        if slot is None:
            continue
        if t.params and slot not in drawn:
            drawn[slot] = dict(t.params)
        failed_for_real = t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and not retry_failed
        pruned = t.state == TrialState.PRUNED and t.user_attrs.get("pruned_at") is not None  # stopped by the pruner
        if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING) or failed_for_real or pruned:
            busy.add(slot)
    return busy, drawn


def enqueue_missing(st: Study, study, retry_failed: bool = False) -> int:
    """Enqueue each grid/list point (and each interrupted search draw) that no trial has done or holds."""
    busy, drawn = _slot_states(study, retry_failed)
    todo = [(i, p) for i, p in enumerate(st.points) if i not in busy] if st.mode != "search" else \
        [(s, p) for s, p in sorted(drawn.items()) if s not in busy]
    for slot, point in todo:
        _retry(study.enqueue_trial, point, user_attrs={"slot": slot})
    return len(todo)


def _sqlite_file(study) -> str | None:
    """The database file of a SQLite storage, else None."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps RDBStorage in a cache
    url = getattr(getattr(storage, "engine", None), "url", None)
    if url is None or url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return url.database


@contextmanager
def _waiting_lock(study):
    """Held while a process turns a WAITING trial RUNNING. Optuna checks that a trial is WAITING and then
    sets it RUNNING; its SELECT ... FOR UPDATE makes that one step on PostgreSQL or MySQL, but SQLite has
    no row locks and reads outside the write transaction, so two workers could both take the same trial
    and run its point at once in the same run directory (the second then fails it, or clobbers the
    first's files). On SQLite an exclusive lock on a file beside the database makes the step atomic."""
    db = _sqlite_file(study)
    try:
        import fcntl
    except ImportError:  # not POSIX
        db = None
    if db is None:
        yield
        return
    with open(f"{db}.claim-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies holding it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim(study):
    """Take one WAITING trial (RUNNING from now on), or None. Never creates a trial."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    study_id = _retry(storage.get_study_id_from_name, study.study_name)
    me = _owner()
    for t in _retry(study.get_trials, deepcopy=False, states=(TrialState.WAITING,)):
        tid = _retry(storage.get_trial_id_from_study_id_trial_number, study_id, t.number)
        try:
            _retry(storage.set_trial_user_attr, tid, _claim_key(me), time.time())  # before: no unowned RUNNING
            with _waiting_lock(study):  # exactly one process gets each WAITING trial
                won = _retry(storage.set_trial_state_values, tid, TrialState.RUNNING)
            if won:
                _retry(storage.set_trial_user_attr, tid, "owner", me)
                return _retry(optuna.trial.Trial, study, tid)
            _retry(storage.set_trial_user_attr, tid, _claim_key(me), None)
        except UpdateFinishedTrialError:
            continue
    return None


def _next_trial(st: Study, study):
    """A WAITING trial, else (search) a new draw while the budget lasts; surplus draws are dropped."""
    from optuna.trial import TrialState

    if st.budget_epochs is not None and spent_epochs(study) >= st.budget_epochs:
        return None  # the budget is spent: no trial starts (a re-run with a larger budget goes on)
    trial = _claim(study)
    if trial is not None or st.mode != "search":
        return trial
    trials = _retry(study.get_trials, deepcopy=False)
    slots = {t.user_attrs.get("slot") for t in trials if not t.user_attrs.get("surplus")}
    if len(slots - {None}) >= st.trials:
        return None
    with _waiting_lock(study):  # ask() too may take a WAITING trial (one enqueued meanwhile)
        trial = _retry(study.ask)
    if trial.user_attrs.get("owner") is None:
        _retry(trial.set_user_attr, "owner", _owner())
    if trial.user_attrs.get("slot") is None:
        _retry(trial.set_user_attr, "slot", trial.number)
        origins = [t.number for t in _retry(study.get_trials, deepcopy=False)
                   if t.user_attrs.get("slot") == t.number and not t.user_attrs.get("surplus")]
        if sum(n <= trial.number for n in origins) > st.trials:  # another worker drew the last one first
            _retry(trial.set_user_attr, "surplus", True)
            _retry(study.tell, trial, state=TrialState.PRUNED)
            return None
    return trial


def spent_epochs(study) -> float:
    """Training epochs the study's finished trials ran, every stage counted (a pruned trial: up to its stop)."""
    return sum(t.user_attrs.get("epochs_run") or 0.0 for t in _retry(study.get_trials, deepcopy=False)
               if t.state.name in ("COMPLETE", "PRUNED"))


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
    from .pipeline import load_recipe

    stages = load_recipe(_recipe_path(st), _sets(st.fixed))["stages"]
    i, name = next(((i, n) for i, (n, _) in enumerate(stages) if n in TRAINS), (0, "train"))
    return run_dir / f"{i:02d}-{name}"


def _pruning_observer(st: Study, trial, run_dir: Path):
    """Report each epoch's validation accuracy of the watched stage to Optuna and stop the trial when the
    pruner says so. A trial already at or above the study's floor is never stopped: it is feasible, and the
    objective then ranks it by its score, which the pruner does not see."""
    watched = _watched_folder(st, run_dir).resolve()
    sign = -1.0 if _directions(st) == ["minimize"] else 1.0  # the pruner ranks by the study's direction
    floor = _floor(st)

    def observe(row: dict, folder: str | None) -> None:
        val = row.get("val_accuracy")
        if folder is None or Path(folder).resolve() != watched or val is None:
            return
        _retry(trial.report, sign * val, int(row["epoch"]))
        if _retry(trial.should_prune) and not (floor is not None and val >= floor):
            raise TrialStopped(int(row["epoch"]), val)

    return observe


def _is_duplicate(study, trial) -> bool:
    """Two processes may enqueue the same point at once; only the lowest-numbered live copy runs."""
    from optuna.trial import TrialState

    slot = trial.user_attrs.get("slot")
    for t in _retry(study.get_trials, deepcopy=False):
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


def _log_console(path: Path):
    from rich.console import Console

    path.parent.mkdir(parents=True, exist_ok=True)
    return Console(file=open(path, "a"), highlight=False, soft_wrap=True, force_terminal=False)


def run_point(st: Study, point: dict[str, Any], run_dir: Path, log: Path, observer=None) -> dict:
    """Run one trial's training (or pipeline) in run_dir, continuing whatever a killed attempt left there.
    ``observer``: shown every epoch (edlab.train.observe_epochs); the pruner's, which may stop the trial."""
    from .train import observe_epochs

    console = _log_console(log)
    try:
        with observe_epochs(observer) if observer is not None else nullcontext():
            if st.kind == "config":
                return _run_train(st, point, run_dir, console)
            return _run_recipe(st, point, run_dir, console)
    finally:
        console.file.close()



def _run_train(st: Study, point: dict, run_dir: Path, console) -> dict:
    from .train import train

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
            "command": _command("edlab", "train", st.base, *(a for x in _sets({**st.fixed, **point,
                                                                               **_study_edits(st, "train")})
                                                                for a in ("--set", x)), "--out", str(run_dir))}


def _run_recipe(st: Study, point: dict, run_dir: Path, console) -> dict:
    from .pipeline import load_recipe, run_pipeline
    from .quantize import STAGE_DEFAULTS

    recipe = _recipe_path(st)
    sets = _sets({**st.fixed, **point})
    stage_sets = {}
    for i, (name, opts) in enumerate(load_recipe(recipe, sets)["stages"]):
        if name in TRAINS:  # distil where the stage fine-tunes (quantize: its method) and not from its own source
            trains = not opts.get("distill") and (name != "quantize" or opts.get("method") in STAGE_DEFAULTS)
            stage_sets[i] = _sets(_study_edits(st, name, trains))
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
        trial = _next_trial(st, study)
        if trial is None:
            return done
        slot = trial.user_attrs["slot"]
        if _is_duplicate(study, trial):
            _retry(trial.set_user_attr, "duplicate", True)
            _retry(study.tell, trial, state=TrialState.PRUNED, skip_if_finished=True)
            continue
        run_dir = st.out / "trials" / f"{slot:04d}"
        _retry(trial.set_user_attr, "heartbeat", time.time())
        point = _suggest(st, trial)
        _retry(trial.set_user_attr, "point", point)
        _retry(trial.set_user_attr, "run_dir", str(run_dir))
        shown = ", ".join(f"{k}={v}" for k, v in point.items())
        echo(f"{tag}trial {trial.number} (point {slot:04d}) {shown}: running")
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(trial, stop), daemon=True)
        beat.start()
        t0 = time.perf_counter()
        if st.pruner is not None:
            _retry(trial.set_user_attr, "full_epochs", full_epochs(st, point))
        observer = _pruning_observer(st, trial, run_dir) if st.pruner is not None else None
        try:
            r = run_point(st, point, run_dir, st.out / "logs" / f"{slot:04d}.log", observer)
            values = _values(st, r)
        except TrialStopped as stop_:  # a losing trial: its run keeps resume.pt and metrics up to the stop
            for k, v in {"pruned_at": stop_.epoch, "val_accuracy": stop_.val_accuracy,
                         "epochs_run": float(stop_.epoch), "wall_seconds": time.perf_counter() - t0}.items():
                _retry(trial.set_user_attr, k, v)
            _retry(study.tell, trial, state=TrialState.PRUNED, skip_if_finished=True)
            echo(f"{tag}trial {trial.number} (point {slot:04d}): {stop_} "
                 f"({time.perf_counter() - t0:.0f} s)")
            continue
        except KeyboardInterrupt:
            _retry(trial.set_user_attr, "interrupted", True)
            _retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:  # a bad point (e.g. ps + pu >= 1) fails its trial, not the study
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            _retry(trial.set_user_attr, "error", msg)
            _retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
            echo(f"{tag}trial {trial.number} (point {slot:04d}): failed: {msg}")
            continue
        finally:
            stop.set()
        for k, v in r.items():
            _retry(trial.set_user_attr, k, v)
        _retry(trial.set_user_attr, "wall_seconds", time.perf_counter() - t0)
        if _floor(st) is not None:  # feasible when <= 0: TPE then prefers draws above the floor
            _retry(trial.set_constraint, "val_floor", _floor(st) - r["val_accuracy"])
        _retry(study.tell, trial, values, skip_if_finished=True)
        done += 1
        echo(f"{tag}trial {trial.number} (point {slot:04d}): val {100 * r['val_accuracy']:.2f}%  "
             f"score {r['score']:.4f}  ({time.perf_counter() - t0:.0f} s)")


# ------------------------------------------------------------------------------------------- results
def trial_rows(study) -> list[dict]:
    rows = []
    tested = _retry(lambda: study.user_attrs)
    for t in _retry(study.get_trials, deepcopy=False):
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
    floor = _floor(st)
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
    later run of a grown study selects instead is tested then, and both figures stay on record."""
    from .evaluation import evaluate_checkpoint

    rows = trial_rows(study)
    done = _retry(lambda: study.user_attrs)
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
        _retry(study.set_user_attr, f"tested:{slot}", {k: r[k] for k in ("test_accuracy", "test_loss", "views",
                                                                          "tta", "images", "checkpoint")})
        tested.append(slot)
    return tested


def pack_winner(st: Study, study, echo=print) -> dict | None:
    """``pack: true``: the best point's final checkpoint packed (edlab.pack) into <out>/winner.pack, with its
    sizes, score and accuracies recorded in the study (``winner``). Packed again at each sweep's end, so the
    file always holds the current best; an int8 ONNX winner is recorded, not packed (pack takes checkpoints)."""
    from .pack import pack

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
    _retry(study.set_user_attr, "winner", winner)
    return winner


def write_report(st: Study, study, url: str) -> dict:
    rows = sorted(trial_rows(study), key=lambda r: (r["slot"] if r["slot"] is not None else -1, r["number"]))
    for r in rows:  # waiting grid/list trials: show their point before a worker has written it
        if r["point"] is None and r["slot"] is not None and st.mode != "search" and r["slot"] < len(st.points):
            r["point"] = st.points[r["slot"]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    report = {"name": st.name, "study_file": st.file, "mode": st.mode, "base": {st.kind: st.base or "inline"},
              "fixed": st.fixed, "objective": st.objective, "storage": _redact(url),
              "size": len(st.points) if st.mode != "search" else st.trials, "counts": counts, "test": st.test,
              "teacher": teacher_path(st) if st.teacher else None,
              "winner": _retry(lambda: study.user_attrs).get("winner") if st.pack else None,
              "best": best(st, rows), "budget": budget(st, rows), "trials": rows}
    write_json(st.out / "study.json", report)
    return report


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


def describe(st: Study) -> list[str]:
    """What ``edlab sweep --dry-run`` prints: the study as read, and its points (or search space)."""
    lines = [f"study {st.name}: {st.mode}, {len(st.points) or st.trials} trials, base {st.kind} "
             f"{st.base or 'inline'}, objective {st.objective}, fixed {st.fixed}, out {st.out}, "
             f"test {st.test}" + (f", teacher {st.teacher}" if st.teacher else "")]
    lines.append(budget_line(st))
    lines += [f"  {i:04d} " + ", ".join(f"{k}={v}" for k, v in p.items()) for i, p in enumerate(st.points)]
    lines += [f"  {k}: " + ", ".join(f"{f}={v}" for f, v in spec.items()) for k, spec in st.params.items()]
    return lines


def sweep(study_file: str, out: str | None = None, storage: str | None = None, workers: int = 1,
          quick: bool = False, sets: Sequence[str] = (), retry_failed: bool = False, stale_after: float = 600,
          floor: float | None = None, worker_index: int | None = None, dry_run: bool = False,
          echo=print, pruner: str | None = None) -> dict | None:
    """``edlab sweep`` as a call: run (or continue) a study, one training or pipeline run per point or trial,
    then test the chosen points (``test: chosen``), pack the winner (``pack: true``) and write
    <out>/study.json. Returns the study report (what study.json holds); None for a worker (``worker_index``,
    a process the sweep itself starts) and for ``dry_run`` (check the file, echo its points, run nothing).
    ``echo(text)`` hears the progress lines."""
    if workers < 1:
        raise EdlabError(f"--workers must be >= 1, got {workers}")
    st = load_study(study_file, quick, tuple(sets), out, floor, pruner)
    if dry_run:
        for line in describe(st):
            echo(line)
        return None
    _optuna()
    if worker_index is None:
        _claim_out(st.out)
    url = storage_url(st, storage)
    if st.kind == "recipe":
        _recipe_path(st)
    ensure_teacher(st, echo=echo)  # before any trial; a worker finds it made (or waits on its lock)
    if worker_index is not None:  # a worker started by the sweep below
        study = open_study(st, url, worker_index, create=False)
        run_worker(st, study, worker_index, echo=lambda m: print(m, flush=True))
        return None
    study = open_study(st, url)
    recovered = recover(study, stale_after)
    added = enqueue_missing(st, study, retry_failed)
    echo(budget_line(st))
    echo(f"study {st.name} in {_redact(url)}: {recovered} interrupted trial(s) to re-run, "
         f"{added} point(s) enqueued, {workers} worker(s); logs in {st.out / 'logs'}")
    if workers == 1:
        run_worker(st, study, 0, echo=echo)
    else:
        _spawn(study_file, st, url, workers, quick, sets, stale_after, floor, pruner)
        recover(study, stale_after)  # a worker that crashed left its trial RUNNING: the next run re-does it
    if st.test == "chosen":  # the trials never read the test split: the selected points are read now, once
        test_chosen(st, study, echo=echo)
    if st.pack:
        pack_winner(st, study, echo=echo)
    return {**write_report(st, study, url), "out": str(st.out)}


STUDY_MARK = ".edlab-study"


def _claim_out(out: Path) -> None:
    """The study folder is the sweep's: it writes study.json, recipe.yaml, logs/ and trials/ there, so a
    folder with other files (a user's own study.json or recipe.yaml) is refused, never overwritten."""
    check_out_path(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / STUDY_MARK).exists():
        legacy = (out / "study.db").exists() or (out / "trials").is_dir()  # made before the mark existed
        if not legacy:
            raise EdlabError(f"{out} exists and is not a sweep's folder (no {STUDY_MARK}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_MARK).touch()


def _spawn(study_file: str, st: Study, url: str, workers: int, quick: bool, sets, stale_after: float,
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
