#!/usr/bin/env bash
# Build an example leaderboard from SMOKE runs (random weights) on the generated demo dataset.
# Nothing in it is a result: every row, cell and figure says SMOKE. It shows a newcomer the
# shape of success (tables, arrows, figures); tests/test_example_results.py checks that the
# tracked copy in results/example/ carries the leaderboard's current columns.
#
# Usage: bash scripts/make_example.sh [--out DIR]
#   without --out: writes into a new temporary folder and prints where; nothing tracked changes.
#   --out results/example: refreshes the tracked example (it replaces that folder; `git diff`
#   then shows what changed). Any other DIR must be empty, missing, or an earlier output of
#   this script (it holds leaderboard.csv): it is replaced as a whole.
# Offline, CPU, about 1.5 minutes (2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }
               out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (usage: bash scripts/make_example.sh [--out DIR])" >&2
           exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/lostreg-example.XXXXXX")
    echo "writing the example into $out (pass --out results/example to refresh the tracked copy)"
elif [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out/leaderboard.csv" ]; then
    echo "error: $out is not empty and holds no leaderboard.csv: not an earlier example;" \
         "give an empty or new folder" >&2
    exit 2
else
    echo "replacing $out with a new example (smoke runs, random weights)"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(--dataset demo --data-root "$work/data" --weights random --runs "$work/runs"
        --no-progress --device cpu)
# ViT-S/14 with and without trained registers, every method.
"$python" -m lostreg.run "${common[@]}" --model dinov2_vits14,dinov2_vits14_reg4 \
    --method lost,tokencut,dinoseg
# ViT-L/14: the baseline, trained registers and the test-time register (shipped neuron list).
"$python" -m lostreg.run "${common[@]}" --model dinov2_vitl14,dinov2_vitl14_reg4,dinov2_vitl14+ttr
# Masks (saliency): a generated 12-image ECSSD-layout tree (a partial set, marked so), ViT-S/14
# with and without registers, TokenCut without and with the bilateral solver, and LOST.
"$python" -c "from lostreg.datasets.mask_demo import generate_mask_tree as g; g('$work/data', 'ecssd', 12)"
"$python" -m lostreg.run --dataset ecssd "${common[@]:2}" --allow-partial-dataset \
    --model dinov2_vits14,dinov2_vits14_reg4 --method tokencut,lost --refine none,bilateral
rm -rf "$out"
"$python" -m lostreg.leaderboard --runs "$work/runs" --output "$out" --include-smoke
rm -f "$out/.build.json"  # the record of a build from runs that no longer exist: not part of the example
echo "example written to $out"
