"""Throughput and latency of batched decoding: large greedy, BiLD at the defaults, exact BiLD (rollback 0) and
speculative decoding (fallback 0, rollback 0, N = 5), at several batch sizes, on the shipped pair.

    python scripts/bench_batch.py --limit 64 --threads 1 --batch-sizes 1 8 32 --rounds 3

Each round decodes the first --limit sources of the split once with every (system, batch size), the order
rotating from round to round so that drift in the machine's speed hits all alike; the figures are medians over
rounds. Batch size 1 runs the batch-1 code (minibild.greedy on one row, bild.generate); larger ones batched
greedy and batch.generate_batch, on batches of consecutive sources. Throughput: output tokens over the pass's
seconds. A sentence's latency is its batch's seconds (it waits for the whole batch); the median over sentences.
Every system must give the same outputs at every batch size; the script says whether it does. Where the time goes:
every decoder call is timed (batch-1 code and batched greedy call the model's decode, batched BiLD ragged.decode), giving
per model its calls, rows and tokens per call and ms per call, and the seconds outside the calls (encoders,
decisions, the loop). Last, how exact BiLD scales against large greedy from batch 1 to the second batch size given
(8 by default): the ratio of the two throughput gains, which minibild aims to keep >= 0.8, the same ratio from each
round's passes alone (their spread is the machine's drift, which on a shared VM moves the ratio by tenths), and the
ratio counting only the seconds inside the decoder calls, with exact BiLD's gain split between its large and its
small calls. --systems runs only some systems (the ratio needs exact BiLD and large greedy).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (DTYPES, WEIGHTS, UsageError, device_name, load_pair, read_sources,  # noqa: E402
                      report_errors)
from minibild import bild  # noqa: E402
from minibild.modes import Mode  # noqa: E402
from minibild.observed import observed  # noqa: E402

SYSTEMS = {"large greedy": Mode("large"), "BiLD": Mode("bild"),
           "exact BiLD": Mode("bild", rollback_threshold=0.0), "speculative": Mode("speculative", max_small_steps=5)}
TARGET = 0.8  # exact BiLD's batching gain over large greedy's


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="data/test.jsonl", help="JSONL with a 'source' per line")
    p.add_argument("--limit", type=int, default=64, help="use only the first N sources (0: all)")
    p.add_argument("--large", default=str(WEIGHTS / "large"))
    p.add_argument("--small", default=str(WEIGHTS / "small"))
    p.add_argument("--max-new-tokens", type=int, default=bild.MAX_NEW_TOKENS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="timed passes per system and batch size")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS), metavar="SYSTEM",
                   help=f"the systems to run, among {', '.join(map(repr, SYSTEMS))} (default: all)")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args(argv)


class CallLog:
    """Every decoder call of a pass, timed: the large and small models observed (minibild/observed.py), their decode
    calls (batch-1 code, batched greedy) and decode_rows calls (batched BiLD's ragged.decode). Per model: calls,
    rows and tokens fed, seconds inside the calls."""

    def __init__(self, large, small):
        self.log = []  # (model name, rows, tokens, seconds)
        self.large, self.small = (observed(model, partial(self.timed, name))
                                  for name, model in (("large", large), ("small", small)))

    def timed(self, name: str, call: str, method, *args):
        if call == "encode":
            return method(*args)
        if call == "decode":  # (ids (B, T), cache)
            rows, tokens = args[0].shape[0], args[0].numel()
        else:  # decode_rows: (cache, rows, tokens per row)
            rows, tokens = len(args[1]), sum(map(len, args[2]))
        start = time.perf_counter()
        out = method(*args)
        self.log.append((name, rows, tokens, time.perf_counter() - start))
        return out

    def summary(self) -> dict:
        """Per model: calls, mean rows and tokens per call, seconds inside its calls."""
        out = {}
        for name in ("large", "small"):
            calls = [entry for entry in self.log if entry[0] == name]
            if calls:
                out[name] = {"calls": len(calls), "rows_per_call": sum(c[1] for c in calls) / len(calls),
                             "tokens_per_call": sum(c[2] for c in calls) / len(calls),
                             "seconds": sum(c[3] for c in calls)}
        return out


def timed_pass(mode: Mode, large, small, sources: list[list[int]], batch_size: int) -> tuple[list, list[float], dict]:
    """Decode every source once, batch_size at a time -> (tokens per source, seconds per batch, CallLog summary)."""
    outputs, seconds = [], []
    calls = CallLog(large, small)
    start = time.perf_counter()
    for rows in mode.decode_batches(calls.large, calls.small, sources, batch_size):
        seconds.append(time.perf_counter() - start)
        outputs += [tokens for tokens, _ in rows]
        start = time.perf_counter()
    return outputs, seconds, calls.summary()


def measure(large, small, sources, batch_sizes: list[int], rounds: int, systems: list[str]) -> dict:
    """Every (system, batch size) once per round, the order rotating -> {(system, batch size): {"outputs",
    "tokens_per_s", "latency_ms", "seconds", "calls", "inside_seconds"}}, medians over rounds."""
    runs = [(label, b) for b in batch_sizes for label in systems]
    passes = {run: [] for run in runs}
    for r in range(rounds):
        turn = r * len(runs) // rounds
        for label, b in runs[turn:] + runs[:turn]:
            passes[label, b].append(timed_pass(SYSTEMS[label], large, small, sources, b))
    figures = {}
    for (label, b), timed in passes.items():
        outputs = timed[0][0]
        assert all(o == outputs for o, _, _ in timed), f"{label} at batch {b} decoded differently in two rounds"
        tokens = sum(map(len, outputs))
        per_sentence = [statistics.median(seconds[i // b] for _, seconds, _ in timed) for i in range(len(sources))]
        round_seconds = [sum(seconds) for _, seconds, _ in timed]  # each round's pass
        calls = timed[0][2]  # the counts are the same in every round; the seconds are medians over rounds
        for name, entry in calls.items():
            entry["seconds"] = statistics.median(summary[name]["seconds"] for _, _, summary in timed)
        figures[label, b] = {"outputs": outputs,
                             "tokens_per_s": statistics.median(tokens / seconds for seconds in round_seconds),
                             "latency_ms": 1000 * statistics.median(per_sentence),
                             "seconds": statistics.median(round_seconds), "round_seconds": round_seconds,
                             "calls": calls, "inside_seconds": sum(entry["seconds"] for entry in calls.values())}
    return figures


def format_calls(figures: dict, systems: list[str], batch_sizes: list[int]) -> str:
    """Where each pass's time goes: per model, its calls (how many, rows and tokens per call, ms per call), then the
    seconds outside the decoder calls (encoders, decisions, the loop)."""
    lines = ["system".ljust(14) + "batch".rjust(6) + "  large: calls  rows tok/call ms/call" +
             "  small: calls  rows tok/call ms/call" + "  outside s"]
    for label in systems:
        for b in batch_sizes:
            entry = figures[label, b]
            cells = ""
            for name in ("large", "small"):
                c = entry["calls"].get(name)
                cells += (f"{c['calls']:>14}{c['rows_per_call']:>6.2f}{c['tokens_per_call']:>9.2f}"
                          f"{1000 * c['seconds'] / c['calls']:>8.2f}" if c else " " * 37)
            lines.append(label.ljust(14) + f"{b:>6}" + cells + f"{entry['seconds'] - entry['inside_seconds']:>11.2f}")
    return "\n".join(lines)


def run(args):
    if args.limit < 0 or args.rounds < 1 or min(args.batch_sizes) < 1 or args.max_new_tokens < 1:
        raise UsageError("--limit must be >= 0, and --rounds, --batch-sizes and --max-new-tokens >= 1")
    batch_sizes = sorted(set(args.batch_sizes))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    large, small, tok = load_pair(args.large, args.small, device, DTYPES[args.dtype])
    sources, _ = read_sources(args.split, args.limit, tok, args.large)
    systems = [label for label in SYSTEMS if label in args.systems]
    figures = measure(large, small, sources, batch_sizes, args.rounds, systems)

    print(f"{len(sources)} sources of {args.split}, {args.large} / {args.small} on {device_name(device)} "
          f"({args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}); median of {args.rounds} "
          "interleaved rounds")
    print("system".ljust(14) + "".join(f"{f'batch {b}: tok/s  ms/sent':>26}" for b in batch_sizes))
    for label in systems:
        cells = [(figures[label, b]["tokens_per_s"], figures[label, b]["latency_ms"]) for b in batch_sizes]
        print(label.ljust(14) + "".join(f"{rate:>17.1f}{ms:>9.0f}" for rate, ms in cells))
    identical = {label: all(figures[label, b]["outputs"] == figures[label, batch_sizes[0]]["outputs"]
                            for b in batch_sizes) for label in systems}
    for label, same in identical.items():
        print(f"  {label}: outputs {'identical' if same else 'DIFFER'} across batch sizes {batch_sizes}")
    print("Where the time goes (ms per call and seconds outside the calls: medians over rounds):")
    print(format_calls(figures, systems, batch_sizes))
    report = {"meta": {"split": args.split, "sentences": len(sources), "large": args.large, "small": args.small,
                       "dtype": args.dtype, "threads": torch.get_num_threads(), "rounds": args.rounds,
                       "device": device_name(device), "torch": torch.__version__,
                       "python": platform.python_version(), "systems": systems},
              "identical_across_batch_sizes": identical,
              "figures": {f"{label} @ {b}": {k: v for k, v in entry.items() if k != "outputs"}
                          for (label, b), entry in figures.items()}}
    if len(batch_sizes) > 1 and batch_sizes[0] == 1 and {"exact BiLD", "large greedy"} <= set(systems):
        b = batch_sizes[1]
        gain = {label: figures[label, b]["tokens_per_s"] / figures[label, 1]["tokens_per_s"]
                for label in ("exact BiLD", "large greedy")}
        ratio = gain["exact BiLD"] / gain["large greedy"]
        # The same ratio from each round's four passes alone: its spread shows how much the machine's drift moves it.
        seconds = {(label, size): figures[label, size]["round_seconds"] for label in gain for size in (1, b)}
        per_round = [seconds["exact BiLD", 1][r] / seconds["exact BiLD", b][r] /
                     (seconds["large greedy", 1][r] / seconds["large greedy", b][r]) for r in range(args.rounds)]
        report["scaling"] = {"batch_size": b, "exact_bild_gain": gain["exact BiLD"],
                             "large_greedy_gain": gain["large greedy"], "ratio": ratio, "ratio_per_round": per_round}
        print(f"batch {b} over batch 1: exact BiLD {gain['exact BiLD']:.2f}x, large greedy "
              f"{gain['large greedy']:.2f}x; ratio {ratio:.2f} (target >= {TARGET}); each round alone: "
              + " ".join(f"{x:.2f}" for x in per_round))
        # The same, counting only the seconds inside the decoder calls (no encoders, decisions or loop).
        inside_gain = {label: figures[label, 1]["inside_seconds"] / figures[label, b]["inside_seconds"]
                       for label in gain}
        report["scaling"]["inside_calls"] = {"exact_bild_gain": inside_gain["exact BiLD"],
                                             "large_greedy_gain": inside_gain["large greedy"],
                                             "ratio": inside_gain["exact BiLD"] / inside_gain["large greedy"]}
        # And per model: how much faster exact BiLD's large calls, and its small calls, get through their work.
        calls = {size: figures["exact BiLD", size]["calls"] for size in (1, b)}
        by_model = {name: calls[1][name]["seconds"] / calls[b][name]["seconds"] for name in ("large", "small")}
        report["scaling"]["inside_calls"]["exact_bild_gain_by_model"] = by_model
        print(f"inside the decoder calls only: exact BiLD {inside_gain['exact BiLD']:.2f}x (its large calls "
              f"{by_model['large']:.2f}x, its small calls {by_model['small']:.2f}x), large greedy "
              f"{inside_gain['large greedy']:.2f}x; ratio {report['scaling']['inside_calls']['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    return report_errors("bench_batch", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
