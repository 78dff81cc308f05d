"""Latency per sentence at batch 1: BiLD against large-model greedy, on CPU or CUDA, side by side with transformers.

    python scripts/time_latency.py --split data/dev.jsonl --limit 100 --threads 1
    python scripts/time_latency.py --device cuda --dtype float32 float16 --synthetic 100 --source-length 40
    python scripts/time_latency.py --large L --small S --hf-large L/hf --hf-small S/hf --json latency.json

Systems: `large`, `small`, `speculative:K`, `bild:FALLBACK,ROLLBACK[,N]` (minibild), and with --hf-large
(and --hf-small), `hf-greedy` and `hf-assisted`: transformers' generate(), greedy and with the small model as
assistant (transformers' default assistant settings), on the Hugging Face folders the minibild files were
converted from. Every source is decoded by every system --repeats times, the order rotating from round to
round, after --warmup untimed rounds on the first source; latency is the median over repeats, speedup is
relative to large greedy in the same run.
Exact systems (bild with rollback 0 or fallback > 1, speculative, hf-greedy, hf-assisted) are checked
token for token against large greedy. For BiLD, the large model's share of wall time is measured by
timing its encode / new_cache / decode calls (a wrapper here; minibild's own code is not instrumented).

Not offered: torch.compile and CUDA graphs. Each decoder call sees a new cache length, and BiLD's large
calls a new number of tokens, so compiled graphs would be rebuilt or made dynamic call after call, and
at batch 1 the Python loop around the model is a large part of the time.
"""
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from evaluate import (DTYPES, UsageError, common_arguments, decode_interleaved, device_name, format_table,
                      load_pair, parse_system, pick_device, read_split, report_errors, summarize)

DEFAULT_SYSTEMS = ["large", "small", "bild:0.6,5", "bild:0.6,0", "speculative:5"]
HF_SYSTEMS = ("hf-greedy", "hf-assisted")
COLUMNS = [("median_ms", "median ms", ".1f"), ("mean_ms", "mean ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("median_speedup", "median speedup", ".2f"), ("mean_output_tokens", "tokens", ".1f"),
           ("same_as_large", "= large", ".1%"), ("tokens_per_large_call", "tokens/large call", ".2f"),
           ("large_share", "large share", ".1%")]


class TimedModel:
    """A model with a stopwatch on its encode, new_cache and decode calls; everything else passes through."""

    def __init__(self, model, sync):
        self.model, self.sync, self.seconds = model, sync, 0.0

    def __getattr__(self, name):  # config, embed, ...
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


def is_exact(mode) -> bool:
    """Whether the system must reproduce large greedy's tokens (up to floating point); None: hf-greedy, hf-assisted."""
    return mode is None or mode.name == "speculative" or (mode.name == "bild" and (mode.rollback_threshold == 0
                                                                                   or mode.fallback_threshold > 1))


def load_hf(path, device, dtype):
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # no deprecation chatter from generate() in the middle of the table
    logging.disable_progress_bar()
    if not (Path(path) / "config.json").exists():
        raise UsageError(f"{path}: no Hugging Face checkpoint folder here (no config.json)")
    return T5ForConditionalGeneration.from_pretrained(path).to(device=device, dtype=dtype).eval()


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


def read_sources(args, tok, vocab_size: int, eos: int) -> list[list[int]]:
    if args.synthetic:
        # Random ids above pad/eos/unk, then EOS: the same sources for every run with this seed.
        g = torch.Generator().manual_seed(args.seed)
        return [torch.randint(3, vocab_size, (args.source_length - 1,), generator=g).tolist() + [eos]
                for _ in range(args.synthetic)]
    if tok is None:
        raise UsageError(f"{args.large}: no spiece.model beside the weights to tokenize {args.split}; "
                         "use --synthetic N for random sources")
    return [tok.encode(row["source"]) for row in read_split(Path(args.split), args.limit)]


def time_dtype(args, specs: list[str], dtype_name: str, device) -> dict:
    """Time every system in one dtype -> {"dtype", "systems": {label: entry}, "exact": {label: identical}}."""
    dtype = DTYPES[dtype_name]
    large, small, tok = load_pair(args.large, args.small, device, dtype, args.exit_layer)
    sources = [torch.tensor([ids], device=device)
               for ids in read_sources(args, tok, large.config.vocab_size, large.config.eos_token_id)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hf_large = load_hf(args.hf_large, device, dtype) if set(HF_SYSTEMS) & set(specs) else None
    hf_small = load_hf(args.hf_small, device, dtype) if "hf-assisted" in specs else None
    systems, timers, exact = {}, {}, {}
    for spec in specs:
        if spec in HF_SYSTEMS:
            label, mode = spec, None
            systems[label] = partial(hf_decode, hf_large, hf_small if spec == "hf-assisted" else None,
                                     args.max_new_tokens)
        else:
            mode = parse_system(spec, args.max_new_tokens)
            label = mode.label
            if mode.name in ("large", "small"):
                systems[label] = partial(mode.decode, large, small)
            else:
                timers[label] = TimedModel(large, sync)
                systems[label] = partial(mode.decode, timers[label], small)
        exact[label] = is_exact(mode)
    for _ in range(args.warmup):  # allocator, kernels, lazy initialisation: out of the timed runs
        for decode in systems.values():
            decode(sources[0])
    for timer in timers.values():
        timer.seconds = 0.0
    runs = decode_interleaved(systems, sources, device, args.repeats, not args.no_progress)
    report = {}
    for label, run in runs.items():
        entry = summarize(run, runs["large"])
        if label in timers:
            entry["large_share"] = timers[label].seconds / run["total_seconds"]
        if exact[label]:
            entry["differs_from_large"] = [i for i, (a, b) in enumerate(zip(run["tokens"], runs["large"]["tokens"]))
                                           if a != b]
        report[label] = entry
    return {"dtype": dtype_name, "sentences": len(sources), "systems": report,
            "exact": {label: not report[label]["differs_from_large"] for label in report if exact[label]}}


def parse_args(argv):
    p = common_arguments(__doc__, split="data/test.jsonl", max_new_tokens=128)
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="time N random sources instead of a split")
    p.add_argument("--source-length", type=int, default=32, help="tokens per synthetic source, EOS included")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sources")
    p.add_argument("--hf-large", help="the large model's Hugging Face folder: adds hf-greedy")
    p.add_argument("--hf-small", help="the small model's Hugging Face folder: adds hf-assisted (with --hf-large)")
    p.add_argument("--systems", nargs="+", help=f"default: {' '.join(DEFAULT_SYSTEMS)}, and the hf systems "
                                                "the --hf folders allow; large greedy is always added")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"],
                   help="one or more: each is a separate timed run (a T4 has no bfloat16)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per source and system; median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every system on the first source")
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return report_errors("time_latency", run, parse_args(argv))


