#!/usr/bin/env bash
# Train the shipped demo pair from scratch and convert it into weights/.
#   scripts/train_demo_pair.sh [MINUTES] [RUNS]
# MINUTES: training time per model (both train at once, on one GPU or CPU); RUNS: work folder (default runs).
# Each model resumes from RUNS/<name>/checkpoint.pt, so a CPU run can be continued by running this again.
set -euo pipefail
minutes=${1:-6.5}
runs=${2:-runs}
mkdir -p "$runs"
[ -f data/train.jsonl ] || python scripts/prepare_data.py
[ -f "$runs/spiece.model" ] || python scripts/train.py tokenizer --out "$runs/spiece.model"
common=(--tokenizer "$runs/spiece.model" --time-budget "$minutes" --epochs 1000 --bf16 --export-dtype float16 --bleu)
python scripts/train.py model --preset large --dropout 0.2 --out "$runs/large" "${common[@]}" > "$runs/large.log" 2>&1 &
large=$!
python scripts/train.py model --preset small --dropout 0.1 --out "$runs/small" "${common[@]}" > "$runs/small.log" 2>&1 &
small=$!
wait $large || { echo "large model training failed: see $runs/large.log" >&2; exit 1; }
wait $small || { echo "small model training failed: see $runs/small.log" >&2; exit 1; }
tail -n 3 "$runs/large.log" "$runs/small.log"
for name in large small; do
  python scripts/convert_hf_t5.py "$runs/$name/hf" "weights/$name" --dtype float16
done
