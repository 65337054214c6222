"""edlab quantize -> edlab.quantize.quantize_checkpoint."""

import click

from ._common import DATASETS, console, distill_options


@click.command("quantize")
@click.argument("checkpoint", type=click.Path())  # a folder: one line from read_checkpoint
@click.option("--method", required=True, help="One of: fp16, bf16, binaryconnect, qat, int8.")
@click.option("--bits-w", type=int, default=8, show_default=True, help="qat: weight bits (2-16).")
@click.option("--bits-a", type=int, help="qat: activation bits (2-16, 32 = float); default: --bits-w.")
@click.option("--first-last-bits", type=int, help="qat: quantize the first/last layers at this many bits "
              "instead of keeping them float.")
@click.option("--layer-bits", metavar="RULES", help="qat: per-layer bits, first matching rule wins: "
              "'first=8,last=8,layers.2.*=3/4' (PATTERN=N: weights and activations; W/A apart; A=32: float "
              "activations; 32: float layer). Patterns are globs over the layer names of `edlab score`.")
@click.option("--fold-bn", "fold", is_flag=True, help="Fold the BNs into the convs before them (after qat/"
              "binaryconnect fine-tuning; before fp16/bf16/int8): the tested, scored and saved model is the "
              "deployment form.")
@click.option("--epochs", type=int, help="Fine-tuning epochs (binaryconnect, qat; default 5).")
@click.option("--keep-first-last/--no-keep-first-last", default=True, show_default=True,
              help="Leave the first and last layers in full precision.")
@click.option("--scale", is_flag=True, help="binaryconnect: per-channel scale alpha = mean |w| (XNOR-style).")
@click.option("--stochastic", is_flag=True, help="binaryconnect: stochastic binarization during training.")
@click.option("--calib-images", type=int, default=1024, show_default=True,
              help="int8: training images for calibration (qat: first 256 set the activation steps).")
@click.option("--dataset", type=click.Choice(DATASETS),
              help="Default: the checkpoint's.")
@click.option("--data-dir")
@click.option("--out", help="Run directory (default runs/<model>-<method>-<timestamp>).")
@click.option("--resume", is_flag=True, help="Continue the stage killed in --out (same options).")
@click.option("--train-subset", type=int, help="Fine-tune on only N training images (as train and prune).")
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
@click.option("--distill", is_flag=True, help="binaryconnect/qat: fine-tune with distillation from the float "
              "source model (or give --teacher CKPT).")
@distill_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any training config key.")
def quantize(checkpoint, method, bits_w, bits_a, first_last_bits, layer_bits, fold, epochs, keep_first_last,
                     scale, stochastic, calib_images, dataset, data_dir, out, resume, train_subset, threads, distill,
                     sets, **flags):
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
    s = quantize_checkpoint(checkpoint, method, bits_w=bits_w, bits_a=bits_a, epochs=epochs,
                            keep_first_last=keep_first_last, first_last_bits=first_last_bits, scale=scale,
                            stochastic=stochastic, data_dir=data_dir, dataset=dataset, out=out, sets=list(sets),
                            calib_images=calib_images, console=c, resume=resume, distill=distill,
                            layer_bits=layer_bits, fold=fold, train_subset=train_subset, threads=threads, **flags)
    change = "" if s["accuracy_change"] is None else f", change {100 * s['accuracy_change']:+.2f} points"
    c.print(f"{method}: test accuracy {pct(s['test_accuracy'])} (float "
            f"{pct(s['reference_test_accuracy'])}{change})  "
            f"bits w/a {s['bits_w']:.3g}/{s['bits_a']:.3g}  score {s['score']:.4f}  -> {s['checkpoint']}")
