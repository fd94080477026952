#!/usr/bin/env bash
# The test command: set up .venv and run the whole suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
