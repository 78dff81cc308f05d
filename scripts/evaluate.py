"""Quality and latency of each decoding system, measured side by side in one run: minibild's large and small
greedy, BiLD, speculative decoding, and transformers' own decoding on the same weights.

    python scripts/evaluate.py --split data/test.jsonl --threads 1
    python scripts/evaluate.py --split data/dev.jsonl --limit 40 --repeats 3 \\
        --hf-large runs/hf-large --hf-small runs/hf-small
    python scripts/evaluate.py --device cuda --dtype float32 float16 bfloat16 --warmup 3 --json latency.json
    python scripts/evaluate.py --synthetic 100 --source-length 40 --systems large bild:0.6,5
    python scripts/evaluate.py --limit 100 --systems sample bild-sample:0.6 bild-sample:0,5 --temperature 0.7

Systems: `large`, `small`, `speculative:K`, `bild:FALLBACK,ROLLBACK[,N]` (minibild), and with --hf-large (and
--hf-small) `hf-greedy` and `hf-assisted`: transformers' generate(), greedy and with the small model as assistant
(transformers' default assistant settings), on the Hugging Face folders the minibild files were converted from.
Sampled at --temperature, each source with a generator seeded with --seed: `sample` (the large model's ancestral
sampling, minibild.sample) and `bild-sample:FALLBACK[,N]` (bild_sample, distributed exactly as `sample`: compare
their quality and speed; compare either's speed with large greedy's as the speedup column does).
--exit-layer K makes the small model the large model's first K decoder layers (early exit).

Every source is decoded by every system --repeats times at batch 1, the order rotating from round to round, after
--warmup untimed rounds on the first source, so that drift in the machine's speed hits all systems alike; on CUDA
each call is synchronized. Latency is the median over repeats; a system's speedup is large greedy's total latency
over its own, on the same sources in the same run. With references in the split: BLEU and chrF (sacrebleu).
For BiLD: fallbacks and rollbacks per sentence, tokens per large-model call, the small model's share of the output,
and the large model's share of wall time (a stopwatch around its encode / new_cache / decode calls here; minibild's
own code is not instrumented). Exact systems (bild with rollback 0 or fallback > 1, speculative, hf-greedy,
hf-assisted) are checked token for token against large greedy. Several --dtype values are separate runs.

With --batch-size B, minibild's systems decode B sources at a time (batched greedy, batch.generate_batch), each
batch one timed call, and every source's latency is its batch's; the large model's share of wall time is not
measured then. transformers' systems and --exit-layer are batch-1 only here.

Not offered: torch.compile and CUDA graphs. Each decoder call sees a new cache length, and BiLD's large calls a new
number of tokens, so compiled graphs would be rebuilt or made dynamic call after call, and at batch 1 the Python
loop around the model is a large part of the time.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from minibild import T5, EarlyExit, Tokenizer, bild, load  # noqa: E402
from minibild.batch import right_pad  # noqa: E402
from minibild.__main__ import DTYPES, UsageError, pick_device  # noqa: E402
from minibild.modes import Mode  # noqa: E402
from minibild.progress import progress  # noqa: E402
from minibild.sampling import check_temperature  # noqa: E402
from minibild.weights import load_tokenizer, tokenizer_path  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_SYSTEMS = ["large", "small", f"bild:{bild.FALLBACK_THRESHOLD:g},{bild.ROLLBACK_THRESHOLD:g}",
                   f"bild:{bild.FALLBACK_THRESHOLD:g},0", "speculative:5"]
HF_SYSTEMS = ("hf-greedy", "hf-assisted")


def parse_system(spec: str, max_new_tokens: int, temperature: float | None = None, seed: int = 0) -> Mode:
    """'large' | 'small' | 'speculative:K' | 'bild:FALLBACK,ROLLBACK[,N]' -> Mode; with a temperature, also
    'sample' | 'bild-sample:FALLBACK[,N]'."""
    name, _, params = spec.partition(":")
    try:
        if name in ("large", "small") and not params:
            return Mode(name, max_new_tokens=max_new_tokens)
        if temperature is not None and name == "sample" and not params:
            return Mode("large", max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        if temperature is not None and name == "bild-sample":
            values = params.split(",")
            if len(values) not in (1, 2):
                raise ValueError
            n = int(values[1]) if len(values) == 2 else bild.MAX_SMALL_STEPS
            return Mode("bild", float(values[0]), max_small_steps=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed)
        if name == "speculative":
            return Mode(name, max_small_steps=int(params or 5), max_new_tokens=max_new_tokens)
        if name == "bild":
            values = params.split(",")
            if len(values) not in (2, 3):
                raise ValueError
            n = int(values[2]) if len(values) == 3 else bild.MAX_SMALL_STEPS
            return Mode(name, float(values[0]), float(values[1]), n, max_new_tokens)
    except ValueError:
        pass
    sampled = ", sample, bild-sample:FALLBACK[,N]" if temperature is not None else ""
    raise UsageError(f"bad system {spec!r}; use large, small, speculative:K, bild:FALLBACK,ROLLBACK[,N]{sampled}")


def is_sampled(spec: str) -> bool:
    return spec.partition(":")[0] in ("sample", "bild-sample")


def is_exact(mode: Mode) -> bool:
    """Whether the mode must reproduce large greedy's tokens (up to floating point); a sampled one never does."""
    return not mode.temperature and (mode.name == "speculative" or (
        mode.name == "bild" and (mode.rollback_threshold == 0 or mode.fallback_threshold > 1)))


