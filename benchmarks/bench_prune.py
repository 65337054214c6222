"""Does structured pruning make ResNet-18 faster? Measured CPU latency of the dense model and of the same
model with channels physically removed by `edlab.prune_structured`, side by side in one run.

Why: counted MACs are a promise; a clock is the proof. Weights are random (latency does not depend on
them). Both models are timed alternately, run by run (`edlab.bench.compare`), so machine load hits both
alike; the table gives the median latency per batch and the ratio dense / pruned. Prints a Markdown table;
`--json OUT` keeps the raw rows with the conditions (date, torch, threads, load average).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prune.py --threads 1
    .venv/bin/python benchmarks/bench_prune.py --ratio 0.5 --target params --global --batch-sizes 1,32,128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from edlab.bench import compare
from edlab.models import create_model
from edlab.prune import prune_structured
from edlab.scoring import profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--ratio", type=float, default=0.75, help="fraction of the dense --target removed")
    ap.add_argument("--target", default="macs", choices=["params", "macs"])
    ap.add_argument("--global", dest="global_pruning", action="store_true")
    ap.add_argument("--round-to", type=int, default=None)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    torch.manual_seed(0)
    dense = create_model(args.model).eval()
    t0 = time.perf_counter()
    pruned = prune_structured(copy.deepcopy(dense), args.ratio, target=args.target,
                              global_pruning=args.global_pruning, round_to=args.round_to)
    prune_s = time.perf_counter() - t0
    models = {"parent": dense, "model": pruned}
    profiles = {n: profile(m) for n, m in models.items()}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = compare(models, sizes, args.threads, args.repeats, args.device)
    bench_s = time.perf_counter() - t0

    how = f"{'global' if args.global_pruning else 'uniform'}, {args.ratio:g} of the {args.target} removed"
    print(f"{args.model} dense vs pruned ({how}; pruning took {prune_s:.1f} s)")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {args.device}, "
          f"{args.threads} thread(s), load average before {load_before:.2f}, after timing "
          f"{os.getloadavg()[0]:.2f}, {bench_s:.0f} s of timing\n")
    head = "| model | params | MACs | score | ps | " + " | ".join(f"b{b} ms | b{b} speed-up" for b in sizes) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, label in (("parent", "dense"), ("model", "pruned")):
        p = profiles[name]
        cells = [label, f"{p.arch_params:,}", f"{p.macs:,}", f"{p.score:.4f}", f"{p.ps:.3f}"]
        for b in sizes:
            r = next(r for r in rows if r["model"] == name and r["batch_size"] == b)
            cells += [f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    pd, pp = profiles["parent"], profiles["model"]
    print(f"\nMACs ratio dense/pruned {pd.macs / pp.macs:.2f}, params ratio {pd.arch_params / pp.arch_params:.2f}, "
          f"ops term {pd.score_ops_term:.4f} -> {pp.score_ops_term:.4f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "profiles": {n: {k: v for k, v in p.to_dict().items() if k != "rows"}
                                    for n, p in profiles.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
