"""Property tests for minibild.bild: BiLD's exactness guarantees, its cache bookkeeping, its validation.

Models are tiny random float64 T5s (tests/tiny_models.py). "agree" pairs: the small model is the large one plus
a little noise, so most small tokens are accepted. "disagree" pairs: an independent, narrower small model, so
rollbacks are common. "same": one model as both. Every run goes through `checked_generate`, which records each
decode/encode call and replays the trace against an independent reading of the policy. Each property is checked
on Hypothesis' examples, and again on a fixed list of seeded cases that count the paths of the loop they reach
(`paths`) and assert a minimum for every path the property can reach.
"""
import copy
import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minibild
from minibild import bild
from minibild.bild import format_trace, generate, speculative, trace_from_jsonl, trace_to_jsonl
from minibild.observed import observed
from tiny_models import (ALL_PATHS, EOS, LENGTHS, PAIR, SEEDS, SOURCE, STEPS, VOCAB, assert_reached, lengths,
                         model_pair, pair_args, paths, pick, random_t5, seeded_cases, seeds, sources, steps, uniform)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: thread start-up costs more than the matmuls (4x faster on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recording(large, small):
    """(large, small) observed (minibild/observed.py): every decode call recorded as (cache, cache.length before,
    ids fed), every encode call as the model that ran it -> (large, small, decodes, encodes) to give generate. With
    an early-exit small model the large model is returned as is: it decodes as the small model's shared_large."""
    decodes, encodes = [], []

    def record(call, method, *args, **kwargs):
        if call == "encode":
            encodes.append(method.__self__)
        else:
            ids, cache = args
            decodes.append((cache, cache.length, ids[0].tolist()))
        return method(*args, **kwargs)
    early_exit = isinstance(small, minibild.EarlyExit)
    return large if early_exit else observed(large, record), observed(small, record), decodes, encodes


def checked_generate(large, small, src, oracle=False, **kwargs):
    """generate(), then check the result against the recorded calls and the policy (see module docstring).
    oracle=True also recomputes each step's probabilities with an uncached full forward."""
    # With an early-exit small model, the large model decodes on the shared cache as small.shared_large, and
    # its encoder is the only one that runs.
    early_exit = isinstance(small, minibild.EarlyExit)
    observed_large, observed_small, decodes, encodes = recording(large, small)
    result = generate(observed_large, observed_small, src, **kwargs)
    fallback_threshold = kwargs.get("fallback_threshold", bild.FALLBACK_THRESHOLD)
    rollback_threshold = kwargs.get("rollback_threshold", bild.ROLLBACK_THRESHOLD)
    N = kwargs.get("max_small_steps", bild.MAX_SMALL_STEPS)
    max_new_tokens = kwargs.get("max_new_tokens", bild.MAX_NEW_TOKENS)
    tokens, stats, trace = result.tokens, result.stats, result.trace

    # Each encoder once; one decode call per trace step, each on its own model's cache.
    if early_exit:
        assert len(encodes) == 1 and encodes[0].large is large  # the shared large model's encoder
    else:
        assert sorted(map(id, encodes)) == sorted(map(id, [large, small]))
    assert len(decodes) == len(trace)
    caches = {}
    for step, (cache, _, _) in zip(trace, decodes):
        assert caches.setdefault(step.model, cache) is cache
    assert len({id(c) for c in caches.values()}) == len(caches)

    # Replay: every call feeds exactly the tokens of y its cache lacks, and the cache holds y's prefix.
    y, verified, held = [large.config.decoder_start_token_id], 1, {"large": [], "small": []}
    for step, (cache, length, fed) in zip(trace, decodes):
        model = large if step.model == "large" else small
        assert (step.start, step.fed) == (length, fed)
        assert held[step.model][:length] == y[:length], "the cache holds tokens that are no longer in y"
        assert fed == y[length:], "a call must feed every token its cache lacks, and only those"
        held[step.model] = held[step.model][:length] + fed
        if early_exit and step.model == "large":  # it ran the exit layers where the small model had not
            held["small"] += held["large"][len(held["small"]):]
        if oracle:
            full = model(src, torch.tensor([y]))[0, length:]  # uncached forward over the same positions
        if step.model == "small":
            if oracle:
                assert step.token == full[-1].argmax().item()
                assert math.isclose(step.prob, full[-1].softmax(-1)[step.token].item(), rel_tol=1e-9)
            assert (step.decision == "fallback") == (step.prob < fallback_threshold)
            if step.decision != "fallback":
                y.append(step.token)
                ended = y[-1] == EOS or len(y) - 1 == max_new_tokens
                assert step.decision == ("handover" if len(y) - verified == N else "end" if ended else "pending")
        else:
            assert length == verified - 1, "the large model feeds the last verified token, then the pending ones"
            pending = y[verified:]
            assert len(step.argmax) == len(pending) + 1 and len(step.cross_entropy) == len(pending)
            assert len(pending) <= N
            if oracle:
                assert step.argmax == full.argmax(-1).tolist()
                expected = [-full.log_softmax(-1)[i, t].item() for i, t in enumerate(pending)]
                assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                           for a, b in zip(step.cross_entropy, expected))
            rejected = [verified + i for i, t in enumerate(pending)
                        if t != step.argmax[i] and step.cross_entropy[i] > rollback_threshold]
            if rejected:
                assert (step.decision, step.rollback_at) == ("rollback", rejected[0])
                assert step.appended == step.argmax[rejected[0] - verified]
                del y[rejected[0]:]
            else:
                assert (step.decision, step.rollback_at) == ("accept", None)
                ended = y[-1] == EOS or len(y) - 1 == max_new_tokens
                assert step.appended == (None if ended else step.argmax[-1])
            if step.appended is not None:
                y.append(step.appended)
            verified = len(y)
    assert trace[-1].model == "large" and verified == len(y), "the tail must be verified"
    assert y[1:] == tokens

    # Output invariants.
    assert 1 <= len(tokens) <= max_new_tokens
    assert EOS not in tokens[:-1]
    assert tokens[-1] == EOS or len(tokens) == max_new_tokens

    # Stats add up, and agree with the trace.
    small_steps = [s for s in trace if s.model == "small"]
    large_steps = [s for s in trace if s.model == "large"]
    decisions = Counter(s.decision for s in trace)
    assert stats.large_tokens + stats.small_tokens == len(tokens)
    assert stats.small_tokens == stats.accepted_small_tokens
    assert len(small_steps) == stats.small_calls
    assert stats.small_calls == stats.accepted_small_tokens + stats.rolled_back_tokens + stats.fallbacks
    assert stats.large_calls == len(large_steps) >= 1
    assert stats.fallbacks == decisions["fallback"] and stats.handovers == decisions["handover"]
    assert stats.rollbacks == decisions["rollback"] <= stats.rolled_back_tokens
    assert stats.large_tokens == sum(s.appended is not None for s in large_steps)
    assert stats.large_tokens in (stats.large_calls, stats.large_calls - 1)
    assert stats.large_calls - 1 == decisions["fallback"] + decisions["handover"] + decisions["end"]
    assert stats.rolled_back_tokens == sum(len(s.fed) - (s.rollback_at - s.start) for s in large_steps
                                           if s.decision == "rollback")
    return result


