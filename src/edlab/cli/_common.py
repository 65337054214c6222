"""What the commands share: the console, the distillation options, the names of choices (written out
here, not imported from the library, so that `edlab --help` starts without torch)."""

from __future__ import annotations

import errno
import json

import click

DATASETS = ("cifar10", "cifar100", "synthetic")  # edlab.config.DATASETS (tests/test_cli.py checks they agree)
TTA_NAMES = ("none", "flip", "flip-shift", "airbench")  # the config's tta choices (checked likewise)

# OSErrors that describe the machine, not a bug: reported in one line (every write is atomic, so the
# files written before the failure are whole).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def distill_options(f):
    """Add --teacher/--temperature/--alpha to a command (values land in ``**flags``: edlab.config.DISTILL_FLAGS)."""
    f = click.option("--alpha", type=float, help="Distillation: weight of the teacher's soft term (default "
                     "0.9; the label loss gets 1 - alpha).")(f)
    f = click.option("--temperature", type=float, help="Distillation: softmax temperature T (default 4).")(f)
    return click.option("--teacher", metavar="CKPT", help="Distil from this checkpoint's logits "
                        "(distill.teacher), computed on the student's augmented batches (or cached once: "
                        "distill.crop_pool).")(f)
