#!/usr/bin/env bash
# End-to-end on the embedded default model (issue #3): the default model is its own teacher.
# Distil 200 GPTeacher role-play instructions through the 4 default stages, then LoRA-train every
# stage for 1 epoch, then answer with the trained stack. Usage: bash recipes/train_default_stack.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/gpteacher/roleplay-simple-deduped-roleplay-instruct.json}
OUT=${2:-runs/default-stack}

time slmstack distill --teacher default --data "$DATA" --limit 200 --batch-size 32 \
  --max-new-tokens 40 --keep-unfinished --out "$OUT/distill"
time slmstack train --data "$OUT/distill" --out "$OUT/train" --epochs 1 --batch-size 8 --max-length 256
time slmstack run --stack "$OUT/train/trained_stack.yaml" --plain "Imagine you are a lighthouse keeper. Describe your evening."
