#!/usr/bin/env bash
# Build the sdist and the wheel (python -m build), install the wheel (not editable) into a fresh virtual
# environment outside the checkout, and run scripts/wheel_smoke.py there from an empty directory, as a user
# of the wheel would. Run by .ci/run; uses the project venv ($LISA_VENV, default .venv) only to build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${LISA_VENV:-.venv}
LOCK=requirements/lock.txt
WORK=$(mktemp -d /tmp/lisa-wheel-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
rm -rf dist build
echo "[wheel] building the sdist, then the wheel from the sdist (python -m build)"
"$VENV/bin/python" -m build --outdir dist . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls -l dist
WHEEL=$(ls "$REPO"/dist/lisa_peft-*.whl)
# The wheel (built from the sdist) holds every module and data file of the source tree.
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
from tests.test_packaging import expected_wheel_files
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = sorted(expected_wheel_files() - names)
sys.exit(f"[wheel] the wheel lacks {missing}" if missing else 0)
PY
echo "[wheel] the wheel holds every source module and data file"

echo "[wheel] installing the wheel (core, no extras) into a fresh environment"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$WORK/venv/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
"$WORK/venv/bin/python" -m pip install -q -c "$LOCK" "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
mkdir "$WORK/empty" && cd "$WORK/empty"
LISA_SMOKE_CORE_ONLY=1 "$WORK/venv/bin/python" -I "$REPO/scripts/wheel_smoke.py" "$REPO/README.md"
echo "[wheel] smoke test passed from $WORK/empty"
