#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (about 8 minutes at most; no vLLM needed there):
#   1. benchmarks/gpu_model.py: whole-model decode, dense vs GRIFFIN 0.25/0.5/0.75 vs the
#      half-FF twin, batch 1/2/4/8, CUDA graphs, with its correctness check first;
#   2. benchmarks/gpu_kernels.py --only union: the union kernel's timings and the fit of its
#      cost constants (GPU_COST in vllm_griffin/ops/dispatch.py);
#   3. gpu_model.py again at batch 1, density 0.5, with the per-row kernel's block shape
#      that benchmarks/results/h200_triton_experts.json found best (128 x 64) instead of
#      the kernel's default the engine runs.
# Each step has its own time limit, so a hang in one leaves the others their time.
# Everything lands in $OUT (7 files):
#
#     bash benchmarks/device_run.sh        # from the repository root
set -u
OUT=${OUT:-device_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

run() {  # run NAME SECONDS ARGS...: one step, its output in $OUT/NAME.log (the end echoed here)
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds} s): $*"
    timeout "$seconds" "$PY" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "== $name: exit $rc"
    STATUS="$STATUS $name=$rc"
}
STATUS=""

run gpu_model 210 benchmarks/gpu_model.py --out "$OUT/gpu_model.json"
run gpu_kernels_union 180 benchmarks/gpu_kernels.py --only union --out "$OUT/gpu_kernels_union.json"
run gpu_model_rows128x64 75 benchmarks/gpu_model.py --batches 1 --densities 0.5 --row-block-k 128 \
    --row-block-h 64 --skip-check --out "$OUT/gpu_model_rows128x64.json"

echo "== summary:$STATUS"
grep -E "^check:|CHECK FAILED|^batch 1:" "$OUT/gpu_model.log"
grep -A 25 "^GPU_COST union" "$OUT/gpu_kernels_union.log"
grep -E "^batch 1:" "$OUT/gpu_model_rows128x64.log"
