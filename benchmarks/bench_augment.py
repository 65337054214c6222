"""Images/s of edlab's batched augmentation vs a torchvision DataLoader with PIL transforms.

Why: edlab keeps the training set as one uint8 tensor and augments whole batches with tensor ops
(edlab.augment), instead of decoding one PIL image at a time in DataLoader workers. This script
measures what that buys for each augmentation policy, both sides in the same run and on the same
images (edlab's training split), with the same batch size, so the ratio is meaningful even on a busy
machine. A batch counts once it is a normalised float NCHW tensor, ready for the model.

    python benchmarks/bench_augment.py --data-dir /root/.cache/cifar10 [--batches N] [--json out.json]

Without CIFAR-10 in --data-dir the script falls back to edlab's small synthetic set and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from edlab.data import FOLDERS, Data, get_data, resolve_data_dir
from edlab.device import host

POLICIES = ("none", "crop-flip", "scale-rotate", "fancy")


def machine() -> dict:
    """What a recorded figure needs next to it: CPU, cores, threads, versions, UTC time."""
    import torchvision

    h = host()
    return {"cpu": f"{h['cpu']} ({h['kind']})", "cores": h["cores"], "torch_threads": h["threads"],
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def load_data(data_dir: str | None, **kwargs) -> tuple[Data, str]:
    """edlab's CIFAR-10 loaders, or its synthetic set (with a note) when CIFAR-10 is not there."""
    folder = resolve_data_dir(data_dir) / FOLDERS["cifar10"]
    if folder.is_dir():
        return get_data("cifar10", str(folder.parent), download=False, **kwargs), f"cifar10 ({folder})"
    print(f"NOTE: no CIFAR-10 at {folder}: using edlab's synthetic data (1,600 training images); "
          f"the figures then only show that the script runs. Pass --data-dir or set EDLAB_DATA_DIR.")
    return get_data("synthetic", **kwargs), "synthetic"


def baseline_transform(policy: str, mean: tuple, std: tuple) -> T.Compose:
    """The PIL pipeline a plain CIFAR script uses for the same policy as edlab's Augment.

    RandomAffine is asked for bilinear interpolation because edlab's warp is bilinear (torchvision's
    default, nearest, is a different and cheaper augmentation).
    """
    ops: list = []
    if policy in ("crop-flip", "fancy"):
        ops += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if policy in ("scale-rotate", "fancy"):
        ops += [T.RandomAffine(degrees=15, scale=(0.9, 1.1), interpolation=T.InterpolationMode.BILINEAR)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


class PILDataset(Dataset):
    """What torchvision's CIFAR10 does per item (HWC uint8 -> PIL image -> transform), on given images.

    Not torchvision's CIFAR10 itself: it refuses a local copy whose md5 differs (the JPEG copy), and
    both sides must see exactly the same images anyway.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: T.Compose):
        self.images = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def baseline_loader(data: Data, policy: str, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    """A plain training DataLoader over edlab's training split (persistent workers: no restart cost;
    ``pin``: page-locked batches, what a plain GPU script uses)."""
    split = data.train.split
    dataset = PILDataset(split.images, split.labels, baseline_transform(policy, data.mean, data.std))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin)


def forever(loader: Iterable) -> Iterator:
    """Batches of epoch after epoch, so any number of batches can be timed on a small set."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def images_per_s(batches: Iterator, n: int, warmup: int) -> float:
    """Consume ``warmup`` batches untimed (worker start-up, first-call costs), then time ``n``."""
    for _ in range(warmup):
        next(batches)
    images, t0 = 0, time.perf_counter()
    for _ in range(n):
        x, _ = next(batches)
        images += len(x)
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ "
                   "(default: $EDLAB_DATA_DIR, else ./data)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated augmentation policies")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", default=f"{cores},0", help="comma-separated DataLoader num_workers values "
                   "for the baseline (default: the CPU cores, then 0)")
    p.add_argument("--batches", type=int, default=0, help="timed batches per measurement (0: one epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches before each measurement")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the main process "
                   "(default: torch's choice, the cores); 1 is steadier when other jobs share the CPU")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    workers = [int(w) for w in args.workers.split(",")]

    start = time.perf_counter()
    info = machine()
    rows = []
    print(f"# augmentation throughput, images/s, batch {args.batch_size}; {info['cpu']}, {cores} cores, "
          f"torch {info['torch']}, {info['torch_threads']} threads")
    for policy in policies:
        data, source = load_data(args.data_dir, batch_size=args.batch_size, augment=policy)
        n = args.batches or len(data.train)
        ours = images_per_s(forever(data.train), n, args.warmup)
        for w in workers:
            theirs = images_per_s(forever(baseline_loader(data, policy, args.batch_size, w)), n, args.warmup)
            rows.append({"policy": policy, "workers": w, "edlab": ours, "torchvision": theirs,
                         "ratio": ours / theirs, "batches": n})
            print(f"  {policy:<12} workers={w}: edlab {ours:,.0f}  torchvision {theirs:,.0f}  "
                  f"ratio {ours / theirs:.1f}x", flush=True)
    seconds = time.perf_counter() - start

    print(f"\ndata: {source}; {n} timed batches of {args.batch_size} after {args.warmup} warm-up; "
          f"{seconds:.0f} s in all\n")
    print("| policy | baseline workers | edlab img/s | torchvision img/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['workers']} | {r['edlab']:,.0f} | {r['torchvision']:,.0f} | "
              f"{r['ratio']:.1f}x |")
    if args.json_out:
        out = {**info, "data": source, "batch_size": args.batch_size, "warmup": args.warmup,
               "seconds": seconds, "rows": rows}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
