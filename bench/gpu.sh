#!/usr/bin/env bash
# Issue 17's measurement in one device call (<= 10 minutes): environment, GPU ceilings, bf16-vs-fp32
# agreement of one step (GAN on and off), the train step in the recipe's configuration against the
# naive loop, each lever against the recipe's configuration, the evaluation throughput, then a
# summary (printed last). Every stage is capped with `timeout`; a stage that fails or runs out
# is recorded and the next one runs.
#
#   bash bench/gpu.sh                 # on the device machine; logs into $OUT (or --out DIR)
#   bash bench/gpu.sh --cpu-dry-run   # every stage at toy size on this machine's CPU (checks the script)
#
# On the device, the packages its image lacks come as wheels in .whl/ (scripts/gpu-wheels.sh
# downloads them; the device call names .whl in `carry`); they are installed with --no-deps into
# /tmp/site beside the image's own CUDA torch. vaeft itself runs from the checkout (PYTHONPATH).
# Network weights are random (bench/common.py): timings and agreement only, no quality numbers.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
OUT_DIR=${OUT:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        --cpu-dry-run) DRY=1 ;;
        --out) OUT_DIR=$2; shift ;;
        *) echo "usage: $0 [--cpu-dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $OUT_DIR ]]; then
    OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vaeft-gpu-XXXXXX")
fi
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu.log
SUMMARY=$OUT_DIR/summary.txt
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vaeft-gpu-work-XXXXXX")
# One inductor cache and one random weight store for all stages: a stage that compiles what an
# earlier one compiled reads the cache instead of compiling again.
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
WEIGHTS=$WORK/weights

if [[ $DRY -eq 1 ]]; then
    DEV=(--device cpu)
    SMALL=(--small)
    TRAIN=(--smoke --no-memory)
    LEVERS=(--smoke --levers)
    LEVERS_COMPILE=(--smoke --levers --compile-levers --only "compile off,compile decoder")
    EVAL=(--smoke)
    # A loaded 2-core CPU compiles the decoder in ~12 minutes: caps only against a hang.
    T_INSTALL=120 T_CEIL=600 T_AGREE=900 T_TRAIN=1200 T_LEVERS=1200 T_COMPILE=1500 T_EVAL=900
else
    DEV=(--device cuda)
    SMALL=()
    TRAIN=(--scale sd --steps 20 --warmup 3)
    LEVERS=(--scale sd --levers --no-compile-levers --lever-steps 6 --warmup 2)
    LEVERS_COMPILE=(--scale sd --levers --compile-levers --only "compile" --lever-steps 6 --warmup 2)
    EVAL=(--scale sd --n 512)
    # 570 s in all if every stage ran out (the 10-minute call, with the summary and some margin).
    # The train step gets the most: it compiles the decoder from a cold cache; later stages read it.
    T_INSTALL=40 T_CEIL=30 T_AGREE=70 T_TRAIN=180 T_LEVERS=110 T_COMPILE=80 T_EVAL=60
fi

declare -a STATUS=()
stage() {  # stage NAME SECONDS CMD...: run with a time cap, log it, remember how it ended
    local name=$1 secs=$2 rc=0
    shift 2
    echo "=== stage $name (cap ${secs}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    # A shell function runs in a child bash (timeout runs programs only).
    if declare -F "$1" >/dev/null; then set -- bash -c "$(declare -f "$1"); $1"; fi
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
    local how=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then how="TIMED OUT"; elif [[ $rc -ne 0 ]]; then how="FAILED rc=$rc"; fi
    STATUS+=("$(printf '%-16s %-14s %4ds' "$name" "$how" $((SECONDS - t0)))")
}

install_and_report() {
    set -euo pipefail  # it runs in a child bash (see stage)
    if [[ $DRY -eq 1 ]]; then
        echo "dry run: the checkout's environment ($PY), no wheels installed"
    else
        local wheels=(.whl/*.whl)
        [[ -e ${wheels[0]} ]] || { echo "no wheels in .whl/: run scripts/gpu-wheels.sh and carry .whl" >&2; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    fi
    "$PY" -c "import torch, diffusers, lpips, torch_fidelity, pydantic, vaeft.train.step; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0)); \
print('diffusers', diffusers.__version__, 'pydantic', pydantic.VERSION)"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; fi
}

if [[ $DRY -eq 0 ]]; then
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

export DRY PY
stage install "$T_INSTALL" install_and_report
stage ceilings "$T_CEIL" "$PY" bench/gpu_checks.py ceilings "${DEV[@]}" "${SMALL[@]}"
stage agreement "$T_AGREE" "$PY" bench/gpu_checks.py agreement "${DEV[@]}" "${SMALL[@]}" --weights-dir "$WEIGHTS"
stage train-step "$T_TRAIN" "$PY" bench/train_step.py "${DEV[@]}" "${TRAIN[@]}" --weights-dir "$WEIGHTS"
stage levers "$T_LEVERS" "$PY" bench/train_step.py "${DEV[@]}" "${LEVERS[@]}" --weights-dir "$WEIGHTS"
stage levers-compile "$T_COMPILE" "$PY" bench/train_step.py "${DEV[@]}" "${LEVERS_COMPILE[@]}" --weights-dir "$WEIGHTS"
stage eval "$T_EVAL" "$PY" bench/eval_throughput.py "${DEV[@]}" "${EVAL[@]}" --weights-dir "$WEIGHTS"

{
    echo "=== summary (bench/gpu.sh$([[ $DRY -eq 1 ]] && echo ' --cpu-dry-run'), $(date -u +%Y-%m-%dT%H:%M:%SZ))"
    printf '%s\n' "${STATUS[@]}"
    grep -E "^(machine|torch |ceiling|agreement|naive +img/s|vaeft +img/s|ratio vaeft/naive|target|MFU|lever |\(recipe config\)|[0-9]+-image eval|memory:)" "$LOG" || true
} | tee "$SUMMARY"
rm -rf "$WORK"
