#!/usr/bin/env bash
# The runs behind README's "Quality" section, in pieces of a few minutes each
# (one vLLM engine per piece; --append merges them into one JSON per model).
# Times measured on the 2-core CPU box are in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q=benchmarks/results/quality
RUN="${RUN:-}"   # e.g. RUN="flock /tmp/vllm-griffin-engine.lock" on a shared machine
GRIFFIN="$RUN $PY -m vllm_griffin.cli"

xsum() {  # model rows tokens out extra-args...
  local model=$1 rows=$2 tokens=$3 out=$4; shift 4
  $GRIFFIN eval xsum --model "$model" --limit "$rows" --max-tokens "$tokens" --dtype float32 --out "$out" "$@"
}

for model in smollm2-135m-instruct gemma-3-270m; do
  rows=20; [ "$model" = gemma-3-270m ] && rows=${GEMMA_ROWS:-10}
  out=$Q/xsum_$model.json
  # 1. the paper's methods and baselines, greedy
  xsum $model $rows 64 $out --setting greedy --methods full,topk,magnitude,random,sample,topk_sample
  # 2. the new methods, greedy
  xsum $model $rows 64 $out --append --setting greedy --methods topk_down,topk_down_first_dense
  # 3. the paper's sampled setting (temperature 0.3, seed per row)
  xsum $model $rows 64 $out --append --setting paper --methods full,topk,topk_down,topk_down_first_dense
  # 4. the issue's reference point: rows 0-39, 48 greedy tokens, density 0.5
  xsum $model 40 48 $Q/xsum_ref40_$model.json --setting greedy --methods full,topk,topk_down,topk_down_first_dense \
    --densities 0.5 --export-experts $Q/experts_$model
  $PY -m vllm_griffin.cli plot overlap --experts $Q/experts_$model --out $Q/overlap_$model.json
  rm -rf $Q/experts_$model
done
$PY -m vllm_griffin.cli plot flocking --model smollm2-135m-instruct --row 0 --out $Q/flocking_smollm2.png
$PY -m vllm_griffin.cli plot flocking --model gemma-3-270m --row 0 --out $Q/flocking_gemma3.png
$PY -m vllm_griffin.cli eval drift --model smollm2-135m-instruct --methods topk,topk_down,topk_down_first_dense \
  --densities 0.5 --out $Q/drift_smollm2.json
