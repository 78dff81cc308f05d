"""Conformance vectors: tiny seeded model pairs and BiLD cases that cover every path of the policy, so that a port
or an optimized variant can prove it decodes like minibild, or learn where it does not (see minibild/diff.py).

    python -m minibild.conformance write conformance      # regenerate the committed suite, byte for byte
    python -m minibild.conformance search v1.1            # list candidate cases and the paths each one covers

The suite (docs/CONFORMANCE.md has every field): models/PAIR/{large,small}/{minibild,hf}, and per case
cases/NAME/case.json (input ids, settings, the rule, expected tokens, the paths it covers), trace.DTYPE.jsonl
(the trace of the case's rule: bild.generate's, or official.generate's for an official-rule case) and
logits.DTYPE.jsonl (per model call, the top logits and the top-1/top-2 margin at each position fed), for DTYPE
float64 and float32. The writer refuses to write a suite that misses a path or holds a fragile or uniform case.
"""
import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bild, official
from .config import T5Config
from .diff import decisions
from .early_exit import EarlyExit
from .generate import greedy
from .model import T5
from .observed import observed
from .trace import TraceHeader, trace_to_jsonl
from .weights import load, save, save_hf

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOP = 5  # logits kept per position fed
# A case is robust when every decision it makes stands more than this many nats from flipping: each argmax by its
# top-1/top-2 margin, each fallback decision by |log p - log alpha_FB|, each rejection by |CE - alpha_RB|.
ROBUST = 0.05
# A case's output is varied when it holds at least VARIED tokens, VARIED - 1 of them distinct: a constant or short
# output would pass a port whose decoder ignores positions (all keys alike, or distances 0 and 1 only).
VARIED = 4

