"""BiLD's quality-latency trade-off: a grid of fallback and rollback thresholds (and N), measured in one run.

    python scripts/sweep.py --split data/dev.jsonl --limit 200 --threads 1 --out runs/sweep
    python scripts/sweep.py --fallback 0.5 0.7 0.9 --rollback 1 3 --n 5 10 --metric rougeL --split xsum.jsonl

Every source is decoded by large greedy, small greedy, speculative decoding (k draft tokens) and BiLD at
every grid point (with --rules bild official, under minibild's rule and the official implementation's rule,
minibild/official.py), interleaved as in scripts/evaluate.py, so that each point's quality (BLEU, or ROUGE-L for
summaries) sits against its speedup over large greedy measured in the same run. Writes OUT.json and, when
matplotlib is installed, OUT.png (quality against speedup, like the paper's figures); prints the table, the
Pareto front (no point is both better and faster) and the fastest point within 1 point of large greedy's
quality. Tune on a dev split: thresholds picked on the test split make its figures optimistic.

--variant NAME=SMALL (repeatable) puts several small models side by side in the same run, against one large
greedy: SMALL is a minibild checkpoint folder, or exit:K for the early-exit small model (the large model's first
K decoder layers). Each variant runs small greedy, speculative decoding and the whole grid; labels start with
"NAME: ". The paper's vanilla, aligned and early-exit BiLD on the test split:

    python scripts/sweep.py --split data/test.jsonl --threads 1 --max-new-tokens 128 --fallback 0.3 0.6 --rollback 3 \
        --variant vanilla=weights/small --variant aligned=weights/aligned-small --variant early-exit=exit:2
"""
import json
import math
import statistics
import sys
from itertools import product
from pathlib import Path

import torch

from evaluate import (DTYPES, UsageError, bleu, common_arguments, device_name, evaluate, exactness_lines,
                      format_table, load_pair, load_small, minibild_system, parse_system, read_sources,
                      report_errors, start)
from minibild import bild
from minibild.modes import Mode
from minibild.weights import load_tokenizer

