#!/usr/bin/env bash
# Measure what `pip install lisa-peft` and each extra add to a fresh virtual environment (MB on disk, packages),
# from the built wheel in dist/ at the locked versions, torch 2.13.0 CPU preinstalled as in the README commands.
# Each extra is measured alone on top of the core install, then removed again. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=$(ls "$(pwd)"/dist/lisa_peft-*.whl)
LOCK=$(pwd)/requirements/lock.txt
WORK=$(mktemp -d /tmp/lisa-install-sizes.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
quiet() { grep -v "^WARNING: Location" || true; }
python3 -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip)
size() { du -sm "$WORK/venv" | cut -f1; }
packages() { "${PIP[@]}" freeze 2>/dev/null | sort; }
"${PIP[@]}" install -q torch==2.13.0 2>&1 | quiet
empty=$(size)
packages > "$WORK/torch.txt"
"${PIP[@]}" install -q -c "$LOCK" "$WHEEL" 2>&1 | quiet
core=$(size)
packages > "$WORK/core.txt"
echo "| install | adds (MB) | packages added |"
echo "|---|---|---|"
echo "| torch 2.13.0 CPU (before lisa-peft) | $empty | - |"
echo "| \`lisa-peft\` (core) | +$(( core - empty )) | $(comm -13 "$WORK/torch.txt" "$WORK/core.txt" | grep -c .) |"
for extra in demo plot data eval triton; do
    "${PIP[@]}" install -q -c "$LOCK" "$WHEEL[$extra]" 2>&1 | quiet
    added=$(comm -13 "$WORK/core.txt" <(packages) | sed 's/==.*//')
    echo "| \`lisa-peft[$extra]\` | +$(( $(size) - core )) | $(echo "$added" | grep -c . || true): $(echo $added | tr ' ' ',' | cut -c1-120) |"
    [ -n "$added" ] && "${PIP[@]}" uninstall -q -y $added 2>&1 | quiet
done
