#!/usr/bin/env bash
# Rebuild results/example/: what a leaderboard looks like, from SMOKE runs (random weights) on
# the generated demo dataset. Nothing in it is a result: every row, cell and figure says SMOKE.
# It shows a newcomer the shape of success (tables, arrows, figures) and is checked by
# tests/test_example_results.py to carry the leaderboard's current columns.
# Offline, CPU, about 1.5 minutes. Usage: bash scripts/make_example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--dataset demo --data-root "$work/data" --weights random --output "$work/runs"
        --no-progress --device cpu)
# ViT-S/14 with and without trained registers, every method.
"$python" -m lostreg.run "${common[@]}" --model dinov2_vits14,dinov2_vits14_reg4 \
    --method lost,tokencut,dinoseg
# ViT-L/14: the baseline, trained registers and the test-time register (shipped neuron list).
"$python" -m lostreg.run "${common[@]}" --model dinov2_vitl14,dinov2_vitl14_reg4,dinov2_vitl14+ttr
rm -rf results/example
"$python" -m lostreg.leaderboard --runs "$work/runs" --out results/example --include-smoke
