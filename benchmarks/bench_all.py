"""Every edlab speed claim in one run: a table of ratios, each measured against its baseline in this run.

Why one script: ratios taken on different days on a shared machine are not comparable; here each row's
two sides are timed back to back by the sibling scripts (each also runs alone, with more options):

    training      bench_train.py    edlab's fit vs a plain loop (torchvision DataLoader, PIL, fp32, NCHW)
    augmentation  bench_augment.py  edlab's batched on-device augmentation vs DataLoader + PIL transforms
    pruning       bench_prune.py    a physically pruned ResNet-18 (half the channels) vs the dense one
    int8          bench_int8.py     ONNX Runtime int8 vs PyTorch fp32 and ORT fp32 (resnet20)
    GPU           bench_gpu.py      resnet18 epoch seconds, time to accuracy, airbench94, GPU throughput (CUDA)

    python benchmarks/bench_all.py --data-dir ~/.cache/cifar10 [--quick] [--skip int8,prune] [--json all.json]

``--quick`` shortens every measurement (fewer steps and repeats) for a smoke run; the recorded figures
in docs/benchmarks.md come from a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("train", "augment", "prune", "int8", "gpu")


def _script(name: str, args: list[str], out: Path, threads: int) -> dict:
    """Run a sibling benchmark with --json and return what it wrote (its own table goes to our stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(HERE / name), *args, "--json", str(out)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=HERE)
    return json.loads(out.read_text())


def train_rows(a, tmp: Path) -> list[tuple]:
    steps = ["--steps", "4"] if a.quick else []
    r = _script("bench_train.py", ["--models", "resnet20,resnet18", *a.data, *steps], tmp / "train.json", a.threads)
    return [(f"train {t['model']} (img/s, {t['edlab_path']})", t["edlab"], t["plain"], "plain DataLoader loop fp32")
            for t in r["throughput"]]


def augment_rows(a, tmp: Path) -> list[tuple]:
    batches = ["--batches", "20"] if a.quick else []
    workers = str(os.cpu_count() or 1)
    r = _script("bench_augment.py", [*a.data, "--workers", workers, *batches], tmp / "augment.json", a.threads)
    return [(f"augment {x['policy']} (img/s)", x["edlab"], x["torchvision"], f"torchvision, {x['workers']} workers")
            for x in r["rows"]]


def prune_rows(a, tmp: Path) -> list[tuple]:
    reps = ["--repeats", "5"] if a.quick else []
    r = _script("bench_prune.py", ["--model", "resnet18", "--ratio", "0.75", *reps], tmp / "prune.json", 1)
    out = []
    for b in sorted({x["batch_size"] for x in r["rows"]}):
        ms = {x["model"]: x["latency_ms"] for x in r["rows"] if x["batch_size"] == b}
        # latency: lower is better, so the "edlab" side of the ratio is the inverse time
        out.append((f"pruned resnet18 ÷4 MACs, batch {b} (1/ms)", 1 / ms["model"], 1 / ms["parent"], "dense resnet18"))
    return out


def int8_rows(a, tmp: Path) -> list[tuple]:
    reps = ["--reps", "5"] if a.quick else []
    ckpt = ["--checkpoint", a.checkpoint] if a.checkpoint else []
    r = _script("bench_int8.py", [*a.data, "--no-accuracy", *ckpt, *reps], tmp / "int8.json", 1)
    rows = {x["variant"]: x["ms"] for x in r["rows"]}
    best = min((v for v in rows if v not in ("pytorch-fp32", "ort-fp32")), key=rows.get)
    return [(f"int8 ORT {best}, batch {r['batch']} (1/ms)", 1 / rows[best], 1 / rows["pytorch-fp32"],
             "PyTorch fp32"),
            (f"int8 ORT {best}, batch {r['batch']} (1/ms)", 1 / rows[best], 1 / rows["ort-fp32"], "ORT fp32")]


def gpu_rows(a, tmp: Path) -> list[tuple]:
    """On CUDA: bench_gpu.py's resnet18 and airbench runs and the GPU throughput vs the plain loop."""
    import torch

    if not torch.cuda.is_available():
        print("\nno CUDA device: the GPU rows are not measured on this machine", flush=True)
        return []
    quick = ["--quick"] if a.quick else []
    r = _script("bench_gpu.py", [*a.data, "--parts", "resnet18,airbench,throughput", *quick], tmp / "gpu.json",
                a.threads)
    r18, air = r["runs"]["resnet18"], r["runs"]["airbench-chosen"]
    rows = [("resnet18 epoch on GPU (1/s)", 1 / r18["median_epoch_s"], 1 / 2.0, "target: 2 s"),
            (f"resnet18 to {100 * r18['test_accuracy']:.2f} % test (1/s)", 1 / r18["seconds"], 1 / 60.0,
             "target: 94 % in 60 s"),
            (f"airbench94 to {100 * air['test_accuracy']:.2f} % test (1/s)", 1 / air["seconds"], 1 / 5.0,
             "target: 94 % in 5 s")]
    return rows + [(f"train {t['model']} on GPU (img/s, {t['edlab_path']})", t["edlab"], t["plain"],
                    "plain DataLoader loop fp32") for t in r["throughput"]["throughput"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("EDLAB_DATA_DIR"))
    p.add_argument("--checkpoint", help="a trained resnet20 for the int8 row (latency does not depend on it)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the train/augment rows")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    p.add_argument("--quick", action="store_true", help="short measurements (smoke run)")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    a.data_dir = str(Path(a.data_dir).expanduser().resolve()) if a.data_dir else None  # the parts run in benchmarks/
    a.checkpoint = str(Path(a.checkpoint).expanduser().resolve()) if a.checkpoint else None
    a.data = ["--data-dir", a.data_dir] if a.data_dir else []
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        p.error(f"unknown part(s) {sorted(skip - set(PARTS))}; choose from {', '.join(PARTS)}")
    t0 = time.perf_counter()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in PARTS:
            if part not in skip:
                try:
                    rows += globals()[f"{part}_rows"](a, Path(tmp))
                except (subprocess.CalledProcessError, OSError, ValueError) as e:  # one broken part, not all
                    print(f"\n{part}: failed ({e}); its rows are missing from the table", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n# edlab vs baselines, one run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{minutes:.1f} min{' (quick)' if a.quick else ''}\n")
    print("| measurement | edlab | baseline | against | ratio |")
    print("|---|---:|---:|---|---:|")
    for what, ours, theirs, against in rows:
        print(f"| {what} | {ours:,.4g} | {theirs:,.4g} | {against} | {ours / theirs:.2f}x |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"minutes": minutes, "quick": a.quick, "rows": [
            {"measurement": w, "edlab": o, "baseline": t, "against": g, "ratio": o / t} for w, o, t, g in rows]},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
