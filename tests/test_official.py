"""minibild.official: the official BiLD implementation's policy, checked against what the official code output.

tests/data/official/ holds the official code's recorded outputs on the shipped pairs and on the conformance
pairs (its README says how they were made): official.generate must reproduce every record, tokens, forward-call
counts and trace. The property tests, on tiny random float64 pairs (tests/tiny_models.py), check what holds for
any model: one decoder call per trace step, each feeding what the official loop feeds, and where the official
differences D1, D2, D3 cannot act, the same output as bild.generate.
"""
import json
import math
from collections import Counter
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minibild
from minibild import bild, official
from minibild.conformance import load_pair
from minibild.trace import trace_from_jsonl
from test_bild import large_greedy, one_thread, recording  # noqa: F401 (one_thread: an autouse fixture)
from tiny_models import (EOS, LENGTHS, PAIR, SOURCE, STEPS, lengths, model_pair, pair_args, seeded_cases, sources,
                         steps, uniform)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = Path(__file__).resolve().parent / "data" / "official"
PAIRS = {"es-en": ("weights/large", "weights/small"), "kjv-web": ("weights/kjv-web/large", "weights/kjv-web/small")}
# Probabilities and cross-entropies come from the transformers fork's float32 T5 and from minibild's, which round
# their own ways (largest difference over the records: 2.5e-5); ids, positions, decisions and counts are exact.
FLOATS = ("prob", "cross_entropy")
TOLERANCE = 1e-4
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (RECORDS / f"{name}.jsonl").read_text().splitlines()]


@lru_cache(maxsize=None)
def shipped_pair(name: str) -> tuple:
    return tuple(minibild.load(ROOT / path) for path in PAIRS[name])


def mismatch(result: bild.BiLDResult, record: dict) -> str | None:
    """How official.generate's result differs from a recorded official output, or None."""
    ours = (result.tokens, result.stats.large_calls, result.stats.small_calls)
    theirs = (record["tokens"], record["large_calls"], record["small_calls"])
    if ours != theirs:
        return f"(tokens, large calls, small calls) {ours} != {theirs}"
    steps_, recorded = [asdict(step) for step in result.trace], record["official_trace"]
    if len(steps_) != len(recorded):
        return f"{len(steps_)} trace steps != {len(recorded)}"
    for k, (step, theirs) in enumerate(zip(steps_, recorded)):
        exact = {key: value for key, value in step.items() if key not in FLOATS}
        if exact != {key: value for key, value in theirs.items() if key not in FLOATS}:
            return f"step {k}: {step} != {theirs}"
        floats = [(x, z) for key in FLOATS if key in step
                  for x, z in zip(*(v if isinstance(v, list) else [v] for v in (step[key], theirs[key])), strict=True)]
        if not all(math.isclose(x, z, rel_tol=TOLERANCE, abs_tol=TOLERANCE) for x, z in floats):
            return f"step {k}: floats {step} != {theirs}"
    return None


def settings_of(record: dict) -> dict:
    return {key: record[key] for key in ("fallback_threshold", "rollback_threshold", "max_small_steps",
                                         "max_new_tokens")}


@pytest.mark.parametrize("name", list(PAIRS))
def test_reproduces_the_official_code_on_the_shipped_pairs(name):
    """150 records per pair: 50 test verses at three settings, float32, one thread, as recorded."""
    large, small = shipped_pair(name)
    records = read(name)
    assert len(records) == 150
    wrong = {}
    for record in records:
        result = official.generate(large, small, torch.tensor([record["input_ids"]]), **settings_of(record))
        if (why := mismatch(result, record)) is not None:
            wrong[(record["source_index"], record["fallback_threshold"], record["rollback_threshold"])] = why
    assert wrong == {}


