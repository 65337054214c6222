"""edlab models -> edlab.models.model_sizes."""

import click


@click.command()
def models():
    """List the registered models with their parameter counts (10 classes)."""
    from ..models import model_sizes

    for name, n in model_sizes().items():
        click.echo(f"{name:<18} {n:>12,} params")
