"""edlab lr-find -> edlab.lr_find.lr_find."""

import click

from ._common import DATASETS


@click.command("lr-find")
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
@click.option("--model")
@click.option("--dataset", type=click.Choice(DATASETS))
@click.option("--data-dir")
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--train-subset", type=int, help="Draw batches from only N training images.")
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--start", type=float, default=1e-6, show_default=True)
@click.option("--end", type=float, default=10.0, show_default=True)
@click.option("--plot", "plot_path", default="lr_find.png", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
def lr_find(config, steps, start, end, plot_path, sets, **flags):
    """Learning-rate range test: saves a loss-vs-lr plot and suggests a starting lr.

    \b
    Example:
      edlab lr-find --model resnet20 --optimizer sgd --steps 100 --plot lr.png
    """
    from ..lr_find import find_lr

    r = find_lr(config, steps, start, end, plot_path, list(sets), progress=lambda m: click.echo(m, err=True), **flags)
    click.echo(f"suggested lr {r['suggested_lr']:.3g} ({len(r['lrs'])} steps, plot: {plot_path})")
