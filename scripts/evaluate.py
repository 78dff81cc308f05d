"""Quality and latency of each decoding mode on a JSONL split, measured side by side in one run.

    python scripts/evaluate.py --split data/test.jsonl
    python scripts/evaluate.py --split data/dev.jsonl --systems large small bild:0.6,5 bild:0.6,0 speculative:5

A system is `large`, `small`, `speculative:K` or `bild:FALLBACK,ROLLBACK[,N]`. Every source is decoded
by every system in turn (the order rotating from source to source), so that drift in the machine's
speed hits all systems alike; each system's speedup is its latency relative to large greedy's over the
same sources in the same run. Prints a table and writes JSON with --json.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from minibild import EarlyExit, Tokenizer, load  # noqa: E402
from minibild.__main__ import DTYPES, UsageError, pick_device  # noqa: E402
from minibild.modes import Mode  # noqa: E402
from minibild.progress import progress  # noqa: E402
from minibild.weights import tokenizer_path  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_SYSTEMS = ["large", "small", "bild:0.6,5", "bild:0.6,0", "speculative:5"]


def parse_system(spec: str, max_new_tokens: int) -> Mode:
    """'large' | 'small' | 'speculative:K' | 'bild:FALLBACK,ROLLBACK[,N]' -> Mode."""
    name, _, params = spec.partition(":")
    try:
        if name in ("large", "small") and not params:
            return Mode(name, max_new_tokens=max_new_tokens)
        if name == "speculative":
            return Mode(name, max_small_steps=int(params or 5), max_new_tokens=max_new_tokens)
        if name == "bild":
            values = params.split(",")
            if len(values) not in (2, 3):
                raise ValueError
            n = int(values[2]) if len(values) == 3 else 10
            return Mode(name, float(values[0]), float(values[1]), n, max_new_tokens)
    except ValueError:
        pass
    raise UsageError(f"bad system {spec!r}; use large, small, speculative:K or bild:FALLBACK,ROLLBACK[,N]")


def read_split(path: Path, limit: int) -> list[dict]:
    if not path.exists():
        raise UsageError(f"{path}: no such split; run scripts/prepare_data.py")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise UsageError(f"{path}: the split is empty")
    return rows


def load_small(large, small_path, device, dtype, exit_layer: int = 0):
    """The small model: the checkpoint at small_path or, for exit_layer k, the large model's first k decoder layers
    (EarlyExit), which shares the large model's weights and caches."""
    return EarlyExit(large, exit_layer) if exit_layer else load(small_path, device=device, dtype=dtype)


def load_pair(large_path, small_path, device, dtype, exit_layer: int = 0) -> tuple:
    """The large and small models (see load_small; None without small_path and exit_layer) and the tokenizer
    stored beside the large one (None if there is none)."""
    large = load(large_path, device=device, dtype=dtype)
    small = load_small(large, small_path, device, dtype, exit_layer) if small_path or exit_layer else None
    spiece = tokenizer_path(large_path)
    return large, small, Tokenizer(spiece) if spiece else None


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu
    return sacrebleu.corpus_chrf(hypotheses, [references]).score


def decode_interleaved(systems: dict, sources: list, device, repeats: int = 1, show_progress=True) -> dict:
    """Decode every source (1, S) with every system, {label: decode(input_ids) -> (tokens, BiLDResult or None)},
    `repeats` times, the order rotating from one round to the next. -> {label: {"tokens", "results": per source,
    "seconds": per source, the median of its repeats, "total_seconds": of all calls}}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    labels = list(systems)
    runs = {label: {"tokens": [], "results": [], "seconds": [], "total_seconds": 0.0} for label in labels}
    for i, input_ids in progress(enumerate(sources), len(sources), "decoding", show_progress):
        seconds, outputs = {label: [] for label in labels}, {}
        for repeat in range(repeats):
            turn = (i * repeats + repeat) % len(labels)
            for label in labels[turn:] + labels[:turn]:
                sync()
                start = time.perf_counter()
                outputs[label] = systems[label](input_ids)  # the last repeat's: decoding is deterministic
                sync()
                seconds[label].append(time.perf_counter() - start)
        for label, run in runs.items():
            run["tokens"].append(outputs[label][0])
            run["results"].append(outputs[label][1])
            run["seconds"].append(statistics.median(seconds[label]))
            run["total_seconds"] += sum(seconds[label])
    return runs


def summarize(run: dict, baseline: dict | None) -> dict:
    """Latency of one system's run (from decode_interleaved), its speedup over `baseline` (large greedy's run,
    same sources), and BiLD's counts when it has them."""
    seconds, outputs, n = run["seconds"], run["tokens"], len(run["tokens"])
    entry = {"mean_output_tokens": statistics.mean(map(len, outputs)),
             "median_ms": 1000 * statistics.median(seconds), "mean_ms": 1000 * statistics.mean(seconds)}
    if baseline:
        entry["speedup"] = sum(baseline["seconds"]) / sum(seconds)  # mean latency of large / of this system
        entry["median_speedup"] = statistics.median(b / s for b, s in zip(baseline["seconds"], seconds))
        entry["same_as_large"] = sum(a == b for a, b in zip(outputs, baseline["tokens"])) / n
    if run["results"][0] is not None:
        s = [result.stats for result in run["results"]]
        entry["fallbacks_per_sentence"] = statistics.mean(x.fallbacks for x in s)
        entry["rollbacks_per_sentence"] = statistics.mean(x.rollbacks for x in s)
        entry["tokens_per_large_call"] = sum(map(len, outputs)) / sum(x.large_calls for x in s)
        entry["small_token_share"] = sum(x.small_tokens for x in s) / sum(map(len, outputs))
    return entry


