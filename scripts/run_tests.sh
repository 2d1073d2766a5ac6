#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow integration tests included.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${LISA_VENV:-.venv}
exec "$VENV/bin/python" -m pytest "$@"
