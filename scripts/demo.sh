#!/usr/bin/env bash
# Set up (if needed) and run the demo: SmolLM2-135M -> calibrated LiSA -> training -> evaluation
# -> save -> reload -> generation, about 15-20 minutes on 2 CPU cores (with installation). Extra arguments go to
# `lisa-peft demo` (e.g. --set training.max_steps=20 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${LISA_VENV:-.venv}
exec "$VENV/bin/lisa-peft" demo "$@"
