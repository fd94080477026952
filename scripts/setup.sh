#!/usr/bin/env bash
# Create .venv (if missing), install lostreg from this checkout with its dev extras, and check
# that torch and torchvision work together (scripts/check_torch.py: one line saying what to
# do when they don't). run.sh and test.sh call this first, so a repeated call must be cheap:
# it installs only when the stamp .venv/.lostreg-setup differs from what the install depends
# on (pyproject.toml's sha256, the venv's Python, the installed lostreg/torch/torchvision),
# e.g. on a fresh clone, after pyproject.toml changed, or in a .venv made before the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.lostreg-setup
read -r -d '' state_py <<'EOF' || true
import hashlib, importlib.metadata as metadata, sys
print("pyproject.toml sha256", hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())
print("python", sys.version.split()[0], sys.executable)
for name in ("lostreg", "torch", "torchvision"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
state=$(.venv/bin/python -c "$state_py" 2>/dev/null || echo "no state")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$state" ]; then
  exit 0
fi
echo "setup: installing lostreg and its dependencies into .venv (a fresh .venv takes minutes)" >&2
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --upgrade pip
# setuptools prints a 10-line "Editable installation ... folders with the same name as your
# package may take precedence" notice for every editable install of a flat (non-src) layout;
# it is information only, filtered by its text so that real warnings still show.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python scripts/check_torch.py
.venv/bin/python -c "$state_py" > "$stamp"
