#!/usr/bin/env bash
# Train the demo pair from scratch and convert it into weights/ (one GPU: about MINUTES + 1 minutes).
#
#   scripts/train_demo_pair.sh pair [MINUTES] [RUNS]    the small and the large model
#   scripts/train_demo_pair.sh align [MINUTES] [RUNS]   then an aligned small model (prediction alignment)
#
# `pair`, in MINUTES (default 8), all on one device at once:
#   - small: from scratch, for the first half;
#   - large-scratch: a large model from scratch, for the whole time;
#   - large-grown: once the small model is done, a large model grown from it (scripts/train.py --init-from:
#     it starts out computing exactly what the small model does), for the second half.
# Both large candidates also train the early-exit loss at decoder layer 2 (--exit-layer 2), so that their
# first two layers are a usable early-exit small model. The candidate with the higher dev BLEU becomes
# weights/large; both logs say why. `align` generates the calibration set with weights/large and fine-tunes
# the small model on it for MINUTES (default 2) into weights/aligned-small, with the hyperparameters of the
# CPU run that made the shipped one (docs/TRAINING.md).
# Every training run resumes from RUNS/<name>/checkpoint.pt, so a CPU run can be continued by running
# the same command again. For smoke tests: BLEU_LIMIT=N scores only the first N dev pairs, and
# CALIBRATION_LIMIT=N aligns on the first N training sources only.
set -euo pipefail
stage=${1:?usage: scripts/train_demo_pair.sh pair|align [MINUTES] [RUNS]}
runs=${3:-runs}
bleu=(--bleu --bleu-limit "${BLEU_LIMIT:-0}")
mkdir -p "$runs"

train() {  # NAME MINUTES ARGS...: train one model in the background, its log in RUNS/NAME.log
  local name=$1 minutes=$2
  shift 2
  python scripts/train.py model --out "$runs/$name" --tokenizer "$runs/spiece.model" --time-budget "$minutes" \
    --epochs 1000 --bf16 --export-dtype float16 "${bleu[@]}" "$@" > "$runs/$name.log" 2>&1
}

dev_bleu() {  # NAME: the dev BLEU its training log ends with
  sed -n 's/^dev greedy BLEU //p' "$runs/$1.log" | tail -n 1
}

if [ "$stage" = pair ]; then
  minutes=${2:-8}
  half=$(python -c "print($minutes / 2)")
  [ -f data/train.jsonl ] || python scripts/prepare_data.py
  [ -f "$runs/spiece.model" ] || python scripts/train.py tokenizer --out "$runs/spiece.model"
  train small "$half" --preset small --dropout 0.1 & small=$!
  train large-scratch "$minutes" --preset large --dropout 0.1 --exit-layer 2 --exit-weight 0.5 & scratch=$!
  wait $small || { echo "small model training failed: see $runs/small.log" >&2; exit 1; }
  train large-grown "$half" --preset grown --init-from "$runs/small/hf" --lr 5e-4 --warmup 200 --dropout 0.1 \
    --exit-layer 2 --exit-weight 0.5 & grown=$!
  wait $scratch || { echo "large model training failed: see $runs/large-scratch.log" >&2; exit 1; }
  wait $grown || { echo "large model training failed: see $runs/large-grown.log" >&2; exit 1; }
  echo "dev BLEU: small $(dev_bleu small), large-scratch $(dev_bleu large-scratch), large-grown $(dev_bleu large-grown)"
  best=$(python -c "print('large-grown' if float('$(dev_bleu large-grown)') > float('$(dev_bleu large-scratch)') else 'large-scratch')")
  echo "weights/large is $best"
  python scripts/convert_hf_t5.py "$runs/$best/hf" weights/large --dtype float16
  python scripts/convert_hf_t5.py "$runs/small/hf" weights/small --dtype float16
elif [ "$stage" = align ]; then
  minutes=${2:-2}
  python scripts/align.py generate --large weights/large --data data --out "$runs/align/data" \
    --limit "${CALIBRATION_LIMIT:-0}" --no-progress
  python scripts/align.py finetune --small weights/small --data "$runs/align/data" --out "$runs/aligned-small" \
    --time-budget "$minutes" --epochs 1000 --lr 5e-4 --warmup 100 --dropout 0.1 --label-smoothing 0 --ema 0.995 \
    --bf16 --export-dtype float16 "${bleu[@]}" > "$runs/aligned-small.log" 2>&1
  python scripts/convert_hf_t5.py "$runs/aligned-small/hf" weights/aligned-small --dtype float16
  python scripts/align.py agreement --large weights/large --small weights/small --small weights/aligned-small \
    --split data/dev.jsonl --limit 200 --no-progress
else
  echo "unknown stage '$stage': use pair or align" >&2
  exit 2
fi
