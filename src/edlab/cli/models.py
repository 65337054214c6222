"""edlab models -> edlab.stages.show_models (edlab.models.model_sizes, printed)."""

import click


@click.command()
def models():
    """List the registered models with their parameter counts (10 classes)."""
    from ..stages import show_models

    show_models(echo=click.echo)
