"""minibild's command line: translate text with the shipped demo pair (or any converted T5 pair).

    python -m minibild "El principio de la sabiduría es el temor de Jehová."
    python -m minibild --mode large < sentences.txt > translations.txt
    python -m minibild --temperature 0.7 --seed 1 "Dios es amor."   # sampled, exactly as the large model samples

Prints exactly one line per input on stdout (a blank one for a blank input line); progress, statistics
and --trace's text traces go to stderr; --trace-jsonl DIR writes each input's trace as JSON lines, its header
first, to DIR/input-N.jsonl.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from . import bild
from .early_exit import EarlyExit
from .modes import MODES, Mode, check_used
from .progress import progress
from .tokenizer import Tokenizer
from .trace import trace_to_jsonl
from .weights import load, load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """A problem with the user's input or settings: reported as one line, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="minibild", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="*", help="texts to translate; none: read one per line from stdin")
    p.add_argument("--large", default=str(WEIGHTS / "large"), help="large model (minibild checkpoint folder)")
    p.add_argument("--small", help="small model (minibild checkpoint folder; default: the shipped weights/small)")
    p.add_argument("--exit-layer", type=int, metavar="K",
                   help="use the large model's first K decoder layers as the small model (early exit), not --small")
    p.add_argument("--mode", choices=MODES, default="bild",
                   help="bild: BiLD; large/small: greedy with one model; speculative: greedy speculative "
                        "decoding with max-small-steps draft tokens (BiLD with fallback 0, rollback 0); official: the "
                        "official BiLD implementation's rule (minibild/official.py)")
    p.add_argument("--fallback-threshold", type=float, help=f"alpha_FB (default {bild.FALLBACK_THRESHOLD})")
    p.add_argument("--rollback-threshold", type=float,
                   help=f"alpha_RB (default {bild.ROLLBACK_THRESHOLD}; refused when sampling, whose rejections keep "
                        "the large model's distribution)")
    p.add_argument("--max-small-steps", type=int, help=f"N (default {bild.MAX_SMALL_STEPS})")
    p.add_argument("--max-new-tokens", type=int, default=bild.MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; T > 0: sample from softmax(logits / T), with bild_sample in the bild "
                        "and speculative modes (distributed exactly as the large model's samples) and "
                        "minibild.sample in the large and small modes")
    p.add_argument("--seed", type=int, help="seed of the sampling generator, reseeded for each input (default 0)")
    p.add_argument("--max-input-tokens", type=int, default=512,
                   help="refuse inputs longer than this many tokens (default 512) instead of truncating them")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="decode B inputs at a time (batched greedy or batch.generate_batch; each output is the one "
                        "batch size 1 gives, in float32 except where a probability lies within about 3e-6 of a "
                        "threshold or a tie; default 1)")
    p.add_argument("--trace", action="store_true", help="print BiLD's decisions for each input on stderr")
    p.add_argument("--trace-jsonl", metavar="DIR",
                   help="write each input's trace as JSON lines, its header first (trace.py), to DIR/input-N.jsonl "
                        "(N from 1, as --trace numbers inputs), for python -m minibild.diff; DIR must be new or empty")
    return p.parse_args(argv)


NOT_UTF8 = "is not UTF-8 text; convert it first, for example with iconv -f latin1 -t utf-8"


def read_inputs(args) -> list[str]:
    """The texts to translate: the arguments, or the lines on stdin (blank lines included)."""
    if args.text:
        texts = args.text
    else:
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError(f"stdin {NOT_UTF8}") from None
        if not text:
            raise UsageError("no input: give texts as arguments or one per line on stdin")
        # Lines end at "\n" only: str.splitlines would also split at form feeds, U+2028 and others inside a line.
        texts = text.removesuffix("\n").split("\n")
    for i, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")  # fails on the surrogates Python makes of undecodable bytes (surrogateescape)
        except UnicodeEncodeError:
            raise UsageError(f"input {i} {NOT_UTF8}") from None
    return texts


def pick_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: minibild supports cpu and cuda")
    return device


def trace_pieces(trace, tok: Tokenizer) -> str:
    """'id=piece' for every token a trace mentions, so a reader can follow it in words; a bare id for
    the ids beyond the tokenizer's pieces (a T5 embedding may be larger: extra ids, padding)."""
    ids = set()
    for step in trace:
        ids.update(step.fed + (getattr(step, "argmax", [step.appended]) if step.model == "large" else [step.token]))
    ids.discard(None)  # a sampled fallback draws no token; a last sampled large call may append none
    return " ".join(f"{i}={tok.sp.IdToPiece(i)}" if i < tok.vocab_size else str(i) for i in sorted(ids))