def test_reproduces_the_official_code_on_the_conformance_cases():
    """The 11 conformance cases with a separate small model, at their own settings (rollback 0 among them)."""
    records = read("conformance")
    assert len(records) == 11
    wrong = {}
    for record in records:
        case = json.loads((RECORDS / "conformance" / "cases" / record["case"] / "case.json").read_text())
        assert case["settings"] == settings_of(record), record["case"]
        large, small = load_pair(RECORDS / "conformance", case["pair"], torch.float32)
        result = official.generate(large, small, torch.tensor([case["input_ids"]]), **case["settings"])
        if (why := mismatch(result, record)) is not None:
            wrong[record["case"]] = why
    assert wrong == {}


def acted(trace: list, rollback_threshold: float, eos: int) -> Counter:
    """Where each official difference acted in a trace, counted (an independent reading of the trace)."""
    seen = Counter()
    for k, step in enumerate(trace):
        previous = trace[k - 1] if k else None
        if step.model == "large":
            above = [i for i, ce in enumerate(step.cross_entropy) if ce > rollback_threshold]
            seen["D1"] += bool(above) and step.argmax[above[0]] == step.fed[1 + above[0]]
            seen["D3"] += previous is not None and previous.decision == "rollback"
            seen["EOS defect"] += step.decision == "rollback" and step.appended == eos
        else:
            seen["re-feed"] += previous is not None and previous.model == "large" and any(
                s.model == "small" and s.decision == "fallback" and s.start == step.start for s in trace[:k])
    if trace[-1].model == "small":
        seen["D2" if trace[-1].token == eos else "D2c"] += 1
    return seen


DIFFERENCES = ["D1", "D2", "D2c", "D3", "EOS defect", "re-feed"]
T5_EOS = 1  # in every T5 vocabulary here: the shipped pairs, the conformance pairs, the tiny models


def test_the_records_reach_every_official_difference():
    """The recorded outputs exercise everything official.py reproduces: D1 keeping a token above the threshold,
    unverified stops at EOS (D2) and at the cap (D2c), D3, the EOS defect and the re-feed."""
    seen = Counter()
    for record in read("es-en") + read("kjv-web") + read("conformance"):
        trace = trace_from_jsonl("".join(json.dumps(step) + "\n" for step in record["official_trace"]))
        seen.update(acted(trace, record["rollback_threshold"], T5_EOS))
    assert all(seen[kind] > 0 for kind in DIFFERENCES), seen


def test_d1_examines_only_the_first_token_above_the_threshold():
    """At the first pending token above the threshold the large argmax is the small token itself: official keeps
    every token and appends its prediction beyond, where bild.decide_large rolls back at the next one."""
    fed, argmax, cross_entropy = [5, 6, 7], [6, 9, 4], [3.0, 2.5]  # both above 2.0; 6 is the argmax at position 2
    y = [0, 5, 6, 7]
    step = official.decide_large(y, 1, fed, argmax, cross_entropy, 2.0, 10)
    assert (step.decision, step.appended, y) == ("accept", 4, [0, 5, 6, 7, 4])
    y = [0, 5, 6, 7]
    assert bild.decide_large(y, 2, 1, fed, argmax, cross_entropy, 2.0, EOS, 10).rollback_at == 3
    y = [0, 5, 6, 7]  # the argmax differs at the first one above: a rollback there, as in bild
    step = official.decide_large(y, 1, fed, [8, 9, 4], cross_entropy, 2.0, 10)
    assert (step.decision, step.rollback_at, step.appended, y) == ("rollback", 2, 8, [0, 5, 8])


def test_the_eos_defect_appends_after_a_corrected_eos():
    """The large call after a rollback whose correction is EOS (D3) appends its prediction after that EOS."""
    y = [0, 5, EOS]
    step = official.decide_large(y, 1, [5, EOS], [EOS, 9], [0.1], 5.0, 10)
    assert (step.decision, step.appended, y) == ("accept", 9, [0, 5, EOS, 9])


