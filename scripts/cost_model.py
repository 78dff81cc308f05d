"""BiLD's latency explained by a cost model, measured: what each model call costs, times how often a run makes it.

    python scripts/cost_model.py --split data/dev.jsonl --limit 20 --threads 1
    python scripts/cost_model.py --split data/dev.jsonl --limit 20 --threads 1 --exit-layer 2 --json cost.json
    python scripts/cost_model.py --large weights/kjv-web/large --small weights/kjv-web/small \
        --split data/kjv-web/test.jsonl --threads 1 --systems large small bild:0.6,5 speculative:5

The model. One sentence's latency is predicted as

    encoder passes(S) + sum over its model calls of cost(kind, k, P) + calls x the loop's overhead per call

S: the source's length; k: the tokens a call feeds; P: the cache length it starts at. The kinds of call:
- small: the small model's call. BiLD's feeds 1 token, or 2 when it catches up after a large call. With early exit
  (--exit-layer K) it is the large model's first K decoder layers, then the final norm and LM head.
- large: the large model's call on its own cache. Large greedy feeds 1 token; BiLD's large call feeds the last
  verified token and the pending ones, k = 1..N+1 (N: max small steps).
- shared, shared+1 (early exit only): BiLD's large call on the cache it shares with the early-exit model: its
  layers above K over the k tokens, the first K layers having run them already (shared: after a fallback), or
  having run all but the last (shared+1: after a handover, at the end, and on the first call).
- encoder passes: the encoder and the decoder's cross-attention keys/values (new_cache); early-exit BiLD has one.
- overhead: the decoding loop's own work (argmax, softmax, the Python around the calls), per call, for each system:
  each of its runs replayed on models that compute nothing and return logits leading to the same decisions.

Measured, not assumed. Every system decodes every source as scripts/evaluate.py does (interleaved, median of
--repeats), and each run's own counts (BiLD: read off its trace; greedy: one 1-token call per output token) give its
predicted latency, printed against the measured one: in aggregate (pred/meas: the sums over all sentences) and per
sentence (median). The cost table is timed on the objects bild.generate itself uses, in --table-rounds rounds spread
evenly among the sources (so that the table and the runs see the machine at the same times; the median of the
rounds is the cost): at the cache lengths --positions (linear in between, flat beyond the ends), decoder calls on
the split's median-length source, encoder passes on its shortest, median and longest.

Flat verify: the same counts, with every large call costing what a 1-token call costs (large(k) = large(1)), as on a
GPU, where a call's time hardly depends on how many tokens it feeds. The speedup over large greedy with flat verify
is what BiLD's decisions would buy on such a machine; its gap to the predicted speedup is what this machine's
growing verify cost takes away. The second table splits each system's predicted time into encoder passes, small
calls, large calls and overhead, with tokens per large call and the fallback rate (fallbacks per small call).

Assumptions: a call's cost depends on its kind, k and P alone (not on the ids, nor on the source beyond the one the
table uses); a call costs in a run what it costs in the table, where every call follows calls of other kinds, as in
BiLD, so the models' weights are not left in the CPU's caches (greedy's consecutive calls of one small model can run
faster than predicted); the loop's overhead is the same for every call of a system.
"""
import json
import math
import platform
import statistics
import sys
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch

from evaluate import (DEFAULT_SYSTEMS, DTYPES, UsageError, common_arguments, decode_interleaved, device_name,
                      format_table, load_pair, parse_system, read_sources, report_errors, start, warm_up)
from minibild import EarlyExit
from minibild.model import KVCache
from minibild.modes import Mode
from minibild.progress import progress

DEFAULT_POSITIONS = [0, 16, 32, 64, 96]
REPLAYS = 3  # timed replays of each run; the median is its overhead
NEGATIVE = -1e4  # a replay logit for "practically probability 0", finite in every dtype


# --- the counts --------------------------------------------------------------------------------------------------

class Call(NamedTuple):
    kind: str  # small, large, shared or shared+1 (see the module docstring)
    fed: int  # tokens fed, k
    start: int  # cache length before the call, P


def greedy_calls(kind: str, tokens: list[int]) -> list[Call]:
    """Greedy decoding feeds the previous token at each position, once per output token."""
    return [Call(kind, 1, p) for p in range(len(tokens))]


