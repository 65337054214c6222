"""edlab export -> edlab.export.export_checkpoint."""

import click

from ._common import DATASETS


@click.command("export")
@click.argument("checkpoint", type=click.Path())  # a folder: one line from read_checkpoint
@click.option("--format", "fmt", default="onnx", show_default=True, help="Export format (onnx).")
@click.option("--int8", is_flag=True, help="Post-training static int8 (ONNX Runtime), calibrated on training images.")
@click.option("--calib-images", type=int, default=1024, show_default=True)
@click.option("--quant-format", default="qoperator", show_default=True, help="int8 graph: qoperator or qdq.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="int8 weight scales.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights, for CPUs without VNNI only.")
@click.option("--out", help="Output .onnx file, or a folder for model[.int8].onnx (default: next to the "
              "checkpoint, .onnx / .int8.onnx).")
@click.option("--dataset", type=click.Choice(DATASETS),
              help="Calibration and evaluation data (default: the checkpoint's).")
@click.option("--data-dir")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Measure test accuracy of the exported model with ONNX Runtime.")
@click.option("--threads", type=int, default=1, show_default=True, help="ONNX Runtime threads for --eval.")
def export(checkpoint, fmt, int8, calib_images, quant_format, per_channel, reduce_range, out, dataset,
                   data_dir, do_eval, threads):
    """Export a checkpoint to ONNX (optionally int8) and measure its accuracy under ONNX Runtime.

    \b
    Examples:
      edlab export runs/r20/model.ckpt --format onnx
      edlab export runs/r20/model.ckpt --int8 --calib-images 2048 --out r20.int8.onnx
      edlab export runs/r20/model.ckpt --int8 --quant-format qdq --no-eval --dataset cifar10
    """
    from ..export import export_checkpoint

    r = export_checkpoint(checkpoint, fmt, int8, calib_images, quant_format, per_channel, reduce_range, out, dataset,
                          data_dir, do_eval, threads)
    line = f"wrote {r['path']} ({r['bytes'] / 1024:.0f} KiB)"
    if do_eval:
        line += f"  ONNX Runtime test accuracy {100 * r['test_accuracy']:.2f}% ({r['images']} images)"
    click.echo(line)
