"""Prediction alignment, the paper's "aligned small model": fine-tune the small model on the large model's own
greedy outputs for the training sources, so that it proposes the tokens the large model would accept.

    python scripts/align.py generate --large weights/large --data data --out runs/align/data
    python scripts/align.py finetune --small weights/small --data runs/align/data --out runs/aligned-small \\
        --lr 3e-4 --warmup 200 --epochs 3
    python scripts/convert_hf_t5.py runs/aligned-small/hf weights/aligned-small --dtype float16
    python scripts/align.py agreement --large weights/large --small weights/small --small weights/aligned-small

`generate` writes the calibration set: OUT/train.jsonl pairs every source of DATA/train.jsonl with the large
model's greedy output (batched greedy decoding, deterministic) as its reference, and OUT/dev.jsonl is
DATA/dev.jsonl unchanged, so that the dev loss printed while fine-tuning is against real references. The test
split and the reserved book (Mark) never reach the calibration set. An output may be at most --max-ratio times
its source's length plus 16 tokens (a real reference of the training split is at most 2x + 2) and at most
--max-new-tokens: one that is cut there, without EOS, is a runaway repetition loop ("two of every kind of every
kind of ..."). Runaways are left out of the calibration set, because training on a cut output teaches the small
model not to stop; they are counted and the first few printed. Each batch stops at its longest source's cap.

`finetune` is scripts/train.py's `model` command started from the small model on the calibration set. It picks
the preset whose shape is the small model's, so that --init-from is a plain copy of its weights, takes the
tokenizer stored beside it, and first writes a minibild checkpoint out as the Hugging Face folder train.py
starts from (OUT/init). Every other option goes to train.py as it is. The same run by hand:

    python scripts/train.py model --preset small --init-from runs/small/hf --data runs/align/data \\
        --tokenizer runs/spiece.model --out runs/aligned-small --lr 3e-4 --warmup 200 --epochs 3

`agreement` BiLD-decodes a split with each small model in turn (interleaved, as scripts/evaluate.py does) and
reports the share of the small model's proposals that the large model accepts, accepted / (accepted + rolled
back) small tokens, with the fallback rate (fallbacks / small-model calls) and the share of output tokens the
small model wrote. Several --small models make "before vs after alignment" one command; --exit-layer K adds
the early-exit small model (the large model's first K decoder layers) beside them.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import minibild  # noqa: E402
import train  # noqa: E402
from evaluate import (DTYPES, WEIGHTS, UsageError, common_arguments, decode_interleaved, device_name,  # noqa: E402
                      format_table, pick_device, read_split, report_errors, start, summarize, warm_up)
from minibild import bild  # noqa: E402
from minibild.modes import Mode  # noqa: E402
from minibild.weights import from_hf, save_hf, tokenizer_path  # noqa: E402
from prepare_data import RESERVED_BOOKS, TEST_BOOKS  # noqa: E402


def tokenizer_beside(path) -> minibild.Tokenizer:
    spiece = tokenizer_path(path)
    if spiece is None:
        raise UsageError(f"{path}: no spiece.model beside the weights")
    return minibild.Tokenizer(spiece)


# --- generate: the calibration set ------------------------------------------------------------------------

def generate(args):
    data, out = Path(args.data), Path(args.out)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.max_ratio > 0:
        raise UsageError(f"--max-ratio must be > 0, got {args.max_ratio}")
    if out.resolve() == data.resolve():
        raise UsageError(f"--out {out} is the --data folder: the calibration set would overwrite the training data")
    if not (data / "dev.jsonl").exists():
        raise UsageError(f"{data / 'dev.jsonl'}: no such split; run scripts/prepare_data.py")
    rows = read_split(data / "train.jsonl", args.limit)
    held_out = sorted({row["book"] for row in rows if row.get("book") in TEST_BOOKS + RESERVED_BOOKS})
    if held_out:
        raise UsageError(f"{data / 'train.jsonl'} holds verses of {', '.join(held_out)}, which belong to the test "
                         "split or are reserved; rebuild the splits with scripts/prepare_data.py")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    large = minibild.load(args.large, device=device, dtype=DTYPES[args.dtype])
    tok = tokenizer_beside(args.large)
    sources = [tok.encode(row["source"]) for row in rows]
    cap = partial(length_cap, args.max_ratio)
    outputs = train.translate(large, sources, device, args.batch_size, args.max_new_tokens, not args.no_progress,
                              length_cap=cap)
    eos = large.config.eos_token_id
    runaways = {i for i, (ids, source) in enumerate(zip(outputs, sources))
                if eos not in ids or len(ids) - 1 > cap(len(source))}  # a row may outrun its own cap in its batch
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for i, (row, ids) in enumerate(zip(rows, outputs)):
            if i not in runaways:
                f.write(json.dumps({**row, "reference": tok.decode(ids)}, ensure_ascii=False) + "\n")
    shutil.copyfile(data / "dev.jsonl", out / "dev.jsonl")
    for i in sorted(runaways)[:3]:
        print(f"runaway, left out: {rows[i]['source'][:60]!r} -> {tok.decode(outputs[i])[:80]!r}...", file=sys.stderr)
    print(f"wrote {out / 'train.jsonl'} ({len(rows) - len(runaways)} pairs; {len(runaways)} runaway outputs, cut "
          f"at {args.max_ratio:g} x source + {LENGTH_SLACK} or --max-new-tokens {args.max_new_tokens} tokens "
          f"without EOS, left out) and {out / 'dev.jsonl'} (real references)", file=sys.stderr)


LENGTH_SLACK = 16  # tokens allowed beyond max_ratio x source length, for very short sources


def length_cap(max_ratio: float, source_length: int) -> int:
    """The most tokens an output of a source this long may take before it counts as a runaway."""
    return int(max_ratio * source_length) + LENGTH_SLACK


# --- finetune: scripts/train.py from the small model ---------------------------------------------------------

def preset_of(config: minibild.T5Config, source) -> str:
    """The name of train.py's preset that builds exactly this config (dropout aside)."""
    for name, shape in train.PRESETS.items():
        if minibild.T5Config(vocab_size=config.vocab_size, dropout_rate=0, **shape) == \
                dataclasses.replace(config, dropout_rate=0):
            return name
    raise UsageError(f"{source}: no preset of scripts/train.py has this model's shape (d_model {config.d_model}, "
                     f"{config.num_heads} heads, d_ff {config.d_ff}, {config.num_layers} encoder / "
                     f"{config.num_decoder_layers} decoder layers); add it to PRESETS or run train.py by hand")


