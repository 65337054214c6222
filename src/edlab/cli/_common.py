"""What the commands share: the console, the options read from an options model (edlab.options, loaded when
a command that has one is), the names of choices (written out here, not imported from the library, so that
`edlab` starts without pydantic or torch)."""

from __future__ import annotations

import errno
import json

import click

DATASETS = ("cifar10", "cifar100", "synthetic")  # edlab.config.DATASETS (tests/test_cli.py checks they agree)
TTA_NAMES = ("none", "flip", "flip-shift", "airbench")  # the config's tta choices (checked likewise)
AUTOCAST_AS = ("trained", "fp32")  # edlab.evaluation.AUTOCAST_AS: edlab eval --autocast (checked likewise)

# OSErrors that describe the machine, not a bug: reported in one line (every write is atomic, so the
# files written before the failure are whole).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


class Epochs(click.ParamType):
    """A whole number of epochs (2) or a fraction (9.9, 0.5), as the config's ``epochs`` takes."""

    name = "epochs"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of epochs", param, ctx)
        return int(v) if v.is_integer() else v


def _click_type(annotation) -> tuple[object, str | None]:
    """An option's click type and metavar from its annotation. Choices are shown, not enforced by click: the
    options model refuses a wrong one in one line (click's usage error is a paragraph)."""
    from ..options import literal_choices

    choices = literal_choices(annotation)
    if choices:
        return str, "[" + "|".join(map(str, choices)) + "]"
    args = {a for a in getattr(annotation, "__args__", ()) if a is not type(None)} or {annotation}
    if args == {int, float}:
        return Epochs(), None
    for t in (bool, int, float):
        if t in args:
            return t, None
    return str, None


def options_from(model, first: tuple[str, ...] = ()):
    """Add the options of an options model (edlab.options) to a command: flags, type, default, help and the
    config key each one sets, all read from the model. The command's own options come before the
    config-setting ones and the distillation ones last, ``first`` before all."""
    from ..options import DistillOptions, config_field, flags_of, meta

    fields = model.model_fields
    order = sorted(fields, key=lambda n: (n not in first, bool(meta(fields[n]).get("config")),
                                          n in DistillOptions.model_fields))

    def decorate(f):
        for name in reversed(order):
            field = fields[name]
            m = meta(field)
            help_ = field.description or ""
            annotation = field.annotation
            if m.get("config"):
                annotation = config_field(m["config"]).annotation
                help_ = f"{help_} [config: {m['config']}]".strip()
            kind, metavar = _click_type(annotation)
            decls = list(flags_of(name, field))
            default = None if field.is_required() else field.default
            kw = {"help": help_, "metavar": metavar}
            if kind is bool and m.get("negatable"):
                decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
                kw.update(default=default, show_default=True)
            elif kind is bool and not m.get("config"):
                kw.update(is_flag=True, default=bool(default))
            else:
                kw.update(type=kind, default=None if default == () else default,
                          show_default=default not in (None, False, (), ""))  # a missing one: the model's line
            f = click.option(*decls, name, **kw)(f)
        return f
    return decorate
