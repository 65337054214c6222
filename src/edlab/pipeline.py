"""Pipelines: a YAML recipe is a list of stages, each one edlab command with its options.

    name: r20-compress
    stages:
      - train:    {config: configs/resnet20-cifar10.yaml, epochs: 5}
      - prune:    {structured: 0.3, unstructured: 0.2, finetune-epochs: 2}
      - quantize: {method: bf16}
      - score:    {}

Each stage calls the library function of the command of the same name (edlab.stages), with the options the
CLI would take (``finetune-epochs: 2`` as ``--finetune-epochs 2``; ``true``: a flag; a key with a dot, e.g.
``optim.lr: 0.05``, as ``--set optim.lr=0.05``); pipeline.json records the equivalent command line. A stage that takes a
checkpoint gets the last ``model.ckpt`` written by an earlier stage. Every stage writes into
``<pipeline dir>/<NN>-<stage>/``; commands without a run directory (score, eval, bench, info) have their
``--json`` output saved there as ``result.json``. Running the same recipe with the same ``--out`` again
continues: finished stages are skipped, an interrupted stage that left resume state (train; quantize
binaryconnect/qat) is resumed from its last finished epoch, any other interrupted stage is moved aside
(``NN-stage.interrupted-K``) and redone from the start; every stage is deterministic, so the pipeline ends
with the same files as an uninterrupted one (docs/guarantees.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .config import parse_overrides, parse_set_pairs, read_yaml, resolve_named_options, safe_name
from .errors import EdlabError
from .runs import check_out_path, write_json
from .stages import STAGES, run_stage, stage_kwargs

TAKES_CHECKPOINT = {n for n, st in STAGES.items() if st.takes_checkpoint}
RESUMABLE = {n for n, st in STAGES.items() if st.resumable}  # used when the stage left a resume.pt
WRITES_JSON = {n for n, st in STAGES.items() if st.writes_json}  # their result is the stage's result.json
NO_OUT = {n for n, st in STAGES.items() if not st.takes_out}
LOCK = ".edlab-pipeline.lock"


def load_recipe(path: str, sets: list[str] | None = None) -> dict:
    """Read and check a recipe; ``sets`` like ``prune.structured=0.5`` or ``0.epochs=3`` edit a stage. Paths
    the recipe names (``config:``, ``checkpoint:``, ``teacher:``, ...) are read from the recipe's folder
    (config.resolve_named); paths in ``sets`` (the command line's) from the working directory."""
    recipe = read_yaml(path)
    unknown = set(recipe) - {"name", "out", "stages"}
    if unknown:
        raise EdlabError(f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))} (valid: name, out, stages)")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise EdlabError(f"recipe {path}: 'stages' must be a non-empty list")
    parsed = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or len(st) != 1:
            raise EdlabError(f"recipe {path}: stage {i} must be a mapping with one key, the command (e.g. train:)")
        (name, opts), = st.items()
        if opts is not None and not isinstance(opts, dict):
            raise EdlabError(f"recipe {path}: options of stage {i} ({name}) must be a mapping")
        parsed.append([str(name), resolve_named_options(dict(opts or {}), path)])  # paths: from the recipe's folder
    for i, (name, _) in enumerate(parsed):  # a typo in stage 3 must not surface after stages 0-2 ran
        if name not in STAGES:
            raise EdlabError(f"recipe {path}: stage {i} '{name}' is not an edlab command "
                             f"(choices: {', '.join(sorted(STAGES))})")
    pairs = [kv for key, value in parse_set_pairs(sets or []).items()  # (a mapping value: its keys, dotted)
             for kv in (_flatten(value, f"{key}.") if isinstance(value, dict) else [(key, value)])]
    for key, value in pairs:
        target, _, option = key.partition(".")
        idx = int(target) if target.isdigit() else next((i for i, (n, _) in enumerate(parsed) if n == target), None)
        if idx is None or idx >= len(parsed) or not option:
            raise EdlabError(f"--set {key}: name a stage by command or index (stages: "
                             f"{', '.join(f'{i}:{n}' for i, (n, _) in enumerate(parsed))})")
        parsed[idx][1][option] = value
    name = str(recipe.get("name") or Path(path).stem)
    try:
        safe_name(name)
    except ValueError as e:
        raise EdlabError(f"recipe {path}: name {name!r}: {e}") from None
    return {"name": name, "out": recipe.get("out"), "stages": parsed}


