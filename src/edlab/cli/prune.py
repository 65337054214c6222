"""edlab prune -> edlab.prune.prune_checkpoint."""

from pathlib import Path

import click

from ..options import PruneOptions
from ._common import console, options_from


@click.command("prune")
@click.argument("target")
@options_from(PruneOptions, first=("structured", "unstructured"))
@click.option("--out", help="Run directory (default runs/<model>-pruned-<timestamp>).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any fine-tuning config key.")
def prune(target, out, sets, **options):
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
    s = prune_checkpoint(target, out=out, sets=list(sets), console=c, **options)
    c.print(f"test accuracy {pct(s['test_accuracy'])}  ps {s['ps']:.3f}  pu {s['pu']:.3f}  "
            f"params {s['arch_params']:,} ({s['nonzero_params']:,} nonzero)  MACs {s['macs']:,}  "
            f"score {s['score']:.4f}  {s['seconds'] / 60:.1f} min  -> {Path(s['run_dir']) / 'model.ckpt'}")
