"""Conformance vectors: tiny seeded model pairs and BiLD cases that cover every path of the policy, so that a port
or an optimized variant can prove it decodes like minibild, or learn where it does not (see minibild/diff.py).

    python -m minibild.conformance write conformance      # regenerate the committed suite, byte for byte
    python -m minibild.conformance search v1.1            # list candidate cases and the paths each one covers

The suite (docs/CONFORMANCE.md has every field): models/PAIR/{large,small}/{minibild,hf}, and per case
cases/NAME/case.json (input ids, settings, expected tokens, the paths it covers), trace.DTYPE.jsonl (bild's trace)
and logits.DTYPE.jsonl (per model call, the top logits and the top-1/top-2 margin at each position fed), for
DTYPE float64 and float32. The writer refuses to write a suite that misses a path or holds a fragile case.
"""
import argparse
import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bild
from .config import T5Config
from .diff import decisions
from .early_exit import EarlyExit
from .generate import greedy
from .model import T5
from .observed import observed
from .weights import load, save, save_hf

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOP = 5  # logits kept per position fed
# A case is robust when every decision it makes stands more than this many nats from flipping: each argmax by its
# top-1/top-2 margin, each fallback decision by |log p - log alpha_FB|, each rejection by |CE - alpha_RB|.
ROBUST = 0.05

