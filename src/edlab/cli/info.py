"""edlab info -> edlab.stages.show_info (edlab.inspect_file.describe, printed)."""

import click

from ._common import console


@click.command()
@click.argument("target")
@click.option("--input-size", default="3,32,32", show_default=True)
@click.option("--layers", is_flag=True, help="Also print the per-layer score table (edlab score).")
def info(target, input_size, layers):
    """The story of a checkpoint, packed or ONNX file: architecture, data and split, accuracy and the views
    it was measured with, the stages it went through, its score and training config. For a zoo model name:
    its size.

    \b
    Examples:
      edlab info runs/r20/model.ckpt
      edlab info r20-qat4.pack --layers
      edlab info resnet20
    """
    from ..stages import show_info

    out = console()
    show_info(target, input_size, layers, echo=out.print, table_console=out)
