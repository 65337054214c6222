"""Every edlab command as a library call, named as in a recipe: the table the pipeline (and a study's
recipes) runs its stages from, with no command line in between.

A stage's options are the command's options, spelled as in the CLI or in Python (``finetune-epochs: 2`` or
``finetune_epochs: 2``); train, prune, quantize and lr-find take those of their model in edlab.options, with
its other spellings (``epochs``, ``global``, ``no-keep-first-last``). A key with a dot (``optim.lr: 0.05``) or
``set: [...]`` is a config edit (``sets``); ``true`` sets a flag, ``false`` and null leave the default (as an
absent flag). Each option is checked against the function's signature or its options model before any stage
runs, so a typo in stage 3 stops the pipeline before stages 0-2 spend an hour.
"""

from __future__ import annotations

import importlib
import inspect
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import EdlabError


@dataclass(frozen=True)
class Stage:
    target: str  # "module:function", imported when the stage is checked or run
    positional: str | None = None  # the keyword that receives the checkpoint (or config, paths)
    options: str | None = None  # "module:Model": the options model of the keywords it takes through **options
    aliases: dict[str, tuple[str, Any]] = field(default_factory=dict)  # CLI flag -> (keyword, value or None)
    takes_checkpoint: bool = False  # gets the last model.ckpt of an earlier stage unless checkpoint: is given
    writes_json: bool = False  # the result is the stage's result.json (commands with --json)
    takes_out: bool = True  # writes into the stage's folder (--out)
    resumable: bool = False  # continues from resume.pt (--resume)

    def function(self):
        return _resolve(self.target)

    def options_model(self):
        return _resolve(self.options) if self.options else None

    def named_options(self) -> tuple[str, ...]:
        model = self.options_model()
        return tuple(model.model_fields) if model else ()

    def all_aliases(self) -> dict[str, tuple[str, Any]]:
        """The other spellings of its options: the model's extra flags (``epochs`` for finetune_epochs,
        ``no-keep-first-last``) and the function's own (``aliases``)."""
        from .options import flags_of, meta

        model = self.options_model()
        found = dict(self.aliases)
        for name, f in (model.model_fields.items() if model else ()):
            flags = flags_of(name, f)
            found.update({flag[2:]: (name, None) for flag in flags if flag[2:] != name.replace("_", "-")})
            if meta(f).get("negatable"):
                found[f"no-{flags[0][2:]}"] = (name, False)
        return found