# The tiny pairs. Weights are drawn in float32 from the seed and stored in float32; float64 runs upcast them.
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0)
PAIRS = {
    # t5 v1.0: relu, LM head tied to the embedding; the small model is the large one plus noise (it agrees often).
    "v1.0": dict(large=dict(seed=1, ends_like=30), small=dict(noise_of="large", seed=2), config=dict(
        feed_forward_proj="relu", tie_word_embeddings=True)),
    # t5 v1.1: gated-gelu, its own LM head; the small model is narrower, shallower and independent (it disagrees).
    "v1.1": dict(large=dict(seed=3), small=dict(seed=4, ends_like=46, d_model=16, num_layers=1),
                 config=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    # Early exit: the small model is the large model's first decoder layer, on one shared cache.
    "early-exit": dict(large=dict(seed=5, ends_like=63, num_decoder_layers=3), exit_layer=1,
                       config=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def tiny_t5(seed: int, ends_like: int | None = None, **config) -> T5:
    """A random float32 T5 with confident, input-dependent outputs. With `ends_like`, EOS wins wherever that token
    would, so outputs end at varied lengths (most random models rarely pick EOS by themselves)."""
    torch.manual_seed(seed)
    model = T5(T5Config(**(TINY | config)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # the default init gives near-uniform, all-alike outputs
        if model.lm_head is None:  # tied (v1.0): a large embedding would make the decoder repeat its input token,
            model.decoder.final_norm.weight.normal_(0, 6.0)  # so sharpen the outputs through the final norm
        else:
            model.lm_head.weight.normal_(0, 3.0)  # confident predictions, so small tokens are often kept
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        if ends_like is not None:
            head[model.config.eos_token_id] = 1.05 * head[ends_like]
    return model.eval()


def build_pair(name: str) -> dict[str, T5]:
    """The pair's models in float32: {"large": T5, "small": T5}, or {"large": T5} for the early-exit pair."""
    spec = PAIRS[name]
    models = {"large": tiny_t5(**spec["large"], **spec["config"])}
    small = spec.get("small")
    if small is not None and small.get("noise_of"):
        models["small"] = copy.deepcopy(models["large"])
        torch.manual_seed(small["seed"])
        with torch.no_grad():
            for p in models["small"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    elif small is not None:
        models["small"] = tiny_t5(**small, **spec["config"])
    return models


@dataclass
class Case:
    name: str
    pair: str
    input_ids: list[int]
    fallback_threshold: float
    rollback_threshold: float
    max_small_steps: int
    max_new_tokens: int

    @property
    def settings(self) -> dict:
        return dict(fallback_threshold=self.fallback_threshold, rollback_threshold=self.rollback_threshold,
                    max_small_steps=self.max_small_steps, max_new_tokens=self.max_new_tokens)


def load_pair(root: Path, pair: str, dtype) -> tuple:
    """(large, small) of a written pair in dtype, the small one an EarlyExit for the early-exit pair."""
    large = load(root / "models" / pair / "large" / "minibild", dtype=dtype)
    exit_layer = PAIRS[pair].get("exit_layer")
    small = EarlyExit(large, exit_layer) if exit_layer else load(root / "models" / pair / "small" / "minibild",
                                                                  dtype=dtype)
    return large, small


def recording_logits(large, small) -> tuple:
    """(large, small) observed (observed.py): each decode call's logits (T, V) appended to calls, in call order ->
    (the large model, the small model, calls) to give bild.generate. The models themselves are left untouched."""
    calls = []

    def record(call, method, *args):
        out = method(*args)
        if call == "decode":
            calls.append(out[0])
        return out
    # An early-exit small model brings its large model's calls (as its shared_large): the large one runs as given.
    return large if isinstance(small, EarlyExit) else observed(large, record), observed(small, record), calls


def run_case(large, small, case: Case) -> tuple[bild.BiLDResult, list[dict]]:
    """bild.generate on the case, and one logits record per model call (see logits_record)."""
    large, small, calls = recording_logits(large, small)
    result = bild.generate(large, small, torch.tensor([case.input_ids]), **case.settings)
    return result, [logits_record(step, logits) for step, logits in zip(result.trace, calls)]


def logits_record(step, logits) -> dict:
    """One model call's top logits: for each position fed, the TOP largest logits (ids, values) and the margin
    between the first two, the distance in nats at which that argmax would flip."""
    values, ids = logits.topk(TOP, dim=-1)  # (T, TOP) each
    return {"model": step.model, "start": step.start, "top_ids": ids.tolist(), "top_logits": values.tolist(),
            "margin": (values[:, 0] - values[:, 1]).tolist()}


def case_paths(case: Case, result: bild.BiLDResult, eos: int) -> list[str]:
    """The paths of the policy this case goes through, by the names PATHS lists."""
    seen = set()
    for step in result.trace:
        if step.model == "small":
            seen.add({"fallback": "fallback", "handover": "handover at N"}.get(step.decision, ""))
            if step.decision == "end" and step.token != eos:
                seen.add("cap reached in a small phase")
            continue
        pending = step.fed[1:]
        if step.decision == "rollback":
            i = step.rollback_at - step.start - 1  # index of the rejected token among the pending ones
            if len(pending) > 1 and i == 0:
                seen.add("rollback at the first of several pending tokens")
            if len(pending) > 1 and i == len(pending) - 1:
                seen.add("rollback at the last of several pending tokens")
            if eos in pending[i:]:
                seen.add("EOS tail rejected")
        elif pending and step.appended is not None:
            seen.add("all pending accepted, then the large model's token")
        elif pending and pending[-1] == eos:
            seen.add("EOS among pending tokens, accepted")
        high = [i for i, ce in enumerate(step.cross_entropy) if ce > case.rollback_threshold]
        if high and pending[high[0]] == step.argmax[high[0]] and step.decision == "rollback":
            seen.add("first high-CE token agrees, a later one is rejected")
    seen.add("ends at EOS" if result.tokens[-1] == eos else "ends at the cap")
    if case.max_small_steps == 1:
        seen.add("N = 1")
    if case.rollback_threshold == 0 and case.fallback_threshold == 0:
        seen.add("speculative decoding (fallback 0, rollback 0)")
    elif case.rollback_threshold == 0:
        seen.add("rollback 0 (large greedy)")
    elif case.fallback_threshold > 1:
        seen.add("fallback > 1 (large greedy)")
    seen.discard("")
    return sorted(seen)


PATHS = ["fallback", "handover at N", "EOS among pending tokens, accepted", "cap reached in a small phase",
         "rollback at the first of several pending tokens", "rollback at the last of several pending tokens",
         "all pending accepted, then the large model's token", "EOS tail rejected",
         "first high-CE token agrees, a later one is rejected", "ends at EOS", "ends at the cap", "N = 1",
         "rollback 0 (large greedy)", "fallback > 1 (large greedy)", "speculative decoding (fallback 0, rollback 0)"]


def closest_call(case: Case, result: bild.BiLDResult, records: list[dict]) -> float:
    """The smallest distance in nats at which one of the case's decisions would flip (see ROBUST)."""
    # Only the last position of a small call decides anything; every position of a large call does.
    distances = [min(r["margin"]) if r["model"] == "large" else r["margin"][-1] for r in records]
    for step in result.trace:
        if step.model == "small":
            if case.fallback_threshold > 0 and step.prob > 0:
                distances.append(abs(math.log(step.prob) - math.log(case.fallback_threshold)))
        else:
            distances += [abs(ce - case.rollback_threshold) for ce, token, argmax
                          in zip(step.cross_entropy, step.fed[1:], step.argmax) if token != argmax]
    return min(distances)


# Picked from `search`'s lists: per pair, the case covering the most paths not yet covered (then the widest margin),
# until the pair's reachable paths were covered; then a few with longer outputs or mixed fallbacks by hand.
# case_paths recomputes what each covers; the writer checks that together they cover PATHS.
CASES = [
    Case("v1.0-speculative", "v1.0", [3, 19, 13, 31, 9, 60, 43, 1], 0.0, 0.0, 3, 6),
    Case("v1.0-rollback-0-n-1", "v1.0", [13, 20, 28, 39, 7, 29, 15, 4, 1], 0.7, 0.0, 1, 6),
    Case("v1.0-accept-to-cap", "v1.0", [13, 20, 28, 39, 7, 29, 15, 4, 1], 0.0, 5.0, 3, 6),
    Case("v1.0-fallback-above-1", "v1.0", [13, 20, 28, 39, 7, 29, 15, 4, 1], 1.5, 2.0, 1, 12),
    Case("v1.0-eos-accepted", "v1.0", [3, 19, 13, 31, 9, 60, 43, 1], 0.0, 5.0, 3, 6),
    Case("v1.1-speculative", "v1.1", [58, 29, 38, 1], 0.0, 0.0, 3, 12),
    Case("v1.1-rollback-0-n-1", "v1.1", [3, 19, 13, 31, 9, 60, 43, 1], 1.5, 0.0, 1, 6),
    Case("v1.1-fallback-above-1", "v1.1", [22, 57, 53, 44, 20, 15, 1], 1.5, 0.5, 1, 6),
    Case("v1.1-accept-n-1", "v1.1", [58, 29, 38, 1], 0.0, 5.0, 1, 6),
    Case("v1.1-bild", "v1.1", [3, 19, 13, 31, 9, 60, 43, 1], 0.4, 5.0, 3, 12),
    Case("v1.1-official-rule", "v1.1", [63, 17, 16, 29, 25, 1], 0.4, 0.5, 3, 12),
    Case("early-exit-speculative", "early-exit", [22, 57, 53, 44, 20, 15, 1], 0.0, 0.0, 3, 6),
    Case("early-exit-rollback-0-n-1", "early-exit", [58, 29, 38, 1], 1.5, 0.0, 1, 6),
    Case("early-exit-speculative-n-1", "early-exit", [63, 17, 16, 29, 25, 1], 0.0, 0.0, 1, 6),
    Case("early-exit-fallback-above-1", "early-exit", [18, 57, 10, 48, 34, 1], 1.5, 5.0, 1, 12),
    Case("early-exit-fallback-n-1", "early-exit", [58, 29, 38, 1], 0.7, 2.0, 1, 6),
    Case("early-exit-official-rule", "early-exit", [58, 29, 38, 1], 0.0, 0.0, 3, 6),
    Case("early-exit-bild", "early-exit", [58, 29, 38, 1], 0.0, 2.0, 3, 6),
]


def write(out, cases=CASES) -> Path:
    """Write the suite to the folder `out` (replacing it): the pairs, then every case in both dtypes. Refuses
    (ValueError) a suite that misses a path of PATHS or holds a case whose float32 and float64 decisions differ,
    a decision closer than ROBUST to flipping, or a large-greedy case that is not large greedy."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")  # `out` is replaced only once the whole suite checks out
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write(staging, cases)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _write(root: Path, cases: list[Case]):
    for pair in PAIRS:
        for name, model in build_pair(pair).items():
            save(model, root / "models" / pair / name / "minibild")
            save_hf(model, root / "models" / pair / name / "hf")
    covered = {path: [] for path in PATHS}
    for case in cases:
        models = {dtype: load_pair(root, case.pair, DTYPES[dtype]) for dtype in DTYPES}  # (large, small) each
        runs = {dtype: run_case(*models[dtype], case) for dtype in DTYPES}
        _check_case(case, models["float64"][0], runs)
        config = models["float64"][0].config
        paths = case_paths(case, runs["float64"][0], config.eos_token_id)
        for path in paths:
            covered[path].append(case.name)
        exit_layer = PAIRS[case.pair].get("exit_layer")
        meta = {"name": case.name, "pair": case.pair, "large": f"models/{case.pair}/large",
                "small": None if exit_layer else f"models/{case.pair}/small", "exit_layer": exit_layer,
                "input_ids": case.input_ids, "settings": case.settings, "eos_token_id": config.eos_token_id,
                "decoder_start_token_id": config.decoder_start_token_id,
                "paths": paths, "tokens": {dtype: result.tokens for dtype, (result, _) in runs.items()}}
        folder = root / "cases" / case.name
        folder.mkdir(parents=True)
        (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
        for dtype, (result, records) in runs.items():
            (folder / f"trace.{dtype}.jsonl").write_text(bild.trace_to_jsonl(result.trace))
            (folder / f"logits.{dtype}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    missing = [path for path, names in covered.items() if not names]
    if missing:
        raise ValueError(f"no case covers these paths: {', '.join(missing)}; add cases (see search)")
    index = {"cases": [case.name for case in cases], "paths": covered, "robust_nats": ROBUST}
    (root / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def _check_case(case: Case, large64: T5, runs: dict):
    r64, r32 = runs["float64"][0], runs["float32"][0]
    if list(map(decisions, r64.trace)) != list(map(decisions, r32.trace)):
        raise ValueError(f"case {case.name}: float32 and float64 make different decisions; pick a robust case")
    for dtype, (result, records) in runs.items():
        closest = closest_call(case, result, records)
        if closest < ROBUST:
            raise ValueError(f"case {case.name}: in {dtype} a decision is {closest:.3g} nats from flipping, less "
                             f"than {ROBUST}; pick a robust case")
    if case.rollback_threshold == 0 or case.fallback_threshold > 1:  # BiLD's exactness: large greedy
        if r64.tokens != greedy(large64, torch.tensor([case.input_ids]), case.max_new_tokens)[0]:
            raise ValueError(f"case {case.name}: rollback 0 or fallback > 1 must give the large model's greedy output")


SEARCH_SETTINGS = [dict(fallback_threshold=fb, rollback_threshold=rb, max_small_steps=n, max_new_tokens=cap)
                   for fb in (0.0, 0.4, 0.7, 1.5) for rb in (0.0, 0.5, 2.0, 5.0) for n in (1, 3, 5) for cap in (6, 12)]


def search(pair: str, sources: int = 8):
    """Print, for random sources and a grid of settings, each robust candidate case and the paths it covers: the
    suite's CASES were picked from this list."""
    models = {name: m.double() for name, m in build_pair(pair).items()}
    large = models["large"]
    small = EarlyExit(large, PAIRS[pair]["exit_layer"]) if "exit_layer" in PAIRS[pair] else models["small"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(sources):
        ids = torch.randint(2, TINY["vocab_size"], (int(torch.randint(3, 9, (), generator=generator)),),
                            generator=generator).tolist() + [large.config.eos_token_id]
        for settings in SEARCH_SETTINGS:
            case = Case("?", pair, ids, **settings)
            result, records = run_case(large, small, case)
            margin = closest_call(case, result, records)
            if margin >= ROBUST:
                paths = case_paths(case, result, large.config.eos_token_id)
                print(f"{pair} {ids} {settings} margin {margin:.3f} | {' | '.join(paths)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minibild.conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("write", help="write the suite to OUT (replacing it)").add_argument("out", type=Path)
    commands.add_parser("search", help="list candidate cases on one pair").add_argument("pair", choices=list(PAIRS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # float32 results can depend on how many threads split a matmul
    if args.command == "write":
        write(args.out)
        print(f"wrote {args.out}: {len(CASES)} cases covering {len(PATHS)} paths")
    else:
        search(args.pair)
    return 0


if __name__ == "__main__":
    sys.exit(main())
