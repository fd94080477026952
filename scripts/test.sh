#!/usr/bin/env bash
# The test command: set up .venv and run the whole suite (CPU only, no network), one pytest
# worker per core (pytest-xdist; at most 4: each worker holds torch and its own fixtures), a
# test file's tests on one worker so module fixtures are built once. Arguments go to pytest
# (`-n 0` runs everything in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest -p no:cacheprovider -n auto --maxprocesses 4 \
  --dist loadfile "$@"
