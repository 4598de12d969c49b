#!/usr/bin/env bash
# The runs behind docs/quality.md, in pieces of a few minutes each on a
# 2-core CPU (one vLLM engine per piece; --append merges the pieces of a model into
# one JSON). Wall times measured here are in docs/quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q=benchmarks/results/quality
RUN="${RUN:-}"   # e.g. RUN="flock /tmp/vllm-griffin-engine.lock" on a machine shared with other engines
griffin() { $RUN $PY -m vllm_griffin.tools.cli "$@"; }
EXPORTS=$(mktemp -d)

for model in smollm2-135m-instruct gemma-3-270m; do
  rows=16; [ "$model" = gemma-3-270m ] && rows=8
  out=$Q/xsum_$model.json
  # 1. the paper's method and its baselines, greedy (experts exported for the overlap figure)
  griffin eval xsum --model $model --limit $rows --max-tokens 64 --out $out --setting greedy \
    --methods full,topk,magnitude,random,sample,topk_sample --export-experts $EXPORTS/$model
  # 2. the two variants, greedy
  griffin eval xsum --model $model --limit $rows --max-tokens 64 --out $out --append --setting greedy \
    --methods topk_down,topk_down_first_dense
  # 3. the issue's reference point: rows 0-39, 48 greedy tokens, density 0.5
  griffin eval xsum --model $model --limit 40 --max-tokens 48 --out $Q/xsum_ref40_$model.json --setting greedy \
    --methods full,topk,topk_down,topk_down_first_dense --densities 0.5
  # 4. topk_magnitude (the statistic plus a weight-magnitude prior): the sweep and the reference point
  griffin eval xsum --model $model --limit $rows --max-tokens 64 --out $out --append --setting greedy \
    --methods topk_magnitude
  griffin eval xsum --model $model --limit 40 --max-tokens 48 --out $Q/xsum_ref40_$model.json --append \
    --setting greedy --methods topk_magnitude --densities 0.5
  # 5. held out: rows 40-79 (the prior's weight was chosen on rows 0-19); row 65 needs more than 2048 tokens
  griffin eval xsum --model $model --start 40 --limit 40 --max-tokens 48 --max-model-len 4096 --setting greedy \
    --methods full,topk,topk_magnitude --densities 0.5 --out $Q/xsum_heldout40_$model.json
  $PY -m vllm_griffin.tools.cli plot overlap --experts $EXPORTS/$model --plot-methods topk,topk_sample \
    --out $Q/overlap_$model.json
done
# the paper's sampled setting (temperature 0.3)
griffin eval xsum --model smollm2-135m-instruct --limit 16 --max-tokens 64 --out $Q/xsum_smollm2-135m-instruct.json \
  --append --setting paper --methods full,topk,topk_down,topk_down_first_dense
griffin eval xsum --model gemma-3-270m --limit 8 --max-tokens 64 --out $Q/xsum_gemma-3-270m.json \
  --append --setting paper --methods full,topk,topk_down,topk_down_first_dense
griffin eval xsum --model smollm2-135m-instruct --limit 16 --max-tokens 64 --out $Q/xsum_smollm2-135m-instruct.json \
  --append --setting paper --methods topk_magnitude
griffin eval xsum --model gemma-3-270m --limit 8 --max-tokens 64 --out $Q/xsum_gemma-3-270m.json \
  --append --setting paper --methods topk_magnitude
rm -rf "$EXPORTS"
# Hugging Face model only (no engine)
$PY -m vllm_griffin.tools.cli plot flocking --model smollm2-135m-instruct --row 0 --out $Q/flocking_smollm2.png
$PY -m vllm_griffin.tools.cli plot flocking --model gemma-3-270m --row 0 --out $Q/flocking_gemma3.png
$PY -m vllm_griffin.tools.cli eval drift --model smollm2-135m-instruct --methods topk,topk_down,topk_down_first_dense \
  --densities 0.5 --prompts 2 --threads 1 --out $Q/drift_smollm2.json
$PY -m vllm_griffin.tools.cli eval drift --model smollm2-135m-instruct --methods topk_magnitude \
  --densities 0.5 --prompts 2 --threads 1 --out $Q/drift_smollm2_topk_magnitude.json
