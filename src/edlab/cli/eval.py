"""edlab eval -> edlab.evaluation.evaluate_checkpoint."""

import click

from ..options import THREADS_HELP
from ._common import AUTOCAST_AS, DATASETS, TTA_NAMES, echo_json


@click.command("eval")
@click.argument("checkpoint")
@click.option("--dataset", type=click.Choice(DATASETS), help="Default: the dataset the checkpoint was trained on.")
@click.option("--data-dir")
@click.option("--half", is_flag=True, help="Evaluate in half precision (fp16 on CUDA, bf16 on CPU).")
@click.option("--autocast", "autocast_as", type=click.Choice(AUTOCAST_AS), default="trained",
              show_default=True, help="'trained': under the autocast dtype the stage tested in (bf16 on a CPU "
              "with fast bf16), so the recorded accuracy is reproduced; 'fp32': in float32.")
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", type=click.Choice([*TTA_NAMES, "trained"]), default="trained",
              show_default=True, help="Test-time views averaged; 'trained' = what the run that made it used.")
@click.option("--threads", type=int, help=THREADS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, dataset, data_dir, half, autocast_as, batch_size, device, tta, threads, as_json):
    """Re-measure test accuracy of a checkpoint.

    \b
    Example:
      edlab eval runs/resnet20-20261125-120000/model.ckpt --half
      edlab eval runs/latest                # a run folder: its model.ckpt (or model.int8.onnx)
      edlab eval model.ckpt --tta flip      # average the logits of each image and its mirror
      edlab eval model.int8.onnx            # through ONNX Runtime
      edlab eval model.ckpt --autocast fp32 # in float32, whatever the run tested in
      edlab eval model.pack --threads 1     # beside a training on a shared machine
    """
    from ..evaluation import evaluate_checkpoint

    progress = None if as_json else (lambda m: click.echo(m, err=True))  # --json is for scripts: no chatter
    r = evaluate_checkpoint(checkpoint, dataset, data_dir, half, batch_size, device, tta, progress=progress,
                            autocast_as=autocast_as, threads=threads)
    if as_json:
        echo_json(r)
    else:
        click.echo(f"{r['dataset']} test accuracy {100 * r['test_accuracy']:.2f}%  loss {r['test_loss']:.4f}  "
                   f"({r['precision']}, {r['images']} images" + (f", tta {r['tta']})" if r["tta"] != "none" else ")"))
