#!/usr/bin/env bash
# The test suite: set up, then pytest. When the shared CIFAR-10 copy is beside the checkout
# (../shared/data), it is prepared once into .cache/ and the real-data tests (marked slow) run too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MARK="not slow"
SHARED=../shared/data
if [ -z "${EDLAB_DATA_DIR:-}" ] && [ -f "$SHARED/prepare_cifar10.py" ]; then
  export EDLAB_DATA_DIR="$PWD/.cache/cifar10"
  .venv/bin/python "$SHARED/prepare_cifar10.py" "$EDLAB_DATA_DIR" >/dev/null
fi
if [ -n "${EDLAB_DATA_DIR:-}" ] && [ -d "$EDLAB_DATA_DIR/cifar-10-batches-py" ]; then
  MARK="slow or not slow"
fi
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest -m "$MARK" "$@"