def _resolve(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def show_info(target: str, input_size: str = "3,32,32", layers: bool = False, echo=print,
          table_console=None) -> dict:
    """`edlab info` (the command and a recipe's info stage): the story lines, and the layer table with --layers
    (drawn on ``table_console``, the command's rich console, when given)."""
    from .inspect_file import describe
    from .score_table import render

    lines, p = describe(target, input_size)
    for line in lines:
        echo(line)
    if layers:
        render(p, table_console)
    return p.to_dict()


def show_models(echo=print) -> dict[str, int]:
    from .models import model_sizes

    sizes = model_sizes()
    for name, n in sizes.items():
        echo(f"{name:<18} {n:>12,} params")
    return sizes


STAGES: dict[str, Stage] = {
    "train": Stage("edlab.train:train_run", "config", options="edlab.options:TrainOptions", resumable=True),
    "eval": Stage("edlab.evaluation:evaluate_checkpoint", "checkpoint", takes_checkpoint=True, writes_json=True,
                  takes_out=False, aliases={"autocast": ("autocast_as", None)}),
    "score": Stage("edlab.inspect_file:score_file", "target", takes_checkpoint=True, writes_json=True, takes_out=False),
    "info": Stage("edlab.stages:show_info", "target", takes_checkpoint=True, takes_out=False),
    "bench": Stage("edlab.bench:bench_target", "target", takes_checkpoint=True, writes_json=True, takes_out=False),
    "prune": Stage("edlab.prune:prune_checkpoint", "target", options="edlab.options:PruneOptions",
                   takes_checkpoint=True),
    "quantize": Stage("edlab.quantize:quantize_checkpoint", "checkpoint", options="edlab.options:QuantizeOptions",
                      takes_checkpoint=True, resumable=True),
    "export": Stage("edlab.export:export_checkpoint", "checkpoint", takes_checkpoint=True,
                    aliases={"format": ("fmt", None), "eval": ("do_eval", None), "no-eval": ("do_eval", False),
                             "per-tensor": ("per_channel", False)}),
    "pack": Stage("edlab.pack:pack", "checkpoint", takes_checkpoint=True),
    "report": Stage("edlab.page:report_or_page", "paths"),
    "demo": Stage("edlab.pipeline:demo"),
    "sweep": Stage("edlab.study:sweep", "study_file"),
    "lr-find": Stage("edlab.lr_find:find_lr", "config", options="edlab.options:LrFindOptions", takes_out=False),
    "models": Stage("edlab.stages:show_models", takes_out=False),
}
# keywords the pipeline fills in itself, not stage options
INTERNAL = {"console", "table_console", "echo", "progress", "options", "sets", "macs", "worker_index"}


def _kind(annotation: Any) -> str:
    """The type a keyword's annotation (a resolved type hint) asks for first: bool, int, float, list or str;
    "+list" when a list is also taken (floor: float | list[float])."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    members = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    listy = any((typing.get_origin(a) or a) in (list, tuple, Sequence) for a in members)
    first = members[0]
    kind = first.__name__ if first in (bool, int, float) else "list" if listy and first is not str else "str"
    return kind + ("+list" if listy and kind != "list" else "")


def _coerce(value: Any, kind: str, key: str) -> Any:
    kind, _, also_list = kind.partition("+")
    if also_list and isinstance(value, list):
        return [_coerce(v, kind, key) for v in value]
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "list":
            return [_scalar(v) if not isinstance(v, (int, float)) else v for v in
                    (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError):
        raise EdlabError(f"option '{key}': {value!r} is not a valid {kind}") from None
    return _scalar(value)


def _scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


def stage_kwargs(name: str, opts: dict, checkpoint: str | None = None, out_dir: str | None = None,
                 resume: bool = False) -> dict:
    """The keywords a stage's function is called with: its recipe options checked against the signature,
    coerced to their types; the checkpoint of an earlier stage, the stage folder and ``resume`` added."""
    if name not in STAGES:
        raise EdlabError(f"'{name}' is not an edlab command (choices: {', '.join(STAGES)})")
    st = STAGES[name]
    params = inspect.signature(st.function()).parameters
    hints = typing.get_type_hints(st.function())
    kinds = {k: _kind(hints.get(k, str)) for k in params if k not in INTERNAL}
    kinds.update({k: "any" for k in st.named_options()})  # checked by the model, in the function
    aliases = st.all_aliases()
    opts = dict(opts)
    kw: dict[str, Any] = {}
    if st.takes_checkpoint:
        ckpt = opts.pop("checkpoint", None) or checkpoint
        if ckpt is None:
            raise EdlabError(f"stage '{name}' needs a checkpoint: put a train stage before it or give checkpoint:")
        kw[st.positional] = str(ckpt)
    sets: list[str] = []
    for key, value in opts.items():
        if "." in key:  # a config key of the stage's training config
            sets.append(f"{key}={_scalar(value)}")
            continue
        if key == "set":
            sets += [_scalar(v) for v in (value if isinstance(value, list) else [value])]
            continue
        if key in ("json", "resume"):  # the pipeline decides both
            continue
        keyword, fixed = aliases.get(key, (key.replace("-", "_"), None))
        if keyword not in kinds or keyword in kw:
            options = sorted({k.replace("_", "-") for k in kinds if k != st.positional} | set(aliases))
            raise EdlabError(f"No such option: {key} (options: {', '.join(options)})")  # click's words
        if value is False or value is None:  # as an absent flag: the default
            continue
        if fixed is not None:  # a negative flag (no-eval: true)
            kw[keyword] = fixed
            continue
        kw[keyword] = value if kinds[keyword] == "any" else _coerce(value, kinds[keyword], key)
    if sets:
        if "sets" not in params:
            raise EdlabError(f"edlab {name} takes no config edits ({sets[0]})")
        kw["sets"] = sets
    if st.takes_out and out_dir is not None:
        kw["out"] = str(out_dir)
    if resume and st.resumable:
        kw["resume"] = True
    return kw


class EchoConsole:
    """A console for library code that prints progress (``.print``): each line goes to ``echo``."""

    is_terminal = False

    def __init__(self, echo=print):
        self.echo = echo

    def print(self, *objects, **_) -> None:
        self.echo(" ".join(str(o) for o in objects))


def run_stage(name: str, kwargs: dict, echo=print) -> Any:
    """Call a stage's function with ``kwargs`` (from :func:`stage_kwargs`); progress lines go to ``echo``.
    Returns its result as JSON-able data (a profile as its dict)."""
    fn = STAGES[name].function()
    params = inspect.signature(fn).parameters
    extra: dict[str, Any] = {}
    if "console" in params:
        extra["console"] = EchoConsole(echo)
    if "echo" in params:
        extra["echo"] = echo
    if "progress" in params:
        extra["progress"] = echo
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs
               and k not in extra and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:  # e.g. a sweep stage without its study file: one line, not a TypeError
        raise EdlabError(f"stage '{name}' needs {', '.join(m.replace('_', '-') for m in missing)}: give "
                         f"{missing[0].replace('_', '-')}: in the recipe")
    result = fn(**kwargs, **extra)
    return result.to_dict() if hasattr(result, "to_dict") else result
