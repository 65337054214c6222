#!/usr/bin/env bash
# Everything one lent-GPU session measures, in one command on the device machine (the `device` tool of the
# developers' workplace; see docs/benchmarks.md). Expects in the checkout: .gpu/ (cifar10-jpeg.tar.gz +
# prepare_cifar10.py from ../shared/data) and .whl/ (pydantic & co. wheels for the machine's Python 3.12).
# Results land in $OUT: bench_gpu.json/.log (benchmarks/bench_gpu.py) and r20.json (resnet20 recipe scan).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-570}   # seconds this script may take in all; the scan gets what the benchmark leaves
start=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, edlab; print('torch', torch.__version__, 'edlab', edlab.__version__)" | tee -a "$OUT/gpu.txt"
python3 .gpu/prepare_cifar10.py /tmp/data > /dev/null && echo "data ready after $(( $(date +%s) - start )) s"

timeout ${BENCH_LIMIT:-330} python3 benchmarks/bench_gpu.py --data-dir /tmp/data --json "$OUT/bench_gpu.json" \
  --parts ${PARTS:-resnet18,airbench,resnet18-compiled,throughput} 2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^\s*$"

# issue 13: edlab's configs/airbench94.yaml beside the airbench package (its wheel in .whl/: `pip wheel --no-deps
# airbench==0.1.8 -w .whl`), same GPU, same pixels; skipped when the package is not there
if python3 -c "import airbench" 2>/dev/null; then
  timeout ${AB_LIMIT:-240} python3 benchmarks/bench_airbench_pkg.py --data-dir /tmp/data --runs ${AB_RUNS:-5} \
    --work /tmp/abpkg --json "$OUT/airbench_pkg.json" 2>&1 | tee "$OUT/airbench_pkg.log" | grep -v "^\s*$"
fi

# resnet20 recipe scan (issue 2's CPU target): variants of configs/resnet20-cifar10.yaml side by side on the GPU,
# to choose on validation which one the CPU run should use. Each process: 2 CPU threads.
left=$(( LIMIT - ($(date +%s) - start) - 15 ))
echo "scan gets ${left} s"
if [ "$left" -gt 60 ]; then
  i=0
  while read -r sets; do
    OMP_NUM_THREADS=2 timeout "$left" python3 -m edlab train configs/resnet20-cifar10.yaml --device cuda \
      --data-dir /tmp/data --out "/tmp/r20/$i" --set $sets --set threads=2 > "/tmp/r20-$i.log" 2>&1 &
    i=$((i + 1))
  done <<'VARIANTS'
seed=0
seed=1
label_smoothing=0.2
optim.weight_decay=3e-4
optim.weight_decay=1e-3
ema=0.9995
sched.pct_start=0.15
data.cutout=8
VARIANTS
  wait
  python3 - "$OUT/r20.json" <<'PY'
import json, pathlib, sys, yaml
rows = []
for d in sorted(pathlib.Path("/tmp/r20").iterdir(), key=lambda p: int(p.name)):
    m = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    rows.append({"run": d.name, "command": s.get("command"), "epochs_done": len(m),
                 "val": [r["val_accuracy"] for r in m], "seconds": s.get("seconds"),
                 "best_val": s.get("best_val_accuracy"), "test": s.get("test_accuracy")})
    print(rows[-1]["run"], rows[-1]["epochs_done"], rows[-1]["best_val"], rows[-1]["test"], rows[-1]["seconds"])
pathlib.Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
PY
  tail -n 3 /tmp/r20-0.log
fi
echo "done after $(( $(date +%s) - start )) s"