def large_greedy(large, src, max_new_tokens):
    return minibild.greedy(large, src, max_new_tokens)[0]


# Each property below is a function of one example: its test checks it on Hypothesis' examples, and its coverage
# test on a fixed list of seeded cases (tiny_models.seeded_cases), which must reach every path the property can.
N_CASES = 60


def rollback_zero_is_large_greedy(args, fallback_threshold, N, max_new_tokens, src):
    large, small = model_pair(*args)
    result = checked_generate(large, small, src, fallback_threshold=fallback_threshold, rollback_threshold=0.0,
                              max_small_steps=N, max_new_tokens=max_new_tokens)
    assert result.tokens == large_greedy(large, src, max_new_tokens)
    return paths(result)


@SETTINGS
@given(pair_args, st.floats(0, 1), steps, lengths, sources)
def test_rollback_threshold_zero_is_large_greedy(args, fallback_threshold, N, max_new_tokens, src):
    rollback_zero_is_large_greedy(args, fallback_threshold, N, max_new_tokens, src)


def test_rollback_threshold_zero_reaches_every_path():
    seen = sum((rollback_zero_is_large_greedy(*case)
                for case in seeded_cases(N_CASES, PAIR, uniform(0, 1), STEPS, LENGTHS, SOURCE)), Counter())
    assert_reached(seen, ALL_PATHS, least=5)


