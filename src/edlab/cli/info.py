"""edlab info -> edlab.score.describe."""

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
    from ..score import describe, render

    lines, p = describe(target, input_size)
    out = console()
    for line in lines:
        out.print(line)
    if layers:
        render(p, out)