# The tiny pairs. Weights are drawn in float32 from the seed and stored in float32; float64 runs upcast them.
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0)
PAIRS = {
    # t5 v1.0: relu, LM head tied to the embedding; the small model is the large one plus noise (it agrees often).
    "v1.0": dict(large=dict(seed=11, ends_like=22, position_bias=4.0), small=dict(noise_of="large", seed=2),
                 config=dict(feed_forward_proj="relu", tie_word_embeddings=True)),
    # t5 v1.1: gated-gelu, its own LM head; the small model is narrower, shallower and independent (it disagrees).
    "v1.1": dict(large=dict(seed=3, position_bias=4.0),
                 small=dict(seed=4, ends_like=46, position_bias=4.0, d_model=16, num_layers=1),
                 config=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    # v1.1's large model with a small model that is certain of one token: the LM head's row of token 31 is scaled by
    # CERTAIN, so wherever that token's logit is positive it wins by tens of nats, with probability exactly 1.0.
    "v1.1-certain": dict(large="v1.1", small=dict(seed=4, ends_like=46, certain=31, position_bias=4.0, d_model=16,
                                                   num_layers=1),
                         config=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    # Early exit: the small model is the large model's first decoder layer, on one shared cache.
    "early-exit": dict(large=dict(seed=11, ends_like=48, position_bias=4.0, num_decoder_layers=3), exit_layer=1,
                       config=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}
# Every decoder's relative position bias is drawn large (position_bias) so that outputs depend on position: a port
# that computes the decoder's buckets as if bidirectional, or drops the bias, fails every case.
CERTAIN = 1000.0
# A probability of exactly 1.0 is the one value a fallback threshold can equal in every implementation and dtype:
# when the top logit leads each of the other 63 by more than EXACT_ONE nats, their probabilities sum below 1e-18,
# under half of float64's epsilon, so the top probability rounds to 1.0 however softmax is computed. The tie case's
# fallback threshold is 1.0, and the writer accepts a probability equal to it only with such a lead.
EXACT_ONE = 45.0


def tiny_t5(seed: int, ends_like: int | None = None, position_bias: float | None = None, certain: int | None = None,
            **config) -> T5:
    """A random float32 T5 with confident, input-dependent outputs. With `ends_like`, EOS wins wherever that token
    would, so outputs end at varied lengths (most random models rarely pick EOS by themselves). With
    `position_bias`, the decoder's relative position bias is drawn with that standard deviation, last. With
    `certain`, that token's LM-head row is scaled by CERTAIN."""
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
        if certain is not None:
            head[certain] *= CERTAIN
        if position_bias is not None:
            model.decoder.relative_bias.weight.normal_(0, position_bias)
    return model.eval()


def build_pair(name: str) -> dict[str, T5]:
    """The pair's models in float32: {"large": T5, "small": T5}, or {"large": T5} for the early-exit pair. A pair
    whose `large` names another pair decodes with that pair's large model."""
    spec = PAIRS[name]
    if isinstance(spec["large"], str):
        return {"large": build_pair(spec["large"])["large"], "small": tiny_t5(**spec["small"], **spec["config"])}
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
    rule: str = "minibild"  # the policy whose trace is expected: a key of RULES

    @property
    def settings(self) -> dict:
        return dict(fallback_threshold=self.fallback_threshold, rollback_threshold=self.rollback_threshold,
                    max_small_steps=self.max_small_steps, max_new_tokens=self.max_new_tokens)


def model_folders(pair: str) -> tuple[str, str | None]:
    """The folders of the pair's large and small models, relative to the suite; the small one None for early exit."""
    large = PAIRS[pair]["large"]
    return (f"models/{large if isinstance(large, str) else pair}/large",
            None if PAIRS[pair].get("exit_layer") else f"models/{pair}/small")


def load_pair(root: Path, pair: str, dtype) -> tuple:
    """(large, small) of a written pair in dtype, the small one an EarlyExit for the early-exit pair."""
    large_folder, small_folder = model_folders(pair)
    large = load(root / large_folder / "minibild", dtype=dtype)
    exit_layer = PAIRS[pair].get("exit_layer")
    small = EarlyExit(large, exit_layer) if exit_layer else load(root / small_folder / "minibild", dtype=dtype)
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


# The policies a case can expect: minibild's (docs/BILD.md) or the official implementation's (minibild/official.py).
RULES = {"minibild": bild.generate, "official": official.generate}
# The name each rule has in a trace's header (trace.RULES): "bild" for minibild's policy, as bild.generate names it.
TRACE_RULES = {"minibild": "bild", "official": "official"}


def run_case(large, small, case: Case) -> tuple[bild.BiLDResult, list[dict]]:
    """The case's rule on the case, and one logits record per model call (see logits_record)."""
    large, small, calls = recording_logits(large, small)
    result = RULES[case.rule](large, small, torch.tensor([case.input_ids]), **case.settings)
    return result, [logits_record(step, logits) for step, logits in zip(result.trace, calls)]


def logits_record(step, logits) -> dict:
    """One model call's top logits: for each position fed, the TOP largest logits (ids, values) and the margin
    between the first two, the distance in nats at which that argmax would flip."""
    values, ids = logits.topk(TOP, dim=-1)  # (T, TOP) each
    return {"model": step.model, "start": step.start, "top_ids": ids.tolist(), "top_logits": values.tolist(),
            "margin": (values[:, 0] - values[:, 1]).tolist()}


def case_paths(case: Case, result: bild.BiLDResult, eos: int) -> list[str]:
    """The paths of the policy this case goes through, by the names PATHS (or OFFICIAL_PATHS) lists."""
    if case.rule == "official":
        return official_paths(case, result, eos)
    seen = set()
    for step in result.trace:
        if step.model == "small":
            seen.add({"fallback": "fallback", "handover": "handover at N"}.get(step.decision, ""))
            if step.prob == case.fallback_threshold:
                seen.add("probability equal to the fallback threshold: kept")
            if step.decision == "end" and step.token != eos:
                seen.add("cap reached in a small phase")
            if step.decision == "handover" and (step.token == eos or step.start + len(step.fed) == case.max_new_tokens):
                seen.add("handover at N, the token also EOS or at the cap")
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


PATHS = ["fallback", "probability equal to the fallback threshold: kept", "handover at N",
         "handover at N, the token also EOS or at the cap", "EOS among pending tokens, accepted", "cap reached in a small phase",
         "rollback at the first of several pending tokens", "rollback at the last of several pending tokens",
         "all pending accepted, then the large model's token", "EOS tail rejected",
         "first high-CE token agrees, a later one is rejected", "ends at EOS", "ends at the cap", "N = 1",
         "rollback 0 (large greedy)", "fallback > 1 (large greedy)", "speculative decoding (fallback 0, rollback 0)"]


def varied(tokens: list[int]) -> bool:
    """The output is long and mixed enough to depend on decoder positions (see VARIED)."""
    return len(tokens) >= VARIED and len(set(tokens)) >= VARIED - 1


OFFICIAL_PATHS = ["official D1: the first token above the rollback threshold agrees, a later rejected one is kept",
                  "official D2: stops at the small model's EOS, unverified",
                  "official D2c: stops at the cap in a small phase, unverified",
                  "official D3: the large model runs again after a rollback",
                  "official EOS defect: a token appended after a rollback's EOS",
                  "official re-feed: a small phase feeds a fallen-back position again"]


def official_paths(case: Case, result: bild.BiLDResult, eos: int) -> list[str]:
    """Where the official implementation's differences (minibild/official.py) act in an official-rule case, by the
    names OFFICIAL_PATHS lists."""
    seen, fallbacks, trace = set(), set(), result.trace
    for k, step in enumerate(trace):
        previous = trace[k - 1] if k else None
        if step.model == "small":
            if previous is not None and previous.model == "large" and step.start in fallbacks:
                seen.add(OFFICIAL_PATHS[5])
            if step.decision == "fallback":
                fallbacks.add(step.start)
            continue
        if previous is not None and previous.model == "large" and previous.decision == "rollback":
            seen.add(OFFICIAL_PATHS[3])
            if previous.appended == eos and step.appended is not None:
                seen.add(OFFICIAL_PATHS[4])
        pending, high = step.fed[1:], [i for i, ce in enumerate(step.cross_entropy) if ce > case.rollback_threshold]
        if high and pending[high[0]] == step.argmax[high[0]] and any(pending[i] != step.argmax[i] for i in high):
            seen.add(OFFICIAL_PATHS[0])
    if trace[-1].model == "small":
        seen.add(OFFICIAL_PATHS[1] if trace[-1].token == eos else OFFICIAL_PATHS[2])
    return [path for path in OFFICIAL_PATHS if path in seen]


def closest_call(case: Case, result: bild.BiLDResult, records: list[dict]) -> float:
    """The smallest distance in nats at which one of the case's decisions would flip (see ROBUST)."""
    # Only the last position of a small call decides anything; every position of a large call does.
    distances = [min(r["margin"]) if r["model"] == "large" else r["margin"][-1] for r in records]
    for step, record in zip(result.trace, records):
        if step.model == "small":
            if step.prob == case.fallback_threshold == 1.0 and record["margin"][-1] > EXACT_ONE:
                continue  # an exact tie in any implementation: kept, since only prob < threshold falls back
            if case.fallback_threshold > 0 and step.prob > 0:
                distances.append(abs(math.log(step.prob) - math.log(case.fallback_threshold)))
        else:  # the official rule (D1) also examines a token equal to the large argmax
            distances += [abs(ce - case.rollback_threshold) for ce, token, argmax
                          in zip(step.cross_entropy, step.fed[1:], step.argmax)
                          if token != argmax or case.rule == "official"]
    return min(distances)


# Picked from `search`'s lists: per pair, the cases covering the most paths not yet covered (then the most varied
# output, then the widest margin), until the pair's reachable paths were covered; then one case per kind of setting
# (speculative, N = 1, large greedy, BiLD) where that pair had none. case_paths recomputes what each covers; the
# writer checks that together they cover PATHS.
CASES = [
    Case("v1.0-speculative", "v1.0", [63, 17, 16, 29, 25, 1], 0.0, 0.0, 3, 12),
    Case("v1.0-rollback-0-n-1", "v1.0", [63, 17, 16, 29, 25, 1], 0.4, 0.0, 1, 12),
    Case("v1.0-fallback-above-1", "v1.0", [58, 29, 38, 1], 1.5, 2.0, 1, 12),
    Case("v1.0-eos-accepted", "v1.0", [3, 19, 13, 31, 9, 60, 43, 1], 0.0, 5.0, 1, 12),
    Case("v1.0-eos-tail-rejected", "v1.0", [22, 57, 53, 44, 20, 15, 1], 0.0, 2.0, 3, 12),
    Case("v1.0-bild", "v1.0", [58, 29, 38, 1], 0.4, 5.0, 5, 12),
    Case("v1.1-speculative", "v1.1", [10, 41, 20, 61, 1], 0.0, 0.0, 3, 6),
    Case("v1.1-rollback-0-n-1", "v1.1", [3, 19, 13, 31, 9, 60, 43, 1], 0.4, 0.0, 1, 12),
    Case("v1.1-fallback-above-1", "v1.1", [58, 29, 38, 1], 1.5, 0.5, 1, 12),
    Case("v1.1-accept-n-1", "v1.1", [18, 57, 10, 48, 34, 1], 0.0, 5.0, 1, 12),
    Case("v1.1-bild", "v1.1", [18, 57, 10, 48, 34, 1], 0.4, 5.0, 3, 12),
    Case("v1.1-certain-fallback-tie", "v1.1-certain", [10, 41, 20, 61, 1], 1.0, 5.0, 1, 12),
    Case("early-exit-speculative", "early-exit", [22, 57, 53, 44, 20, 15, 1], 0.0, 0.0, 3, 6),
    Case("early-exit-speculative-n-1", "early-exit", [58, 29, 38, 1], 0.0, 0.0, 1, 12),
    Case("early-exit-rollback-0-n-1", "early-exit", [59, 59, 19, 17, 1], 0.7, 0.0, 1, 12),
    Case("early-exit-fallback-above-1", "early-exit", [18, 57, 10, 48, 34, 1], 1.5, 5.0, 1, 12),
    Case("early-exit-first-high-ce-agrees", "early-exit", [10, 41, 20, 61, 1], 0.0, 0.0, 5, 12),
    Case("early-exit-bild", "early-exit", [59, 59, 19, 17, 1], 0.7, 5.0, 5, 12),
    # The official implementation's rule (minibild/official.py; it has no early-exit small model): three cases
    # that repeat a minibild case's source and settings, whose outputs the two rules make differ, and two more for
    # its EOS defect. Together they cover OFFICIAL_PATHS.
    Case("v1.0-speculative-official", "v1.0", [63, 17, 16, 29, 25, 1], 0.0, 0.0, 3, 12, rule="official"),
    Case("v1.0-eos-defect-official", "v1.0", [58, 29, 38, 1], 0.4, 2.0, 3, 12, rule="official"),
    Case("v1.1-speculative-official", "v1.1", [10, 41, 20, 61, 1], 0.0, 0.0, 3, 6, rule="official"),
    Case("v1.1-bild-official", "v1.1", [18, 57, 10, 48, 34, 1], 0.4, 5.0, 3, 12, rule="official"),
    Case("v1.1-eos-defect-official", "v1.1", [63, 17, 16, 29, 25, 1], 0.7, 2.0, 1, 12, rule="official"),
]


def write(out, cases=CASES) -> Path:
    """Write the suite to the folder `out`: a new or empty folder, or a suite this function wrote, which is
    replaced. Refuses (ValueError) any other folder or file, before writing anything, and a suite that misses a
    path of PATHS or holds a case whose float32 and float64 decisions differ, a decision closer than ROBUST to
    flipping, or a large-greedy case that is not large greedy; then nothing is left behind."""
    out = Path(os.path.abspath(out))  # ".." resolved, links kept
    check_destination(out)
    # Written beside `out` under a fresh name (no existing folder is ever reused), which replaces `out` only once
    # the whole suite checks out.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write(staging, cases)
    except BaseException:
        shutil.rmtree(staging)
        raise
    if out.exists():  # an empty folder or an old suite: moved aside, then removed once the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / "suite")
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
    return out


# Every file the writer writes, relative to the suite's folder: what makes a folder safe to replace.
SUITE_FILES = re.compile(r"index\.json|models/[^/]+/[^/]+/(hf|minibild)/[^/]+|"
                         r"cases/[^/]+/(case\.json|(trace|logits)\.[^/]+\.jsonl)")


def check_destination(out: Path):
    """Refuse (ValueError) a destination `write` must not replace: anything but a missing folder, an empty one,
    or a suite (an index.json beside files the writer writes, and nothing else)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: name a new folder, an empty one, or a suite to replace")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder: create it first, or name a folder in an existing one")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise ValueError(f"{out} is the current folder or holds it; name the suite's folder itself, e.g. conformance")
    if not out.exists() or not any(out.iterdir()):
        return
    files = [path.relative_to(out).as_posix() for path in sorted(out.rglob("*"))
             if path.is_symlink() or not path.is_dir()]  # a link is never the writer's, even to a folder
    foreign = [name for name in files if not SUITE_FILES.fullmatch(name)]
    if "index.json" not in files or foreign:
        why = f"it holds {foreign[0]}" if foreign else "it has no index.json"
        raise ValueError(f"{out} is not empty and not a conformance suite ({why}): name a new or empty folder, or "
                         f"remove {out} yourself if it may go")


def _write(root: Path, cases: list[Case]):
    for pair in PAIRS:
        for name, model in build_pair(pair).items():
            if name == "large" and isinstance(PAIRS[pair]["large"], str):
                continue  # another pair's, written there
            save(model, root / "models" / pair / name / "minibild")
            save_hf(model, root / "models" / pair / name / "hf")
    covered = {path: [] for path in PATHS + OFFICIAL_PATHS}
    for case in cases:
        models = {dtype: load_pair(root, case.pair, DTYPES[dtype]) for dtype in DTYPES}  # (large, small) each
        runs = {dtype: run_case(*models[dtype], case) for dtype in DTYPES}
        _check_case(case, models["float64"][0], runs)
        config = models["float64"][0].config
        paths = case_paths(case, runs["float64"][0], config.eos_token_id)
        for path in paths:
            covered[path].append(case.name)
        large_folder, small_folder = model_folders(case.pair)
        meta = {"name": case.name, "pair": case.pair, "rule": case.rule, "large": large_folder, "small": small_folder,
                "exit_layer": PAIRS[case.pair].get("exit_layer"),
                "input_ids": case.input_ids, "settings": case.settings, "eos_token_id": config.eos_token_id,
                "decoder_start_token_id": config.decoder_start_token_id,
                "paths": paths, "tokens": {dtype: result.tokens for dtype, (result, _) in runs.items()}}
        folder = root / "cases" / case.name
        folder.mkdir(parents=True)
        (folder / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
        for dtype, (result, records) in runs.items():
            header = TraceHeader.of(*models[dtype], **case.settings, rule=TRACE_RULES[case.rule])
            (folder / f"trace.{dtype}.jsonl").write_text(trace_to_jsonl(result.trace, header))
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
    if not varied(r64.tokens):
        raise ValueError(f"case {case.name}: its output {r64.tokens} is not varied (at least {VARIED} tokens, "
                         f"{VARIED - 1} of them distinct); pick another case")
    if case.rule == "minibild" and (case.rollback_threshold == 0 or case.fallback_threshold > 1):  # large greedy
        if r64.tokens != greedy(large64, torch.tensor([case.input_ids]), case.max_new_tokens)[0]:
            raise ValueError(f"case {case.name}: rollback 0 or fallback > 1 must give the large model's greedy output")


SEARCH_SETTINGS = [dict(fallback_threshold=fb, rollback_threshold=rb, max_small_steps=n, max_new_tokens=cap)
                   for fb in (0.0, 0.4, 0.7, 1.0, 1.5) for rb in (0.0, 0.5, 2.0, 5.0) for n in (1, 3, 5) for cap in (6, 12)]


def search(pair: str, rule: str = "minibild", sources: int = 8):
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
            case = Case("?", pair, ids, **settings, rule=rule)
            result, records = run_case(large, small, case)
            margin = closest_call(case, result, records)
            if margin >= ROBUST and varied(result.tokens):
                paths = case_paths(case, result, large.config.eos_token_id)
                print(f"{pair} {ids} {settings} margin {margin:.3f} -> {result.tokens} | {' | '.join(paths)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minibild.conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    writing = commands.add_parser("write", help="write the suite to OUT: a new or empty folder, or a suite to replace")
    writing.add_argument("out", type=Path)
    searching = commands.add_parser("search", help="list candidate cases on one pair")
    searching.add_argument("pair", choices=list(PAIRS))
    searching.add_argument("--rule", choices=list(RULES), default="minibild", help="the policy the cases expect")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # float32 results can depend on how many threads split a matmul
    if args.command == "write":
        try:
            write(args.out)
        except (ValueError, OSError) as e:
            print(f"python -m minibild.conformance write: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}: {len(CASES)} cases covering {len(PATHS) + len(OFFICIAL_PATHS)} paths")
    elif args.rule == "official" and PAIRS[args.pair].get("exit_layer"):
        p.error(f"the official rule has no early-exit small model: search another pair than {args.pair}")
    else:
        search(args.pair, args.rule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
