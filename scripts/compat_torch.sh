#!/usr/bin/env bash
# The fast compatibility subset, the kernel tests (Triton interpreter) and the mixed-precision tests on a newer
# torch than the lock's, with lisa-peft installed from the built wheel (dist/, made by scripts/check_wheel.sh):
# what a user of a current GPU image gets. Default torch 2.14.1, a CUDA build (about 5.5 GB installed, with its
# own triton 3.8) that this machine's pip takes from local disk in about two minutes; set LISA_COMPAT_TORCH to
# try another release.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${LISA_COMPAT_TORCH:-2.14.1}
WHEEL=$(ls dist/lisa_peft-*.whl)
WORK=$(mktemp -d /tmp/lisa-torch-compat.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
quiet() { grep -v "^WARNING: Location" || true; }
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
start=$(date +%s)
"$PY" -m pip install -q --upgrade pip 2>&1 | quiet
"$PY" -m pip install -q "torch==$TORCH" 2>&1 | quiet
# Everything else at the locked versions; torch and what it brings (triton, CUDA libraries) as it comes.
grep -v -E '^(torch|triton|nvidia-|cuda-)' requirements/lock.txt > "$WORK/constraints.txt"
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$WHEEL[dev]" 2>&1 | quiet
"$PY" - "$TORCH" <<'PY'
import sys, torch
if torch.__version__.split("+")[0] != sys.argv[1]:
    sys.exit(f"[compat-torch] installing lisa-peft replaced torch {sys.argv[1]} by {torch.__version__}: "
             "a requirement pins torch; fix it so that users of newer torch releases can install lisa-peft")
PY
echo "[compat-torch] installed in $(( $(date +%s) - start )) s, $(du -sm "$WORK/venv" | cut -f1) MB: $("$PY" -c \
  'import torch, triton, transformers, peft; print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
mapfile -t SUBSET < <(grep -v -e '^#' -e '^$' scripts/compat_subset.txt)
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${SUBSET[@]}" tests/kernels $(ls tests/test_mixed_precision.py 2>/dev/null)
"$PY" -c 'import lisa_peft, sys; assert "site-packages" in lisa_peft.__file__, lisa_peft.__file__'
echo "[compat-torch] passed on torch $TORCH in $(( $(date +%s) - start )) s"
