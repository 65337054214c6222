"""Writes the compatibility files under tests/data/compat with the edlab of the commit that made them (the
commit is in made_by.json). They are what a user's disk holds before a refactor: a training run killed after
epoch 1 (resume state) beside the uninterrupted run's model, a pruned checkpoint, a QAT checkpoint and its
packed file, an int8 ONNX file and a finished study folder. expected.json records what today's code reads from
them; tests/test_compat.py checks that later code reads the same. Run once, from the repository root:

    .venv/bin/python tests/data/compat/make.py

Not part of the suite: re-running it after a change would make the check compare the new code with itself.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EDLAB = [sys.executable, "-m", "edlab.cli"]
TRAIN = """model: {name: resnet20, width: 0.25}
data: {dataset: synthetic, val_size: 128, train_subset: 256, batch_size: 64, mixup: 0.2}
optim: {lr: 0.05}
epochs: 2
ema: 0.9
precision: fp32
threads: 1
seed: 3
"""
STUDY = """name: compat-grid
config: train.yaml
set: {epochs: 1}
grid:
  optim.lr: [0.05, 0.1]
test: chosen
pack: true
"""


def cli(*args: str) -> None:
    subprocess.run([*EDLAB, *map(str, args)], check=True, cwd=HERE)


def killed_after_first_epoch(out: Path) -> None:
    """The run as `edlab train train.yaml --out train-killed` leaves it when killed once epoch 1 is saved."""
    from edlab.config import load_train_config, to_yaml
    from edlab.runs import Run
    from edlab.train import data_from_config, fit, model_from_config

    cfg = load_train_config(str(HERE / "train.yaml"), None, [f"out={out}"])
    torch.set_num_threads(cfg.threads)  # as `edlab train` does: the sums' order, so the weights, depend on it
    run = Run.create("cut", cfg.out)
    run.write_text("config.yaml", to_yaml(cfg))
    data = data_from_config(cfg, torch.device("cpu"))

    class Killed(Exception):
        pass

    def die(row):
        if row["epoch"] == 1:
            raise Killed

    try:
        fit(model_from_config(cfg, data.num_classes), data, cfg, run, on_epoch=die)
    except Killed:
        pass


def main() -> None:
    for p in HERE.iterdir():
        if p.name not in {"make.py"}:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (HERE / "train.yaml").write_text(TRAIN)
    (HERE / "study.yaml").write_text(STUDY)
    cli("train", "train.yaml", "--out", "train-full")
    killed_after_first_epoch(HERE / "train-killed")
    cli("prune", "train-full/model.ckpt", "--structured", "0.3", "--unstructured", "0.2", "--finetune-epochs", "1",
          "--out", "pruned")
    cli("quantize", "pruned/model.ckpt", "--method", "qat", "--bits-w", "4", "--bits-a", "4",
          "--first-last-bits", "8", "--fold-bn", "--epochs", "1", "--out", "qat")
    cli("pack", "qat/model.ckpt", "--out", "qat.pack")
    cli("export", "train-full/model.ckpt", "--int8", "--calib-images", "128", "--out", "int8.onnx")
    cli("sweep", "study.yaml", "--out", "study")
    finished = [HERE / d / "resume.pt" for d in ["train-full", "pruned", "qat"]]
    for p in [*HERE.rglob("tb"), *HERE.rglob("*lock"), *finished]:
        if p.exists():  # logs, locks and finished runs' state: nothing reads them back
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    import edlab as lib

    x = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=x)
    expected = {}
    for name in ["train-full/model.ckpt", "pruned/model.ckpt", "qat/model.ckpt", "qat.pack", "int8.onnx",
                 "study/winner.pack"]:
        model = lib.load_model(str(HERE / name))
        with torch.no_grad():
            logits = model(images)
        prof = lib.score_file(str(HERE / name))
        expected[name] = {"logits": logits.float().tolist()} | {
            key: getattr(prof, key)
            for key in ["score", "params", "nonzero_params", "macs", "bits_w", "bits_a", "ps", "pu", "views"]}
    expected["study/study.json"] = json.loads((HERE / "study" / "study.json").read_text())
    torch.save(images, HERE / "images.pt")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    (HERE / "made_by.json").write_text(json.dumps({"commit": commit, "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
