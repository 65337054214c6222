"""The ``edlab`` command line: a thin layer over the library. Every command turns an EdlabError (bad
input, missing file, invalid config) into one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import json
import sys
import warnings
from pathlib import Path

import click

from .errors import EdlabError

# The distillation flags of every training stage (train, prune, quantize): flag -> config key.
DISTILL_FLAGS = {"teacher": "distill.teacher", "temperature": "distill.temperature", "alpha": "distill.alpha"}


def distill_options(f):
    """Add --teacher/--temperature/--alpha to a command (values land in ``**flags``; see DISTILL_FLAGS)."""
    f = click.option("--alpha", type=float, help="Distillation: weight of the teacher's soft term (default "
                     "0.9; the label loss gets 1 - alpha).")(f)
    f = click.option("--temperature", type=float, help="Distillation: softmax temperature T (default 4).")(f)
    return click.option("--teacher", metavar="CKPT", help="Distil from this checkpoint's logits "
                        "(distill.teacher), computed on the student's augmented batches.")(f)

TTA_NAMES = ("none", "flip", "flip-shift", "airbench")  # edlab.train.TTA_VIEWS (not imported here: the CLI starts fast)

# CLI flag -> config key: the common options as flags (like timm's train.py), the rest via --set.
TRAIN_FLAGS = {
    "model": "model.name", "dataset": "data.dataset", "data_dir": "data.data_dir",
    "train_subset": "data.train_subset", "epochs": "epochs", "batch_size": "data.batch_size",
    "optimizer": "optim.name", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "scheduler": "sched.name", "augment": "data.augment", "seed": "seed", "out": "out", "device": "device",
    "precision": "precision", "threads": "threads", "tracker": "tracker", **DISTILL_FLAGS,
}


# OSErrors that describe the machine, not a bug: reported in one line (every write is atomic, so the
# files written before the failure are whole).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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


RUN_MODEL_FILES = ("model.ckpt", "model.int8.onnx", "model.onnx", "model.pack")  # what a run folder holds


def resolve_model_path(target: str) -> str:
    """A run folder -> the model file in it (a stage writes model.ckpt, the int8 stage model.int8.onnx);
    anything else unchanged. So `edlab score runs/latest` works."""
    p = Path(target)
    if not p.is_dir():
        return target
    for name in RUN_MODEL_FILES:
        if (p / name).is_file():
            return str(p / name)
    raise EdlabError(f"{target} is a folder without a model file ({', '.join(RUN_MODEL_FILES)}): give a run "
                     f"folder or a checkpoint")


def load_model_arg(target: str):
    """A checkpoint, packed file or .onnx path, a run folder, or a registered model name -> nn.Module."""
    from .checkpoint import load_checkpoint
    from .models import create_model, list_models

    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        from .onnx_model import OrtModule

        return OrtModule(target)
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
        except OSError as e:  # the machine's answer (disk full, read-only, no permission): one line, exit 2
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(f"edlab: error: {e.strerror or e}{where}; files written before are intact", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edlab")
def cli():
    """edlab: train, compress, score and compare ResNets on CIFAR.

    \b
    Quick start:
      edlab train --model resnet20 --epochs 30            # CIFAR-10 from $EDLAB_DATA_DIR or ./data
      edlab score runs/latest/model.ckpt                  # the course score of the newest run
    """
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


@cli.command()
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
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
    from .config import load_train_config
    from .train import pct
    from .train import train as run_train

    if resume and not flags.get("out"):
        raise EdlabError("--resume needs --out RUN_DIR: the run to continue")
    cfg = load_train_config(config, _flags_to_tree(flags, TRAIN_FLAGS), list(sets))
    console = _console()
    _, s = run_train(cfg, resume=resume, console=console)
    if s is None:  # a torchrun rank other than 0: rank 0 reports
        return
    console.print(f"test accuracy {pct(s['test_accuracy'])}  (best val {100 * s['best_val_accuracy']:.2f}%"
                  f" @ epoch {s['best_epoch']})  params {s['params']:,}  MACs {s['macs']:,}  "
                  f"score {s['score']:.4f}  {s['seconds'] / 60:.1f} min  -> {s['run_dir']}")


@cli.command("eval")
@click.argument("checkpoint")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "synthetic"]),
              help="Default: the dataset the checkpoint was trained on.")
@click.option("--data-dir")
@click.option("--half", is_flag=True, help="Evaluate in half precision (fp16 on CUDA, bf16 on CPU).")
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", type=click.Choice([*TTA_NAMES, "trained"]), default="trained",
              show_default=True, help="Test-time views averaged; 'trained' = what the run that made it used.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, dataset, data_dir, half, batch_size, device, tta, as_json):
    """Re-measure test accuracy of a checkpoint.

    \b
    Example:
      edlab eval runs/resnet20-20261125-120000/model.ckpt --half
      edlab eval runs/latest                # a run folder: its model.ckpt (or model.int8.onnx)
      edlab eval model.ckpt --tta flip      # average the logits of each image and its mirror
      edlab eval model.int8.onnx            # through ONNX Runtime
    """
    import torch

    from .checkpoint import load_checkpoint, trained_with
    from .data import get_data
    from .train import TTA_VIEWS, evaluate, resolve_device

    checkpoint = resolve_model_path(checkpoint)
    onnx = checkpoint.endswith(".onnx")
    model = load_model_arg(checkpoint) if onnx else load_checkpoint(checkpoint)
    meta = model.edlab_metadata if isinstance(getattr(model, "edlab_metadata", None), dict) else {}
    trained = trained_with(model)  # checked metadata: never a folder to create or a download to try
    recorded = meta.get("dataset") if meta.get("dataset") in ("cifar10", "cifar100", "synthetic") else None
    dataset = dataset or recorded or trained["dataset"] or "cifar10"
    dev = resolve_device("cpu" if onnx else device)  # ONNX Runtime runs here on the CPU
    if onnx and half:
        raise EdlabError("--half applies to checkpoints; an ONNX file runs in the precision it was exported in")
    data = get_data(dataset, data_dir or trained["data_dir"], batch_size=batch_size, val_size=0,
                    eval_batch_size=batch_size, device=dev, download=False)
    model.to(dev)
    precision = "fp32"
    if half:
        dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        model.to(dtype)
        precision = str(dtype).replace("torch.", "")
    if tta == "trained":
        inference = meta.get("inference") if isinstance(meta.get("inference"), dict) else {}
        tta = inference.get("tta") if inference.get("tta") in TTA_VIEWS else trained["tta"]
    if not as_json:  # --json output is for scripts: no progress chatter
        click.echo(f"evaluating {len(data.test.split):,} test images x {TTA_VIEWS[tta]} view(s) on {dev}", err=True)
    r = evaluate(model, data.test, tta=tta)
    if onnx:
        precision = (model.edlab_metadata.get("inference") or {}).get("precision", "fp32") + " (ONNX Runtime)"
    out = {"checkpoint": checkpoint, "dataset": dataset, "precision": precision, "tta": tta,
           "views": TTA_VIEWS[tta],
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
@click.option("--tta", type=click.Choice(["recorded", *TTA_NAMES]), default="recorded", show_default=True,
              help="Test-time views charged (f = views x MACs); recorded = those the checkpoint's accuracy used.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def score(target, rules, input_size, bits_w, bits_a, tta, as_json):
    """The course score of a checkpoint or zoo model, counted layer by layer from the model itself.

    A score describes the inference that produced the accuracy printed beside it: a checkpoint evaluated
    with test-time views (tta flip-shift: 6 forward passes per image) is charged 6x its MACs.

    \b
    Examples:
      edlab score resnet18                       # 3.9790 in fp32
      edlab score runs/r20/model.ckpt --json
      edlab score runs/r20/model.ckpt --tta none  # the same weights run on one view per image
      edlab score resnet20 --bits-w 8 --bits-a 8  # what-if estimate
    """
    from .score import profile, render
    from .train import TTA_VIEWS

    size = _parse_size(input_size)
    views = None if tta == "recorded" else TTA_VIEWS[tta]
    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        if rules != "course" or bits_w or bits_a:
            raise EdlabError("an ONNX file is scored as it is, under the course rules (no --rules/--bits-*)")
        from .onnx_model import onnx_profile

        p = onnx_profile(target, views=views)
    else:
        p = profile(load_model_arg(target), input_size=size, rules=rules, bits_w=bits_w, bits_a=bits_a, views=views)
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
@click.option("--layers", is_flag=True, help="Also print the per-layer score table (edlab score).")
def info(target, input_size, layers):
    """The story of a checkpoint, packed or ONNX file: architecture, data and split, accuracy and the views
    it was measured with, the stages it went through, its score and training config. For a zoo model name:
    its size.

    \b
    Examples:
      edlab info runs/r20/model.ckpt
      edlab info r20-qat4.pack --layers
      edlab info resnet20
    """
    from .score import profile, render

    size = _parse_size(input_size)
    console = _console()
    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        from .onnx_model import onnx_profile

        p = onnx_profile(target)
        meta = load_model_arg(target).edlab_metadata
        kind = "ONNX file (ONNX Runtime)"
    else:
        model = load_model_arg(target)
        p = profile(model, input_size=size)
        meta = getattr(model, "edlab_metadata", None) or {"config": {"model": {"name": target}}}
        kind = "packed file" if getattr(model, "edlab_packed", False) else \
            "checkpoint" if Path(target).exists() else "zoo model (fresh weights)"
    for line in story_lines(target, kind, meta, p):
        console.print(line)
    if layers:
        render(p, console)


def story_lines(target: str, kind: str, meta: dict, p) -> list[str]:
    """What `edlab info` prints: the file's history in a few lines, from its recorded metadata."""
    from .checkpoint import stage_history

    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    size = f", {Path(target).stat().st_size:,} bytes" if Path(target).is_file() else ""
    m, d = cfg.get("model") or {}, cfg.get("data") or {}
    lines = [f"[bold]{target}[/bold]: {kind}{size}"]
    arch = m.get("name") or "-"
    if m:
        arch += f" (width {m.get('width', 1)}, conv {m.get('conv', 'standard')})"
    lines.append(f"architecture: {arch}; {p.params:,} parameters counted ({p.nonzero_params:,} nonzero), "
                 f"{p.macs:,} MACs per forward pass")
    if d:
        split = d.get("split_seed", cfg.get("seed"))
        lines.append(f"data: {d.get('dataset', '-')}, validation split {d.get('val_size', '-')} training images "
                     f"(split_seed {split})" + (f", trained on {d['train_subset']:,} images" if d.get("train_subset")
                                                else ""))
    inference = meta.get("inference") or {}
    acc = [f"{k} {100 * meta[k + '_accuracy']:.2f} %" for k in ("test", "val")
           if isinstance(meta.get(k + "_accuracy"), (int, float))]
    if acc or inference:
        how = f"tta {inference.get('tta', cfg.get('tta', 'none'))} ({p.views} view{'s' * (p.views > 1)} per image)"
        how += f", {inference['precision']}" if inference.get("precision") else ""
        lines.append(f"accuracy: {', '.join(acc) or 'not recorded'}; measured with {how}")
    stages = stage_history(meta)
    if stages:
        def one(s: dict) -> str:
            extra = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                              if k not in ("stage", "test_accuracy", "views") and v not in (None, 0, False))
            return s.get("stage", "?") + (f" ({extra})" if extra else "")
        lines.append("stages: " + " -> ".join(one(s) for s in stages))
    lines.append(f"score {p.score:.4f} = params term {p.score_params_term:.4f} + ops term {p.score_ops_term:.4f} "
                 f"({p.rules} rules; bits w/a {p.bits_w:.3g}/{p.bits_a:.3g}; ps {p.ps:.3f}, pu {p.pu:.3f}"
                 + (f"; f charged {p.views}x: {p.views} views per image" if p.views > 1 else "") + ")")
    if cfg.get("epochs") is not None:
        o, sch = cfg.get("optim") or {}, cfg.get("sched") or {}
        lines.append(f"training config: {cfg.get('epochs')} epochs, {o.get('name')} lr {o.get('lr')} wd "
                     f"{o.get('weight_decay')}, {sch.get('name')} schedule, batch {d.get('batch_size')}, augment "
                     f"{d.get('augment')}, seed {cfg.get('seed')}" + (f", ema {cfg['ema']}" if cfg.get("ema") else ""))
    return lines