def bild_calls(trace, early_exit: bool) -> list[Call]:
    """BiLD's model calls, read off its trace. With early exit, a large call is shared+1 when the first K layers have
    not run its last token: they hold every position a call fed until a rollback crops the cache."""
    calls, ran = [], 0  # ran: positions the first K layers hold
    for step in trace:
        end = step.start + len(step.fed)
        kind = step.model
        if kind == "large" and early_exit:
            fresh = end - max(ran, step.start)  # tokens the first K layers have not run
            if fresh > 1:
                raise ValueError(f"a large call at {step.start} feeds {fresh} tokens the early-exit layers never ran; "
                                 "the cost table has shared (0) and shared+1 (1) only")
            kind = "shared" if fresh == 0 else "shared+1"
        calls.append(Call(kind, len(step.fed), step.start))
        ran = step.rollback_at if step.model == "large" and step.decision == "rollback" else max(ran, end)
    return calls


def encoder_kinds(mode: Mode, early_exit: bool) -> list[str]:
    """The encoder passes a system runs: greedy its model's, BiLD both models' or, with early exit, one shared."""
    if mode.name in ("large", "small"):
        return [mode.name]
    return ["shared"] if early_exit else ["large", "small"]


def run_calls(mode: Mode, tokens: list[int], result, early_exit: bool) -> list[Call]:
    return greedy_calls(mode.name, tokens) if result is None else bild_calls(result.trace, early_exit)


def counts(calls: list[Call]) -> dict[str, dict[int, int]]:
    """{kind: {tokens fed: calls}}."""
    by_kind = {}
    for (kind, fed), n in sorted(Counter((c.kind, c.fed) for c in calls).items()):
        by_kind.setdefault(kind, {})[fed] = n
    return by_kind


# --- the prediction ----------------------------------------------------------------------------------------------

def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise linear through the measured points {x: y}, flat beyond the first and the last."""
    xs = sorted(points)
    i = bisect_left(xs, x)
    if i == 0 or i == len(xs):
        return points[xs[min(i, len(xs) - 1)]]
    x0, x1 = xs[i - 1], xs[i]
    return points[x0] + (points[x1] - points[x0]) * (x - x0) / (x1 - x0)


@dataclass
class CostTable:
    """Seconds, measured: encoders[kind][source length], calls[(kind, tokens fed)][cache length]."""
    encoders: dict[str, dict[int, float]]
    calls: dict[tuple[str, int], dict[int, float]]

    def encoder(self, kind: str, source_length: int) -> float:
        return interpolate(self.encoders[kind], source_length)

    def call(self, call: Call, flat: bool = False) -> float:
        """A call's cost; with flat, a large call costs what one feeding a single token does."""
        fed = 1 if flat and call.kind != "small" else call.fed
        if (call.kind, fed) not in self.calls:
            raise ValueError(f"the cost table has no {call.kind} call feeding {fed} tokens")
        return interpolate(self.calls[call.kind, fed], call.start)


def predict(table: CostTable, encoders: list[str], calls: list[Call], source_length: int, overhead: float,
            flat: bool = False) -> dict[str, float]:
    """One run's predicted seconds by part: encoder passes, small calls, large calls, loop overhead."""
    return {"encoders": sum(table.encoder(kind, source_length) for kind in encoders),
            "small": sum(table.call(c) for c in calls if c.kind == "small"),
            "large": sum(table.call(c, flat) for c in calls if c.kind != "small"),
            "overhead": len(calls) * overhead}


# --- measuring the cost table ------------------------------------------------------------------------------------

@dataclass
class Probe:
    """One entry of the cost table: `call` is timed; `before` and `after`, untimed, set up its cache and undo it."""
    key: tuple
    call: Callable
    before: Callable = lambda: None
    after: Callable = lambda: None


def max_fed(modes: list[Mode], early_exit: bool) -> dict[str, int]:
    """The most tokens a call of each kind feeds in these systems: the small model's 2 (catching up), BiLD's large
    call N + 1 (large greedy's 1)."""
    verify = max((m.max_small_steps + 1 for m in modes if m.name in ("bild", "speculative")), default=1)
    if early_exit:
        return {"small": 2, "large": 1, "shared": verify, "shared+1": verify}
    return {"small": 2, "large": verify}


def encoder_probes(large, small, sources: list, max_length: int) -> list[Probe]:
    """Each encoder pass as the decoding loops run it, on each of `sources` (1, S)."""
    passes = {"large": lambda ids: large.new_cache(large.encode(ids), max_length=max_length),
              "small": lambda ids: small.new_cache(small.encode(ids), max_length=max_length)}
    if isinstance(small, EarlyExit):
        passes["shared"] = lambda ids: small.share_cache(ids, max_length)
    return [Probe(("encoder", kind, ids.shape[1]), partial(encoder_pass, ids))
            for kind, encoder_pass in passes.items() for ids in sources]


