#!/usr/bin/env bash
# The runs behind the README's quality headline and docs/quality.md on selection at density 0.5:
# HumanEval (Qwen2.5-Coder-0.5B, tuning split = problems 0-81, held out = 82-163),
# XSum rows 40-199 (SmolLM2, Gemma-3) and `eval chat` (all three embedded models).
# Each piece is a few engines, one at a time; run pieces on separate cores with CORE=0 / CORE=1, e.g.
#   CORE=0 bash benchmarks/quality_selection.sh humaneval-tune
#   CORE=1 bash benchmarks/quality_selection.sh humaneval-heldout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q=benchmarks/results/quality
export VLLM_CPU_OMP_THREADS_BIND=${CORE:-0} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
griffin() { taskset -c "${CORE:-0}" $PY -m vllm_griffin.tools.cli "$@"; }
QWEN=qwen2.5-coder-0.5b-instruct

humaneval() {  # $1 = first problem, $2 = count, $3 = output name
  local out=$Q/humaneval_$3_$QWEN.json
  griffin eval humaneval --model $QWEN --start "$1" --limit "$2" --methods full,topk,topk_magnitude,gated \
    --densities 0.5 --chunk 512 --out "$out"
  griffin eval humaneval --model $QWEN --start "$1" --limit "$2" --methods gated --densities 0.75 \
    --chunk 512 --out "$out" --append
  griffin eval humaneval --model $QWEN --start "$1" --limit "$2" --methods topk --densities 0.5 \
    --request-options '{"refresh": 4}' --chunk 512 --out "$out" --append
  combined humaneval --model $QWEN --start "$1" --limit "$2" --out "$out"
}

combined() {  # gated + refresh 4 at 0.5, appended to a task's results: $1 = task, the rest its options
  local task=$1; shift
  griffin eval "$task" --methods gated --densities 0.5 --request-options '{"refresh": 4}' --chunk 512 "$@" --append
}

xsum() {  # $1 = model
  griffin eval xsum --model "$1" --start 40 --limit 160 --max-tokens 48 --max-model-len 4096 --setting greedy \
    --methods full,topk,topk_magnitude,gated --densities 0.5 --chunk 512 --out $Q/xsum_rows40-199_$1.json
  combined xsum --model "$1" --start 40 --limit 160 --max-tokens 48 --max-model-len 4096 --setting greedy \
    --out $Q/xsum_rows40-199_$1.json
}

chat() {  # $1 = model
  griffin eval chat --model "$1" --methods full,topk,topk_magnitude,gated --densities 0.5 --chunk 512 \
    --out $Q/chat_$1.json
  griffin eval chat --model "$1" --methods topk --densities 0.5 --request-options '{"refresh": 4}' --chunk 512 \
    --out $Q/chat_$1.json --append
  combined chat --model "$1" --out $Q/chat_$1.json
}

case "${1:-all}" in
  humaneval-tune) humaneval 0 82 tune ;;
  humaneval-heldout) humaneval 82 82 heldout ;;
  xsum-smollm2) xsum smollm2-135m-instruct ;;
  xsum-gemma) xsum gemma-3-270m ;;
  chat) for m in smollm2-135m-instruct gemma-3-270m $QWEN; do chat $m; done ;;
  all) humaneval 0 82 tune; humaneval 82 82 heldout; xsum smollm2-135m-instruct; xsum gemma-3-270m
       for m in smollm2-135m-instruct gemma-3-270m $QWEN; do chat $m; done ;;
  # gated + refresh 4 alone (it is also inside the pieces above; it was measured after them)
  combined) for split in "0 tune" "82 heldout"; do set -- $split
              combined humaneval --model $QWEN --start "$1" --limit 82 --out $Q/humaneval_$2_$QWEN.json; done
            for m in smollm2-135m-instruct gemma-3-270m $QWEN; do combined chat --model $m --out $Q/chat_$m.json; done
            combined xsum --model smollm2-135m-instruct --start 40 --limit 160 --max-tokens 48 --max-model-len 4096 \
              --setting greedy --out $Q/xsum_rows40-199_smollm2-135m-instruct.json ;;
  # The cells of one shared engine (dense, topk, topk_magnitude, gated at 0.5), run again into the existing files:
  # session 9 found (cd6d1be) that until then a gated row in a CPU step could give other rows the wrong k.
  # Session 10 ran the two HumanEval splits (the same problems solved as before) and stopped there.
  remeasure) for split in "0 tune" "82 heldout"; do set -- $split
               griffin eval humaneval --model $QWEN --start "$1" --limit 82 --methods full,topk,topk_magnitude,gated \
                 --densities 0.5 --chunk 512 --out $Q/humaneval_$2_$QWEN.json --append; done
             for m in smollm2-135m-instruct gemma-3-270m; do
               griffin eval xsum --model $m --start 40 --limit 160 --max-tokens 48 --max-model-len 4096 --setting greedy \
                 --methods full,topk,topk_magnitude,gated --densities 0.5 --chunk 512 \
                 --out $Q/xsum_rows40-199_$m.json --append; done
             for m in smollm2-135m-instruct gemma-3-270m $QWEN; do
               griffin eval chat --model $m --methods full,topk,topk_magnitude,gated --densities 0.5 --chunk 512 \
                 --out $Q/chat_$m.json --append; done ;;
  # The loop guard (session 10; docs/quality.md), on Gemma-3's chat prompts, where the default loops more
  # than dense: guards of 0, 4 and 8 tokens on the tuning prompts 0-23, then 8 (the tuning split's best)
  # on all 48. It did not reduce loops, so it stayed off by default.
  loop-guard)
    out=$Q/tune_loop_guard_chat_gemma-3-270m.json
    griffin eval chat --model gemma-3-270m --split tune --methods full,gated --densities 0.5 --chunk 512 \
      --request-options '{"refresh": 4, "loop_guard": 0}' --out $out
    for n in 4 8; do
      griffin eval chat --model gemma-3-270m --split tune --methods gated --densities 0.5 --chunk 512 \
        --request-options "{\"refresh\": 4, \"loop_guard\": $n}" --out $out --append; done
    griffin eval chat --model gemma-3-270m --methods gated --densities 0.5 --chunk 512 \
      --request-options '{"refresh": 4, "loop_guard": 8}' --out $Q/loop_guard8_chat_gemma-3-270m.json ;;
  *) echo "unknown piece $1; allowed: humaneval-tune humaneval-heldout xsum-smollm2 xsum-gemma chat combined remeasure loop-guard all" >&2
     exit 2 ;;
esac