@cli.command()
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The packed file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def pack(checkpoint, out, as_json):
    """Write a deployment file that holds what the score counts, and nothing else.

    k-bit weights as packed integers with their steps, binary weights as bits, pruned weights as a bitmask
    plus the nonzeros, BN folded to its scale and shift, the rest in the dtype the score charges. edlab
    eval, score, bench and info (and edlab.load_checkpoint) read it and give the outputs of the checkpoint.

    \b
    Example:
      edlab pack runs/r20-qat4/model.ckpt --out r20-qat4.pack
      edlab score r20-qat4.pack && edlab eval r20-qat4.pack
    """
    from .pack import pack as pack_file

    checkpoint = resolve_model_path(checkpoint)
    if checkpoint.endswith(".onnx"):
        raise EdlabError("edlab pack packs an edlab checkpoint; an .onnx file is already a deployment file")
    r = pack_file(checkpoint, out)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    parts = " + ".join(f"{k} {r[k]:,}" for k in ("header", "weights", "values", "other") if r.get(k))
    counted = r["counted"]
    click.echo(f"packed {checkpoint} -> {r['out']}: {r['file']:,} bytes = {parts}" +
               (f" + mask {r['mask']:,}" if r.get("mask") else ""))
    body = r["file"] - r["header"] - r.get("mask", 0)
    click.echo(f"the score's parameter term counts {counted:,.0f} bytes (nonzero entries x bits / 8); the file "
               f"holds {body:,} bytes of tensors ({100 * (body / counted - 1):+.1f} %) besides its header" +
               (" and the bitmask of pruned positions, which the course rules do not charge" if r.get("mask")
                else ""))


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
@click.argument("recipe", type=click.Path())  # a folder: one line from the reader
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
@click.argument("config", required=False, type=click.Path())  # a folder: one line from the reader
@click.option("--model")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "synthetic"]))
@click.option("--data-dir")
@click.option("--batch-size", type=int)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--train-subset", type=int, help="Draw batches from only N training images.")
@click.option("--threads", type=int, help="CPU threads (default: all cores; 1 on a busy shared machine).")
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
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = data_from_config(cfg, device)
    model = model_from_config(cfg, data.num_classes)
    r = lr_range_test(model, data, cfg, start, end, steps, progress=lambda m: click.echo(m, err=True))
    plot(r, plot_path)
    click.echo(f"suggested lr {r['suggested_lr']:.3g} ({len(r['lrs'])} steps, plot: {plot_path})")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"edlab: warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line_warning
    cli(prog_name="edlab")


if __name__ == "__main__":
    main()
