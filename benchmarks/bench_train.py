"""Training images/s of edlab's training path vs a plain hand-written PyTorch loop, same model and SGD.

Why: edlab's claim is that its path (device-resident uint8 data with batched augmentation, bf16
autocast + channels_last where the CPU has native bf16 kernels, all inside ``edlab.train.fit``) trains
faster than the loop most CIFAR code uses (torchvision DataLoader with PIL crop-flip in workers, fp32,
NCHW). Both run here in the same process and run, on the same training images, from the same initial
weights, so the ratio holds even when the machine is busy.

Throughput: K timed steps after W warm-up steps. A step counts from the moment its batch is ready to
the moment the next batch is ready, so the time includes augmentation, forward, backward and the
optimizer on both sides. edlab is timed inside ``fit`` itself (a loader that stamps each batch);
``--accuracy-epochs N`` also trains both for N epochs on ``--train-subset`` images and reports their
validation accuracy, to check that bf16 does not cost accuracy.

    python benchmarks/bench_train.py --data-dir /root/.cache/cifar10 [--models resnet20,resnet18]
        [--steps K] [--accuracy-epochs N --train-subset M] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_augment import baseline_loader, forever, load_data, machine  # the sibling script

from edlab.config import TrainConfig, load_train_config
from edlab.data import Data, Loader
from edlab.device import resolve_channels_last, resolve_precision
from edlab.evaluation import evaluate
from edlab.models import create_model
from edlab.train import fit

# resnet18 takes seconds a step on a 2-core CPU (~15 min an epoch): a few steps give its rate
DEFAULT_STEPS = {"resnet20": 40, "resnet18": 6}


class Enough(Exception):
    """Raised by StampedLoader once the timed steps are done: it ends ``fit`` mid-epoch."""


class StampedLoader(Loader):
    """edlab's training Loader, unchanged except that it notes the time each batch is handed out."""

    def __init__(self, base: Loader, batches: int):
        super().__init__(base.split, base.batch_size, base.augment, train=True, seed=base.seed)
        self.batches, self.stamps = batches, []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in super().__iter__():
            _sync(self.device)  # the GPU is asynchronous: a stamp counts once its queue is done
            self.stamps.append(time.perf_counter())
            if len(self.stamps) > self.batches:
                raise Enough
            yield batch


def edlab_config(model: str, data_dir: str | None, batch_size: int, epochs: int,
                 train_subset: int | None) -> TrainConfig:
    """edlab's default recipe (SGD 0.1, momentum 0.9, nesterov, wd 5e-4, cosine, precision auto).

    Weight decay goes on every parameter, as in the plain loop, so that an accuracy difference can only
    come from the training path (bf16, channels_last, augmentation), not from the recipe.
    """
    flags = {"model": {"name": model}, "epochs": epochs, "precision": "auto",
             "data": {"data_dir": data_dir, "batch_size": batch_size, "train_subset": train_subset,
                      "download": False},
             "optim": {"no_decay_bn_bias": False}}
    return load_train_config(None, flags)


def fresh_model(name: str, seed: int) -> nn.Module:
    """The same initial weights for both sides."""
    torch.manual_seed(seed)
    return create_model(name, 10)


def plain_sgd(model: nn.Module, cfg: TrainConfig, steps_total: int):
    """SGD with edlab's hyper-parameters and a per-step cosine schedule, the way a plain script does it."""
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_total))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_steps(model: nn.Module, data: Data, cfg: TrainConfig, workers: int, steps: int, warmup: int,
                epochs: int | None = None, device: torch.device = torch.device("cpu")) -> float:
    """The plain loop: PIL crop-flip DataLoader, fp32, NCHW. Returns images/s over the timed steps.

    With ``epochs`` it instead trains that many whole epochs and returns images/s over all of them.
    On a GPU it does what a plain script does there: pinned host batches copied to the device each step.
    """
    loader = baseline_loader(data, cfg.data.augment, cfg.data.batch_size, workers, pin=device.type == "cuda")
    model.to(device)
    total = epochs * len(loader) if epochs else warmup + steps
    opt, sched = plain_sgd(model, cfg, total)
    first = 0 if epochs else warmup
    model.train()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(forever(loader)):
        if i == first:
            _sync(device)
            t0 = time.perf_counter()
        if i == total:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _sync(device)
    return (total - first) * loader.batch_size / (time.perf_counter() - t0)


def edlab_steps(model: nn.Module, data: Data, cfg: TrainConfig, steps: int, warmup: int) -> float:
    """edlab's ``fit`` on the same split, stopped after warmup + steps batches. Returns images/s."""
    data.val = None  # no validation pass between epochs of a throughput run
    data.train = loader = StampedLoader(data.train, warmup + steps)
    cfg.epochs = math.ceil((warmup + steps + 1) / len(loader)) + 1
    try:
        fit(model, data, cfg)
    except Enough:
        pass
    return steps * loader.batch_size / (loader.stamps[warmup + steps] - loader.stamps[warmup])


