#!/usr/bin/env bash
# The README's evaluation table (issue #4): the default model, the untrained default stack and the stack
# trained by recipes/train_default_stack.sh, on six tiny (100-item, seeded) zero-shot subsets.
# Usage: bash recipes/eval_report.sh [DATA_DIR] [TRAINED_STACK] [OUT]
set -euo pipefail
DATA=${1:-../shared/data}
TRAINED=${2:-runs/default-stack/train/trained_stack.yaml}
OUT=${3:-runs/eval}
TASKS=arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq
# Upstream stages generate at most 24 tokens each here, 32 inputs per batch, to bound CPU time.
FAST=(--set batch_size=32 --set stages.0.generation.max_new_tokens=24 --set stages.1.generation.max_new_tokens=24
      --set stages.2.generation.max_new_tokens=24)

time slmstack eval --model default --tasks $TASKS --subset tiny --data-dir "$DATA" --out "$OUT/default-model.json"
time slmstack eval "${FAST[@]}" --tasks $TASKS --subset tiny --data-dir "$DATA" --out "$OUT/default-stack.json"
time slmstack eval --stack "$TRAINED" "${FAST[@]}" --tasks $TASKS --subset tiny --data-dir "$DATA" --out "$OUT/trained-stack.json"
slmstack compare "$OUT/default-model.json" "$OUT/default-stack.json" "$OUT/trained-stack.json" --png docs/eval_tiny.png
