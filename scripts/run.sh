#!/usr/bin/env bash
# The main job: set up .venv, then `python -m lostreg.run` with your arguments
# (default: DINOv2 ViT-L/14 with registers on VOC07; the dataset and weights download first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lostreg.run "$@"