def finetune(args):
    taken = {"--preset", "--init-from"} & {option.partition("=")[0] for option in args.train_options}
    if taken:
        raise UsageError(f"{', '.join(sorted(taken))}: finetune sets this itself from --small")
    small_path = Path(args.small)
    is_hf = (small_path / "config.json").exists()
    small = from_hf(small_path) if is_hf else minibild.load(small_path)
    preset = preset_of(small.config, small_path)
    tokenizer = args.tokenizer or tokenizer_path(small_path)
    if tokenizer is None:
        raise UsageError(f"{small_path}: no spiece.model beside the weights; give --tokenizer")
    # train.py starts from Hugging Face folders: write a minibild checkpoint out as one first.
    hf_dir = small_path if is_hf else save_hf(small, Path(args.out) / "init", tokenizer=tokenizer)
    train.main(["model", "--preset", preset, "--init-from", str(hf_dir), "--data", args.data,
                "--tokenizer", str(tokenizer), "--out", args.out, *args.train_options])


# --- agreement: how often the large model accepts the small model's proposals ----------------------------

def agreement_entry(run: dict) -> dict:
    """BiLD's counts over one small model's run (from decode_interleaved), its acceptance and fallback rates,
    and evaluate.summarize's figures (the small model's token share among them)."""
    stats = [result.stats for result in run["results"]]
    entry = {name: sum(getattr(s, name) for s in stats)
             for name in ("accepted_small_tokens", "rolled_back_tokens", "fallbacks", "small_calls")}
    proposals = entry["accepted_small_tokens"] + entry["rolled_back_tokens"]  # kept by the small model, then judged
    if proposals:
        entry["acceptance"] = entry["accepted_small_tokens"] / proposals
    if entry["small_calls"]:
        entry["fallback_rate"] = entry["fallbacks"] / entry["small_calls"]
    return {**entry, **summarize(run, None)}


