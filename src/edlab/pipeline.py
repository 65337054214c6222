"""Pipelines: a YAML recipe is a list of stages, each one edlab command with its options.

    name: r20-compress
    stages:
      - train:    {config: configs/resnet20-cifar10.yaml, epochs: 5}
      - prune:    {structured: 0.3, unstructured: 0.2, finetune-epochs: 2}
      - quantize: {method: bf16}
      - score:    {}

Each stage runs the command of the same name in-process, with its options written as the CLI would take
them (``finetune-epochs: 2`` -> ``--finetune-epochs 2``; ``true`` -> a bare flag; a list -> the option
repeated; a key with a dot, e.g. ``optim.lr: 0.05``, -> ``--set optim.lr=0.05``). A stage that takes a
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
import io
import json
import time
from pathlib import Path
from typing import Any

from .config import parse_overrides, read_yaml
from .errors import EdlabError
from .runs import write_json

TAKES_CHECKPOINT = {"prune", "quantize", "export", "eval", "score", "bench", "info"}
RESUMABLE = {"train", "quantize"}  # commands with --resume, used when the stage left a resume.pt
WRITES_JSON = {"score", "eval", "bench"}  # their --json output is the stage's result
NO_OUT = {"score", "eval", "bench", "info"}


def load_recipe(path: str, sets: list[str] | None = None) -> dict:
    """Read and check a recipe; ``sets`` like ``prune.structured=0.5`` or ``0.epochs=3`` edit a stage."""
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
        parsed.append([str(name), dict(opts or {})])
    commands = _commands()
    for i, (name, _) in enumerate(parsed):  # a typo in stage 3 must not surface after stages 0-2 ran
        if name not in commands or name == "run":
            raise EdlabError(f"recipe {path}: stage {i} '{name}' is not an edlab command "
                             f"(choices: {', '.join(c for c in commands if c != 'run')})")
    for key, value in _flatten(parse_overrides(sets or [])):
        target, _, option = key.partition(".")
        idx = int(target) if target.isdigit() else next((i for i, (n, _) in enumerate(parsed) if n == target), None)
        if idx is None or idx >= len(parsed) or not option:
            raise EdlabError(f"--set {key}: name a stage by command or index (stages: "
                             f"{', '.join(f'{i}:{n}' for i, (n, _) in enumerate(parsed))})")
        parsed[idx][1][option] = value
    return {"name": recipe.get("name") or Path(path).stem, "out": recipe.get("out"), "stages": parsed}


def _commands() -> list[str]:
    import click

    from .cli import cli

    return cli.list_commands(click.Context(cli))


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


def _invoke(argv: list[str]) -> tuple[int, str]:
    import click

    from .cli import cli

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            cli.main(args=argv, prog_name="edlab", standalone_mode=False)
        except SystemExit as e:
            code = int(e.code or 0)
        except click.ClickException as e:  # a bad option value of the stage: one line, like EdlabError
            click.echo(f"edlab: error: {argv[0]}: {e.format_message()}", err=True)
            code = e.exit_code
    return code, buf.getvalue()


def run_pipeline(recipe_path: str, sets: list[str] | None = None, out: str | None = None, echo=print) -> dict:
    recipe = load_recipe(recipe_path, sets)
    root = Path(out or recipe["out"] or f"runs/{recipe['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "pipeline.json"
    done = json.loads(state_path.read_text())["stages"] if state_path.exists() else []
    checkpoint: str | None = None
    results = []
    for i, (name, opts) in enumerate(recipe["stages"]):
        stage_dir = root / f"{i:02d}-{name}"
        prev = done[i] if i < len(done) else None
        if prev and prev.get("status") == "done" and prev.get("name") == name:
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
            write_json(state_path, {"recipe": recipe_path, "name": recipe["name"], "stages": results})
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
        code, output = _invoke(argv)
        if name in WRITES_JSON:
            res = json.loads(output or "{}")
            echo(", ".join(f"{k} {res[k]:.4g}" for k in ("score", "test_accuracy") if isinstance(res.get(k), float)))
        elif output.strip():
            echo(output.rstrip())
        if code != 0:
            raise EdlabError(f"stage {i} ({name}) failed with exit code {code}; fix it and run the same "
                             f"command again to continue from this stage")
        stage_dir.mkdir(parents=True, exist_ok=True)
        if name in WRITES_JSON:
            (stage_dir / "result.json").write_text(output)
        if (stage_dir / "model.ckpt").exists():
            checkpoint = str(stage_dir / "model.ckpt")
        summary = stage_dir / ("summary.json" if (stage_dir / "summary.json").exists() else "result.json")
        entry = {"index": i, "name": name, "argv": argv, "dir": str(stage_dir), "status": "done",
                 "seconds": time.perf_counter() - t0, "checkpoint": checkpoint,
                 "summary": json.loads(summary.read_text()) if summary.exists() else None}
        results.append(entry)
        write_json(state_path, {"recipe": recipe_path, "name": recipe["name"], "stages": results})
    final = {"recipe": recipe_path, "name": recipe["name"], "dir": str(root), "stages": results,
             "checkpoint": checkpoint}
    write_json(state_path, final)
    return final