DEFAULT_FALLBACK = [0.3, 0.5, 0.7, 0.9]
DEFAULT_ROLLBACK = [1.0, 2.0, 3.0, 5.0, 8.0]
RULES = ("bild", "official")  # the grid's policies: minibild's (bild.py) and the official implementation's


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of a and b (one row of the dynamic programme at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """ROUGE-L F1 (Lin, 2004) over lowercased whitespace tokens, averaged over sentences, times 100."""
    scores = []
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        h, r = hypothesis.lower().split(), reference.lower().split()
        common = lcs_length(h, r)
        if not h and not r:  # two empty outputs are identical
            scores.append(1.0)
        else:
            scores.append(0.0 if common == 0 else 2 * common / (len(h) + len(r)))  # 2PR / (P + R)
    return 100 * statistics.mean(scores)


METRICS = {"bleu": bleu, "rougeL": rouge_l}
TITLES = {"bleu": "BLEU", "rougeL": "ROUGE-L"}


def labelled(variant: str, mode: Mode) -> str:
    """A system's label: the mode's, after its variant's name when the sweep compares several."""
    return f"{variant}: {mode.label}" if variant else mode.label  # large greedy has no variant


def point(variant: str, mode: Mode, entry: dict, metric: str) -> dict:
    """One system of the sweep as a point: its label, variant, settings, quality and speedup."""
    p = {"label": labelled(variant, mode), "variant": variant, "system": mode.name, "quality": entry[metric],
         "speedup": entry["speedup"]}
    if mode.name in RULES:
        p.update(fallback_threshold=mode.fallback_threshold, rollback_threshold=mode.rollback_threshold)
    if mode.name in RULES + ("speculative",):
        p["max_small_steps"] = mode.max_small_steps
    return p


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both quality and speedup (better on one, at least as good on the
    other), by increasing speedup."""
    def dominated(p):
        return any(q["quality"] >= p["quality"] and q["speedup"] >= p["speedup"]
                   and (q["quality"] > p["quality"] or q["speedup"] > p["speedup"]) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: p["speedup"])


def fastest_within(points: list[dict], quality: float, tolerance: float = 1.0) -> dict | None:
    """The fastest point whose quality is at most `tolerance` below `quality`, or None."""
    return max((p for p in points if p["quality"] >= quality - tolerance), key=lambda p: p["speedup"], default=None)


def plot(points: list[dict], front: list[dict], best: dict | None, metric: str, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    variants = list(dict.fromkeys(p["variant"] for p in points if p["system"] != "large"))
    for variant, color in zip(variants, plt.get_cmap("tab10").colors):
        name = f"{variant}: " if variant else ""
        for rule, marker in zip(RULES, ("o", "x")):
            grid = [p for p in points if p["variant"] == variant and p["system"] == rule]
            if not grid:
                continue
            ax.scatter([p["speedup"] for p in grid], [p["quality"] for p in grid], color=color, s=30, zorder=3,
                       marker=marker, label=f"{name}{rule} (numbers: fallback, rollback threshold)")
            for p in grid:
                ax.annotate(f"{p['fallback_threshold']:g},{p['rollback_threshold']:g}", (p["speedup"], p["quality"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        for system, marker in (("small", "s"), ("speculative", "^")):
            for p in (p for p in points if p["variant"] == variant and p["system"] == system):
                ax.scatter(p["speedup"], p["quality"], marker=marker, color=color, s=80, zorder=4, label=p["label"])
    large = next(p for p in points if p["system"] == "large")
    ax.scatter(large["speedup"], large["quality"], marker="*", color="red", s=150, zorder=4, label="large")
    ax.plot([p["speedup"] for p in front], [p["quality"] for p in front], "k--", lw=1, label="Pareto front")
    ax.axhline(large["quality"] - 1, color="red", ls=":", lw=1, label="large greedy - 1")
    if best:
        ax.scatter(best["speedup"], best["quality"], s=250, facecolors="none", edgecolors="red", zorder=5,
                   label=f"fastest within 1: {best['label']}")
    ax.set_xlabel("speedup over large greedy (same run)")
    ax.set_ylabel(TITLES[metric])
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def parse_variant(spec: str) -> tuple[str, str | None, int]:
    """'NAME=PATH' -> (NAME, PATH, 0); 'NAME=exit:K' -> (NAME, None, K)."""
    name, _, small = spec.partition("=")
    if not name or not small or ":" in name:
        raise UsageError(f"bad --variant {spec!r}; use NAME=SMALL_FOLDER or NAME=exit:K")
    if small.startswith("exit:"):
        try:
            k = int(small.removeprefix("exit:"))
        except ValueError:
            k = 0
        if k < 1:
            raise UsageError(f"bad --variant {spec!r}: exit:K needs a whole number K >= 1 of decoder layers")
        return name, None, k
    return name, small, 0


def parse_args(argv):
    p = common_arguments(__doc__, split="data/dev.jsonl", max_new_tokens=256)
    p.add_argument("--fallback", nargs="+", type=float, default=DEFAULT_FALLBACK, help="fallback thresholds")
    p.add_argument("--rollback", nargs="+", type=float, default=DEFAULT_ROLLBACK, help="rollback thresholds")
    p.add_argument("--n", nargs="+", type=int, default=[bild.MAX_SMALL_STEPS], help="max small steps N")
    p.add_argument("--k", type=int, default=5, help="draft tokens of the speculative decoding baseline")
    p.add_argument("--rules", nargs="+", choices=RULES, default=["bild"],
                   help="the policies that run the grid: bild (minibild's) and/or official (the official "
                        "implementation's rule); default bild")
    p.add_argument("--metric", choices=sorted(METRICS), default="bleu", help="rougeL when references are summaries")
    p.add_argument("--out", default="runs/sweep", help="writes OUT.json and OUT.png")
    p.add_argument("--variant", action="append", metavar="NAME=SMALL",
                   help="a small model to compare side by side (a folder, or exit:K); repeat; replaces --small")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return report_errors("sweep", run, parse_args(argv))


def run(args):
    for name, values in (("fallback", args.fallback), ("rollback", args.rollback)):
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise UsageError(f"--{name} thresholds must be finite and >= 0, got {values}")
    if min(args.n + [args.k]) < 1:
        raise UsageError(f"--n and --k must be >= 1, got --n {args.n} --k {args.k}")
    early_exit = args.exit_layer or any(k for _, _, k in map(parse_variant, args.variant or []))
    if "official" in args.rules and early_exit:
        raise UsageError("--rules official: the official implementation has no early-exit small model")
    grid = [Mode(rule, fb, rb, n, args.max_new_tokens)
            for rule, n, rb, fb in product(dict.fromkeys(args.rules), args.n, args.rollback, args.fallback)]
    modes = [parse_system(s, args.max_new_tokens) for s in ("small", f"speculative:{args.k}")]
    modes += list({m.label: m for m in grid}.values())  # a repeated grid value runs once
    variants = [parse_variant(v) for v in args.variant or []]
    if len({name for name, _, _ in variants}) < len(variants):
        raise UsageError(f"--variant names must differ, got {args.variant}")
    if variants and args.exit_layer:
        raise UsageError("--exit-layer and --variant: give the early-exit model as a variant, NAME=exit:K")
    device, dtype = start(args), DTYPES[args.dtype]
    large, small, tok = load_pair(args.large, None if variants else args.small, device, dtype,
                                  0 if variants else args.exit_layer)
    smalls = {name: load_small(large, path, device, dtype, k) for name, path, k in variants} or \
        {"": small}  # no --variant: the one small model of --small or --exit-layer, labels unprefixed
    if tok is not None and any(path for _, path, _ in variants):  # every variant must tokenize as the large one
        load_tokenizer({"large": (args.large, large.config),
                        **{name: (path, smalls[name].config) for name, path, _ in variants if path}})
    sources, references = read_sources(args.split, args.limit, tok, args.large)
    if references is None:
        raise UsageError(f"{args.split}: every line needs a 'reference' to score the systems' quality")

    large_greedy = Mode("large", max_new_tokens=args.max_new_tokens)
    systems = [("", large_greedy)] + [(name, m) for name in smalls for m in modes]
    decoders = {labelled(name, m): minibild_system(m, large, smalls.get(name), device) for name, m in systems}
    report = evaluate(decoders, sources, device, references, tok, {args.metric: METRICS[args.metric]},
                      args.repeats, args.warmup, not args.no_progress)
    points = [point(name, m, report[labelled(name, m)], args.metric) for name, m in systems]
    front = pareto_front(points)
    quality = report["large"][args.metric]
    best = fastest_within(points, quality)
    best_by_variant = {name: fastest_within([p for p in points if p["variant"] == name], quality)
                       for name in smalls if name}
    small_names = " / ".join(f"{name}={path or f'exit:{k}'}" for name, path, k in variants) or \
        (f"exit:{args.exit_layer}" if args.exit_layer else args.small)
    title = (f"{len(sources)} sentences of {Path(args.split).name}, {Path(args.large).name} / {small_names}, "
             f"{device_name(device)}, {args.dtype}, {torch.get_num_threads()} threads")

    columns = [(args.metric, TITLES[args.metric], ".2f"),
               ("speedup", "speedup", ".2f"), ("median_ms", "median ms", ".1f"), ("same_as_large", "= large", ".1%"),
               ("fallbacks_per_sentence", "fallbacks/sent", ".2f"), ("rollbacks_per_sentence", "rollbacks/sent", ".2f"),
               ("tokens_per_large_call", "tokens/large call", ".2f")]
    print(f"{len(sources)} sentences of {args.split}, {args.large} / {small_names} on {device_name(device)} "
          f"({args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}); speedup vs large greedy "
          "in this run")
    print(format_table(report, columns))
    for line in exactness_lines(report, len(sources)):
        print(line)
    print("Pareto front (quality, speedup):")
    for p in front:
        print(f"  {p['label']}: {p['quality']:.2f} @ {p['speedup']:.2f}x")
    for name, p in [("", best)] + list(best_by_variant.items()):
        print(f"fastest within 1 point of large greedy{f' ({name})' if name else ''}: " +
              (f"{p['label']}: {p['quality']:.2f} @ {p['speedup']:.2f}x" if p else "none"))

    json_path, png_path = Path(f"{args.out}.json"), Path(f"{args.out}.png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"split": args.split, "sentences": len(sources), "large": args.large, "small": small_names,
            "metric": args.metric, "device": device_name(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "torch": torch.__version__}
    result = {"meta": meta, "points": points, "pareto_front": [p["label"] for p in front],
              "fastest_within_1": best["label"] if best else None,
              "fastest_within_1_by_variant": {name: p["label"] if p else None for name, p in best_by_variant.items()},
              "systems": report}
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {json_path}")
    try:
        plot(points, front, best, args.metric, png_path, title)
        print(f"wrote {png_path}")
    except ImportError:
        print("no plot: matplotlib is not installed; pip install -e '.[plot]'", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
