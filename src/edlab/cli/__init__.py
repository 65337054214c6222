"""The ``edlab`` command line: one thin file per command (parse the options, call one library function,
print its result). Every command turns an EdlabError (bad input, missing file, invalid config) into one
line on stderr and exit code 2. The library (edlab.*) never imports this package."""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from ..errors import EdlabError
from ._common import ENVIRONMENT_ERRNOS

# command -> "module:attribute"; a module is imported only when its command runs or --help lists it.
COMMANDS: dict[str, str] = {
    "train": "edlab.cli.train:train",
    "eval": "edlab.cli.eval:eval_",
    "score": "edlab.cli.score:score",
    "info": "edlab.cli.info:info",
    "pack": "edlab.cli.pack:pack",
    "demo": "edlab.cli.demo:demo",
    "run": "edlab.cli.run:run_recipe",
    "models": "edlab.cli.models:models",
    "lr-find": "edlab.cli.lr_find:lr_find",
    "prune": "edlab.cli.prune:prune",
    "quantize": "edlab.cli.quantize:quantize",
    "export": "edlab.cli.export:export",
    "bench": "edlab.cli.bench:bench",
    "report": "edlab.cli.report:report",
    "sweep": "edlab.cli.sweep:sweep",
}


class Group(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdlabError as e:
            click.echo(f"edlab: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("edlab: interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # the machine's answer (disk full, read-only, no permission): one line, exit 2
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(f"edlab: error: {e.strerror or e}{where}; files written before are intact", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edlab")
def cli():
    """edlab: train, compress, score and compare ResNets on CIFAR.

    \b
    Quick start:
      edlab train --model resnet20 --epochs 30            # CIFAR-10 from $EDLAB_DATA_DIR or ./data
      edlab score runs/latest/model.ckpt                  # the course score of the newest run
    """
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"edlab: warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    cli(prog_name="edlab")
