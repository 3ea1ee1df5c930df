#!/usr/bin/env bash
# One-shot GPU check of evit-deploy, run from the source tree (no install), under 10 minutes:
#   1. evit-deploy doctor
#   2. where TensorRT is installed (TensorRT first: it is what this script exists for):
#      export (FP32, token indices; onnxslim not needed), build-engine FP16 (strongly typed, the
#      graph converted with FP32 TopK-score islands, --detailed-profile), the islands' precision
#      read back with the engine inspector (fails if one is not FP32, "no evidence" if none is
#      visible), an FP32 engine, kept tokens
#      and top-1 of both engines against FP32 ONNX Runtime at batch 1, 7, 64 and 128 (before the
#      bench: NVIDIA/TensorRT#2299), then bench against the plain-ViT engine built with the same
#      settings, and if time remains the FP16 engine without the score islands
#   2b. TensorRT FP16, the old EViT graph against the new (issue 21): the graph from before the
#      fusion-friendly export (benchmarks/old_graph.py: explicit softmax(QK^T) in the drop blocks,
#      torch.gather with a broadcast index) built like the new one, then both and their plain ViT
#      timed interleaved at batch 1 and 64 with a per-layer profile (benchmarks/trt_graph_profile.py:
#      IProfiler times per layer type and for the drop machinery)
#   3. PyTorch CUDA fp16, eager and torch.compile: deit_small EViT keep 0.7 vs plain ViT at batch 64
#   4. FP16 and EViT's token choice: FP16 scores vs FP32 scores (PyTorch on the GPU)
# Parts whose requirements are missing (no GPU, no TensorRT, a Python module that does not import:
# onnx and onnxruntime are needed by the TensorRT part only) are skipped with one line saying why,
# and the rest is measured. Every step, the preflight included, runs under a timeout, and the
# whole run stays within GPU_CHECK_BUDGET_S seconds (default 570, 9.5 minutes). GPU_CHECK_ONLY
# names the parts to run (doctor, tensorrt, graphs (2b), pytorch, scores; comma-separated), so
# that a part the budget would cut off gets a run of its own.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]     (default: $OUT/gpu_check, else a temp folder)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_ONLY=graphs bash benchmarks/gpu_check.sh     (2b alone)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:+$OUT/gpu_check}}"
RESULTS="${RESULTS:-$(mktemp -d -t evit-gpu-check-XXXX)}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d -t evit-gpu-work-XXXX)"  # ONNX files and engines: large, not results
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export EVIT_DEPLOY_CACHE="$WORK/cache"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
cd "$ROOT"

SUMMARY=()
say() { echo "[gpu_check +${SECONDS}s] $*"; }
skip() { say "SKIP $1: $2"; SUMMARY+=("skipped  $1: $2"); }

# step NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a timeout that respects the budget,
# output to the terminal and RESULTS/NAME.log; returns CMD's status (124: timed out; 3: it ran
# but found nothing to judge, e.g. no island tensor visible in the engine: not a failure).
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
        3) SUMMARY+=("NO EVIDENCE $name (see $RESULTS/$name.log)") ;;
        *) SUMMARY+=("FAILED   $name (exit $status, see $RESULTS/$name.log)") ;;
    esac
    return $status
}

say "python: $PY; results: $RESULTS"
# Preflight (CPU-safe, at most 120 s): which GPU PyTorch sees, whether TensorRT is installed (not
# imported here), and per part whether its Python modules import from the source tree without
# onnxslim and safetensors (absent on the GPU image): "part NAME ok" or "part NAME REASON".
# The TensorRT part's modules (onnx, onnxruntime, its helpers) are tried only where TensorRT is.
PREFLIGHT="$(timeout --kill-after=10 120 "$PY" - 2>&1 <<'PYTHON'
import importlib, importlib.util, sys
sys.modules.update(onnxslim=None, safetensors=None)
import torch, evit_deploy
print("torch", torch.__version__)
print("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
parts = {"doctor": ["evit_deploy.cli"], "pytorch": ["gpu_torch_fp16"], "scores": ["fp16_topk_scores"]}
if importlib.util.find_spec("tensorrt") is not None:
    parts["tensorrt"] = ["onnx", "onnxscript", "onnxruntime", "evit_deploy.cli", "trt_kept_tokens", "trt_layer_precisions"]
    parts["graphs"] = [*parts["tensorrt"], "old_graph", "trt_graph_profile"]
for part, modules in parts.items():
    reason = "ok"
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            reason = f"{module} does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            break
    print("part", part, reason)
PYTHON
)"
status=$?
if [ $status -ne 0 ]; then
    echo "$PREFLIGHT" | tail -3 >&2
    [ $status -eq 124 ] && echo "gpu_check: the preflight timed out after 120 s" >&2
    echo "gpu_check: $PY cannot import torch and evit_deploy from $ROOT (set PYTHON)" >&2
    exit 1