# --- the sources and the models --------------------------------------------------------------------------

def read_split(path: Path, limit: int) -> list[dict]:
    if not path.exists():
        raise UsageError(f"{path}: no such split; run scripts/prepare_data.py")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise UsageError(f"{path}: the split is empty")
    return rows


def read_sources(split: str, limit: int, tok: Tokenizer | None, large_path) -> tuple[list[list[int]], list | None]:
    """The split's source token ids, and its references when every row has one (None otherwise)."""
    if tok is None:
        raise UsageError(f"{large_path}: no spiece.model beside the weights to tokenize {split}")
    rows = read_split(Path(split), limit)
    references = [row.get("reference") for row in rows]
    return [tok.encode(row["source"]) for row in rows], None if None in references else references


def synthetic_sources(n: int, length: int, seed: int, config) -> list[list[int]]:
    """n random sources of `length` tokens, EOS included: ids above pad/eos/unk, the same for every run."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, config.vocab_size, (length - 1,), generator=g).tolist() + [config.eos_token_id]
            for _ in range(n)]


def load_small(large, small_path, device, dtype, exit_layer: int = 0):
    """The small model: the checkpoint at small_path or, for exit_layer k, the large model's first k decoder layers
    (EarlyExit), which shares the large model's weights and caches."""
    return EarlyExit(large, exit_layer) if exit_layer else load(small_path, device=device, dtype=dtype)


def load_pair(large_path, small_path, device, dtype, exit_layer: int = 0) -> tuple:
    """The large and small models (see load_small; None without small_path and exit_layer) and the tokenizer
    stored beside the large one (None if there is none, as for random weights timed on --synthetic sources),
    refused unless the small model stores the same one and it fits both models."""
    large = load(large_path, device=device, dtype=dtype)
    small = load_small(large, small_path, device, dtype, exit_layer) if small_path or exit_layer else None
    if tokenizer_path(large_path) is None:
        return large, small, None
    models = {"large": (large_path, large.config)}
    if small_path and not exit_layer:
        models["small"] = (small_path, small.config)
    return large, small, load_tokenizer(models)


def load_hf(path, device, dtype):
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # no deprecation chatter from generate() in the middle of the table
    logging.disable_progress_bar()
    if not (Path(path) / "config.json").exists():
        raise UsageError(f"{path}: no Hugging Face checkpoint folder here (no config.json)")
    return T5ForConditionalGeneration.from_pretrained(path).to(device=device, dtype=dtype).eval()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


