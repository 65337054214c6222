#!/usr/bin/env bash
# The strict challenge search (issue 27) in one command on a lent GPU machine, <= 10 minutes of wall time:
#   bash benchmarks/gpu_challenge.sh                          # device machine: 4 workers share the GPU
#   OUT=/tmp/gpuq bash benchmarks/gpu_challenge.sh --quick    # the same chain in minutes on a CPU
# Runs `edlab sweep studies/challenge-gpu.yaml --floor 0.90 --workers K` under a timeout that leaves time to
# test and pack what finished, then writes to $OUT (at most 5 files, flat: the device returns <= 8):
#   run.log (everything printed), study.json, winner.pack, report.md and pareto.png (`edlab report`).
# Expects in the checkout, as benchmarks/gpu_session.sh: .gpu/ (cifar10-jpeg.tar.gz + prepare_cifar10.py from
# ../shared/data) and, when the machine lacks them, .whl/ (pydantic, optuna & co. for its Python 3.12).
# Without .gpu/ the data is read from $EDLAB_DATA_DIR (a prepared cifar-10-batches-py folder's parent).
# Env: OUT, LIMIT (s, whole script: 570, 1500 with --quick), FINISH_S (s kept for the end, 60), WORKERS (4; 1 with
# --quick), STUDY_OUT (/tmp/strict), EDLAB_DATA_DIR, OMP_NUM_THREADS (16 cores / WORKERS by default).
set -u
QUICK=""
if [ "${1:-}" = "--quick" ] || [ -n "${QUICK_RUN:-}" ]; then QUICK="--quick"; fi
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-$([ -n "$QUICK" ] && echo 1500 || echo 570)}   # s: the device runs a command <= 600 s
FINISH_S=${FINISH_S:-60}
WORKERS=${WORKERS:-$([ -n "$QUICK" ] && echo 1 || echo 4)}
STUDY_OUT=${STUDY_OUT:-/tmp/strict}
start=$(date +%s)
exec > >(tee "$OUT/run.log") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( 16 / WORKERS ))}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU: $(uname -m) CPU"
$PY -c "import torch, edlab; print('torch', torch.__version__, 'edlab', edlab.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import optuna, pydantic" || { echo "optuna/pydantic missing: put their wheels in .whl/ (docs/benchmarks.md)"; exit 2; }
if [ -f .gpu/prepare_cifar10.py ]; then
  $PY .gpu/prepare_cifar10.py /tmp/data > /dev/null || exit 1
  export EDLAB_DATA_DIR=/tmp/data
fi
[ -d "${EDLAB_DATA_DIR:-}/cifar-10-batches-py" ] || { echo "no data: give .gpu/ or EDLAB_DATA_DIR"; exit 2; }
echo "data ready after $(( $(date +%s) - start )) s: $EDLAB_DATA_DIR"

# the search: the teacher once, then trials until the study's budget is spent or the timeout strikes
sweep_s=$(( LIMIT - ($(date +%s) - start) - FINISH_S ))
echo "sweep gets ${sweep_s} s, ${WORKERS} worker(s), ${OMP_NUM_THREADS} thread(s) each"
timeout -k 10 "$sweep_s" $PY -m edlab sweep studies/challenge-gpu.yaml --floor 0.90 --workers "$WORKERS" \
  --out "$STUDY_OUT" $QUICK
rc=$?
echo "sweep exit ${rc} after $(( $(date +%s) - start )) s"
if [ "$rc" -ne 0 ]; then
  # stopped by the timeout (or a worker's error): end the study with the trials that finished, as the sweep's
  # own end does (the chosen point tested once, packed, study.json); the trials cut off are withdrawn
  timeout "$FINISH_S" $PY -m edlab sweep studies/challenge-gpu.yaml --floor 0.90 --out "$STUDY_OUT" $QUICK \
    --finish || echo "edlab sweep --finish failed or ran past ${FINISH_S} s (exit $?)"
fi
timeout 120 $PY -m edlab report "$STUDY_OUT" --floor 0.90 --out /tmp/strict-report > /dev/null || \
  echo "edlab report failed or ran past 120 s (exit $?)"
for f in "$STUDY_OUT/study.json" "$STUDY_OUT/winner.pack" /tmp/strict-report/report.md /tmp/strict-report/pareto.png; do
  [ -f "$f" ] && cp "$f" "$OUT/" || echo "missing: $f"
done
echo "done after $(( $(date +%s) - start )) s; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