def trace_folder(folder: Path) -> Path:
    """--trace-jsonl's folder, created if new; a file or a folder holding anything is refused (nothing overwritten)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--trace-jsonl {folder} is not a folder; name a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"--trace-jsonl {folder} is not empty; name a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"minibild: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader left early (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 1


# The CLI's flags for the settings modes.MODES declares (and the seed), given or None.
FLAGS = {"fallback_threshold": "--fallback-threshold", "rollback_threshold": "--rollback-threshold",
         "max_small_steps": "--max-small-steps", "small": "--small", "exit_layer": "--exit-layer", "seed": "--seed"}


def mode_of(args) -> Mode:
    """The Mode the arguments ask for; a setting given to a mode that does not use it is refused."""
    given = {"small_model" if name in ("small", "exit_layer") else name: flag for name, flag in FLAGS.items()
             if getattr(args, name) is not None}
    check_used(args.mode, given, args.temperature)

    def value(name, default):
        return default if getattr(args, name) is None else getattr(args, name)
    return Mode(args.mode, value("fallback_threshold", bild.FALLBACK_THRESHOLD),
                value("rollback_threshold", bild.ROLLBACK_THRESHOLD), value("max_small_steps", bild.MAX_SMALL_STEPS),
                args.max_new_tokens, args.temperature, value("seed", 0))


def run(args) -> int:
    texts = read_inputs(args)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        raise UsageError(f"--dtype {args.dtype} is for GPUs; on CPU use float32 or float64")
    if args.temperature and args.rollback_threshold is not None:
        raise UsageError("--rollback-threshold has no place in sampling (a rollback rule would change the output's "
                         "distribution): drop it, or sample with --temperature 0 for greedy BiLD")
    mode = mode_of(args)
    for flag in ("trace", "trace_jsonl"):
        if getattr(args, flag) and mode.name in ("large", "small"):
            raise UsageError(f"--{flag.replace('_', '-')} shows BiLD's decisions; --mode {mode.name} has none "
                             "(greedy, one model)")
    early_exit = args.exit_layer is not None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if mode.temperature and args.batch_size > 1:
        raise UsageError("--temperature > 0 samples one input at a time; use --batch-size 1")
    if mode.name == "official" and (args.batch_size > 1 or early_exit):
        raise UsageError("--mode official decodes one input at a time with a separate small model, as the official "
                         "implementation does; use --batch-size 1 and no --exit-layer")
    if early_exit and args.batch_size > 1:
        raise UsageError("--exit-layer is batch-1 only (the early-exit model shares one cache with the large "
                         "model); use --batch-size 1")
    if early_exit and args.small is not None:
        raise UsageError("--small and --exit-layer exclude each other: with --exit-layer K the small model is "
                         "the large model's first K decoder layers")
    trace_dir = args.trace_jsonl and trace_folder(Path(args.trace_jsonl))  # after every other check
    paths = {"large": args.large, "small": args.small or str(WEIGHTS / "small")}
    needs = ["large"] if early_exit and mode.name != "large" else mode.models()
    models = {name: load(paths[name], device=device, dtype=dtype) for name in needs}
    if early_exit:
        models["small"] = EarlyExit(models["large"], args.exit_layer)
    tok = load_tokenizer({name: (paths[name], models[name].config) for name in needs})
    eos = models[needs[0]].config.eos_token_id
    sources = [tok.encode(t) for t in texts]
    blank = [i for i, ids in enumerate(sources, 1) if len(ids) == 1]  # no token but the EOS encode appends
    if blank and args.text:
        raise UsageError(f"input {blank[0]} is empty; every argument must hold text to translate")
    if blank:  # one line out per line in, as line-oriented tools do
        print(f"minibild: note: blank input lines give blank output lines ({len(blank)}, the first at line "
              f"{blank[0]})", file=sys.stderr)
    for i, ids in enumerate(sources, 1):
        if len(ids) > args.max_input_tokens:
            raise UsageError(f"input {i} has {len(ids)} tokens, more than --max-input-tokens "
                             f"{args.max_input_tokens}; split it or raise the limit")
    show_progress = len(texts) > 1 and not args.trace
    header = trace_dir and mode.header(models["large"], models["small"])
    batches = mode.decode_batches(models.get("large"), models.get("small"), [ids for ids in sources if len(ids) > 1],
                                  args.batch_size, device)
    outputs = (row for batch in batches for row in batch)  # (tokens, BiLD result or None) per non-blank input
    for i, ids in progress(enumerate(sources, 1), len(sources), "translating", show_progress):
        if len(ids) == 1:
            print(flush=True)
            continue
        tokens, result = next(outputs)
        if args.trace and result is not None:
            print(f"--- input {i}: {result.stats}\n{bild.format_trace(result.trace)}\n"
                  f"pieces: {trace_pieces(result.trace, tok)}", file=sys.stderr)
        if trace_dir and result is not None:
            (trace_dir / f"input-{i}.jsonl").write_text(trace_to_jsonl(result.trace, header))
        if tokens[-1:] != [eos]:
            print(f"minibild: warning: input {i} reached --max-new-tokens {args.max_new_tokens} before "
                  "the end of its translation", file=sys.stderr)
        print(tok.decode(tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
