#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $LISA_VENV) and install lisa-peft with its dev
# tools at the exact versions of requirements/lock.txt (the ones CI tested). Safe to run again: it
# reinstalls only when setup.cfg, setup.py, pyproject.toml or the lock file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LISA_VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.lisa-peft-setup-$(sha256sum setup.cfg setup.py pyproject.toml "$LOCK" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing lisa-peft and its dependencies into $VENV from $LOCK (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU build of torch 2.13.0; any other torch spec may pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -c "$LOCK" -e ".[dev]"
    rm -f "$VENV"/.lisa-peft-setup-*
    touch "$stamp"
fi