fi
TORCH="$(echo "$PREFLIGHT" | sed -n 's/^torch //p')"
CUDA="$(echo "$PREFLIGHT" | sed -n 's/^cuda //p')"
# why NAME: "" when the part's modules import and GPU_CHECK_ONLY (if set) lists it, else the
# reason to skip it
why() {
    local reason
    reason="$(echo "$PREFLIGHT" | sed -n "s/^part $1 //p" | sed 's/^ok$//')"
    if [ -z "$reason" ] && [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$1,"* ]]; then
        reason="not in GPU_CHECK_ONLY ($GPU_CHECK_ONLY)"
    fi
    echo "$reason"
}
say "torch $TORCH; modules import without onnxslim and safetensors where no reason is given below"

# 1. Environment.
if [ -n "$(why doctor)" ]; then
    skip doctor "$(why doctor)"
else
    step doctor 90 20 "$PY" -m evit_deploy doctor
    step doctor-json 60 15 bash -c '"$0" -m evit_deploy doctor --json > "$1"' "$PY" "$RESULTS/doctor.json"
fi

tensorrt_steps() {
    local onnx="$WORK/deit_small_keep0.7.onnx" fp16="$WORK/evit.fp16.plan" fp32="$WORK/evit.fp32.plan"
    local engine_args=(--opt-batch 64 --max-batch 128)
    step export 150 40 "$PY" -m evit_deploy export --model deit_small_patch16_224 --keep-rate 0.7 \
        --with-token-indices -o "$onnx" || return
    step build-engine-fp16 200 60 "$PY" -m evit_deploy build-engine "$onnx" -o "$fp16" "${engine_args[@]}" \
        --detailed-profile --json || return
    # Strongly typed: the score islands must be FP32 in the engine itself (exit 1 otherwise;
    # 3, "no evidence", when every island tensor is inside a fused layer).
    step tensorrt-layer-precisions 60 15 "$PY" benchmarks/trt_layer_precisions.py "$onnx" "$fp16" \
        --json "$RESULTS/tensorrt_layer_precisions.json"
    local engines=("$fp16")
    if step build-engine-fp32 150 60 "$PY" -m evit_deploy build-engine "$onnx" -o "$fp32" --fp32 "${engine_args[@]}"; then
        engines+=("$fp32")
    fi
    # Before the bench: kept tokens at batch 1, 7, 64, 128 (TopK -> Gather, NVIDIA/TensorRT#2299).
    step tensorrt-kept-tokens 90 20 "$PY" benchmarks/trt_kept_tokens.py "$onnx" "${engines[@]}" \
        --images 128 --batches 1,7,64,128 --json "$RESULTS/tensorrt_kept_tokens.json"
    step tensorrt-bench 200 90 "$PY" -m evit_deploy bench "$fp16" --batch 64 \
        --min-seconds 2 --json-out "$RESULTS/tensorrt_bench.json"
    step build-engine-fp16-scores 150 60 "$PY" -m evit_deploy build-engine "$onnx" \
        -o "$WORK/evit.fp16-scores.plan" "${engine_args[@]}" --fp16-topk-scores \
        && step tensorrt-kept-tokens-fp16-scores 60 20 "$PY" benchmarks/trt_kept_tokens.py "$onnx" \
            "$WORK/evit.fp16-scores.plan" --images 128 --batches 64 --min-top1 0 --min-consistency 0 \
            --json "$RESULTS/tensorrt_kept_tokens_fp16_scores.json"
    return 0
}

# The old and the new EViT graph in TensorRT FP16 (after tensorrt_steps, which exported the new
# graph and built its engine and the plain ViT's; whatever is missing is made here).
tensorrt_graph_steps() {
    local new="$WORK/deit_small_keep0.7.onnx" old="$WORK/old_evit.onnx"
    local engine_args=(--opt-batch 64 --max-batch 128 --detailed-profile)
    if [ ! -f "$new" ]; then
        step export 150 40 "$PY" -m evit_deploy export --model deit_small_patch16_224 --keep-rate 0.7 \
            --with-token-indices -o "$new" || return
    fi
    if [ ! -f "$WORK/evit.fp16.plan" ]; then
        step build-engine-fp16 200 60 "$PY" -m evit_deploy build-engine "$new" -o "$WORK/evit.fp16.plan" \
            "${engine_args[@]}" || return
    fi
    step export-old-graph 150 40 "$PY" benchmarks/old_graph.py --model deit_small_patch16_224 --keep-rate 0.7 \
        --with-token-indices -o "$old" || return
    step build-engine-fp16-old 200 60 "$PY" -m evit_deploy build-engine "$old" -o "$WORK/old_evit.fp16.plan" \
        "${engine_args[@]}" || return
    step tensorrt-old-vs-new 300 90 "$PY" benchmarks/trt_graph_profile.py "new=$WORK/evit.fp16.plan:$new" \
        "old=$WORK/old_evit.fp16.plan:$old" --batches 1,64 --min-seconds 2 --json "$RESULTS/tensorrt_old_vs_new.json"
}

if [ -z "$CUDA" ]; then
    skip "tensorrt" "no CUDA GPU"
    skip "tensorrt-old-vs-new" "no CUDA GPU (TensorRT FP16, the old EViT graph against the new, per-layer profile)"
    skip "pytorch-cuda-fp16" "no CUDA GPU visible to PyTorch $TORCH (eager and torch.compile)"
    skip "fp16-topk-scores" "no CUDA GPU (on CPU: python benchmarks/fp16_topk_scores.py --device cpu, minutes)"
else
    say "GPU: $CUDA"
    # 2. TensorRT (export works without onnxslim: it only skips the simplification).
    if ! echo "$PREFLIGHT" | grep -q '^part tensorrt '; then
        skip "tensorrt" "TensorRT is not installed (pip install 'tensorrt>=10.12,<12')"
    elif [ -n "$(why tensorrt)" ]; then
        skip "tensorrt" "$(why tensorrt)"
    else
        tensorrt_steps
    fi
    if ! echo "$PREFLIGHT" | grep -q '^part tensorrt '; then
        skip "tensorrt-old-vs-new" "TensorRT is not installed"
    elif [ -n "$(why graphs)" ]; then
        skip "tensorrt-old-vs-new" "$(why graphs)"
    else
        tensorrt_graph_steps
    fi
    # 3. PyTorch CUDA fp16, eager, then compiled (separately: a failing compiler keeps the eager numbers).
    if [ -n "$(why pytorch)" ]; then
        skip "pytorch-cuda-fp16" "$(why pytorch)"
    else
        step pytorch-cuda-fp16-eager 120 40 "$PY" benchmarks/gpu_torch_fp16.py --batch 64 --modes eager \
            --json "$RESULTS/pytorch_cuda_fp16_eager.json"
        step pytorch-cuda-fp16-compile 200 90 "$PY" benchmarks/gpu_torch_fp16.py --batch 64 --modes compile \
            --json "$RESULTS/pytorch_cuda_fp16_compile.json"
    fi
    # 4. FP16 vs FP32 class-attention scores (kept tokens).
    if [ -n "$(why scores)" ]; then
        skip "fp16-topk-scores" "$(why scores)"
    else
        step fp16-topk-scores 90 30 "$PY" benchmarks/fp16_topk_scores.py --device cuda --images 256 --json "$RESULTS/fp16_topk_scores.json"
    fi
fi

echo
say "done in ${SECONDS}s (budget ${BUDGET}s); results in $RESULTS"
printf '  %s\n' "${SUMMARY[@]}"
for line in "${SUMMARY[@]}"; do
    case "$line" in FAILED*|TIMEOUT*) exit 1 ;; esac
done
exit 0
