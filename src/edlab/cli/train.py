"""edlab train -> edlab.train.train_run."""

import click

from ..options import TrainOptions
from ._common import console, options_from


@click.command()
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
@options_from(TrainOptions, first=("model", "dataset", "data_dir", "train_subset", "epochs"))
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. optim.nesterov=false.")
def train(config, resume, sets, **flags):
    """Train a model; write a run directory (config, metrics, summary, TensorBoard, model.ckpt).

    \b
    Examples:
      edlab train configs/resnet20-cifar10.yaml
      edlab train --model resnet20 --dataset synthetic --epochs 2
      edlab train cfg.yaml --lr 0.05 --set data.cutout=8 --set sched.warmup_epochs=1
      edlab train configs/airbench94.yaml --set lookahead=null   # airbench's recipe, one trick off
      edlab train cfg.yaml --out runs/r20 --resume      # continue a killed run
      edlab train --model resnet20 --set model.blocks=[2,3,3] --teacher runs/r56/model.ckpt --temperature 4
      WANDB_MODE=offline edlab train cfg.yaml --tracker wandb
    """
    from ..evaluation import pct
    from ..train import train_run

    out = console()
    s = train_run(config, resume=resume, sets=list(sets), console=out, **flags)
    if s is None:  # a torchrun rank other than 0: rank 0 reports
        return
    val = (f"best val {pct(s['best_val_accuracy'])} @ epoch {s['best_epoch']}" if s["best_val_accuracy"] is not None
           else "no validation split")
    score = f"score {s['score']:.4f}"
    if s.get("views", 1) > 1:  # the views are charged: say so, and what one view per image would score
        score += f" ({s['views']} test-time views charged; one view {s['score_one_view']:.4f})"
    out.print(f"test accuracy {pct(s['test_accuracy'])}  ({val})  params {s['params']:,}  MACs {s['macs']:,}  "
              f"{score}  {s['seconds'] / 60:.1f} min  -> {s['run_dir']}")