def evaluate(systems: dict, tok: Tokenizer, rows, device, show_progress=True, metrics=None) -> dict:
    """Decode every row with every system, {label: decode(input_ids) -> (tokens, BiLDResult or None)}, interleaved;
    return per-system metrics, with speedups over the system labelled "large" (large greedy).
    `metrics`: {name: score(hypotheses, references)}, default BLEU and chrF."""
    metrics = metrics or {"bleu": bleu, "chrf": chrf}
    sources = [torch.tensor([tok.encode(row["source"])], device=device) for row in rows]
    runs = decode_interleaved(systems, sources, device, show_progress=show_progress)
    references = [r["reference"] for r in rows]
    report = {}
    for label, run in runs.items():
        hypotheses = [tok.decode(t) for t in run["tokens"]]
        report[label] = {name: score(hypotheses, references) for name, score in metrics.items()}
        report[label].update(summarize(run, runs.get("large")))
    return report


COLUMNS = [("bleu", "BLEU", ".2f"), ("chrf", "chrF", ".2f"), ("mean_output_tokens", "tokens", ".1f"),
           ("median_ms", "median ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("median_speedup", "median speedup", ".2f"), ("same_as_large", "= large", ".1%"),
           ("fallbacks_per_sentence", "fallbacks/sent", ".2f"), ("rollbacks_per_sentence", "rollbacks/sent", ".2f"),
           ("tokens_per_large_call", "tokens/large call", ".2f"), ("small_token_share", "small share", ".1%")]


def format_table(report: dict, columns=COLUMNS) -> str:
    """One row per system, one column per (key, title, format); a key the entry lacks shows as '-'."""
    width = max(map(len, report)) + 2
    rows = [[format(entry[key], fmt) if key in entry else "-" for key, _, fmt in columns] for entry in report.values()]
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, (_, title, _) in enumerate(columns)]
    lines = ["system".ljust(width) + " | ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths))]
    for label, row in zip(report, rows):
        lines.append(label.ljust(width) + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


def common_arguments(description: str, split: str, max_new_tokens: int) -> argparse.ArgumentParser:
    """A parser with the options every measuring script shares: the pair, the sources, the machine."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=split, help="JSONL with a 'source' (and a 'reference') per line")
    p.add_argument("--limit", type=int, default=0, help="use only the first N sources (0: all)")
    p.add_argument("--large", default=str(WEIGHTS / "large"), help="large model (minibild checkpoint folder)")
    p.add_argument("--small", default=str(WEIGHTS / "small"), help="small model (minibild checkpoint folder)")
    p.add_argument("--exit-layer", type=int, default=0, metavar="K",
                   help="use the large model's first K decoder layers as the small model (early exit), not --small")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def report_errors(program: str, run, args) -> int:
    """Run `run(args)`; a user error becomes one line on stderr and exit status 2, not a traceback."""
    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = common_arguments(__doc__, split="data/test.jsonl", max_new_tokens=256)
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", help="also write the report here")
    return report_errors("evaluate", run, p.parse_args(argv))


def setup(args, with_small: bool = True):
    """The device, the sources and the pair (with its tokenizer) that the common options name; without
    with_small, the small model is None (the caller loads its own)."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_split(Path(args.split), args.limit)
    large, small, tok = load_pair(args.large, args.small if with_small else None, device, DTYPES[args.dtype],
                                  args.exit_layer if with_small else 0)
    if tok is None:
        raise UsageError(f"{args.large}: no spiece.model beside the weights")
    return device, rows, large, small, tok


def run(args):
    systems = [parse_system(s, args.max_new_tokens) for s in args.systems]
    if "large" not in [m.label for m in systems]:
        systems.insert(0, Mode("large", max_new_tokens=args.max_new_tokens))  # the baseline of every speedup
    device, rows, large, small, tok = setup(args)
    report = evaluate({m.label: partial(m.decode, large, small) for m in systems}, tok, rows, device,
                      not args.no_progress)
    meta = {"split": args.split, "sentences": len(rows), "large": args.large, "small": args.small,
            "device": device_name(device), "threads": torch.get_num_threads(), "dtype": args.dtype,
            "torch": torch.__version__}
    print(f"{len(rows)} sentences of {args.split} on {meta['device']} ({args.dtype}, {meta['threads']} threads, "
          f"torch {meta['torch']}); latency per sentence, speedup vs large greedy in this run")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "systems": report}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
