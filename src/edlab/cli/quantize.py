"""edlab quantize -> edlab.quantize.quantize_checkpoint."""

import click

from ..options import QuantizeOptions
from ._common import console, options_from


@click.command("quantize")
@click.argument("checkpoint", type=click.Path())  # a folder: one line from read_checkpoint
@options_from(QuantizeOptions, first=("method",))
@click.option("--out", help="Run directory (default runs/<model>-<method>-<timestamp>).")
@click.option("--resume", is_flag=True, help="Continue the stage killed in --out (same options).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any training config key.")
def quantize(checkpoint, out, resume, sets, **options):
    """Quantize a trained (or pruned) checkpoint; write a run directory and the quantized model.

    CHECKPOINT: a checkpoint, a run folder or a zoo model name (fresh weights), as edlab prune takes; not an
    .onnx file (int8 ONNX export is from the checkpoint).

    Methods: fp16/bf16 (cast, evaluate, save half), binaryconnect (binary weights, fine-tuned), qat (k-bit
    weights and activations, LSQ, fine-tuned), int8 (ONNX Runtime static int8: .onnx + accuracy + latency).
    Fine-tuning uses the checkpoint's saved training config, changed by the flags and --set.

    \b
    Examples:
      edlab quantize runs/r20/model.ckpt --method bf16
      edlab quantize runs/r20/model.ckpt --method binaryconnect --epochs 10 --scale
      edlab quantize runs/r20/model.ckpt --method qat --bits-w 4 --bits-a 4 --set optim.lr=0.005
      edlab quantize runs/r20-pruned/model.ckpt --method int8 --calib-images 2048
      edlab quantize m.ckpt --method qat --out runs/q4 --resume   # continue a killed qat run
      edlab quantize m.ckpt --method qat --bits-w 4 --distill     # the float model teaches its 4-bit copy
      edlab quantize m.ckpt --method qat --bits-w 3 --bits-a 4 --layer-bits 'first=8,last=8,layers.0.*=4'
      edlab quantize m.ckpt --method qat --bits-w 4 --first-last-bits 8 --fold-bn   # the deployment form
      edlab quantize m.ckpt --method qat --teacher runs/r56/model.ckpt --temperature 4 --alpha 0.9
    """
    from ..evaluation import pct
    from ..quantize import quantize_checkpoint

    c = console()
    s = quantize_checkpoint(checkpoint, out=out, sets=list(sets), console=c, resume=resume, **options)
    change = "" if s["accuracy_change"] is None else f", change {100 * s['accuracy_change']:+.2f} points"
    c.print(f"{s['method']}: test accuracy {pct(s['test_accuracy'])} (float "
            f"{pct(s['reference_test_accuracy'])}{change})  "
            f"bits w/a {s['bits_w']:.3g}/{s['bits_a']:.3g}  score {s['score']:.4f}  -> {s['checkpoint']}")