def fallback_above_one_is_large_greedy(args, fallback_threshold, rollback_threshold, N, max_new_tokens, src):
    large, small = model_pair(*args)
    result = checked_generate(large, small, src, fallback_threshold=fallback_threshold,
                              rollback_threshold=rollback_threshold, max_small_steps=N, max_new_tokens=max_new_tokens)
    assert result.tokens == large_greedy(large, src, max_new_tokens)
    assert result.stats.small_tokens == 0 and result.stats.fallbacks == result.stats.small_calls
    return paths(result) + Counter({"fallback threshold inf": fallback_threshold == math.inf})


@SETTINGS
@given(pair_args, st.one_of(st.floats(1, 100, exclude_min=True), st.just(math.inf)), st.floats(0, 10), steps,
       lengths, sources)
def test_fallback_threshold_above_one_is_large_greedy(args, fallback_threshold, rollback_threshold, N,
                                                      max_new_tokens, src):
    fallback_above_one_is_large_greedy(args, fallback_threshold, rollback_threshold, N, max_new_tokens, src)


def test_fallback_threshold_above_one_reaches_every_path():
    above_one = lambda rng: rng.choice([math.inf, rng.uniform(1.0001, 100)])  # noqa: E731
    seen = sum((fallback_above_one_is_large_greedy(*case)
                for case in seeded_cases(N_CASES, PAIR, above_one, uniform(0, 10), STEPS, LENGTHS, SOURCE)),
               Counter())
    # The small model never keeps a token, so nothing is ever pending: no handover, no rollback, no accepted
    # small token, no EOS pending. What remains is a fallback on every small call and both ways to end.
    assert_reached(seen, ["fallback", "ends at EOS", "ends at cap", "fallback threshold inf"], least=5)


def speculative_is_large_greedy(args, k, max_new_tokens, src):
    large, small = model_pair(*args)
    result = speculative(large, small, src, k, max_new_tokens)
    assert result.tokens == large_greedy(large, src, max_new_tokens)
    assert result.stats.fallbacks == 0
    assert result.trace == checked_generate(large, small, src, fallback_threshold=0.0, rollback_threshold=0.0,
                                            max_small_steps=k, max_new_tokens=max_new_tokens).trace
    return result


@SETTINGS
@given(pair_args, steps, lengths, sources)
def test_speculative_is_large_greedy(args, k, max_new_tokens, src):
    speculative_is_large_greedy(args, k, max_new_tokens, src)


def test_speculative_reaches_every_path_with_fewer_large_calls():
    seen, totals = Counter(), Counter()
    for case in seeded_cases(N_CASES, PAIR, STEPS, LENGTHS, SOURCE):
        result = speculative_is_large_greedy(*case)
        seen.update(paths(result))
        if case[0][0] == "agree":
            totals["large_calls"] += result.stats.large_calls
            totals["tokens"] += len(result.tokens)
    assert totals["large_calls"] < totals["tokens"], totals
    # Fallback threshold 0: no small token is ever discarded, so every other path is reachable.
    assert_reached(seen, [path for path in ALL_PATHS if path != "fallback"], least=5)


def invariants_and_determinism(kind, seed, fallback_threshold, rollback_threshold, N, max_new_tokens, src):
    large, small = model_pair(kind, seed)
    kwargs = dict(fallback_threshold=fallback_threshold, rollback_threshold=rollback_threshold,
                  max_small_steps=N, max_new_tokens=max_new_tokens)
    first = checked_generate(large, small, src, oracle=True, **kwargs)
    again = generate(large, small, src, **kwargs)
    assert (again.tokens, again.stats) == (first.tokens, first.stats)
    assert trace_to_jsonl(again.trace) == trace_to_jsonl(first.trace)
    assert format_trace(again.trace) == format_trace(first.trace)
    return paths(first) + Counter({"rolled back": first.stats.rolled_back_tokens})


@SETTINGS
@given(st.sampled_from(["agree", "disagree", "same"]), seeds, st.floats(0, 1.2), st.floats(0, 8), steps, lengths,
       sources)
