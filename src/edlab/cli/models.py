"""edlab models -> edlab.stages._models (edlab.models.model_sizes, printed)."""

import click


@click.command()
def models():
    """List the registered models with their parameter counts (10 classes)."""
    from ..stages import _models

    _models(echo=click.echo)
