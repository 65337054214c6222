"""edlab prune -> edlab.prune.prune_checkpoint."""

from pathlib import Path

import click

from ._common import console, distill_options


@click.command("prune")
@click.argument("target")
@click.option("--structured", type=float, default=0.0, show_default=True,
              help="Total fraction of the dense params (or MACs, --target) to remove by deleting channels.")
@click.option("--unstructured", type=float, default=0.0, show_default=True,
              help="Total fraction of the dense params to set to zero (the score's pu).")
@click.option("--steps", type=int, default=1, show_default=True, help="Pruning steps per kind, fine-tuning after each.")
@click.option("--finetune-epochs", "--epochs", "finetune_epochs", type=int, default=5, show_default=True,
              help="Fine-tuning epochs after each step (--epochs: the same, as in train and quantize).")
@click.option("--schedule", default="linear", show_default=True, help="Targets of the steps: linear | cubic (AGP).")
@click.option("--importance", default="l1", show_default=True, help="Channel importance: l1 | l2 | bn | taylor.")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels of all layers together.")
@click.option("--target", "target_kind", default="params", show_default=True,
              help="What --structured is a fraction of: params | macs.")
@click.option("--keep", default="", help="Comma-separated layers left untouched, e.g. fc,conv1 "
              "(the classifier's outputs are always kept).")
@click.option("--scope", default="global", show_default=True, help="Unstructured ranking: global | layer.")
@click.option("--round-to", type=int, help="Keep channel counts multiples of N (fast kernels like 8).")
@click.option("--distill", is_flag=True, help="Fine-tune with distillation from the unpruned model "
              "(or give --teacher CKPT).")
@click.option("--from-scratch", is_flag=True, help="Baseline: train the pruned architecture from random init.")
@click.option("--scratch-epochs", type=int, help="Epochs of the --from-scratch training (default --finetune-epochs).")
@click.option("--calib-batches", type=int, default=8, show_default=True, help="Training batches for taylor.")
@click.option("--dataset", help="cifar10 | cifar100 | synthetic (default: the checkpoint's).")
@click.option("--data-dir")
@click.option("--train-subset", type=int, help="Fine-tune on only N training images.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Fine-tuning lr (default: 1/10 of the checkpoint's training lr).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", help="auto | fp32 | bf16 | fp16.")
@click.option("--seed", type=int)
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
@click.option("--out", help="Run directory (default runs/<model>-pruned-<timestamp>).")
@distill_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any fine-tuning config key.")
def prune(target, structured, unstructured, steps, finetune_epochs, schedule, importance, global_pruning,
                  target_kind, keep, scope, round_to, distill, from_scratch, scratch_epochs, calib_batches, lr,
                  out, sets, **flags):
    """Prune a checkpoint (structured, then unstructured), fine-tuning after every step.

    TARGET: a checkpoint, a run folder or a zoo model name (fresh weights). Not an .onnx file, nor a quantized
    checkpoint: models are pruned before quantization (prune the float checkpoint, then quantize).

    --structured R removes channels until R of the dense model's parameters (--target params, the score's
    ps) or MACs (--target macs) are gone; --unstructured S then zeroes weights until S of the dense
    parameters are zero (the score's pu). Both are totals, so ps + pu < 1. Writes a run directory:
    metrics.jsonl (one line per step), finetune.jsonl, config.yaml, summary.json and model.ckpt.

    \b
    Examples:
      edlab prune runs/r20/model.ckpt --structured 0.3 --unstructured 0.2 --finetune-epochs 5
      edlab prune runs/r20/model.ckpt --structured 0.5 --steps 3 --schedule cubic --global --distill
      edlab prune runs/r18/model.ckpt --structured 0.75 --target macs --importance taylor --round-to 8
      edlab prune runs/r20/model.ckpt --structured 0.5 --from-scratch --scratch-epochs 30
      edlab prune runs/s/model.ckpt --unstructured 0.7 --teacher runs/r56/model.ckpt --temperature 4
    """
    from ..evaluation import pct
    from ..prune import prune_checkpoint

    c = console()
    s = prune_checkpoint(target, structured, unstructured, steps, finetune_epochs, schedule, importance,
                         global_pruning, target_kind, keep, scope, round_to, distill, from_scratch, scratch_epochs,
                         calib_batches, lr, out, list(sets), console=c, **flags)
    c.print(f"test accuracy {pct(s['test_accuracy'])}  ps {s['ps']:.3f}  pu {s['pu']:.3f}  "
            f"params {s['arch_params']:,} ({s['nonzero_params']:,} nonzero)  MACs {s['macs']:,}  "
            f"score {s['score']:.4f}  {s['seconds'] / 60:.1f} min  -> {Path(s['run_dir']) / 'model.ckpt'}")
