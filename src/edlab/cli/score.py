"""edlab score -> edlab.inspect_file.score_file (drawn by edlab.score_table)."""

import click

from ._common import TTA_NAMES, console, echo_json


@click.command()
@click.argument("target")
@click.option("--rules", type=click.Choice(["course", "micronet"]), default="course", show_default=True)
@click.option("--input-size", default="3,32,32", show_default=True, help="C,H,W of one input image.")
@click.option("--bits-w", type=int, help="What-if: pretend every layer's weights have this many bits.")
@click.option("--bits-a", type=int, help="What-if: pretend activations have this many bits.")
@click.option("--tta", type=click.Choice(["recorded", *TTA_NAMES]), default="recorded", show_default=True,
              help="Test-time views charged (f = views x MACs); recorded = those the checkpoint's accuracy used.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def score(target, rules, input_size, bits_w, bits_a, tta, as_json):
    """The course score of a checkpoint or zoo model, counted layer by layer from the model itself.

    A score describes the inference that produced the accuracy printed beside it: a checkpoint evaluated
    with test-time views (tta flip-shift: 6 forward passes per image) is charged 6x its MACs.

    \b
    Examples:
      edlab score resnet18                       # 3.9790 in fp32
      edlab score runs/r20/model.ckpt --json
      edlab score runs/r20/model.ckpt --tta none  # the same weights run on one view per image
      edlab score resnet20 --bits-w 8 --bits-a 8  # what-if estimate
    """
    from ..inspect_file import score_file
    from ..score_table import render

    p = score_file(target, rules, input_size, bits_w, bits_a, tta)
    if as_json:
        echo_json(p.to_dict())
    else:
        render(p, console())