COLUMNS = [("acceptance", "accepted", ".1%"), ("fallback_rate", "fallback rate", ".1%"),
           ("small_token_share", "small share", ".1%"), ("rollbacks_per_sentence", "rollbacks/sent", ".2f"),
           ("tokens_per_large_call", "tokens/large call", ".2f"), ("mean_output_tokens", "tokens", ".1f"),
           ("median_ms", "median ms", ".1f")]


def agreement(args):
    smalls = args.small or ([] if args.exit_layer else [str(WEIGHTS / "small")])
    if len(set(smalls)) < len(smalls):
        raise UsageError("the same --small model is given twice")
    mode = Mode("bild", args.fallback_threshold, args.rollback_threshold, args.max_small_steps, args.max_new_tokens)
    device = start(args)
    rows = read_split(Path(args.split), args.limit)
    dtype = DTYPES[args.dtype]
    large, tok = minibild.load(args.large, device=device, dtype=dtype), tokenizer_beside(args.large)
    models = {path: minibild.load(path, device=device, dtype=dtype) for path in smalls}
    if args.exit_layer:  # the large model's first K decoder layers, beside the --small models
        models[f"early exit (layer {args.exit_layer})"] = minibild.EarlyExit(large, args.exit_layer)
    for path in smalls:
        spiece = tokenizer_path(path)
        if spiece is not None and spiece.read_bytes() != tok.path.read_bytes():
            raise UsageError(f"{spiece} differs from the large model's {tok.path}: the pair must share one tokenizer")
    sources = [torch.tensor([tok.encode(row["source"])], device=device) for row in rows]
    decoders = {path: partial(mode.decode, large, small) for path, small in models.items()}
    warm_up(decoders, sources[0], args.warmup)
    runs = decode_interleaved(decoders, sources, device, args.repeats, not args.no_progress)
    report = {path: agreement_entry(run) for path, run in runs.items()}
    meta = {"split": args.split, "sentences": len(rows), "large": args.large, "mode": mode.label,
            "fallback_threshold": mode.fallback_threshold, "rollback_threshold": mode.rollback_threshold,
            "max_small_steps": mode.max_small_steps, "max_new_tokens": mode.max_new_tokens,
            "device": device_name(device), "dtype": args.dtype, "threads": torch.get_num_threads()}
    print(f"{len(rows)} sentences of {args.split}, large model {args.large}, {mode.label}; accepted: share of the "
          "small model's proposals the large model accepts")
    print(format_table(report, COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "small_models": report}, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("generate", help="write the calibration set: training sources, the large model's outputs")
    p.add_argument("--large", default=str(WEIGHTS / "large"), help="large model (minibild checkpoint folder)")
    p.add_argument("--data", default="data", help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--out", default="runs/align/data")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training sources (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-ratio", type=float, default=2.0,
                   help=f"outputs longer than this x source length + {LENGTH_SLACK} tokens are runaways, left out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=generate)
    p = sub.add_parser("finetune", help="scripts/train.py model, started from the small model; other options go "
                                        "to train.py")
    p.add_argument("--small", default=str(WEIGHTS / "small"),
                   help="small model: minibild checkpoint folder or Hugging Face folder (e.g. runs/small/hf)")
    p.add_argument("--data", default="runs/align/data", help="the calibration set written by `generate`")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the one beside --small)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=finetune)
    p = sub.add_parser("agreement", help="share of small-model proposals the large model accepts under BiLD",
                       parents=[common_arguments(None, split="data/dev.jsonl", max_new_tokens=256)],
                       add_help=False, conflict_handler="resolve")  # resolve: this --small replaces the shared one
    p.add_argument("--small", action="append", help="small model (minibild checkpoint folder); repeat to compare "
                                                    f"several (default: {WEIGHTS / 'small'})")
    p.add_argument("--fallback-threshold", type=float, default=bild.FALLBACK_THRESHOLD)
    p.add_argument("--rollback-threshold", type=float, default=bild.ROLLBACK_THRESHOLD)
    p.add_argument("--max-small-steps", type=int, default=bild.MAX_SMALL_STEPS)
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=agreement)
    args, rest = parser.parse_known_args(argv)
    if rest and args.func is not finetune:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.train_options = rest
    return report_errors("align", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
