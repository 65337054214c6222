#!/usr/bin/env bash
# The test suite: set up, then pytest. When the shared CIFAR-10 copy is beside the checkout
# (../shared/data), it is prepared once into .cache/ and the real-data tests (marked slow) run too.
set -euo pipefail
cd "$(dirname "$0")/.."
# pytest workers: EDLAB_TEST_WORKERS=0 (in this process), N, or auto (one per core, at most 8); checked first, so
# that a typo fails before the minute of setup
WORKERS=${EDLAB_TEST_WORKERS:-auto}
case "$WORKERS" in
  auto) XDIST=(-n auto --maxprocesses 8) ;;
  ''|*[!0-9]*) echo "test.sh: EDLAB_TEST_WORKERS must be a number of workers or auto, got '$WORKERS'" >&2; exit 2 ;;
  *) XDIST=(-n "$WORKERS") ;;
esac
bash scripts/setup.sh
# tests/test_report.py opens the report in headless Chromium: install it quietly when missing; without apt
# (or root/sudo) it is not installed and that test skips, saying why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends chromium; } >/dev/null 2>&1 || echo "test.sh: could not install chromium (browser test skips)"
fi
# tests/test_postgres.py starts its own PostgreSQL server: install the server quietly when missing (as Chromium)
# and the driver (edlab[postgres]); without them that test skips, saying why.
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends postgresql; } >/dev/null 2>&1 || echo "test.sh: could not install postgresql (its test skips)"
fi
if ! .venv/bin/python -c "import psycopg" 2>/dev/null; then
  .venv/bin/pip install --quiet "psycopg[binary]>=3.1" >/dev/null 2>&1 \
    || echo "test.sh: could not install psycopg (the PostgreSQL test skips)"
fi
MARK="not slow and not stress"
SHARED=../shared/data
if [ -z "${EDLAB_DATA_DIR:-}" ] && [ -f "$SHARED/prepare_cifar10.py" ]; then
  export EDLAB_DATA_DIR="$PWD/.cache/cifar10"
  .venv/bin/python "$SHARED/prepare_cifar10.py" "$EDLAB_DATA_DIR" >/dev/null
fi
if [ -n "${EDLAB_DATA_DIR:-}" ] && [ -d "$EDLAB_DATA_DIR/cifar-10-batches-py" ]; then
  MARK="not stress"   # the stress kill tests run on demand: pytest -m stress -s
fi
.venv/bin/ruff check src tests benchmarks
# One pytest worker per core (pytest-xdist), each at one torch thread: the tests train tiny models whose second
# thread buys little. On 2 cores pytest took 4 min 44 s so, 8 min 51 s in one process (docs/getting-started.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -m "$MARK" "${XDIST[@]}" "$@"
