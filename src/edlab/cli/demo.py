"""edlab demo -> edlab.pipeline.demo."""

import click

from ._common import console


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--train-subset", type=int, default=10000, show_default=True,
              help="Training images used (of the 45,000 left after the validation split).")
@click.option("--data-dir")
@click.option("--out", help="Run directory (default runs/demo-<timestamp>).")
def demo(model, epochs, train_subset, data_dir, out):
    """The whole workflow on a small model: train, prune, quantize, score, report — one pipeline.

    Trains MODEL briefly, removes 30 % of its parameters as channels and zeroes 20 % more (fine-tuning
    after each), quantizes it to int8 with ONNX Runtime (bf16 without the onnx extra), scores it, and
    writes an HTML report beside the stages. Without CIFAR-10 (not found and not downloadable) it says so
    in one line and runs the same pipeline on the synthetic dataset.

    \b
    Example:
      EDLAB_DATA_DIR=~/.cache/cifar10 edlab demo --epochs 2 --out runs/demo
    """
    from ..pipeline import demo as run_demo

    c = console()
    r = run_demo(model, epochs, train_subset, data_dir, out, echo=c.print)
    c.print(f"[bold]demo[/bold] {model} on {r['dataset']}:")
    for st in r["stages"]:
        s = st.get("summary") or {}
        if "test_accuracy" in s and st["name"] != "score":
            c.print(f"  {st['name']:<9} test accuracy {100 * s['test_accuracy']:6.2f}%  params "
                    f"{s.get('params', 0):>9,}  MACs {s.get('macs', 0):>12,}  score {s.get('score', 0):.4f}")
    c.print(f"report: {r['report']}")
