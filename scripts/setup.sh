#!/usr/bin/env bash
# Create .venv (if missing) and install edlab with its test extras. pip, not uv/poetry: on the project's
# machines pip takes torch 2.14.1 / torchvision 0.29.1 from local files in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import edlab, pytest, xdist, torchvision, optuna" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install --quiet "torch>=2.3,<=2.14.1" "torchvision>=0.18,<=0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install --quiet -e ".[test,onnx,study]" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import edlab, pytest" >/dev/null