def _check_partial_config(tree: dict) -> None:
    """Keys and types of a stage's config edits (merged later with its checkpoint's config, so a rule across
    keys is left to the stage)."""
    from .config import TrainConfig, build

    try:
        build(TrainConfig, tree)
    except EdlabError as e:
        if not str(e).startswith("config: "):
            raise


def check_stages(recipe: dict) -> None:
    """Check every stage's options as its function takes them (unknown options, bad types, the train stage's
    config, every stage's config edits) before anything runs: a typo in stage 3 must not surface after
    stages 0-2 ran for an hour."""
    from .config import load_train_config, merge

    for i, (name, opts) in enumerate(recipe["stages"]):
        made = any(n in ("train", "prune", "quantize") for n, _ in recipe["stages"][:i])
        try:
            kw = stage_kwargs(name, opts, "model.ckpt" if made else None, "probe")
            model = STAGES[name].options_model()
            if name == "train":
                named = model.of({k: v for k, v in kw.items() if k in model.model_fields})
                load_train_config(kw.get("config"), named.config_tree(), kw.get("sets"))
                continue
            edits = parse_overrides(kw.get("sets", []))
            _check_partial_config(edits)  # the edits' own keys first: a typo is named as one
            if model:
                named = model.of({k: v for k, v in kw.items() if k in model.model_fields}, partial=True)
                _check_partial_config(merge(named.config_tree(), edits))
        except EdlabError as e:
            raise EdlabError(f"stage {i} ({name}): {e}") from None


def _spec(recipe: dict) -> list:
    return json.loads(json.dumps(recipe["stages"], default=str))


def _spec_change(old: list, new: list, finished: int) -> str | None:
    """How the recipe of a pipeline folder changed in its ``finished`` stages, in words, or None. Stages not
    finished yet may change (a failed stage's option is fixed in the recipe), and stages may be added."""
    for i, ((o_name, o_opts), (n_name, n_opts)) in enumerate(list(zip(old, new))[:finished]):
        if o_name != n_name:
            return f"stage {i} was {o_name}, now {n_name}"
        for key in sorted(set(o_opts) | set(n_opts)):
            if o_opts.get(key, "unset") != n_opts.get(key, "unset"):
                return f"stage {i} ({n_name}) option '{key}' was {o_opts.get(key, 'unset')!r}, " \
                       f"now {n_opts.get(key, 'unset')!r}"
    if len(new) < min(finished, len(old)):
        return f"{finished} stages ran, the recipe now has {len(new)}"
    return None


@contextlib.contextmanager
def _folder_lock(root: Path):
    """Held while a pipeline runs in ``root``: a second ``edlab run`` with the same --out stops at once
    instead of interleaving its stage files with the first's. The kernel drops the lock if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / LOCK, "a+") as f:  # also marks the folder as a pipeline's, should stage 0 fail
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise EdlabError(f"another edlab run (pid {pid}) is working in {root}; wait for it to finish, "
                             f"or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flatten(tree: dict, prefix: str = ""):
    """{'train': {'optim': {'lr': 1}}} -> ('train.optim.lr', 1)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def stage_argv(name: str, opts: dict, checkpoint: str | None, out_dir: Path) -> list[str]:
    """The command line a stage runs: ``[name, positional..., --option value ...]``."""
    argv = [name]
    opts = dict(opts)
    if name == "train" and "config" in opts:
        argv.append(str(opts.pop("config")))
    if name in TAKES_CHECKPOINT:
        ckpt = opts.pop("checkpoint", None) or checkpoint
        if ckpt is None:
            raise EdlabError(f"stage '{name}' needs a checkpoint: put a train stage before it or give checkpoint:")
        argv.append(str(ckpt))
    for key, value in opts.items():
        if "." in key:  # a config key of the stage's training config
            argv += ["--set", f"{key}={_scalar(value)}"]
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for v in value:
                argv += [flag, _scalar(v)]
        else:
            argv += [flag, _scalar(value)]
    if name not in NO_OUT:
        argv += ["--out", str(out_dir)]
    if name in WRITES_JSON:
        argv.append("--json")
    return argv


