"""The GPU targets in one run: resnet18 epoch seconds and time to 94 %, the airbench-class recipe's time to
94 %, and edlab's training path vs a plain PyTorch loop on the same GPU.

Why a script of its own: GPU time is scarce (a lent machine, minutes at a time), so everything the speed
claims need is measured in one process start, each part's figures written to ``--json`` as soon as they
exist (a run cut short still leaves the parts it finished). Every figure comes from a full training run of
``edlab.train.train`` with the committed config, test accuracy read once at its end:

    resnet18           configs/resnet18-94-gpu.yaml, eager (bf16 autocast + channels_last)
    resnet18-compiled  the same with torch.compile (the first epoch then includes compilation)
    airbench           configs/airbench94-gpu.yaml, a small grid (lr x epochs); the point kept is the one
                       with the best *validation* accuracy, its test accuracy is the one reported
    throughput         benchmarks/bench_train.py --device cuda: edlab vs DataLoader + PIL + fp32 loop

    python benchmarks/bench_gpu.py --data-dir ~/.cache/cifar10 [--parts resnet18,airbench] [--json gpu.json]
    python benchmarks/bench_gpu.py --device cpu --quick      # smoke run of the script itself (CPU, tiny)

"Seconds" of a run = the sum of its epochs' wall time, training and the per-epoch validation pass
(``summary.json``'s ``seconds``), i.e. what a user waits for; ``train s`` excludes validation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
PARTS = ("resnet18", "resnet18-compiled", "airbench", "throughput")
# airbench grid around the config (lr 0.5, 18 epochs); the best by validation is kept
AIRBENCH_GRID = [["epochs=12"], [], ["optim.lr=0.3"], ["optim.lr=1.0"]]


def train_run(config: str, sets: list[str], a, out: Path) -> dict:
    """One full training run of a committed config; its timing and accuracy figures."""
    from edlab.config import load_train_config
    from edlab.train import train

    quick = ["epochs=1", "data.train_subset=1024", "data.val_size=512", "tta=none", "model.width=0.25",
             "compile=false"] if a.quick else []  # a smoke run of the script, not a measurement
    cfg = load_train_config(str(CONFIGS / config), {"data": {"data_dir": a.data_dir, "download": False},
                                                    "device": a.device, "out": str(out)}, [*sets, *quick])
    _, s = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_s = [r["seconds"] for r in rows]
    train_s = [r.get("train_seconds", r["seconds"]) for r in rows]
    later = epoch_s[1:] or epoch_s  # the first epoch pays for cuDNN autotuning / compilation
    return {"config": config, "sets": sets, "epochs": s["epochs"], "seconds": s["seconds"],
            "first_epoch_s": epoch_s[0], "median_epoch_s": statistics.median(later), "fastest_epoch_s": min(later),
            "train_seconds": sum(train_s), "test_accuracy": s["test_accuracy"],
            "val_accuracy": s["val_accuracy"], "val_curve": [r["val_accuracy"] for r in rows],
            "images_per_s": statistics.median(r["images_per_s"] for r in rows[1:] or rows),
            "precision": s["precision"], "tta": s["tta"]}


def line(name: str, r: dict) -> str:
    return (f"| {name} | {' '.join(r['sets']) or '-'} | {r['epochs']} | {r['first_epoch_s']:.2f} | "
            f"{r['median_epoch_s']:.2f} | {r['seconds']:.1f} | {100 * r['val_accuracy']:.2f} % | "
            f"{100 * r['test_accuracy']:.2f} % |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("EDLAB_DATA_DIR"))
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a --quick smoke run")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    p.add_argument("--run", action="append", default=[], metavar="CONFIG[:KEY=V,...]",
                   help="also train this config of configs/ with these overrides (repeatable), e.g. "
                   "resnet18-94-gpu.yaml:epochs=40,optim.lr=0.3")
    p.add_argument("--quick", action="store_true", help="1 epoch on 1,024 images per run (smoke run)")
    p.add_argument("--json", dest="json_out", default="bench_gpu.json")
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()] + [f"run:{r}" for r in a.run]
    unknown = {x for x in parts if x not in PARTS and not x.startswith("run:")}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here (use --device cpu --quick for a smoke run)")
        return 1
    a.data_dir = str(Path(a.data_dir).expanduser().resolve()) if a.data_dir else None
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result: dict = {"device": gpu, "torch": torch.__version__, "quick": a.quick,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}, "throughput": None}

    def save() -> None:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            print(f"\n== {part} ({time.perf_counter() - t0:.0f} s in)", flush=True)
            if part in ("resnet18", "resnet18-compiled"):
                sets = ["compile=true"] if part.endswith("compiled") else []
                result["runs"][part] = train_run("resnet18-94-gpu.yaml", sets, a, Path(tmp) / part)
            elif part.startswith("run:"):
                config, _, sets = part[4:].partition(":")
                result["runs"][part[4:]] = train_run(config, [x for x in sets.split(",") if x], a,
                                                     Path(tmp) / f"run{len(result['runs'])}")
            elif part == "airbench":
                grid = [train_run("airbench94-gpu.yaml", sets, a, Path(tmp) / f"air{i}")
                        for i, sets in enumerate(AIRBENCH_GRID[:2] if a.quick else AIRBENCH_GRID)]
                for i, r in enumerate(grid):
                    result["runs"][f"airbench-{i}"] = r
                best = max(range(len(grid)), key=lambda i: grid[i]["val_accuracy"])  # chosen on validation
                result["runs"]["airbench-chosen"] = {**grid[best], "chosen_from": len(grid)}
            else:
                out = Path(tmp) / "throughput.json"
                steps = ["--steps", "3", "--warmup", "1"] if a.quick else ["--steps", "60", "--warmup", "10"]
                subprocess.run([sys.executable, str(HERE / "bench_train.py"), "--device", a.device,
                                "--models", "resnet20,resnet18", "--batch-size", "512", *steps,
                                *(["--data-dir", a.data_dir] if a.data_dir else []), "--json", str(out)],
                               check=True, cwd=HERE)
                result["throughput"] = json.loads(out.read_text())
            save()
            print(f"   ({time.perf_counter() - t0:.0f} s in) {json.dumps(result['runs'].get(part, ''))[:400]}",
                  flush=True)
    result["minutes"] = (time.perf_counter() - t0) / 60
    save()

    print(f"\n# GPU benchmark, {gpu}, torch {torch.__version__}, {result['date']}, "
          f"{result['minutes']:.1f} min{' (quick)' if a.quick else ''}\n")
    print("| run | --set | epochs | first epoch s | median epoch s | seconds | val acc | test acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in result["runs"].items():
        print(line(name, r))
    if result["throughput"]:
        print("\n| model (batch 512) | edlab img/s | plain loop img/s | ratio |")
        print("|---|---:|---:|---:|")
        for t in result["throughput"]["throughput"]:
            print(f"| {t['model']} ({t['edlab_path']}) | {t['edlab']:,.0f} | {t['plain']:,.0f} | {t['ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