def checked_official(large, small, src, **kwargs):
    """official.generate, with its decoder calls recorded and checked against the trace: one call per step, each
    feeding what the official loop feeds (every position its cache lacks; a fallen-back call's positions again)."""
    observed_large, observed_small, decodes, _ = recording(large, small)
    result = official.generate(observed_large, observed_small, src, **kwargs)
    trace, stats, tokens = result.trace, result.stats, result.tokens
    assert [(step.start, step.fed) for step in trace] == [(length, fed) for _, length, fed in decodes]
    assert stats.large_calls == sum(step.model == "large" for step in trace)
    assert stats.small_calls == sum(step.model == "small" for step in trace)
    assert 1 <= len(tokens) <= kwargs["max_new_tokens"]
    assert tokens[-1] == EOS or len(tokens) == kwargs["max_new_tokens"]
    corrected_eos = sum(step.decision == "rollback" and step.appended == EOS for step in trace)
    assert tokens[:-1].count(EOS) <= corrected_eos  # EOS inside the output only by the EOS defect
    small_length = 0  # the small cache: a fallback keeps none of its call, a rollback crops it
    for k, step in enumerate(trace):
        if step.model == "small":
            assert step.start == small_length
            small_length = step.start if step.decision == "fallback" else step.start + len(step.fed)
        elif step.decision == "rollback":
            assert trace[k + 1].model == "large" and trace[k + 1].start == step.start  # D3
            small_length = min(small_length, step.rollback_at)
    assert trace[-1].model == "large" or trace[-1].decision == "end"  # D2, D2c: a small step may end decoding
    return result


def calls_and_feeds_follow_the_official_loop(args, fallback_threshold, rollback_threshold, N, max_new_tokens,
                                             src) -> Counter:
    """checked_official on one example -> where each official difference acted in it."""
    large, small = model_pair(*args)
    result = checked_official(large, small, src, fallback_threshold=fallback_threshold,
                              rollback_threshold=rollback_threshold, max_small_steps=N, max_new_tokens=max_new_tokens)
    return acted(result.trace, rollback_threshold, EOS)


@SETTINGS
@given(pair_args, st.floats(0, 1), st.floats(0, 8), steps, lengths, sources)
def test_calls_and_feeds_follow_the_official_loop(args, fallback_threshold, rollback_threshold, N, max_new_tokens,
                                                  src):
    calls_and_feeds_follow_the_official_loop(args, fallback_threshold, rollback_threshold, N, max_new_tokens, src)


def test_calls_and_feeds_follow_the_official_loop_on_cases_reaching_every_difference():
    """The same property on fixed seeded cases, which must reach every official difference the tiny pairs can show
    (the EOS defect needs a rollback whose correction is EOS: the recorded outputs reach it)."""
    seen = sum((calls_and_feeds_follow_the_official_loop(*case)
                for case in seeded_cases(60, PAIR, uniform(0, 1), uniform(0, 8), STEPS, LENGTHS, SOURCE)), Counter())
    assert all(seen[kind] >= 3 for kind in DIFFERENCES if kind != "EOS defect"), seen


def without_rollbacks_it_is_bild_less_the_last_verification(args, fallback_threshold, N, max_new_tokens,
                                                              src) -> Counter:
    """Rollback threshold inf: D1 and D3 cannot act. The output is bild.generate's (which accepts every pending
    token too); the official code only skips bild's last large call when decoding ends in a small phase (D2,
    D2c), and feeds a fallen-back call's positions again. -> the example's unverified ends and fallbacks."""
    large, small = model_pair(*args)
    kwargs = dict(fallback_threshold=fallback_threshold, rollback_threshold=math.inf, max_small_steps=N,
                  max_new_tokens=max_new_tokens)
    ours = checked_official(large, small, src, **kwargs)
    theirs = bild.generate(large, small, src, **kwargs)
    assert ours.tokens == theirs.tokens
    assert ours.stats.small_calls == theirs.stats.small_calls
    unverified = ours.trace[-1].model == "small"
    assert ours.stats.large_calls == theirs.stats.large_calls - unverified
    large_steps = [step for step in theirs.trace if step.model == "large"]
    assert [step for step in ours.trace if step.model == "large"] == large_steps[:len(large_steps) - unverified]
    return Counter({"ends unverified": unverified, "fallback": ours.stats.fallbacks})


