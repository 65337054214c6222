"""edlab run -> edlab.pipeline.run_pipeline."""

import click

from ._common import console


@click.command("run")
@click.argument("recipe", type=click.Path())  # a folder: one line from the reader
@click.option("--out", help="Pipeline directory (default: the recipe's out:, else runs/<name>-<timestamp>).")
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Edit a stage's option: prune.structured=0.5, 0.epochs=3, train.optim.lr=0.05.")
def run_recipe(recipe, out, sets):
    """Run a pipeline recipe: a list of stages (train, prune, quantize, score, ...), one run directory each.

    Running it again with the same --out continues where it stopped.

    \b
    Examples:
      edlab run recipes/r20-compress.yaml --out runs/r20-compress
      edlab run recipes/r20-compress.yaml --set prune.structured=0.5 --set train.epochs=3
    """
    from ..pipeline import run_pipeline

    c = console()
    r = run_pipeline(recipe, list(sets), out, echo=c.print)
    c.print(f"pipeline {r['name']}: {len(r['stages'])} stages done -> {r['dir']}/pipeline.json")