def test_invariants_and_determinism(kind, seed, fallback_threshold, rollback_threshold, N, max_new_tokens, src):
    invariants_and_determinism(kind, seed, fallback_threshold, rollback_threshold, N, max_new_tokens, src)


def test_invariants_and_determinism_reach_every_path():
    seen = {kind: Counter() for kind in ("agree", "disagree", "same")}
    for case in seeded_cases(N_CASES, pick("agree", "disagree", "same"), pick(*SEEDS), uniform(0, 1.2),
                             uniform(0, 8), STEPS, LENGTHS, SOURCE):
        seen[case[0]] += invariants_and_determinism(*case)
    everything = seen["agree"] + seen["disagree"] + seen["same"]
    assert_reached(everything, [path for path in ALL_PATHS if path != "EOS rolled back"], least=5)
    # Rare here (rollback thresholds up to 8, and a third of the pairs never roll back); the rollback-0 and
    # speculative cases reach it more often.
    assert_reached(everything, ["EOS rolled back"], least=1)
    assert seen["agree"]["accepted"] > seen["agree"]["rolled back"], seen["agree"]  # the agreeing pair agrees
    assert seen["same"]["rollback"] == 0, seen["same"]


def same_model_never_rolls_back(seed, fallback_threshold, rollback_threshold, N, max_new_tokens, src):
    large, small = model_pair("same", seed)
    result = checked_generate(large, small, src, fallback_threshold=fallback_threshold,
                              rollback_threshold=rollback_threshold, max_small_steps=N, max_new_tokens=max_new_tokens)
    assert result.stats.rollbacks == 0
    assert result.tokens == large_greedy(large, src, max_new_tokens)
    return paths(result)


@SETTINGS
@given(seeds, st.floats(0, 1), st.floats(0, 8), steps, lengths, sources)
def test_same_model_as_large_and_small_never_rolls_back(seed, fallback_threshold, rollback_threshold, N,
                                                        max_new_tokens, src):
    same_model_never_rolls_back(seed, fallback_threshold, rollback_threshold, N, max_new_tokens, src)


def test_same_model_as_large_and_small_reaches_every_path():
    seen = sum((same_model_never_rolls_back(*case)
                for case in seeded_cases(N_CASES, pick(*SEEDS), uniform(0, 1), uniform(0, 8), STEPS, LENGTHS,
                                         SOURCE)), Counter())
    # One model agrees with itself, so the large model accepts every pending token: no rollback is reachable.
    assert_reached(seen, [path for path in ALL_PATHS if not path.startswith(("rollback", "EOS rolled"))], least=5)


def test_thresholds_are_strict():
    """Fallback when the probability is BELOW alpha_FB; reject when the cross-entropy EXCEEDS alpha_RB."""
    large, small = model_pair("disagree")
    src = torch.tensor([[5, 6, 7, 8]])

    def first(model, decision_of, **kwargs):
        trace = checked_generate(large, small, src, max_small_steps=8, max_new_tokens=16, **kwargs).trace
        return next(step for step in trace if step.model == model and decision_of(step))

    prob = first("small", lambda s: True, fallback_threshold=0.0).prob  # the first small step ignores thresholds
    assert first("small", lambda s: True, fallback_threshold=prob).decision != "fallback"
    assert first("small", lambda s: True, fallback_threshold=math.nextafter(prob, 1)).decision == "fallback"

    # The first verification of pending tokens does not depend on the rollback threshold either.
    step = first("large", lambda s: len(s.fed) > 1, fallback_threshold=0.0, rollback_threshold=math.inf)
    ce = max(c for c, t, a in zip(step.cross_entropy, step.fed[1:], step.argmax) if t != a)
    at = step.start + 1 + step.cross_entropy.index(ce)
    assert first("large", lambda s: len(s.fed) > 1, fallback_threshold=0.0, rollback_threshold=ce).decision == "accept"
    rolled = first("large", lambda s: len(s.fed) > 1, fallback_threshold=0.0, rollback_threshold=math.nextafter(ce, 0))
    assert (rolled.decision, rolled.rollback_at) == ("rollback", at)