@SETTINGS
@given(pair_args, st.floats(0, 1), steps, lengths, sources)
def test_without_rollbacks_it_is_bild_less_the_last_verification(args, fallback_threshold, N, max_new_tokens, src):
    without_rollbacks_it_is_bild_less_the_last_verification(args, fallback_threshold, N, max_new_tokens, src)


def test_without_rollbacks_on_cases_ending_unverified_and_falling_back():
    seen = sum((without_rollbacks_it_is_bild_less_the_last_verification(*case)
                for case in seeded_cases(60, PAIR, uniform(0, 1), STEPS, LENGTHS, SOURCE)), Counter())
    assert seen["ends unverified"] >= 5 and seen["fallback"] >= 5, seen


def test_fallback_above_one_is_large_greedy_refeeding_every_position():
    """No small token is ever kept, so nothing is pending: the large model's greedy output, and every small call
    feeds the whole of y again from position 0 (the re-feed), where bild feeds the positions its cache lacks."""

    @SETTINGS
    @given(pair_args, st.floats(0, 8), steps, lengths, sources)
    def check(args, rollback_threshold, N, max_new_tokens, src):
        large, small = model_pair(*args)
        result = checked_official(large, small, src, fallback_threshold=1.5, rollback_threshold=rollback_threshold,
                                  max_small_steps=N, max_new_tokens=max_new_tokens)
        assert result.tokens == large_greedy(large, src, max_new_tokens)
        assert all(step.start == 0 and step.decision == "fallback" for step in result.trace if step.model == "small")

    check()


def test_threshold_zero_means_zero():
    """Unlike the official constructor (`rollback_threshold or 5.0`), a rollback threshold of 0 is 0: on the
    recorded conformance case speculative decoding on v1.1 (both thresholds 0), 0 rolls back where 5 does not."""
    record = next(r for r in read("conformance") if r["case"] == "v1.1-speculative")
    case = json.loads((RECORDS / "conformance" / "cases" / record["case"] / "case.json").read_text())
    large, small = load_pair(RECORDS / "conformance", case["pair"], torch.float32)
    src = torch.tensor([case["input_ids"]])
    at_zero = official.generate(large, small, src, **case["settings"])
    at_default = official.generate(large, small, src, **(case["settings"] | {"rollback_threshold": 5.0}))
    assert at_zero.tokens == record["tokens"]
    assert at_zero.stats.rollbacks > at_default.stats.rollbacks


def test_bad_input_is_refused():
    large, small = model_pair("disagree", 0)
    src, kwargs = torch.tensor([[3, 4]]), dict(fallback_threshold=0.5, rollback_threshold=1.0, max_small_steps=3,
                                              max_new_tokens=5)
    with pytest.raises(ValueError, match="no early-exit small model"):
        official.generate(large, minibild.EarlyExit(large, 1), src, **kwargs)
    with pytest.raises(ValueError, match="rollback_threshold must be >= 0"):
        official.generate(large, small, src, **(kwargs | {"rollback_threshold": -1.0}))
    with pytest.raises(TypeError, match="max_small_steps"):  # no defaults: the official ones differ by entry point
        official.generate(large, small, src, fallback_threshold=0.5, rollback_threshold=1.0, max_new_tokens=5)


# --- the command line and the scripts ---------------------------------------------------------------------------

