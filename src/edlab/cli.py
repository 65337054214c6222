"""The ``edlab`` command line: a thin layer over the library. Every command turns an EdlabError (bad
input, missing file, invalid config) into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from .errors import EdlabError

# CLI flag -> config key: the common options as flags (like timm's train.py), the rest via --set.
TRAIN_FLAGS = {
    "model": "model.name", "dataset": "data.dataset", "data_dir": "data.data_dir",
    "train_subset": "data.train_subset", "epochs": "epochs", "batch_size": "data.batch_size",
    "optimizer": "optim.name", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "scheduler": "sched.name", "augment": "data.augment", "seed": "seed", "out": "out", "device": "device",
    "precision": "precision", "threads": "threads", "tracker": "tracker",
}


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _flags_to_tree(values: dict, mapping: dict) -> dict:
    from .config import _set_dotted

    tree: dict = {}
    for flag, key in mapping.items():
        if values.get(flag) is not None:
            _set_dotted(tree, key, values[flag])
    return tree


def load_model_arg(target: str):
    """A checkpoint path or a registered model name -> nn.Module."""
    from .checkpoint import load_checkpoint
    from .models import create_model, list_models

    if Path(target).exists() or target.endswith(".ckpt"):
        return load_checkpoint(target)
    if target in list_models():
        return create_model(target)
    raise EdlabError(f"'{target}' is neither a checkpoint file nor a model (models: {', '.join(list_models())})")


# Stage commands that live beside their stage (one module per stage): name -> "module:attribute".
# A new stage is its module plus one entry here; modules are imported only when their command runs.
STAGE_COMMANDS: dict[str, str] = {
    "prune": "edlab.prune:prune_command",
    "bench": "edlab.bench:bench_command",
    "quantize": "edlab.quantize:quantize_command",
    "export": "edlab.export:export_command",
    "report": "edlab.report:report_command",
    "sweep": "edlab.study:sweep_command",
}


def _stage_available(target: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(target.split(":")[0]) is not None


class Group(click.Group):
    def list_commands(self, ctx):
        extra = [n for n, t in STAGE_COMMANDS.items() if _stage_available(t)]
        return sorted(set(super().list_commands(ctx)) | set(extra))

    def get_command(self, ctx, name):
        if name in STAGE_COMMANDS and _stage_available(STAGE_COMMANDS[name]):
            import importlib

            module, attr = STAGE_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdlabError as e:
            click.echo(f"edlab: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("edlab: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edlab")
def cli():
    """edlab: train, compress, score and compare ResNets on CIFAR.

    \b
    Quick start:
      edlab train --model resnet20 --epochs 30            # CIFAR-10 from $EDLAB_DATA_DIR or ./data
      edlab score runs/resnet20-*/model.ckpt              # the course score, counted from the model
    """
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Registered model name (see `edlab models`).")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "synthetic"]))
@click.option("--data-dir", help="Folder holding cifar-10-batches-py/ (else $EDLAB_DATA_DIR, else ./data).")
@click.option("--train-subset", type=int, help="Train on only N images (quick runs).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--scheduler", type=click.Choice(["none", "cosine", "onecycle", "step", "plateau"]))
@click.option("--augment", type=click.Choice(["none", "crop-flip", "scale-rotate", "fancy"]))
@click.option("--seed", type=int)
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
@click.option("--tracker", type=click.Choice(["tensorboard", "wandb", "mlflow"]),
              help="Also log to W&B or MLflow (TensorBoard always); needs pip install edlab[wandb] / edlab[mlflow].")
@click.option("--out", help="Run directory (default runs/<name>-<timestamp>).")
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
      WANDB_MODE=offline edlab train cfg.yaml --tracker wandb
    """
    from .config import load_train_config
    from .train import train as run_train

    if resume and not flags.get("out"):
        raise EdlabError("--resume needs --out RUN_DIR: the run to continue")
    cfg = load_train_config(config, _flags_to_tree(flags, TRAIN_FLAGS), list(sets))
    console = _console()
    _, s = run_train(cfg, resume=resume, console=console)
    if s is None:  # a torchrun rank other than 0: rank 0 reports
        return
    console.print(f"test accuracy {100 * s['test_accuracy']:.2f}%  (best val {100 * s['best_val_accuracy']:.2f}%"
                  f" @ epoch {s['best_epoch']})  params {s['params']:,}  MACs {s['macs']:,}  "
                  f"score {s['score']:.4f}  {s['seconds'] / 60:.1f} min  -> {s['run_dir']}")


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "synthetic"]),
              help="Default: the dataset the checkpoint was trained on.")