def call_probes(large, small, input_ids, positions: list[int], fed: dict[str, int]) -> list[Probe]:
    """Each decoder call of each kind, feeding k = 1..fed[kind] tokens at each cache length P: one cache per kind and
    P, filled to P once and cropped back to P after every call. The ids are arbitrary (costs do not depend on them)."""
    length = max(positions) + max(fed.values())
    ids = torch.randint(3, large.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(input_ids.device)
    probes = []
    for P in positions:
        for kind, model in (("small", small), ("large", large)):
            cache = model.new_cache(model.encode(input_ids), max_length=length)
            if P:
                model.decode(ids[:, :P], cache)
            probes += [Probe((kind, k, P), partial(model.decode, ids[:, P:P + k], cache), after=partial(cache.crop, P))
                       for k in range(1, fed[kind] + 1)]
        if isinstance(small, EarlyExit):  # BiLD's large call on the shared cache, as bild.generate sets it up
            shared_large, cache, view = small.share_cache(input_ids, length)
            if P:
                shared_large.decode(ids[:, :P], cache)
            for fresh, kind in ((0, "shared"), (1, "shared+1")):
                for k in range(1, fed[kind] + 1):
                    # The early-exit model runs the first K layers on all but `fresh` of the tokens, untimed.
                    before = partial(small.decode, ids[:, P:P + k - fresh], view) if k > fresh else lambda: None
                    probes.append(Probe((kind, k, P), partial(shared_large.decode, ids[:, P:P + k], cache), before,
                                        partial(cache.crop, P)))
    return probes


@torch.inference_mode()  # as in bild.generate and greedy: no autograd bookkeeping
def time_round(probes: list[Probe], turn: int, sync) -> dict[tuple, float]:
    """Each probe's seconds, once, in order from probes[turn] round to the one before it."""
    seconds = {}
    for p in probes[turn:] + probes[:turn]:
        p.before()
        sync()
        start_time = time.perf_counter()
        p.call()
        sync()
        seconds[p.key] = time.perf_counter() - start_time
        p.after()
    return seconds


@torch.inference_mode()
def table_probes(large, small, sources: list, modes: list[Mode], positions: list[int],
                 max_new_tokens: int) -> tuple[list[Probe], int]:
    """The cost table's probes for these systems on these sources (1, S) -> (them, the length of the source the
    decoder calls run on: the median one)."""
    by_length = sorted(sources, key=lambda ids: ids.shape[1])
    median = by_length[len(by_length) // 2]
    picked = {ids.shape[1]: ids for ids in (by_length[0], median, by_length[-1])}.values()
    probes = encoder_probes(large, small, list(picked), max_new_tokens + 1)
    probes += call_probes(large, small, median, positions, max_fed(modes, isinstance(small, EarlyExit)))
    return probes, median.shape[1]


def measure(systems: dict, inputs: list, probes: list[Probe], rounds: int, device, repeats: int, sync,
            show_progress: bool) -> tuple[dict, CostTable]:
    """Time the table in `rounds` rounds spread evenly among the sources, which every system decodes in between as
    evaluate.decode_interleaved does: the table and the runs see the machine at the same times, so that drift in its
    speed does not pass for an error of the model. -> (the runs, as decode_interleaved gives them; the table, each
    cost the median of its rounds, the starting point of the order moving round by round)."""
    seconds = {p.key: [] for p in probes}
    runs = {label: {"tokens": [], "results": [], "seconds": [], "total_seconds": 0.0} for label in systems}
    bounds = [len(inputs) * r // rounds for r in range(rounds + 1)]
    for r in progress(range(rounds), rounds, "measuring", show_progress):
        for key, s in time_round(probes, r * len(probes) // rounds, sync).items():
            seconds[key].append(s)
        for label, run in decode_interleaved(systems, inputs[bounds[r]:bounds[r + 1]], device, repeats,
                                             show_progress=False).items():
            for key in ("tokens", "results", "seconds"):
                runs[label][key] += run[key]
            runs[label]["total_seconds"] += run["total_seconds"]
    table = CostTable({}, {})
    for key, values in seconds.items():
        if key[0] == "encoder":
            table.encoders.setdefault(key[1], {})[key[2]] = statistics.median(values)
        else:
            table.calls.setdefault(key[:2], {})[key[2]] = statistics.median(values)
    return runs, table


# --- measuring the loop's overhead ---------------------------------------------------------------------------------

class Replay:
    """A model that computes nothing: each decode returns the next of the logits it was given. Run on Replay models,
    a decoding loop takes the decisions those logits lead to, in the time of its own work alone. Each has a cache of
    its own, so an early-exit run replays as BiLD with a separate small model (the same calls; the small model's
    first call after a large one may feed one token more)."""
    training = False

    def __init__(self, config, logits: list, like):
        self.config, self.logits, self.like = config, iter(logits), like
        self.embed = SimpleNamespace(weight=like)  # bild.generate compares the models' devices and dtypes

    def encode(self, input_ids, attention_mask=None):
        return None

    def new_cache(self, encoder_output, attention_mask=None, max_length: int = 512) -> KVCache:
        empty = self.like.new_zeros(1, 1, 1, 1)  # a real cache, one position wide: only its length is used
        return KVCache([empty], [empty], empty, max_length)

    def decode(self, decoder_input_ids, cache: KVCache):
        cache.length += decoder_input_ids.shape[1]
        return next(self.logits)


def replay_logits(mode: Mode, tokens: list[int], result, vocab_size: int, like) -> dict[str, list]:
    """{"large": [...], "small": [...]}: logits (1, k, V), one per call, under which the run's loop decides as it did.
    Greedy: each output token as the argmax. A small call: its token with its probability, the rest spread over
    just enough other ids that none is likelier. A large call: its argmax in every row and, where a pending token
    differs from it, that token with its cross-entropy."""
    def zero(k):  # probability 0 wherever nothing else is set
        return torch.full((1, k, vocab_size), NEGATIVE, dtype=like.dtype, device=like.device)

    logits = {"large": [], "small": []}
    if result is None:
        for token in tokens:
            x = zero(1)
            x[0, 0, token] = 0.0
            logits[mode.name].append(x)
        return logits
    for step in result.trace:
        x = zero(len(step.fed))
        if step.model == "small":
            p = step.prob
            others = min(vocab_size - 1, math.floor((1 - p) / p) + 1) if p < 1 else 0
            if others:
                x[0, -1, [i for i in range(others + 1) if i != step.token][:others]] = math.log((1 - p) / others)
            x[0, -1, step.token] = math.log(p)
        else:
            pending = step.fed[1:]
            for i, argmax in enumerate(step.argmax):
                x[0, i, argmax] = 0.0
                if i < len(pending) and pending[i] != argmax:  # its cross-entropy decides rollback
                    ce = step.cross_entropy[i]
                    x[0, i, argmax] = math.log1p(-math.exp(-ce))
                    x[0, i, pending[i]] = max(-ce, NEGATIVE)
        logits[step.model].append(x)
    return logits


def decisions(trace) -> list[tuple[str, str]]:
    return [(step.model, step.decision) for step in trace]


def replay_seconds(mode: Mode, config, tokens: list[int], result, input_ids, like, sync) -> float | None:
    """The loop's own time for one run: the median of REPLAYS replays, or None when a replay made other calls (a
    probability within rounding of a threshold)."""
    logits = replay_logits(mode, tokens, result, config.vocab_size, like)
    seconds = []
    for _ in range(REPLAYS):
        large, small = Replay(config, logits["large"], like), Replay(config, logits["small"], like)
        sync()
        start_time = time.perf_counter()
        try:
            replayed, replayed_result = mode.decode(large, small, input_ids)
        except StopIteration:  # it asked for more calls than the run made
            return None
        sync()
        seconds.append(time.perf_counter() - start_time)
        if replayed != tokens or (result and decisions(replayed_result.trace) != decisions(result.trace)):
            return None
    return statistics.median(seconds)


# --- the report --------------------------------------------------------------------------------------------------

def summarize(decoded: dict, sentences: list[dict], baseline: list[dict] | None) -> dict:
    """A system's figures from its run (decode_interleaved's) and per-sentence entries, against large greedy's."""
    def total(key, entries=sentences):
        return sum(s[key] for s in entries)

    measured, predicted = total("measured"), total("predicted")
    entry = {"measured_ms": 1000 * statistics.median(s["measured"] for s in sentences),
             "predicted_ms": 1000 * statistics.median(s["predicted"] for s in sentences),
             "ratio": predicted / measured,
             "median_ratio": statistics.median(s["predicted"] / s["measured"] for s in sentences)}
    if baseline:
        entry.update(speedup=total("measured", baseline) / measured,
                     predicted_speedup=total("predicted", baseline) / predicted,
                     flat_speedup=total("predicted", baseline) / total("predicted_flat"))
    for part in ("encoders", "small", "large", "overhead"):
        entry[f"{part}_share"] = sum(s["parts"][part] for s in sentences) / predicted
    calls = Counter()
    for s in sentences:
        calls.update({(kind, fed): n for kind, by_fed in s["counts"].items() for fed, n in by_fed.items()})
    entry["calls_per_sentence"] = calls.total() / len(sentences)
    if decoded["results"][0] is not None:
        large_calls = Counter()
        for (kind, fed), n in calls.items():
            if kind != "small":
                large_calls[fed] += n
        stats = [result.stats for result in decoded["results"]]
        entry["tokens_per_large_call"] = sum(map(len, decoded["tokens"])) / large_calls.total()
        entry["fallback_rate"] = sum(s.fallbacks for s in stats) / max(1, sum(s.small_calls for s in stats))
        entry["large_calls_by_fed"] = dict(sorted(large_calls.items()))
    return entry


def explain(mode: Mode, decoded: dict, inputs: list, table: CostTable, config, early_exit: bool, like,
            sync) -> tuple[list[dict], float]:
    """One system's run (decode_interleaved's) -> (per sentence: measured and predicted seconds, the prediction by
    part and with flat verify, the counts; the loop's overhead per call, from replays of every sentence)."""
    runs = list(zip(decoded["tokens"], decoded["results"], inputs))
    calls = [run_calls(mode, tokens, result, early_exit) for tokens, result, _ in runs]
    replays = [replay_seconds(mode, config, tokens, result, ids, like, sync) for tokens, result, ids in runs]
    replayed = [i for i, seconds in enumerate(replays) if seconds is not None]
    overhead = sum(replays[i] for i in replayed) / max(1, sum(len(calls[i]) for i in replayed))
    if len(replayed) < len(runs):
        print(f"note: {mode.label}: {len(runs) - len(replayed)} replay(s) made other calls (a probability within "
              "rounding of a threshold); its overhead comes from the others", file=sys.stderr)
    entries, encoders = [], encoder_kinds(mode, early_exit)
    for seconds, (tokens, _, ids), c in zip(decoded["seconds"], runs, calls):
        parts = predict(table, encoders, c, ids.shape[1], overhead)
        flat = predict(table, encoders, c, ids.shape[1], overhead, flat=True)
        entries.append({"measured": seconds, "predicted": sum(parts.values()), "parts": parts,
                        "predicted_flat": sum(flat.values()), "output_tokens": len(tokens), "counts": counts(c)})
    return entries, overhead


PREDICTION_COLUMNS = [("measured_ms", "measured ms", ".1f"), ("predicted_ms", "predicted ms", ".1f"),
                      ("ratio", "pred/meas", ".2f"), ("median_ratio", "median pred/meas", ".2f"),
                      ("speedup", "speedup", ".2f"), ("predicted_speedup", "predicted speedup", ".2f"),
                      ("flat_speedup", "flat-verify speedup", ".2f")]
PARTS_COLUMNS = [("encoders_share", "encoders", ".1%"), ("small_share", "small calls", ".1%"),
                 ("large_share", "large calls", ".1%"), ("overhead_share", "overhead", ".1%"),
                 ("overhead_per_call_ms", "overhead/call ms", ".3f"), ("calls_per_sentence", "calls/sent", ".1f"),
                 ("tokens_per_large_call", "tokens/large call", ".2f"), ("fallback_rate", "fallback rate", ".1%")]


def format_cost_table(table: CostTable, positions: list[int]) -> str:
    """One row per (kind, tokens fed), one column per cache length, in ms, and the cost relative to feeding one token
    (median over the cache lengths); then the encoder passes."""
    label = max(len(f"{kind}, {k} fed") for kind, k in table.calls) + 2
    lines = ["cache length".ljust(label) + "".join(f"{p:>8}" for p in positions) + "   x 1 fed"]
    for (kind, k), by_position in table.calls.items():
        relative = statistics.median(by_position[p] / table.calls[kind, 1][p] for p in positions)
        lines.append(f"{kind}, {k} fed".ljust(label) + "".join(f"{1000 * by_position[p]:8.2f}" for p in positions)
                     + f"{relative:10.2f}")
    for kind, by_length in table.encoders.items():
        lines.append(f"encoder pass, {kind}: " + ", ".join(f"{1000 * s:.2f} at {n} tokens"
                                                          for n, s in sorted(by_length.items())))
    return "\n".join(lines)


# --- this script -------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = common_arguments(__doc__, split="data/dev.jsonl", max_new_tokens=128)
    p.add_argument("--systems", nargs="+", help=f"default: {' '.join(DEFAULT_SYSTEMS)}; large greedy is always added")
    p.add_argument("--positions", nargs="+", type=int, default=DEFAULT_POSITIONS,
                   help="cache lengths at which the table measures each decoder call")
    p.add_argument("--table-rounds", type=int, default=9,
                   help="timed rounds of the cost table; each cost is the median")
    p.add_argument("--json", help="also write the table, the per-sentence counts and predictions, and the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return report_errors("cost_model", run, parse_args(argv))


def run(args):
    if min(args.positions) < 0 or args.table_rounds < 1:
        raise UsageError(f"--positions must be >= 0 and --table-rounds >= 1, got {args.positions} and "
                         f"{args.table_rounds}")
    positions = sorted(set(args.positions))
    specs = dict.fromkeys(["large"] + (args.systems or DEFAULT_SYSTEMS))  # large greedy: every speedup's baseline
    modes = [parse_system(spec, args.max_new_tokens) for spec in specs]
    device, dtype = start(args), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    large, small, tok = load_pair(args.large, args.small, device, dtype, args.exit_layer)
    early_exit = isinstance(small, EarlyExit)
    sources, _ = read_sources(args.split, args.limit, tok, args.large)
    inputs = [torch.tensor([ids], device=device) for ids in sources]

    probes, table_source = table_probes(large, small, inputs, modes, positions, args.max_new_tokens)
    systems = {mode.label: partial(mode.decode, large, small) for mode in modes}
    for _ in range(args.warmup):
        time_round(probes, 0, sync)
    warm_up(systems, inputs[0], args.warmup)
    runs, table = measure(systems, inputs, probes, args.table_rounds, device, args.repeats, sync, not args.no_progress)

    # Replay logits in float32 at least, as bild reads them: a float16 probability could cross a threshold.
    like = torch.empty(0, dtype=torch.promote_types(dtype, torch.float32), device=device)
    per_sentence, report = {}, {}
    for mode in modes:
        entries, overhead = explain(mode, runs[mode.label], inputs, table, large.config, early_exit, like, sync)
        per_sentence[mode.label] = entries
        report[mode.label] = summarize(runs[mode.label], entries, per_sentence.get("large"))
        report[mode.label]["overhead_per_call_ms"] = 1000 * overhead

    small_name = f"exit:{args.exit_layer}" if args.exit_layer else args.small
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{len(sources)} sources of {args.split}, {args.large} / {small_name} on {device_name(device)} "
          f"({args.dtype}{threads}, torch {torch.__version__}); batch 1")
    print(f"\nCall costs, ms: median of {args.table_rounds} rounds spread among the sources; decoder calls on a "
          f"{table_source}-token source, by cache length; x 1 fed: the cost over that of feeding one token")
    print(format_cost_table(table, positions))
    print(f"\nPredicted against measured (median of {args.repeats} interleaved run(s) per source); speedups over large "
          "greedy: measured, predicted, and predicted with flat verify (large(k) = large(1))")
    print(format_table(report, PREDICTION_COLUMNS))
    print("\nWhere the predicted time goes")
    print(format_table(report, PARTS_COLUMNS))
    for label, entry in report.items():
        if "large_calls_by_fed" in entry:
            print(f"  {label}: large calls by tokens fed: "
                  + ", ".join(f"{k}: {n}" for k, n in entry["large_calls_by_fed"].items()))
    if args.json:
        meta = {"split": args.split, "sentences": len(sources), "large": args.large, "small": small_name,
                "device": device_name(device), "dtype": args.dtype,
                "threads": torch.get_num_threads() if device.type == "cpu" else None, "repeats": args.repeats,
                "table_rounds": args.table_rounds, "warmup": args.warmup, "positions": positions,
                "table_source_tokens": table_source, "max_new_tokens": args.max_new_tokens,
                "torch": torch.__version__, "python": platform.python_version()}
        cost_table = {"encoders": table.encoders,
                      "calls": [{"kind": kind, "fed": k, "start": p, "seconds": s}
                                for (kind, k), by_position in table.calls.items() for p, s in by_position.items()]}
        Path(args.json).write_text(json.dumps({"meta": meta, "cost_table": cost_table, "systems": report,
                                               "sentences": per_sentence}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
