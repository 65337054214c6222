"""The study file: read, checked against its base before anything runs, and what each trial is made of.

``load_study`` turns a study file (plus ``--quick``, ``--set``, ``--floor``, ``--pruner``) into a ``Study``;
every varied value is validated against the base config or recipe, so a bad point fails the command, not a
trial hours later. ``trial_config``, ``study_edits`` and ``set_args`` are how a point becomes a training run
or a pipeline's ``--set`` list; ``full_epochs`` counts what one trial spends at full fidelity.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig, build, read_yaml, resolve_named, resolve_named_options, safe_name, set_dotted
from ..errors import EdlabError

STUDY_KEYS = ("name", "description", "out", "config", "recipe", "set", "quick", "grid", "list", "search",
              "objective", "seed", "test", "teacher", "pack", "pruner", "budget")
TEACHER_KEYS = ("config", "set", "quick", "stages")
TRAINS = ("train", "prune", "quantize")  # the stages that train (and test), as in edlab.pipeline
# test: all = every trial tests its model; chosen = only the selected points, once, after the trials; none = no
# test at all (the choice is made beyond this study, e.g. against an earlier study's winner, and read once there)
TEST_MODES = ("all", "chosen", "none")
SEARCH_KEYS = ("params", "trials", "startup_trials")
# multi-fidelity: an Optuna pruner watches each trial's validation accuracy per epoch of its training stage
PRUNERS = ("successive-halving", "hyperband", "median")
PRUNER_KEYS = ("type", "min_epochs", "reduction_factor", "startup_trials")
BUDGET_KEYS = ("epochs",)
PARAM_TYPES = {"int": ("low", "high", "step", "log"), "float": ("low", "high", "step", "log"),
               "categorical": ("choices",)}
MAX_GRID = 100_000  # grid points a study may enumerate
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
    test: str = "all"  # "chosen": trials run with final_test off, the selected points tested after them; "none": never
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
    from ..config import parse_set_pairs

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
    fixed.update(parse_set_pairs(list(sets)))
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
            from ..config import parse_overrides

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
        build(TrainConfig, read_yaml(config), nested(sets))
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


def nested(flat: dict[str, Any]) -> dict:
    """{'optim.lr': 1} -> {'optim': {'lr': 1}}: dotted overrides as the config tree ``build`` merges."""
    tree: dict = {}
    for k, v in flat.items():
        set_dotted(tree, k, v)
    return tree


def trial_config(st: Study, point: dict[str, Any], out: str) -> TrainConfig:
    """The train config of one point of a config study: base, fixed overrides, the point, the study's edits."""
    return build(TrainConfig, read_yaml(st.base), nested(st.fixed), nested(point), {"out": out},
                 nested(study_edits(st, "train")))


def study_edits(st: Study, stage: str, trains: bool = True) -> dict[str, Any]:
    """Config edits the study makes to a training stage of every trial: no test read (test: chosen or none), and the
    study's teacher where it distils (``trains``: a quantize stage whose method fine-tunes)."""
    edits: dict[str, Any] = {"final_test": False} if st.test != "all" else {}
    if st.teacher and stage in st.teacher["stages"] and trains:
        edits["distill.teacher"] = teacher_path(st)
    return edits


def teacher_path(st: Study) -> str:
    """The study's teacher checkpoint: the one it names, or where the sweep trains it (<out>/teacher)."""
    return st.teacher.get("checkpoint") or str(st.out / "teacher" / "model.ckpt")


def directions(st: Study) -> list[str]:
    """The Optuna directions of the objective: val up; a score down; Pareto both (val up, score down)."""
    if st.objective == "pareto":
        return ["maximize", "minimize"]
    return ["minimize"] if isinstance(st.objective, dict) else ["maximize"]


def val_floor(st: Study) -> float | None:
    """The validation accuracy a trial must reach: the floor plus its margin (validation estimates the test
    accuracy with an error: select val >= 0.905 to trust test >= 0.90)."""
    if not isinstance(st.objective, dict):
        return None
    return round(st.objective["min_score_with_val_at_least"] + st.objective.get("floor_margin", 0), 12)


def full_epochs(st: Study, point: dict[str, Any]) -> tuple[float, float]:
    """(epochs of the trial's first training stage, epochs of all its stages) at full fidelity, as the config
    or recipe states them: what a trial that no pruner stops spends."""
    if st.kind == "config":
        e = float(trial_config(st, point, "probe").epochs)
        return e, e
    from ..options import PruneRecipe
    from ..quantize import STAGE_DEFAULTS

    default = {k: f.default for k, f in PruneRecipe.model_fields.items()}
    stages = study_recipe(st, point)["stages"]
    counts = []
    for name, opts in stages:
        if name == "train":
            cfg = read_yaml(str(opts["config"])) if opts.get("config") else {}
            counts.append(float(opts.get("epochs", cfg.get("epochs", TrainConfig().epochs))))
        elif name == "prune":  # fine-tuning after each step of each kind (structured, then unstructured)
            kinds = sum(float(opts.get(k) or 0) > 0 for k in ("structured", "unstructured"))
            counts.append(float(opts.get("finetune-epochs", opts.get("epochs", default["finetune_epochs"])))
                          * int(opts.get("steps", default["steps"])) * max(kinds, 1))
        elif name == "quantize" and opts.get("method", "qat") in STAGE_DEFAULTS:
            counts.append(float(opts.get("epochs", STAGE_DEFAULTS[opts.get("method", "qat")]["epochs"])))
    return (counts[0] if counts else 0.0), sum(counts)


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


def set_args(flat: dict[str, Any]) -> list[str]:
    """Overrides as ``--set KEY=VALUE`` texts, what a recipe stage and a recorded command line take."""
    return [f"{k}={_text(v)}" for k, v in flat.items()]


def recipe_path(st: Study) -> str:
    """The recipe file of a recipe study; an inline recipe is written to <out>/recipe.yaml first (rewritten only
    when it changed)."""
    if st.inline_recipe is None:
        return st.base
    st.out.mkdir(parents=True, exist_ok=True)
    p = st.out / "recipe.yaml"
    import yaml

    text = yaml.safe_dump(st.inline_recipe, sort_keys=False)
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    return str(p)


def study_recipe(st: Study, point: dict[str, Any]) -> dict:
    """The study's recipe with the point's overrides, read without writing anything: a dry run, a budget or a
    check must not leave a recipe.yaml that would make the out folder look like someone else's."""
    from ..pipeline import load_recipe

    if st.inline_recipe is None:
        return load_recipe(st.base, set_args({**st.fixed, **point}))
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(st.inline_recipe, f)
    try:
        return load_recipe(f.name, set_args({**st.fixed, **point}))
    finally:
        os.unlink(f.name)


def _check_recipe(st: Study, point: dict[str, Any]) -> None:
    """Parse every stage's command line as the CLI would (unknown options, bad types), without running it."""
    from ..pipeline import check_stages

    check_stages(study_recipe(st, point))