def test_one_new_token_is_the_large_models_first():
    """max_new_tokens = 1, which the property tests leave out: one large call, and the small model never runs."""
    large, small = model_pair("disagree")
    src = torch.tensor([[3, 4, 5]])
    result = checked_generate(large, small, src, max_new_tokens=1)
    assert result.tokens == large_greedy(large, src, 1)
    assert [step.model for step in result.trace] == ["large"]


def test_one_large_call_per_phase_and_one_encode_per_model():
    large, small = model_pair("agree")
    src = torch.tensor([[5, 6, 7, 8]])
    observed_large, observed_small, decodes, encodes = recording(large, small)
    result = generate(observed_large, observed_small, src, max_small_steps=4, max_new_tokens=16)
    assert [id(m) for m in encodes] == [id(large), id(small)]
    large_cache = decodes[0][0]
    assert sum(cache is large_cache for cache, _, _ in decodes) == result.stats.large_calls
    assert len(decodes) == result.stats.large_calls + result.stats.small_calls
    assert result.stats.large_calls < len(result.tokens)
    assert large_cache.max_length == 17


def test_trace_text_and_jsonl():
    large, small = model_pair("disagree")
    result = generate(large, small, torch.tensor([[3, 4, 5]]), rollback_threshold=1.0, max_small_steps=3,
                      max_new_tokens=12)
    text = format_trace(result.trace).splitlines()
    rows = [json.loads(line) for line in trace_to_jsonl(result.trace).splitlines()]
    assert len(text) == len(rows) == len(result.trace)
    assert {step.model for step in result.trace} == {"small", "large"}
    for line, row, step in zip(text, rows, result.trace):
        assert line.startswith(f"{step.model} @{step.start} fed [{' '.join(map(str, step.fed))}] ")
        assert row == dataclasses.asdict(step)  # every field, floats unrounded
    large_lines = [(line, step) for line, step in zip(text, result.trace) if step.model == "large"]
    assert {step.decision for _, step in large_lines} == {"accept", "rollback"}
    for line, step in large_lines:
        decision = f"rollback at {step.rollback_at}: " if step.decision == "rollback" else f"accept {step.accepted}"
        assert f" -> {decision}" in line


def test_probabilities_in_float32_for_low_precision_models():
    large, small = (copy.deepcopy(m).to(torch.bfloat16) for m in model_pair("disagree"))
    result = generate(large, small, torch.tensor([[3, 4, 5]]), max_new_tokens=6)
    probs = [s.prob for s in result.trace if s.model == "small"]
    # bf16 has 8 significant bits: a softmax computed in bf16 would round every probability to them.
    assert any(p != float(torch.tensor(p).to(torch.bfloat16)) for p in probs), probs


@pytest.mark.parametrize("small, message", [
    (lambda: random_t5(1, vocab_size=VOCAB + 1), f"vocab_size: large has {VOCAB}, small has {VOCAB + 1}"),
    (lambda: random_t5(1, pad_token_id=3), "pad_token_id: large has 0, small has 3"),
    (lambda: random_t5(1, eos_token_id=2), "eos_token_id: large has 1, small has 2"),
    (lambda: random_t5(1, decoder_start_token_id=4), "decoder_start_token_id: large has 0, small has 4"),
    (lambda: copy.deepcopy(model_pair("disagree")[1]).float(), "the small model torch.float32"),
    (lambda: copy.deepcopy(model_pair("disagree")[1]).to("meta"), "the small model on meta"),
])
def test_mismatched_models_are_rejected(small, message):
    large, small = model_pair("disagree")[0], small()
    large, small, decodes, encodes = recording(large, small)
    with pytest.raises(ValueError, match=message):
        generate(large, small, torch.tensor([[3, 4]]))
    assert decodes == encodes == []


