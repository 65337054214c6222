#!/usr/bin/env bash
# The main job: set up, then the whole workflow on a small model (edlab demo): train a resnet20 briefly on
# CIFAR-10, prune it, quantize it to int8, score it, and write an HTML report. Without CIFAR-10 (not found,
# no download) it says so in one line and runs the same pipeline on the synthetic dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edlab demo "$@"