@click.option("--data-dir")
@click.option("--half", is_flag=True, help="Evaluate in half precision (fp16 on CUDA, bf16 on CPU).")
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", type=click.Choice(["none", "flip", "flip-shift", "airbench", "trained"]), default="trained",
              show_default=True, help="Test-time views averaged; 'trained' = what the run that made it used.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, dataset, data_dir, half, batch_size, device, tta, as_json):
    """Re-measure test accuracy of a checkpoint.

    \b
    Example:
      edlab eval runs/resnet20-20261125-120000/model.ckpt --half
      edlab eval model.ckpt --tta flip      # average the logits of each image and its mirror
    """
    import torch

    from .checkpoint import load_checkpoint
    from .data import get_data
    from .train import evaluate, resolve_device

    model = load_checkpoint(checkpoint)
    cfg = getattr(model, "edlab_metadata", {}).get("config", {})
    dataset = dataset or cfg.get("data", {}).get("dataset", "cifar10")
    dev = resolve_device(device)
    data = get_data(dataset, data_dir or cfg.get("data", {}).get("data_dir"), batch_size=batch_size,
                    val_size=0, eval_batch_size=batch_size, device=dev)
    model.to(dev)
    precision = "fp32"
    if half:
        dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        model.to(dtype)
        precision = str(dtype).replace("torch.", "")
    if tta == "trained":
        tta = cfg.get("tta", "none")
    r = evaluate(model, data.test, tta=tta)
    out = {"checkpoint": checkpoint, "dataset": dataset, "precision": precision, "tta": tta,
           "test_accuracy": r["accuracy"], "test_loss": r["loss"], "images": len(data.test.split)}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"{dataset} test accuracy {100 * r['accuracy']:.2f}%  loss {r['loss']:.4f}  "
                   f"({precision}, {out['images']} images" + (f", tta {tta})" if tta != "none" else ")"))