def test_the_cli_mode_official_prints_the_official_output(capsys):
    """Verse 3 of the Spanish test split at (0.4, 1): the official output and call counts, which bild's differ from."""
    from test_cli import run_cli
    record = next(r for r in read("es-en") if r["source_index"] == 3 and r["rollback_threshold"] == 1.0)
    source = json.loads((ROOT / "data" / "test.jsonl").read_text().splitlines()[3])["source"]
    tok = minibild.Tokenizer(ROOT / PAIRS["es-en"][0] / "spiece.model")
    assert tok.encode(source) == record["input_ids"]
    settings_ = ["--fallback-threshold", "0.4", "--rollback-threshold", "1", "--trace"]
    status, out, err = run_cli(capsys, "--mode", "official", *settings_, source)
    assert status == 0 and out == tok.decode(record["tokens"]) + "\n"
    assert f"large_calls={record['large_calls']}, small_calls={record['small_calls']}" in err
    status, bild_out, _ = run_cli(capsys, "--mode", "bild", *settings_, source)
    assert status == 0 and bild_out != out


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2"], "--mode official decodes one input at a time"),
    (["--exit-layer", "2"], "--mode official decodes one input at a time with a separate small model"),
    (["--temperature", "0.7"], "mode official decodes greedily"),
])
def test_the_cli_refuses_what_mode_official_cannot_do(capsys, args, message):
    from test_cli import run_cli
    status, out, err = run_cli(capsys, "--mode", "official", *args, "hola")
    assert status == 2 and out == "" and message in err


def test_evaluate_runs_the_official_rule_beside_bild(tmp_path, capsys):
    """`official:F,R` in scripts/evaluate.py on the first 4 recorded verses: agreement with bild at the same
    settings, large calls and small positions fed per sentence as recorded. With fallback > 1 it must equal large
    greedy; at rollback 0 it need not (D1)."""
    from evaluate import is_exact, parse_system
    from evaluate import main as evaluate_main
    records = [r for r in read("es-en") if r["rollback_threshold"] == 1.0][:4]
    out = tmp_path / "eval.json"
    assert evaluate_main(["--limit", "4", "--threads", "1", "--no-progress", "--warmup", "0", "--systems",
                          "bild:0.4,1", "official:0.4,1", "--json", str(out)]) == 0
    systems = json.loads(out.read_text())["runs"][0]["systems"]
    entry = systems["official(fb=0.4,rb=1,N=10)"]
    assert entry["large_calls_per_sentence"] == pytest.approx(sum(r["large_calls"] for r in records) / 4)
    fed = [sum(len(step["fed"]) for step in r["official_trace"] if step["model"] == "small") for r in records]
    assert entry["small_fed_per_sentence"] == pytest.approx(sum(fed) / 4)
    bild_tokens = [bild.generate(*shipped_pair("es-en"), torch.tensor([r["input_ids"]]), **settings_of(r)).tokens
                   for r in records]
    same = sum(a == r["tokens"] for a, r in zip(bild_tokens, records))
    assert entry["same_as_bild"] == same / 4 and same < 4
    assert is_exact(parse_system("official:2,1", 10)) and not is_exact(parse_system("official:0.6,0", 10))
    assert "= bild" in capsys.readouterr().out


def test_evaluate_and_sweep_refuse_the_official_rule_where_it_cannot_run(capsys):
    from evaluate import main as evaluate_main
    from sweep import main as sweep_main
    assert evaluate_main(["--limit", "1", "--systems", "official:0.6,5", "--batch-size", "2"]) == 2
    assert "official decodes one source at a time" in capsys.readouterr().err
    assert evaluate_main(["--limit", "1", "--systems", "official:0.6"]) == 2
    assert "official:FALLBACK,ROLLBACK[,N]" in capsys.readouterr().err
    assert sweep_main(["--limit", "1", "--rules", "official", "--exit-layer", "2"]) == 2
    assert "the official implementation has no early-exit small model" in capsys.readouterr().err


def test_sweep_runs_the_grid_under_both_rules(tmp_path, capsys):
    from sweep import main as sweep_main
    out = tmp_path / "sweep"
    assert sweep_main(["--split", str(ROOT / "data" / "test.jsonl"), "--limit", "2", "--threads", "1", "--fallback",
                       "0.4", "--rollback", "1", "--max-new-tokens", "24", "--rules", "bild", "official",
                       "--no-progress", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    assert {"bild(fb=0.4,rb=1,N=10)", "official(fb=0.4,rb=1,N=10)"} <= set(points)
    assert points["official(fb=0.4,rb=1,N=10)"]["system"] == "official"
    assert points["official(fb=0.4,rb=1,N=10)"]["rollback_threshold"] == 1.0
