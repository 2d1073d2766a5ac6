#!/usr/bin/env bash
# The GPU check in one command: native Triton kernel tests, Triton vs PyTorch vs base prefill and decode
# timings on a LLaMA-shaped model with random weights, and a bf16 LiSA training step, written to ONE JSON file.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        writes OUT_DIR/gpu_check-<time>.json and its .log
#                                              (OUT_DIR default: gpu_check_results/ in the repository root)
#   bash scripts/gpu_check.sh --fetch-wheels   where PyPI is reachable: the locked wheels to carry (see below)
#
# On a lent GPU machine with a 600 s command limit: `bash scripts/gpu_check.sh "$OUT"` with a 600 s timeout,
# carrying .whl/ if --fetch-wheels made it. Exit 0: every stage passed, or no GPU; 1: a stage failed or timed out.
#
# No CUDA device (no `nvidia-smi -L` GPU and no /dev/nvidia<N>): prints why, writes {"skipped": "no CUDA device"},
# exits 0, installs nothing. Otherwise these stages run, each under `timeout` with its budget, sized so that the
# whole check ends within GPU_CHECK_TOTAL_S (570 s) on one H100: a 600 s command limit still gets the JSON.
#
#   stage         budget  what (GPU_CHECK_BUDGET_<STAGE> overrides the budget in seconds)
#   env             60 s  choose/install the environment (below), then versions + setup.cfg requirement check
#   kernel_tests   180 s  TRITON_INTERPRET=0 python -m pytest tests/kernels (tensors on CUDA, compiled kernels)
#   timings        180 s  benchmarks/gpu_check.py timings: GPU_CHECK_SHAPE (llama3-8b; or llama2-7b) in bf16 with
#                         random weights, LiSA in the last half of the layers; prompts of GPU_CHECK_TOKENS
#                         ("1024 4096") tokens, 32 decode steps, variants triton / torch / base / triton-chunk=0,
#                         GPU_CHECK_REPEATS (5) timed repeats each after one warm-up (median, min, max, spread)
#   train          100 s  benchmarks/gpu_check.py train: 4 AdamW steps of the LiSA weights (float32) on the bf16
#                         base, GPU_CHECK_TRAIN_SEQ (2048) tokens: losses and gradients finite, peak memory
# A stage that fails or times out is recorded and the next one still runs (each stage is its own process).
#
# Environment. ASSUMPTION (the lent GPU machines: no internet; their `python3` holds a CUDA build of torch with
# Triton, transformers, peft, accelerate, setuptools, pytest): when $GPU_CHECK_PYTHON (default python3) imports
# a torch that sees a CUDA device, that Python is used as it is and nothing is downloaded: lisa-peft (no deps, no
# index, no build isolation) and any wheels in $GPU_CHECK_WHEELS (default .whl/) are installed into the folder
# $GPU_CHECK_SITE (default /tmp/lisa-gpu-check-site), which goes first on PYTHONPATH (so a carried wheel wins
# over the image's copy); if that build fails, src/ and kernels/ go on PYTHONPATH instead. The env stage
# fails, naming each package, where an installed version misses setup.cfg's range: then run
# `bash scripts/gpu_check.sh --fetch-wheels` where PyPI is reachable (downloads requirements/lock.txt's versions
# of $GPU_CHECK_WHEEL_PACKAGES, default "peft", into .whl/) and carry .whl. Only when that Python has no CUDA
# torch (a machine of your own) is a venv made at $GPU_CHECK_VENV (default /tmp/lisa-gpu-check-venv) with
# PyPI's Linux torch (a CUDA build) and `pip install -e .[triton]` under lock.txt's constraints (less its CPU
# torch pin): that needs the internet and minutes, so raise GPU_CHECK_BUDGET_ENV and GPU_CHECK_TOTAL_S.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
CALLER_DIR=$PWD
cd "$(dirname "$SELF")/.."
BASE_PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/lisa-gpu-check-site}
VENV=${GPU_CHECK_VENV:-/tmp/lisa-gpu-check-venv}
SHAPE=${GPU_CHECK_SHAPE:-llama3-8b}
TOKENS=${GPU_CHECK_TOKENS:-1024 4096}
REPEATS=${GPU_CHECK_REPEATS:-5}
TRAIN_SEQ=${GPU_CHECK_TRAIN_SEQ:-2048}
TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
say() { echo "[gpu_check] $*"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    for name in ${GPU_CHECK_WHEEL_PACKAGES:-peft}; do
        pin=$(grep -i -E "^${name}==" requirements/lock.txt) || { say "$name is not in requirements/lock.txt"; exit 2; }
        "$BASE_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$pin" || exit 1
    done
    say "wheels in $WHEELS/: $(ls "$WHEELS" | tr '\n' ' ')— carry \"$WHEELS\" with the check"
    exit 0
fi

if [ "${1:-}" = "--env" ]; then  # the env stage (run under timeout): install, write $2/env.sh, then $2/env.json
    work=$2
    if "$BASE_PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        say "using $BASE_PY's CUDA torch as it is ($("$BASE_PY" -c 'import sys, torch; print(sys.executable, torch.__version__)'))"
        rm -rf "$SITE" && mkdir -p "$SITE"
        wheels=()
        if compgen -G "$WHEELS/*.whl" >/dev/null; then wheels=("$WHEELS"/*.whl); say "carried wheels: ${wheels[*]}"; fi
        # Built from a copy: pip builds in the source folder, and a build/ left in the checkout goes stale.
        mkdir -p "$work/pkg" && cp -r setup.py setup.cfg pyproject.toml README.md src kernels model_cards recipes "$work/pkg/"
        if "$BASE_PY" -m pip install -q --no-deps --no-index --no-build-isolation --no-compile --disable-pip-version-check \
                --target "$SITE" "$work/pkg" "${wheels[@]}"; then
            path=$SITE
        else
            say "pip could not install lisa-peft into $SITE: using the source tree (src/ and kernels/) instead"
            path=$SITE:$PWD/src:$PWD/kernels
            if [ ${#wheels[@]} -gt 0 ]; then
                "$BASE_PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "${wheels[@]}" || exit 1
            fi
        fi
        printf 'PY=%q\nexport PYTHONPATH=%q\n' "$BASE_PY" "$path${PYTHONPATH:+:$PYTHONPATH}" >"$work/env.sh"
    else
        say "$BASE_PY has no torch that sees a CUDA device: installing torch and lisa-peft into $VENV (needs the internet)"
        "$BASE_PY" -m venv "$VENV" || exit 1
        grep -v -i -E '^(torch|triton)==' requirements/lock.txt >"$work/constraints.txt"
        "$VENV/bin/python" -m pip install -q --timeout 30 --retries 1 torch || exit 1
        "$VENV/bin/python" -m pip install -q --timeout 30 --retries 1 -c "$work/constraints.txt" -e ".[triton]" || exit 1
        printf 'PY=%q\n' "$VENV/bin/python" >"$work/env.sh"
    fi
    # shellcheck disable=SC1091
    source "$work/env.sh"
    exec "$PY" benchmarks/gpu_check.py env --out "$work/env.json"
fi

OUT_DIR=${1:-gpu_check_results}
[ -z "${1:-}" ] || [ "${OUT_DIR:0:1}" = / ] || OUT_DIR=$CALLER_DIR/$OUT_DIR  # a given relative path: from the caller's folder
mkdir -p "$OUT_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
RESULT=$OUT_DIR/gpu_check-$STAMP.json
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus=0
if [ "$gpus" -eq 0 ] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    say "no CUDA device (nvidia-smi lists no GPU, no /dev/nvidia<N>): nothing to check here, skipping"
    "$BASE_PY" benchmarks/gpu_check.py skip --reason "no CUDA device" --out "$RESULT" || exit 1
    exit 0
fi

WORK=$(mktemp -d)
START=$(date +%s)
: >"$WORK/stages.tsv"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# run_stage NAME BUDGET COMMAND...: COMMAND under `timeout` (budget, cut to what is left of TOTAL_S less 20 s for
# the report), its output into NAME.log and on screen, a row in stages.tsv (exit code -1: not run, no time left).
run_stage() {
    local name=$1 budget=$2 left limit t0 rc ms
    shift 2
    left=$((TOTAL_S - ($(date +%s) - START) - 20))
    limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 10 ]; then
        say "stage $name: not run, ${left} s left of GPU_CHECK_TOTAL_S=$TOTAL_S"
        echo "no time left for this stage" >"$WORK/$name.log"
        printf '%s\t-1\t0\t%s\n' "$name" "$budget" >>"$WORK/stages.tsv"
        return
    fi
    say "stage $name (budget ${limit} s): $*"
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%s\t%s\t%d.%03d\t%s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" >>"$WORK/stages.tsv"
    say "stage $name: exit code $rc"
}

run_stage env "${GPU_CHECK_BUDGET_ENV:-60}" bash "$SELF" --env "$WORK"
PY=$BASE_PY
# shellcheck disable=SC1091
[ -f "$WORK/env.sh" ] && source "$WORK/env.sh"
run_stage kernel_tests "${GPU_CHECK_BUDGET_KERNEL_TESTS:-180}" "$PY" -m pytest tests/kernels -q -p no:cacheprovider
run_stage timings "${GPU_CHECK_BUDGET_TIMINGS:-180}" "$PY" benchmarks/gpu_check.py timings --shape "$SHAPE" \
    --tokens $TOKENS --new-tokens 32 --repeats "$REPEATS" --out "$WORK/timings.json"
run_stage train "${GPU_CHECK_BUDGET_TRAIN:-100}" "$PY" benchmarks/gpu_check.py train --shape "$SHAPE" \
    --seq-len "$TRAIN_SEQ" --steps 4 --out "$WORK/train.json"

while IFS=$'\t' read -r name _; do
    echo "===== $name"
    cat "$WORK/$name.log"
done <"$WORK/stages.tsv" >"${RESULT%.json}.log"
"$BASE_PY" benchmarks/gpu_check.py report --work "$WORK" --out "$RESULT"
rc=$?
rm -rf "$WORK"
exit $rc
