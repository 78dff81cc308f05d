#!/usr/bin/env bash
# Everything in minibild that needs a CUDA GPU, in one run of at most 8 minutes on one GPU (the steps' time limits
# add up to 470 s):
#   1. the CUDA tests (tests/test_cuda.py: float32, float16 and bfloat16 against transformers on the GPU, BiLD's
#      exactness on the GPU, the shipped pair in every dtype);
#   2. the command line on the GPU in float16 (a real trace);
#   3. the latency table of the shipped pair in float32, float16 and bfloat16 with scripts/evaluate.py: large and
#      small greedy, BiLD, exact BiLD, speculative decoding and transformers' greedy and assisted generation, then
#      the early-exit small model (the large model's first 2 decoder layers), exact and not.
# It writes docs/gpu/ (the JSON and printed tables of every step) and docs/GPU.md (the tables, the device, the
# commands). Run it from a checkout after `pip install -e '.[test]'`; it installs nothing. Without CUDA it says
# so and exits 0. Each step has a time limit; a step that fails or runs out of time is reported in docs/GPU.md,
# the others still run, and the script exits 1.
#
#   scripts/gpu_report.sh            # LIMIT=30 sentences of data/test.jsonl per latency run by default
#   LIMIT=100 scripts/gpu_report.sh  # more sentences, if the step times in docs/GPU.md leave room under the limits
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "scripts/gpu_report.sh needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)."
    echo "Nothing was run. On a machine with one: pip install -e '.[test]' && scripts/gpu_report.sh"
    exit 0
fi

LIMIT=${LIMIT:-30}
OUT=docs/gpu
HF=runs/gpu  # the Hugging Face copies of the shipped pair, for transformers' baselines (runs/ is not committed)
mkdir -p "$OUT" "$HF"
rm -f "$OUT"/*.json "$OUT"/*.txt
status=0

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in $OUT/NAME.txt and on the terminal;
# record the command, its exit status and its wall time in $OUT/steps.txt.
step() {
    local name=$1 limit=$2 start=$SECONDS code=0 shown="" arg
    shift 2
    for arg in "$@"; do  # the command as one line, arguments with spaces quoted
        case $arg in *" "*|*$'\n'*) shown+="\"${arg//$'\n'/; }\" " ;; *) shown+="$arg " ;; esac
    done
    echo "== $name: $shown"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || code=$?
    cat "$OUT/$name.txt"
    if [ "$code" -ne 0 ]; then
        status=1
        [ "$code" -eq 124 ] && echo "== $name: stopped after its limit of $limit s" || echo "== $name: exit $code"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" "${shown% }" >> "$OUT/steps.txt"
}

step tests 120 python -m pytest -q -rs tests/test_cuda.py
step cli 45 python -m minibild --device cuda --dtype float16 --trace "Jesús lloró."
step hf-copies 45 python -c "import minibild; from minibild.weights import save_hf
[save_hf(minibild.load(f'weights/{m}'), f'$HF/hf-{m}') for m in ('large', 'small')]"
COMMON=(--split data/test.jsonl --limit "$LIMIT" --device cuda --dtype float32 float16 bfloat16
        --max-new-tokens 128 --warmup 3 --no-progress)
step latency 170 python scripts/evaluate.py "${COMMON[@]}" --hf-large "$HF/hf-large" --hf-small "$HF/hf-small" \
    --json "$OUT/latency.json"
step latency-early-exit 90 python scripts/evaluate.py "${COMMON[@]}" --exit-layer 2 \
    --systems large small bild:0.6,0 bild:0.2,3 speculative:5 --json "$OUT/latency-early-exit.json"

# docs/GPU.md from what the steps wrote.
python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
steps = [line.split("\t") for line in (out / "steps.txt").read_text().splitlines()]
lines = ["# minibild on a GPU", "",
         "Written by `scripts/gpu_report.sh` (the figures, the device, the commands); run it again to refresh this "
         "page. Raw outputs: [`docs/gpu/`](gpu/).", ""]
tests = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
lines += ["## Steps", "", "| step | exit | seconds | command |", "|---|---|---|---|"]
lines += [f"| {name} | {code} | {seconds} | `{command}` |" for name, code, seconds, command in steps]
lines += ["", f"CUDA tests (`tests/test_cuda.py`): {tests[-1] if tests else 'no output'}", ""]
cli = out / "cli.txt"
if cli.exists():
    lines += ["The command line on the GPU in float16:", "", "```", cli.read_text().strip(), "```", ""]

COLUMNS = [("bleu", "BLEU", ".2f"), ("median_ms", "median ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("same_as_large", "= large", ".0%"), ("tokens_per_large_call", "tokens/large call", ".2f"),
           ("large_share", "large share", ".0%")]
for name, title in (("latency", "The shipped pair"), ("latency-early-exit", "Early exit at decoder layer 2")):
    path = out / f"{name}.json"
    if not path.exists():
        lines += [f"## {title}", "", f"No figures: the step `{name}` finished no dtype (see Steps).", ""]
        continue
    report = json.loads(path.read_text())
    meta = report["meta"]
    command = next((c for n, _, _, c in steps if n == name), "")
    lines += [f"## {title}", "",
              f"{meta['device']}, torch {meta['torch']}" + (f", transformers {meta['transformers']}"
                                                            if meta.get("transformers") else "")
              + f"; {meta['inputs']}, batch 1, after {meta['warmup']} warm-up rounds; speedup: large greedy's total "
              "latency over the system's, in the same run.", "", f"`{command}`", ""]
    for run in report["runs"]:
        lines += [f"**{run['dtype']}** ({run['sentences']} sentences)", "",
                  "| system | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for label, entry in run["systems"].items():
            cells = [format(entry[key], fmt) if key in entry else "-" for key, _, fmt in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        differs = {label: e["differs_from_large"] for label, e in run["systems"].items() if e.get("differs_from_large")}
        lines += ["", "Exact systems: " + ("all identical to large greedy." if not differs else "; ".join(
            f"{label} differs on {len(d)} sentences" for label, d in differs.items())), ""]
(out.parent / "GPU.md").write_text("\n".join(lines))
print(f"wrote {out.parent / 'GPU.md'}")
EOF
exit $status