@pytest.mark.parametrize("src, kwargs, message", [
    (torch.tensor([[3, 4], [5, 6]]), {}, r"one source at a time: input_ids must have shape \(1, S\), got \(2, 2\)"),
    (torch.tensor([3, 4]), {}, r"must have shape \(1, S\), got \(2,\)"),
    (torch.tensor([[3, VOCAB]]), {}, rf"input_ids holds ids outside \[0, {VOCAB}\): min 3, max {VOCAB}"),
    (torch.tensor([[3.0, 4.0]]), {}, r"input_ids must be an integer tensor"),
    (None, {"fallback_threshold": -0.1}, "fallback_threshold must be >= 0, got -0.1"),
    (None, {"fallback_threshold": math.nan}, "fallback_threshold must be >= 0, got nan"),
    (None, {"rollback_threshold": -1.0}, "rollback_threshold must be >= 0, got -1.0"),
    (None, {"rollback_threshold": math.nan}, "rollback_threshold must be >= 0, got nan"),
])
def test_bad_arguments_are_rejected(src, kwargs, message):
    large, small = model_pair("disagree")
    large, small, decodes, encodes = recording(large, small)
    with pytest.raises(ValueError, match=message):
        generate(large, small, torch.tensor([[3, 4]]) if src is None else src, **kwargs)
    assert decodes == encodes == []


@pytest.mark.parametrize("models, message", [
    (lambda large, small: (large.train(), small), "the large model"),
    (lambda large, small: (large, small.train()), "the small model"),
    (lambda large, small: (large.train(), minibild.EarlyExit(large, 1)), "the large model"),
])
def test_models_in_training_mode_are_refused(models, message):
    """Dropout would make every output random: five calls, five outputs, and rollback 0 no longer greedy."""
    large, small = models(*copy.deepcopy(model_pair("disagree")))
    large, small, decodes, encodes = recording(large, small)
    with pytest.raises(ValueError, match=rf"^{message} is in training mode.*call \.eval\(\)"):
        generate(large, small, torch.tensor([[3, 4]]))
    assert decodes == encodes == []


@pytest.mark.parametrize("model, message", [
    (lambda large: large.train(), "the model"),
    (lambda large: minibild.EarlyExit(large.train(), 1), "the early-exit model's large model"),
])
def test_greedy_refuses_a_model_in_training_mode(model, message):
    with pytest.raises(ValueError, match=rf"^{message} is in training mode.*call \.eval\(\)"):
        minibild.greedy(model(copy.deepcopy(model_pair("disagree")[0])), torch.tensor([[3, 4]]), 4)


@pytest.mark.parametrize("value", [2.5, math.inf, True, 0, -1])
@pytest.mark.parametrize("name", ["max_small_steps", "max_new_tokens"])
def test_counts_must_be_integers(name, value):
    """2.5 or inf pending tokens never equal N, so the small phase would never hand over; True is not a count."""
    large, small = model_pair("disagree")
    message = rf"^{name} must be an integer >= 1, got {value!r}$"
    large, small, decodes, encodes = recording(large, small)
    with pytest.raises(ValueError, match=message):
        generate(large, small, torch.tensor([[3, 4]]), **{name: value})
    assert decodes == encodes == []
    if name == "max_new_tokens":
        with pytest.raises(ValueError, match=message):
            minibild.greedy(large, torch.tensor([[3, 4]]), value)


def test_jsonl_is_standard_json_and_reads_back_exactly():
    large, small = model_pair("disagree")
    trace = generate(large, small, torch.tensor([[3, 4, 5]]), rollback_threshold=1.0, max_small_steps=3,
                     max_new_tokens=12).trace
    # A float32 or float16 large model can give a pending token probability 0: cross-entropy inf.
    i = next(i for i, step in enumerate(trace) if step.model == "large" and step.cross_entropy)
    trace[i] = dataclasses.replace(trace[i], cross_entropy=[math.inf] + trace[i].cross_entropy[1:])
    text = trace_to_jsonl(trace)

    def not_standard(constant):
        raise AssertionError(f"{constant} is not standard JSON")

    rows = [json.loads(line, parse_constant=not_standard) for line in text.splitlines()]
    assert rows[i]["cross_entropy"][0] == "inf"
    assert trace_from_jsonl(text) == trace
    assert trace_to_jsonl(trace_from_jsonl(text)) == text

    trace[i] = dataclasses.replace(trace[i], cross_entropy=[math.nan] + trace[i].cross_entropy[1:])
    row = json.loads(trace_to_jsonl(trace).splitlines()[i], parse_constant=not_standard)
    assert row["cross_entropy"][0] == "nan"
    assert math.isnan(trace_from_jsonl(trace_to_jsonl(trace))[i].cross_entropy[0])
