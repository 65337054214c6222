"""edlab lr-find -> edlab.lr_find.find_lr."""

import click

from ..options import LrFindOptions
from ._common import options_from


@click.command("lr-find")
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
@options_from(LrFindOptions, first=("model",))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key.")
def lr_find(config, sets, **options):
    """Learning-rate range test: saves a loss-vs-lr plot and suggests a starting lr.

    \b
    Example:
      edlab lr-find --model resnet20 --optimizer sgd --steps 100 --plot lr.png
    """
    from ..lr_find import find_lr

    r = find_lr(config, list(sets), progress=lambda m: click.echo(m, err=True), **options)
    click.echo(f"suggested lr {r['suggested_lr']:.3g} ({len(r['lrs'])} steps, plot: {r['plot']})")
