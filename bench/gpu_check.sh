#!/usr/bin/env bash
# The GPU checks of issue #25 (item 7) in one script: at most 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh            # on a machine with CUDA: writes bench/results/gpu_check.json
#   bash bench/gpu_check.sh --cpu      # a dry run of the same code on the CPU, tiny sizes
#                                      # (writes bench/results/gpu_check-cpu.json; not GPU figures)
#
# Builds the sd15-shaped model (SD 1.5's configs, random weights) and measures in float16 and
# bfloat16: engine (sample.ddim) vs diffusers (StableDiffusionPipeline) per step with SDPA,
# eager attention and torch.compile; the whole round trip run_recipe vs diffusers; the peak
# GPU memory of the guided pix2pix-zero edit vs the unguided one; the cache's write/read rate
# from and to GPU tensors; byte-identical reruns on the GPU. bench/gpu_check.py has the
# details; every figure is min / median / max over ABBA pairs (bench/harness.py).
#
# Without CUDA (and without --cpu) it says so and exits 0. Extra arguments go to
# gpu_check.py (e.g. --steps 50, --dtypes float16, --no-compile). The Python used is
# $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

LIMIT_S=480          # the whole script, model build included
BUDGET_S=420         # gpu_check.py starts no section after this (the last may run past it)
EXTRA=()
OUT="bench/results/gpu_check.json"
for arg in "$@"; do
    if [[ "$arg" == "--cpu" || "$arg" == "--dry-run" ]]; then
        EXTRA+=(--cpu)
        OUT="bench/results/gpu_check-cpu.json"
    else
        EXTRA+=("$arg")
    fi
done

if [[ ! " ${EXTRA[*]-} " == *" --cpu "* ]]; then
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing"
        echo "measured. Run it on a GPU machine, or 'bash bench/gpu_check.sh --cpu' for a dry"
        echo "run of the same code on the CPU at tiny sizes."
        exit 0
    fi
    "$PYTHON" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), '- torch', torch.__version__, 'CUDA', torch.version.cuda)"
fi

status=0
timeout --signal=TERM --kill-after=15 "$LIMIT_S" \
    "$PYTHON" bench/gpu_check.py --budget-s "$BUDGET_S" --out "$OUT" "${EXTRA[@]}" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "gpu_check: stopped at the ${LIMIT_S} s limit; $OUT holds the sections that finished"
elif [[ $status -ne 0 ]]; then
    echo "gpu_check: gpu_check.py exited $status; $OUT holds what it measured"
    exit "$status"
fi
echo "gpu_check: results in $OUT"
