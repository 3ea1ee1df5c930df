#!/usr/bin/env bash
# One-shot GPU check of evit-deploy, run from the source tree (no install):
#   1. evit-deploy doctor
#   2. PyTorch CUDA fp16, eager and torch.compile: deit_small EViT keep 0.7 vs plain ViT at batch 64
#      (throughput, speed-up, top-1 and kept-token agreement with fp32)
#   3. FP16 and EViT's token choice: FP16 scores vs FP32 scores (PyTorch on the GPU)
#   4. where TensorRT is installed: export, build-engine (fp16), bench against the plain-ViT engine
#      built with the same settings, and kept tokens with the TopK scores in FP32 vs FP16
# Parts whose requirements are missing are skipped with one line saying why; the whole run stays
# within GPU_CHECK_BUDGET_S seconds (default 450, under 8 minutes).
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]     (default: $OUT/gpu_check, else a temp folder)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:+$OUT/gpu_check}}"
RESULTS="${RESULTS:-$(mktemp -d -t evit-gpu-check-XXXX)}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d -t evit-gpu-work-XXXX)"  # ONNX files and engines: large, not results
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export EVIT_DEPLOY_CACHE="$WORK/cache"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
cd "$ROOT"

SUMMARY=()
say() { echo "[gpu_check +${SECONDS}s] $*"; }
skip() { say "SKIP $1: $2"; SUMMARY+=("skipped  $1: $2"); }

# step NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a timeout that respects the budget,
# output to the terminal and RESULTS/NAME.log; returns CMD's status (124: timed out).
step() {
    local name="$1" max="$2" min="$3"; shift 3
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$min" ]; then
        skip "$name" "only ${left}s of the ${BUDGET}s budget left (needs ~${min}s)"
        return 125
    fi
    local limit=$(( max < left ? max : left ))
    say "RUN  $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > >(tee "$RESULTS/$name.log") 2>&1
    local status=$?
    wait  # for tee
    case $status in
        0) SUMMARY+=("ok       $name") ;;
        124) SUMMARY+=("TIMEOUT  $name (after ${limit}s)") ;;
        *) SUMMARY+=("FAILED   $name (exit $status, see $RESULTS/$name.log)") ;;
    esac
    return $status
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

say "python: $PY; results: $RESULTS"
# Preflight (CPU-safe): the project and the benchmark helpers import from the source tree without
# onnxslim and safetensors (absent on the GPU image), and which GPU PyTorch sees.
PREFLIGHT="$("$PY" -c "
import sys
sys.modules.update(onnxslim=None, safetensors=None)
import torch, evit_deploy.cli, gpu_torch_fp16, fp16_topk_scores, trt_kept_tokens
print(torch.__version__)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
")" || { echo "gpu_check: $PY cannot import torch, evit_deploy and the helpers from $ROOT (set PYTHON)" >&2; exit 1; }
TORCH="$(echo "$PREFLIGHT" | sed -n 1p)"
CUDA="$(echo "$PREFLIGHT" | sed -n 2p)"
say "torch $TORCH; helpers import without onnxslim and safetensors"

# 1. Environment.
step doctor 90 20 "$PY" -m evit_deploy doctor
"$PY" -m evit_deploy doctor --json > "$RESULTS/doctor.json" 2>/dev/null

if [ -z "$CUDA" ]; then
    skip "pytorch-cuda-fp16" "no CUDA GPU visible to PyTorch $TORCH (eager and torch.compile)"
    skip "fp16-topk-scores" "no CUDA GPU (on CPU: python benchmarks/fp16_topk_scores.py --device cpu, minutes)"
    skip "tensorrt" "no CUDA GPU"
else
    say "GPU: $CUDA"
    # 2. PyTorch CUDA fp16, eager, then compiled (separately: a failing compiler keeps the eager numbers).
    step pytorch-cuda-fp16-eager 120 40 "$PY" benchmarks/gpu_torch_fp16.py --batch 64 --modes eager \
        --json "$RESULTS/pytorch_cuda_fp16_eager.json"
    step pytorch-cuda-fp16-compile 200 90 "$PY" benchmarks/gpu_torch_fp16.py --batch 64 --modes compile \
        --json "$RESULTS/pytorch_cuda_fp16_compile.json"
    # 3. FP16 vs FP32 class-attention scores (kept tokens).
    step fp16-topk-scores 90 30 "$PY" benchmarks/fp16_topk_scores.py --device cuda --images 256 --json "$RESULTS/fp16_topk_scores.json"
    # 4. TensorRT.
    if ! has_module tensorrt; then
        skip "tensorrt" "TensorRT is not installed (pip install 'tensorrt>=10,<11')"
    elif ! has_module onnxslim; then
        skip "tensorrt" "onnxslim is not installed and export needs it (pip install onnxslim)"
    else
        ONNX="$WORK/deit_small_keep0.7.onnx"
        if step export 150 60 "$PY" -m evit_deploy export --model deit_small_patch16_224 --keep-rate 0.7 \
                --with-token-indices -o "$ONNX" \
            && step build-engine 240 60 "$PY" -m evit_deploy build-engine "$ONNX" -o "$WORK/evit.fp16.plan" \
                --opt-batch 64 --max-batch 128; then
            step tensorrt-bench 300 120 "$PY" -m evit_deploy bench "$WORK/evit.fp16.plan" --batch 64 \
                --min-seconds 2 --json-out "$RESULTS/tensorrt_bench.json"
            step build-engine-fp16-scores 200 60 "$PY" -m evit_deploy build-engine "$ONNX" \
                -o "$WORK/evit.fp16-scores.plan" --opt-batch 64 --max-batch 128 --fp16-topk-scores \
                && step tensorrt-kept-tokens 90 20 "$PY" benchmarks/trt_kept_tokens.py "$ONNX" \
                    "$WORK/evit.fp16.plan" "$WORK/evit.fp16-scores.plan" --json "$RESULTS/tensorrt_kept_tokens.json"
        fi
    fi
fi

echo
say "done in ${SECONDS}s (budget ${BUDGET}s); results in $RESULTS"
printf '  %s\n' "${SUMMARY[@]}"
for line in "${SUMMARY[@]}"; do
    case "$line" in FAILED*|TIMEOUT*) exit 1 ;; esac
done
exit 0