def _scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _open_root(root: Path, recipe_path: str, recipe: dict) -> tuple[list, bool]:
    """Check that ``root`` can hold this pipeline; return the stages an earlier run of it finished, and
    whether its pipeline.json predates recorded recipes (then the stages' command lines are compared)."""
    state_path = root / "pipeline.json"
    if not state_path.exists():
        return [], False
    try:
        saved = json.loads(state_path.read_text())
        done = saved["stages"]
        assert isinstance(done, list) and all(isinstance(d, dict) for d in done)
    except Exception:
        raise EdlabError(f"{state_path} is unreadable; choose another --out") from None
    finished = sum(1 for d in done if d.get("status") == "done")
    change = _spec_change(saved["spec"], _spec(recipe), finished) if isinstance(saved.get("spec"), list) else None
    if change:
        raise EdlabError(f"{root} holds a run of another recipe ({change}); run the same recipe and --set "
                         f"to continue it, or choose another --out")
    return done, "spec" not in saved


TRAINS = ("train", "prune", "quantize")  # the stages that read data, train and test


def run_pipeline(recipe_path: str, sets: list[str] | None = None, out: str | None = None, echo=print,
                 stage_sets: dict[int, list[str]] | None = None) -> dict:
    """Run (or continue) a recipe in ``out``. ``stage_sets``: config edits (``final_test=false``,
    ``distill.teacher=PATH``) added to the ``--set`` list of the stages they name by index, e.g. by a study
    that tests only its chosen points or distils every trial from one teacher."""
    recipe = load_recipe(recipe_path, sets)
    for i, edits in (stage_sets or {}).items():
        if edits:
            opts = recipe["stages"][i][1]
            given = opts.get("set")
            opts["set"] = [*([] if given is None else given if isinstance(given, list) else [given]), *edits]
    check_stages(recipe)
    root = Path(out or recipe["out"] or f"runs/{recipe['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_path(root, "--out")
    if root.is_dir() and not (root / "pipeline.json").exists() and not (root / LOCK).exists():
        mine = Path(recipe_path).name if Path(recipe_path).parent.resolve() == root.resolve() else None
        if any(p.name != mine for p in root.iterdir()):  # (the demo writes its recipe into the folder first)
            raise EdlabError(f"{root} exists and is not a pipeline's folder (no pipeline.json); choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root):
        return _run_stages(recipe_path, recipe, root, echo)


def _run_stages(recipe_path: str, recipe: dict, root: Path, echo) -> dict:
    done, legacy = _open_root(root, recipe_path, recipe)
    state_path = root / "pipeline.json"
    spec = _spec(recipe)
    checkpoint: str | None = None
    results: list[dict] = []

    def save_state(**extra) -> None:
        write_json(state_path, {"recipe": recipe_path, "name": recipe["name"], **extra, "spec": spec,
                                "stages": results})

    if not state_path.exists():
        # before the first stage makes its folder: a pipeline killed inside stage 0 and carried to another
        # machine without its (ignored, machine-local) lock file is still known as this pipeline's folder
        save_state()
    for i, (name, opts) in enumerate(recipe["stages"]):
        stage_dir = root / f"{i:02d}-{name}"
        prev = done[i] if i < len(done) else None
        if prev and prev.get("status") == "done" and prev.get("name") == name:
            old = [a for a in prev.get("argv") or [] if a != "--resume"] if legacy else []
            now = stage_argv(name, opts, checkpoint, stage_dir) if old else []
            if old != now:  # a pipeline.json from before recipes were recorded: compare the command lines
                raise EdlabError(f"{root} holds a run of another recipe (stage {i} ({name}) ran "
                                 f"'{' '.join(old)}'); run the same recipe to continue it, or choose another --out")
            echo(f"[{i}] {name}: done earlier, skipped")
            checkpoint = prev.get("checkpoint") or checkpoint
            results.append(prev)
            continue
        last = results[-1].get("summary") if results else None
        no_model = bool(results) and not (Path(results[-1]["dir"]) / "model.ckpt").exists()
        if name == "score" and not opts and no_model and isinstance(last, dict) and "score" in last:
            # int8 leaves an ONNX file, not a checkpoint: its stage already scored it from the model
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json(stage_dir / "result.json", {**last, "scored_by": results[-1]["name"]})
            echo(f"[{i}] score: taken from stage {i - 1} ({results[-1]['name']}), which scored its own output")
            results.append({"index": i, "name": name, "argv": [], "dir": str(stage_dir), "status": "done",
                            "seconds": 0.0, "checkpoint": None, "summary": last})
            save_state()
            continue
        argv = stage_argv(name, opts, checkpoint, stage_dir)
        if stage_dir.exists() and any(stage_dir.iterdir()):
            if name in RESUMABLE and (stage_dir / "resume.pt").exists():
                argv.append("--resume")
            else:  # an interrupted stage without resume state: keep its files aside, start it again
                k = 1
                while stage_dir.with_name(f"{stage_dir.name}.interrupted-{k}").exists():
                    k += 1
                stage_dir.rename(stage_dir.with_name(f"{stage_dir.name}.interrupted-{k}"))
        echo(f"[{i}] edlab {' '.join(argv)}")
        t0 = time.perf_counter()
        try:
            res = run_stage(name, stage_kwargs(name, opts, checkpoint, stage_dir, "--resume" in argv), echo)
        except EdlabError as e:
            raise EdlabError(f"stage {i} ({name}) failed: {e}; fix it and run the same command again to "
                             f"continue from this stage") from None
        if isinstance(res, dict):
            echo(", ".join(f"{k} {res[k]:.4g}" for k in ("score", "test_accuracy") if isinstance(res.get(k), float)))
        stage_dir.mkdir(parents=True, exist_ok=True)
        if name in WRITES_JSON:
            (stage_dir / "result.json").write_text(json.dumps(res, indent=2) + "\n")
        if (stage_dir / "model.ckpt").exists():
            checkpoint = str(stage_dir / "model.ckpt")
        summary = stage_dir / ("summary.json" if (stage_dir / "summary.json").exists() else "result.json")
        entry = {"index": i, "name": name, "argv": argv, "dir": str(stage_dir), "status": "done",
                 "seconds": time.perf_counter() - t0, "checkpoint": checkpoint,
                 "summary": json.loads(summary.read_text()) if summary.exists() else None}
        results.append(entry)
        save_state()
    save_state(dir=str(root), checkpoint=checkpoint)
    return {"recipe": recipe_path, "name": recipe["name"], "dir": str(root), "stages": results,
            "checkpoint": checkpoint}


def demo(model: str = "resnet20", epochs: int = 2, train_subset: int = 10000, data_dir: str | None = None,
         out: str | None = None, echo=print) -> dict:
    """``edlab demo`` as a call: train MODEL briefly, prune 30 % of its parameters as channels and zero 20 %
    more, quantize it (int8 with ONNX Runtime, else bf16), score it, and write an HTML report beside the
    stages; on the synthetic dataset when CIFAR-10 is unavailable. Returns the pipeline's result plus
    ``dataset`` and ``report`` (the report's index.html)."""
    import importlib.util

    import yaml

    from .data import load_splits
    from .report import build_report

    root = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_path(root, "--out")
    if root.exists() and any(root.iterdir()) and not (root / "pipeline.json").exists():
        raise EdlabError(f"{root} exists and is not an earlier demo; choose another --out")
    dataset = "cifar10"
    try:
        load_splits("cifar10", data_dir)
    except EdlabError as e:
        echo(f"CIFAR-10 unavailable ({e}); running the same pipeline on the synthetic dataset.")
        dataset = "synthetic"
    train = {"model": model, "dataset": dataset, "epochs": epochs, "train-subset": train_subset,
             "sched.warmup_epochs": 0, **({"data-dir": data_dir} if data_dir else {}),
             **({"data.val_size": 400} if dataset == "synthetic" else {})}
    int8 = importlib.util.find_spec("onnxruntime") is not None
    stages = [{"train": train},
              {"prune": {"structured": 0.3, "unstructured": 0.2, "finetune-epochs": 1, "train-subset": train_subset}},
              {"quantize": {"method": "int8", "calib-images": 512} if int8 else {"method": "bf16"}},
              {"score": {}}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump({"name": "demo", "stages": stages}, sort_keys=False))
    r = run_pipeline(str(root / "recipe.yaml"), out=str(root), echo=echo)
    report = build_report([root], root / "report", title=f"edlab demo: {model} on {dataset}")
    return {**r, "dataset": dataset, "report": str(Path(report["out"]) / "index.html")}