def run(args):
    for name in ("synthetic", "limit", "warmup"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("source_length", "repeats", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    default = list(DEFAULT_SYSTEMS)
    if args.hf_large:
        default += ["hf-greedy", "hf-assisted"] if args.hf_small else ["hf-greedy"]
    specs = list(dict.fromkeys(args.systems or default))
    for spec in specs:
        if spec not in HF_SYSTEMS:
            try:
                parse_system(spec, args.max_new_tokens)
            except UsageError as e:
                raise UsageError(f"{e}, hf-greedy or hf-assisted") from None
    if "large" not in specs:
        specs.insert(0, "large")  # the baseline of every speedup
    hf_wanted, hf_version = [s for s in specs if s in HF_SYSTEMS], None
    if hf_wanted:
        try:
            import transformers
        except ImportError:
            raise UsageError(f"{', '.join(hf_wanted)} need transformers: pip install transformers") from None
        hf_version = transformers.__version__
        if not args.hf_large or ("hf-assisted" in specs and not args.hf_small):
            raise UsageError(f"{', '.join(hf_wanted)} need{'s' * (len(hf_wanted) == 1)} --hf-large"
                             + (" and --hf-small" if "hf-assisted" in specs else ""))
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = {"inputs": f"{args.synthetic} synthetic sources of {args.source_length} tokens (seed {args.seed})"
                      if args.synthetic else args.split,
            "large": args.large, "small": args.small, "hf_large": args.hf_large, "hf_small": args.hf_small,
            "device": device_name(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "repeats": args.repeats, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens,
            "torch": torch.__version__, "transformers": hf_version,
            "python": platform.python_version()}
    runs = []
    for dtype_name in args.dtype:
        result = time_dtype(args, specs, dtype_name, device)
        runs.append(result)
        threads = f", {meta['threads']} threads" if meta["threads"] else ""
        versions = f"torch {meta['torch']}" + (f", transformers {hf_version}" if hf_version else "")
        print(f"{result['sentences']} sources of {meta['inputs']} on {meta['device']} ({dtype_name}{threads}; "
              f"{versions}); batch 1, median of {args.repeats} interleaved run(s) per source after "
              f"{args.warmup} warm-up round(s); speedup vs large greedy in this run")
        print(format_table(result["systems"], COLUMNS))
        for label, identical in result["exact"].items():
            differs = result["systems"][label]["differs_from_large"]
            print(f"  {label}: " + ("identical to large greedy" if identical else
                                    f"DIFFERS from large greedy on {len(differs)} of {result['sentences']} sources "
                                    f"{differs[:10]} (floating point near-ties? compare in float64)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