# --- the systems ---------------------------------------------------------------------------------------------

class TimedModel:
    """A model with a stopwatch on its encode, new_cache and decode calls; everything else passes through."""

    def __init__(self, model, sync):
        self.model, self.sync, self.seconds = model, sync, 0.0

    def __getattr__(self, name):  # config, embed, training, ...
        return getattr(self.model, name)

    def _timed(self, method, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = method(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out

    def encode(self, *args, **kwargs):
        return self._timed(self.model.encode, *args, **kwargs)

    def new_cache(self, *args, **kwargs):
        return self._timed(self.model.new_cache, *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._timed(self.model.decode, *args, **kwargs)


@dataclass
class System:
    """One system to measure: decode(input_ids (1, S)) -> (tokens, BiLD result or None), and for minibild's
    systems decode_batch(input_ids (B, S), attention_mask) -> one (tokens, BiLD result or None) per row."""
    decode: Callable
    decode_batch: Callable | None = None
    exact: bool = False  # must reproduce large greedy's tokens
    timer: TimedModel | None = None  # the large model's stopwatch (BiLD and speculative decoding)


def minibild_system(mode: Mode, large, small, device) -> System:
    """A minibild mode as a System; BiLD and speculative decoding run their large model under a stopwatch."""
    decode_batch = partial(mode.decode_batch, large, small)  # batched BiLD calls the model's layers: no stopwatch
    if mode.name in ("large", "small"):
        return System(partial(mode.decode, large, small), decode_batch)
    timer = TimedModel(large, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    if isinstance(small, EarlyExit):  # the early-exit model must sit on the very large model BiLD is given
        small = EarlyExit(timer, small.exit_layer)
    return System(partial(mode.decode, timer, small), decode_batch, exact=is_exact(mode), timer=timer)


@torch.inference_mode()
def hf_decode(model, assistant, max_new_tokens: int, input_ids):
    """transformers' greedy decoding (assisted when `assistant` is a model) -> (tokens as minibild gives them, None)."""
    cache = {}
    if model.config.num_decoder_layers > model.config.num_layers:
        # transformers sizes the decoder's cache by the encoder's depth and fails on a deeper decoder;
        # a cache made without a config grows to as many layers as it is fed.
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.generation.utils import ALL_CACHE_NAMES
        name = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"  # renamed in transformers 5
        cache = {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=assistant,
                         do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, **cache)
    tokens, eos = out[0, 1:].tolist(), model.config.eos_token_id  # without the decoder-start token
    return (tokens[: tokens.index(eos) + 1] if eos in tokens else tokens), None  # nothing after EOS


# --- measuring -----------------------------------------------------------------------------------------------

def bleu(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu
    return sacrebleu.corpus_chrf(hypotheses, [references]).score


def warm_up(decoders: dict, input_ids, rounds: int):
    """Run every decoder `rounds` times, untimed: the allocator, kernels and lazy initialisation settle."""
    for _ in range(rounds):
        for decode in decoders.values():
            decode(input_ids)


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


def batch_decoder(decode_batch: Callable) -> Callable:
    """A System's decode_batch as decode_interleaved's decoder: a batch (input_ids, attention_mask) -> (the rows'
    tokens, the rows' BiLD results or Nones)."""
    def decode(batch):
        rows = decode_batch(*batch)
        return [tokens for tokens, _ in rows], [result for _, result in rows]
    return decode


def by_source(run: dict) -> dict:
    """A run of batch_decoders (from decode_interleaved) as if per source: each source takes its batch's seconds."""
    return {"tokens": [tokens for batch in run["tokens"] for tokens in batch],
            "results": [result for batch in run["results"] for result in batch],
            "seconds": [s for s, batch in zip(run["seconds"], run["tokens"]) for _ in batch],
            "total_seconds": run["total_seconds"]}


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


def evaluate(systems: dict[str, System], sources: list[list[int]], device, references: list[str] | None = None,
             tok: Tokenizer | None = None, metrics: dict | None = None, repeats: int = 1, warmup: int = 0,
             show_progress=True, batch_size: int = 1, pad_token_id: int = 0) -> dict:
    """Decode every source with every system, interleaved (decode_interleaved), after `warmup` untimed rounds on the
    first source -> {label: figures}: latency and speedup over the system labelled "large" (large greedy), BiLD's
    counts, the large model's share of wall time, which sources an exact system decodes unlike large greedy, and
    with references, each of `metrics` ({name: score(hypotheses, references)}, default BLEU and chrF).
    batch_size > 1: batches of right-padded sources, one timed decode_batch call each (see the module docstring)."""
    if batch_size == 1:
        inputs = [torch.tensor([ids], device=device) for ids in sources]
        decoders = {label: system.decode for label, system in systems.items()}
    else:
        inputs = [right_pad(sources[i:i + batch_size], pad_token_id, device)
                  for i in range(0, len(sources), batch_size)]
        decoders = {label: batch_decoder(system.decode_batch) for label, system in systems.items()}
    warm_up(decoders, inputs[0], warmup)
    for system in systems.values():
        if system.timer:
            system.timer.seconds = 0.0
    runs = decode_interleaved(decoders, inputs, device, repeats, show_progress)
    if batch_size > 1:
        runs = {label: by_source(run) for label, run in runs.items()}
    report = {}
    for label, run in runs.items():
        entry = {}
        if references:
            hypotheses = [tok.decode(t) for t in run["tokens"]]
            metrics = metrics or {"bleu": bleu, "chrf": chrf}
            entry = {name: score(hypotheses, references) for name, score in metrics.items()}
        entry.update(summarize(run, runs.get("large")))
        system = systems[label]
        if system.timer and batch_size == 1:
            entry["large_share"] = system.timer.seconds / run["total_seconds"]
        if system.exact and "large" in runs and label != "large":
            entry["differs_from_large"] = [i for i, (a, b) in enumerate(zip(run["tokens"], runs["large"]["tokens"]))
                                           if a != b]
        report[label] = entry
    return report


COLUMNS = [("bleu", "BLEU", ".2f"), ("chrf", "chrF", ".2f"), ("mean_output_tokens", "tokens", ".1f"),
           ("median_ms", "median ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("median_speedup", "median speedup", ".2f"), ("same_as_large", "= large", ".1%"),
           ("fallbacks_per_sentence", "fallbacks/sent", ".2f"), ("rollbacks_per_sentence", "rollbacks/sent", ".2f"),
           ("tokens_per_large_call", "tokens/large call", ".2f"), ("small_token_share", "small share", ".1%"),
           ("large_share", "large share", ".1%")]


def format_table(report: dict, columns=COLUMNS) -> str:
    """One row per system, one column per (key, title, format) that some entry has; a key an entry lacks shows
    as '-'."""
    columns = [c for c in columns if any(c[0] in entry for entry in report.values())]
    width = max(map(len, report)) + 2
    rows = [[format(entry[key], fmt) if key in entry else "-" for key, _, fmt in columns] for entry in report.values()]
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, (_, title, _) in enumerate(columns)]
    lines = ["system".ljust(width) + " | ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths))]
    for label, row in zip(report, rows):
        lines.append(label.ljust(width) + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    return "\n".join(lines)


def exactness_lines(report: dict, sentences: int) -> list[str]:
    """One line per exact system: identical to large greedy, or on which sources it differs."""
    lines = []
    for label, entry in report.items():
        if "differs_from_large" in entry:
            differs = entry["differs_from_large"]
            lines.append(f"  {label}: " + ("identical to large greedy" if not differs else
                                           f"DIFFERS from large greedy on {len(differs)} of {sentences} sources "
                                           f"{differs[:10]} (floating point near-ties? compare in float64)"))
    return lines


# --- the options every measuring script shares -----------------------------------------------------------------

def common_arguments(description: str | None, split: str, max_new_tokens: int,
                     several_dtypes: bool = False) -> argparse.ArgumentParser:
    """A parser with the options every measuring script shares: the pair, the sources, the machine, the timing."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default=split, help="JSONL with a 'source' (and a 'reference') per line")
    p.add_argument("--limit", type=int, default=0, help="use only the first N sources (0: all)")
    p.add_argument("--large", default=str(WEIGHTS / "large"), help="large model (minibild checkpoint folder)")
    p.add_argument("--small", default=str(WEIGHTS / "small"), help="small model (minibild checkpoint folder)")
    p.add_argument("--exit-layer", type=int, default=0, metavar="K",
                   help="use the large model's first K decoder layers as the small model (early exit), not --small")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    if several_dtypes:
        p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"],
                       help="one or more: each is a separate run (a T4 has no bfloat16)")
    else:
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per source and system; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every system on the first source")
    p.add_argument("--no-progress", action="store_true")
    return p


def start(args) -> torch.device:
    """Check the common options' counts, set the thread count, and return the device."""
    for name in ("limit", "warmup"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("repeats", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def report_errors(program: str, run, args) -> int:
    """Run `run(args)`; a user error becomes one line on stderr and exit status 2, not a traceback."""
    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    return 0


# --- this script -----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = common_arguments(__doc__, split="data/test.jsonl", max_new_tokens=bild.MAX_NEW_TOKENS, several_dtypes=True)
    p.add_argument("--systems", nargs="+", help=f"default: {' '.join(DEFAULT_SYSTEMS)}, and the hf systems "
                                                "the --hf folders allow; large greedy is always added")
    p.add_argument("--hf-large", help="the large model's Hugging Face folder: adds hf-greedy")
    p.add_argument("--hf-small", help="the small model's Hugging Face folder: adds hf-assisted (with --hf-large)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N random sources instead of the split")
    p.add_argument("--source-length", type=int, default=32, help="tokens per synthetic source, EOS included")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sources and of the sampled systems")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled systems (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="decode B sources at a time with minibild's systems (default 1)")
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return report_errors("evaluate", run, parse_args(argv))


def system_specs(args) -> list[str]:
    """The systems to run, checked, large greedy first if not given (the baseline of every speedup)."""
    default = list(DEFAULT_SYSTEMS)
    if args.hf_large:
        default += ["hf-greedy", "hf-assisted"] if args.hf_small else ["hf-greedy"]
    specs = list(dict.fromkeys(args.systems or default))
    if any(is_sampled(spec) for spec in specs):  # before parse_system, which would call a bad one a bad system
        check_temperature(args.temperature, "large and bild:FALLBACK,0")
    for spec in specs:
        if spec not in HF_SYSTEMS:
            try:
                parse_system(spec, args.max_new_tokens, args.temperature, args.seed)
            except UsageError as e:
                raise UsageError(f"{e}, hf-greedy or hf-assisted") from None
    if "large" not in specs:
        specs.insert(0, "large")
    hf_wanted = [s for s in specs if s in HF_SYSTEMS]
    if hf_wanted and (not args.hf_large or ("hf-assisted" in specs and not args.hf_small)):
        raise UsageError(f"{', '.join(hf_wanted)} need{'s' * (len(hf_wanted) == 1)} --hf-large"
                         + (" and --hf-small" if "hf-assisted" in specs else ""))
    return specs


def small_name(args, specs: list[str]) -> str | None:
    """The small model minibild's systems use ("exit:K" for early exit), or None when they use none."""
    if all(spec in HF_SYSTEMS or spec == "large" for spec in specs):
        return None
    return f"exit:{args.exit_layer}" if args.exit_layer else args.small


def build_systems(args, specs: list[str], dtype, device) -> tuple[dict[str, System], T5, Tokenizer | None]:
    """Load what the systems need in `dtype` -> ({label: System}, the large model, its tokenizer)."""
    modes = {spec: parse_system(spec, args.max_new_tokens, args.temperature, args.seed) for spec in specs
             if spec not in HF_SYSTEMS}
    uses_small = small_name(args, specs) is not None
    large, small, tok = load_pair(args.large, args.small if uses_small else None, device, dtype,
                                  args.exit_layer if uses_small else 0)
    hf_large = load_hf(args.hf_large, device, dtype) if set(HF_SYSTEMS) & set(specs) else None
    hf_small = load_hf(args.hf_small, device, dtype) if "hf-assisted" in specs else None
    systems = {}
    for spec in specs:
        if spec in HF_SYSTEMS:
            assistant = hf_small if spec == "hf-assisted" else None
            systems[spec] = System(partial(hf_decode, hf_large, assistant, args.max_new_tokens), exact=True)
        else:
            systems[modes[spec].label] = minibild_system(modes[spec], large, small, device)
    return systems, large, tok


def run(args):
    if args.synthetic < 0 or args.source_length < 1:
        raise UsageError(f"--synthetic must be >= 0 and --source-length >= 1, got {args.synthetic} and "
                         f"{args.source_length}")
    specs = system_specs(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size > 1 and any(map(is_sampled, specs)):
        raise UsageError("--batch-size > 1: sample and bild-sample decode one source at a time; use --batch-size 1")
    if args.batch_size > 1 and (args.exit_layer or any(s in HF_SYSTEMS for s in specs)):
        raise UsageError("--batch-size > 1 is for minibild's systems with a separate small model: hf-greedy, "
                         "hf-assisted and --exit-layer decode one source at a time; use --batch-size 1")
    hf_version = None
    if any(s in HF_SYSTEMS for s in specs):
        try:
            import transformers
        except ImportError:
            raise UsageError("hf-greedy and hf-assisted need transformers: pip install transformers") from None
        hf_version = transformers.__version__
    device = start(args)
    meta = {"inputs": f"{args.synthetic} synthetic sources of {args.source_length} tokens (seed {args.seed})"
                      if args.synthetic else args.split,
            "large": args.large, "small": small_name(args, specs),
            "hf_large": args.hf_large, "hf_small": args.hf_small, "device": device_name(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None, "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup": args.warmup, "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
            "transformers": hf_version, "python": platform.python_version()}
    runs = []
    for dtype_name in args.dtype:
        systems, large, tok = build_systems(args, specs, DTYPES[dtype_name], device)
        if args.synthetic:
            sources, references = synthetic_sources(args.synthetic, args.source_length, args.seed, large.config), None
        else:
            sources, references = read_sources(args.split, args.limit, tok, args.large)
        report = evaluate(systems, sources, device, references, tok, repeats=args.repeats, warmup=args.warmup,
                          show_progress=not args.no_progress, batch_size=args.batch_size,
                          pad_token_id=large.config.pad_token_id)
        runs.append({"dtype": dtype_name, "sentences": len(sources), "systems": report})
        threads = f", {meta['threads']} threads" if meta["threads"] else ""
        versions = f"torch {meta['torch']}" + (f", transformers {hf_version}" if hf_version else "")
        inputs = meta["inputs"] if args.synthetic else f"{len(sources)} sources of {args.split}"
        pair = f"{args.large} / {meta['small']}" if meta["small"] else args.large
        print(f"{inputs}, {pair} on {meta['device']} "
              f"({dtype_name}{threads}; {versions}); batch {args.batch_size}, median of {args.repeats} interleaved "
              f"run(s) per source "
              f"after {args.warmup} warm-up round(s); speedup vs large greedy in this run")
        print(format_table(report))
        for line in exactness_lines(report, len(sources)):
            print(line)
        if args.json:  # after every dtype: a run stopped later keeps the finished ones
            Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