def throughput(name: str, args: argparse.Namespace) -> dict:
    """images/s of both sides for one model, in the same run."""
    steps = args.steps or DEFAULT_STEPS.get(name, 10)
    device = torch.device(args.device)
    cfg = edlab_config(name, args.data_dir, args.batch_size, 1, None)
    data, source = load_data(args.data_dir, batch_size=args.batch_size, augment=cfg.data.augment)
    theirs = plain_steps(fresh_model(name, 0), data, cfg, args.workers, steps, args.warmup, device=device)
    if device.type != "cpu":  # edlab's side holds the dataset on the device itself
        data, _ = load_data(args.data_dir, batch_size=args.batch_size, augment=cfg.data.augment, device=device)
    cfg.device = args.device
    ours = edlab_steps(fresh_model(name, 0), data, cfg, steps, args.warmup)
    amp = resolve_precision(cfg.precision, device)
    path = str(amp).removeprefix("torch.") if amp else "fp32"
    if resolve_channels_last(cfg.channels_last, device, amp):
        path += " + channels_last"
    return {"model": name, "device": str(device), "steps": steps, "warmup": args.warmup, "edlab": ours, "plain": theirs,
            "ratio": ours / theirs, "edlab_path": path, "data": source}


def accuracy(name: str, args: argparse.Namespace) -> dict:
    """Both sides trained for N epochs on the same subset; validation accuracy on the same held-out split."""
    cfg = edlab_config(name, args.data_dir, args.batch_size, args.accuracy_epochs, args.train_subset)
    data, source = load_data(args.data_dir, batch_size=args.batch_size, augment=cfg.data.augment,
                             train_subset=args.train_subset, seed=cfg.seed)
    plain = fresh_model(name, cfg.seed)
    t0 = time.perf_counter()
    plain_rate = plain_steps(plain, data, cfg, args.workers, 0, 0, epochs=args.accuracy_epochs)
    plain_s = time.perf_counter() - t0
    plain_acc = evaluate(plain, data.val)["accuracy"]
    t0 = time.perf_counter()
    state = fit(fresh_model(name, cfg.seed), data, cfg)
    ours_s = time.perf_counter() - t0
    h = state.history
    return {"model": name, "epochs": args.accuracy_epochs, "train_images": len(data.train.split),
            "val_images": len(data.val.split), "edlab_val_accuracy": h[-1]["val_accuracy"],
            "plain_val_accuracy": plain_acc, "edlab_seconds": ours_s, "plain_seconds": plain_s,
            "edlab_images_per_s": sum(r["images_per_s"] for r in h) / len(h),
            "plain_images_per_s": plain_rate, "data": source}


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ "
                   "(default: $EDLAB_DATA_DIR, else ./data)")
    p.add_argument("--models", default="resnet20", help="comma-separated, e.g. resnet20,resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=cores, help="DataLoader workers of the plain loop "
                   "(default: the CPU cores)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per side (default: resnet20 40, "
                   "resnet18 6)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train both for N epochs and "
                   "compare validation accuracy (0: skip)")
    p.add_argument("--train-subset", type=int, default=5000, help="training images for --accuracy-epochs")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the main process "
                   "(default: torch's choice, the cores); 1 is steadier when other jobs share the CPU")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both sides train")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    start = time.perf_counter()
    info = machine()
    print(f"# training throughput, batch {args.batch_size}; {info['cpu']}, {cores} cores, "
          f"torch {info['torch']}, {info['torch_threads']} threads; "
          f"plain loop: {args.workers} DataLoader workers, fp32, NCHW")
    rows = []
    for name in models:
        rows.append(throughput(name, args))
        r = rows[-1]
        print(f"  {name}: edlab {r['edlab']:,.0f} img/s, plain {r['plain']:,.0f} img/s, "
              f"ratio {r['ratio']:.2f}x", flush=True)
    acc = [accuracy(name, args) for name in models] if args.accuracy_epochs else []
    seconds = time.perf_counter() - start

    print(f"\ndata: {rows[0]['data']}; edlab path: {rows[0]['edlab_path']}; {seconds:.0f} s in all\n")
    print("| model | timed steps | edlab img/s | plain loop img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['edlab']:,.0f} | {r['plain']:,.0f} | {r['ratio']:.2f}x |")
    if acc:
        print("\n| model | epochs | train images | edlab val acc | plain val acc | edlab s | plain s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for a in acc:
            ours, theirs = 100 * a["edlab_val_accuracy"], 100 * a["plain_val_accuracy"]
            print(f"| {a['model']} | {a['epochs']} | {a['train_images']:,} | {ours:.2f}% | {theirs:.2f}% | "
                  f"{a['edlab_seconds']:.0f} | {a['plain_seconds']:.0f} |")
    if args.json_out:
        out = {**info, "batch_size": args.batch_size, "workers": args.workers, "seconds": seconds,
               "throughput": rows, "accuracy": acc}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