@cli.command()
@click.argument("target")
@click.option("--rules", type=click.Choice(["course", "micronet"]), default="course", show_default=True)
@click.option("--input-size", default="3,32,32", show_default=True, help="C,H,W of one input image.")
@click.option("--bits-w", type=int, help="What-if: pretend every layer's weights have this many bits.")
@click.option("--bits-a", type=int, help="What-if: pretend activations have this many bits.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def score(target, rules, input_size, bits_w, bits_a, as_json):
    """The course score of a checkpoint or zoo model, counted layer by layer from the model itself.

    \b
    Examples:
      edlab score resnet18                       # 3.9790 in fp32
      edlab score runs/r20/model.ckpt --json
      edlab score resnet20 --bits-w 8 --bits-a 8  # what-if estimate
    """
    from .score import profile, render

    model = load_model_arg(target)
    size = _parse_size(input_size)
    p = profile(model, input_size=size, rules=rules, bits_w=bits_w, bits_a=bits_a)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        render(p, _console())


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise EdlabError(f"--input-size expects C,H,W (e.g. 3,32,32), got '{text}'")
    return size


@cli.command()
@click.argument("target")
@click.option("--input-size", default="3,32,32", show_default=True)
def info(target, input_size):
    """Parameters and MACs per layer of a zoo model or checkpoint.

    \b
    Examples:
      edlab info resnet20
      edlab info runs/r20/model.ckpt
    """
    from .score import profile, render

    render(profile(load_model_arg(target), input_size=_parse_size(input_size)), _console())


@cli.command()
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
    import importlib.util
    import time
    from pathlib import Path

    import yaml

    from .data import load_splits
    from .pipeline import run_pipeline
    from .report import build_report

    console = _console()
    root = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if root.exists() and any(root.iterdir()) and not (root / "pipeline.json").exists():
        raise EdlabError(f"{root} exists and is not an earlier demo; choose another --out")
    dataset = "cifar10"
    try:
        load_splits("cifar10", data_dir)
    except EdlabError as e:
        console.print(f"CIFAR-10 unavailable ({e}); running the same pipeline on the synthetic dataset.")
        dataset = "synthetic"
    train = {"model": model, "dataset": dataset, "epochs": epochs, "train-subset": train_subset,
             "sched.warmup_epochs": 0, **({"data-dir": data_dir} if data_dir else {}),
             **({"data.val_size": 400} if dataset == "synthetic" else {})}
    int8 = importlib.util.find_spec("onnxruntime") is not None
    stages = [{"train": train},
              {"prune": {"structured": 0.3, "unstructured": 0.2, "finetune-epochs": 1, "train-subset": train_subset}},
              {"quantize": {"method": "int8", "calib-images": 512} if int8 else {"method": "bf16"}},
              {"score": {}}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump({"name": "demo", "stages": stages}, sort_keys=False))
    r = run_pipeline(str(root / "recipe.yaml"), out=str(root), echo=console.print)
    report = build_report([root], root / "report", title=f"edlab demo: {model} on {dataset}")
    console.print(f"[bold]demo[/bold] {model} on {dataset}:")
    for st in r["stages"]:
        s = st.get("summary") or {}
        if "test_accuracy" in s and st["name"] != "score":
            console.print(f"  {st['name']:<9} test accuracy {100 * s['test_accuracy']:6.2f}%  params "
                          f"{s.get('params', 0):>9,}  MACs {s.get('macs', 0):>12,}  score {s.get('score', 0):.4f}")
    console.print(f"report: {report['out'] / 'index.html'}")


@cli.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", help="Pipeline directory (default: the recipe's out:, else runs/<name>-<timestamp>).")
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Edit a stage's option: prune.structured=0.5, 0.epochs=3, train.optim.lr=0.05.")
def run_recipe(recipe, out, sets):
    """Run a pipeline recipe: a list of stages (train, prune, quantize, score, ...), one run directory each.

    Running it again with the same --out continues where it stopped.

    \b
    Examples:
      edlab run recipes/r20-compress.yaml --out runs/r20-compress
      edlab run recipes/r20-compress.yaml --set prune.structured=0.5 --set train.epochs=3
    """
    from .pipeline import run_pipeline

    console = _console()
    r = run_pipeline(recipe, list(sets), out, echo=console.print)
    console.print(f"pipeline {r['name']}: {len(r['stages'])} stages done -> {r['dir']}/pipeline.json")


@cli.command()
def models():
    """List the registered models with their parameter counts (10 classes)."""
    from .models import create_model, list_models

    for name in list_models():
        m = create_model(name)
        click.echo(f"{name:<18} {sum(p.numel() for p in m.parameters()):>12,} params")


@cli.command("lr-find")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "synthetic"]))
@click.option("--data-dir")
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--start", type=float, default=1e-6, show_default=True)
@click.option("--end", type=float, default=10.0, show_default=True)
@click.option("--plot", "plot_path", default="lr_find.png", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
def lr_find(config, steps, start, end, plot_path, sets, **flags):
    """Learning-rate range test: saves a loss-vs-lr plot and suggests a starting lr.

    \b
    Example:
      edlab lr-find --model resnet20 --optimizer sgd --steps 100 --plot lr.png
    """
    from .config import load_train_config
    from .lr_find import lr_range_test, plot
    from .train import data_from_config, model_from_config, resolve_device

    if not 0 < start < end:
        raise EdlabError(f"--start must be > 0 and below --end (got {start}, {end})")
    cfg = load_train_config(config, _flags_to_tree(flags, TRAIN_FLAGS), list(sets))
    device = resolve_device(cfg.device)
    data = data_from_config(cfg, device)
    model = model_from_config(cfg, data.num_classes)
    r = lr_range_test(model, data, cfg, start, end, steps)
    plot(r, plot_path)
    click.echo(f"suggested lr {r['suggested_lr']:.3g} ({len(r['lrs'])} steps, plot: {plot_path})")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"edlab: warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    cli(prog_name="edlab")


if __name__ == "__main__":
    main()
