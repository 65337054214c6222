"""edlab's airbench94 recipe beside the original (the PyPI package ``airbench`` 0.1.8), same GPU, same data.

Issue 13's GPU target: edlab within 0.3 points of the package's accuracy at <= 1.5x its time. Why one script:
the comparison only means something when both run in one process start, on one machine, on the same pixels,
so it writes the package's data files from edlab's copy of CIFAR-10 first (``cifar10/train.pt`` and
``test.pt`` under ``--work``: dicts of uint8 NHWC ``images``, int64 ``labels``, ``classes``), then runs
``--runs`` seeds of each and prints the means and the two ratios. Both train on all 50,000 images and are
tested on the 10,000 test images, single view and with airbench's 6-view test-time augmentation.

Timing. airbench: wall time of ``train94`` (whitening init + training + the lookahead's last reset), CUDA
synchronised, after one untimed warm-up run (``airbench.warmup94``), evaluation excluded. edlab: the
``seconds`` of its summary (the sum of its epochs: training, no validation since val_size is 0), after one
untimed warm-up run of its own; evaluation excluded as well.

    python benchmarks/bench_airbench_pkg.py --data-dir ~/.cache/cifar10 --runs 5 --json airbench-pkg.json
    python benchmarks/bench_airbench_pkg.py --device cpu --quick     # smoke run of the edlab half (CPU, tiny)

Needs ``pip install airbench==0.1.8`` (pure Python; CUDA only: it times with CUDA events).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_package_data(data_dir: str | None, folder: Path) -> None:
    """cifar10/train.pt and test.pt as the airbench package's loader reads them, from edlab's copy."""
    from edlab.data import load_cifar

    train, test = load_cifar("cifar10", data_dir, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        torch.save({"images": split.images.permute(0, 2, 3, 1).contiguous(), "labels": split.labels,
                    "classes": CLASSES}, folder / f"{name}.pt")


def run_package(work: Path, runs: int) -> list[dict]:
    """``runs`` trainings of airbench94 by the package itself (cwd = work: it reads ./cifar10/)."""
    import airbench
    from airbench.lib_airbench94 import hyp

    os.chdir(work)
    loader = airbench.CifarLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                                  altflip=True)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    airbench.train94(loader, verbose=False)  # warm-up: cuDNN autotuning, allocator
    out = []
    for r in range(runs):
        torch.manual_seed(r)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(loader, verbose=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out.append({"run": r, "seconds": seconds, "test_1view": airbench.evaluate(model, test, tta_level=0),
                    "test_6view": airbench.evaluate(model, test, tta_level=2)})
        print(f"airbench  run {r}: {out[-1]['test_1view']:.4f} / {out[-1]['test_6view']:.4f} (1 / 6 views)  "
              f"{seconds:.2f} s", flush=True)
    return out


def run_edlab(config: str, data_dir: str | None, device: str, runs: int, work: Path, quick: bool) -> list[dict]:
    """``runs`` trainings of ``config`` by edlab (plus one untimed warm-up), then both views on the test set."""
    from edlab.checkpoint import load_checkpoint
    from edlab.config import load_train_config
    from edlab.data import Loader, data_from_config
    from edlab.evaluation import evaluate
    from edlab.train import train

    sets = [f"device={device}", "final_test=false"] + (["epochs=0.2", "data.train_subset=2048"] if quick else [])
    if data_dir:
        sets.append(f"data.data_dir={data_dir}")
    data = None
    out = []
    for r in range(-1, runs):  # r = -1: the warm-up
        cfg = load_train_config(config, None, sets + [f"seed={max(r, 0)}", f"out={work / f'edlab-{r}'}"])
        data = data or data_from_config(cfg, torch.device(device))  # loaded once: the same tensors every run
        data.train.seed = cfg.seed  # ... shuffled and augmented by each run's seed
        _, summary = train(cfg, data=data)
        if r < 0:
            continue
        model = load_checkpoint(work / f"edlab-{r}" / "model.ckpt").to(device)
        test = data.test
        if quick:  # 500 test images: 7 passes over all 10,000 take many minutes on a CPU
            test = Loader(test.split.subset(torch.arange(500)), test.batch_size, test.augment)
        out.append({"run": r, "seconds": summary["seconds"],
                    "test_1view": evaluate(model, test, tta="none")["accuracy"],
                    "test_6view": evaluate(model, test, tta="airbench")["accuracy"]})
        print(f"edlab     run {r}: {out[-1]['test_1view']:.4f} / {out[-1]['test_6view']:.4f} (1 / 6 views)  "
              f"{summary['seconds']:.2f} s", flush=True)
    return out


def mean(rows: list[dict], key: str) -> float | None:
    return statistics.fmean(r[key] for r in rows) if rows else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="edlab's CIFAR-10 folder (default: EDLAB_DATA_DIR or cache)")
    p.add_argument("--config", default=str(HERE.parent / "configs" / "airbench94.yaml"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--work", default=None, help="folder for the data files and runs (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("--quick", action="store_true", help="tiny edlab runs only (a smoke run of this script)")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="airbench-pkg-")).resolve()
    write_package_data(a.data_dir, work / "cifar10")
    result: dict = {"device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
                    "torch": torch.__version__, "runs": a.runs, "config": a.config}
    if a.device == "cuda" and not a.quick:
        result["airbench"] = run_package(work, a.runs)
    result["edlab"] = run_edlab(a.config, a.data_dir, a.device, a.runs if not a.quick else 1, work, a.quick)
    for who in ("airbench", "edlab"):
        if who in result:
            result[f"{who}_mean"] = {k: mean(result[who], k) for k in ("seconds", "test_1view", "test_6view")}
            m = result[f"{who}_mean"]
            print(f"{who:<9} mean of {len(result[who])}: {m['test_1view']:.4f} / {m['test_6view']:.4f}  "
                  f"{m['seconds']:.2f} s")
    if "airbench" in result:
        e, o = result["edlab_mean"], result["airbench_mean"]
        result["ratios"] = {"time_edlab_over_airbench": e["seconds"] / o["seconds"],
                            "points_6view_edlab_minus_airbench": 100 * (e["test_6view"] - o["test_6view"]),
                            "points_1view_edlab_minus_airbench": 100 * (e["test_1view"] - o["test_1view"])}
        r = result["ratios"]
        print(f"time ratio edlab/airbench {r['time_edlab_over_airbench']:.2f}x (target <= 1.5);  6-view points "
              f"{r['points_6view_edlab_minus_airbench']:+.2f} (target >= -0.3);  "
              f"1-view {r['points_1view_edlab_minus_airbench']:+.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
