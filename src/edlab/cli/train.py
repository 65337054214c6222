"""edlab train -> edlab.train.train_run."""

import click

from ..config import DataConfig, OptimConfig, SchedConfig, TrainConfig, choices
from ._common import DATASETS, console, distill_options


class _Epochs(click.ParamType):
    """A whole number of epochs (2) or a fraction (9.9, 0.5), as the config's ``epochs`` takes."""

    name = "epochs"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of epochs", param, ctx)
        return int(v) if v.is_integer() else v


EPOCHS = _Epochs()


@click.command()
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
@click.option("--model", help="Registered model name (see `edlab models`).")
@click.option("--dataset", type=click.Choice(DATASETS))
@click.option("--data-dir", help="Folder holding cifar-10-batches-py/ (else $EDLAB_DATA_DIR, else ./data).")
@click.option("--train-subset", type=int, help="Train on only N images (quick runs).")
@click.option("--epochs", type=EPOCHS, help="Epochs; a fraction (9.9, 0.5) ends with a partial epoch.")
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(choices(OptimConfig, "name")))
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--scheduler", type=click.Choice(choices(SchedConfig, "name")))
@click.option("--augment", type=click.Choice(choices(DataConfig, "augment")))
@click.option("--seed", type=int)
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(choices(TrainConfig, "precision")))
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
@click.option("--tracker", type=click.Choice(choices(TrainConfig, "tracker")),
              help="Also log to W&B or MLflow (TensorBoard always); needs pip install edlab[wandb] / edlab[mlflow].")
@click.option("--out", help="Run directory (default runs/<name>-<timestamp>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@distill_options
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
