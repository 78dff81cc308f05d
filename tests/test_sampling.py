"""Tests for minibild/sampling.py: bild_sample is distributed exactly as the large model's ancestral sampling.

The exact tests enumerate every outcome of every random draw bild_sample makes (draft tokens, acceptances,
residual and beyond tokens), each with the probability the implementation's own decisions give it (sampling.py's
accept_probability and residual, through its draws object), by running the real loop once per path of draws. The
probability of each complete output is then compared with the large model's own, the product of p over the
sequence from uncached forwards, to 1e-12. Models are tiny float64 T5s with 3 to 5 tokens (pad 0, EOS 1), one
layer, and soft output distributions, so that every path of the loop is reached within 2 or 3 tokens.
"""
import copy
import json
import math
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minibild
from minibild import bild, sampling
from minibild.sampling import bild_sample
from minibild.trace import SampledLargeStep, SampledSmallStep
from tiny_models import EOS, model_pair, random_source, random_t5

TOLERANCE = 1e-12


def tiny(seed, vocab_size=4, num_layers=1, sharpness=0.15):
    """A one-layer float64 T5 over vocab_size tokens whose output distributions are spread (logits of std ~1)."""
    model = random_t5(seed, d_model=8, num_layers=num_layers, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def pair(seed, vocab_size=4):
    return tiny(seed, vocab_size), tiny(seed + 1000, vocab_size)


SRC = torch.tensor([[2, 1, 2]])


class Enumeration:
    """Draws that follow a list of outcome indices, then the first outcome of every further draw, recording how
    many outcomes each draw had (those of probability > 0) and the probability of the path taken."""

    def __init__(self, choices):
        self.choices, self.outcomes, self.probability = choices, [], 1.0

    def _choose(self, outcomes):  # [(value, probability)]
        outcomes = [(value, p) for value, p in outcomes if p > 0]
        i = len(self.outcomes)
        value, p = outcomes[self.choices[i] if i < len(self.choices) else 0]
        self.outcomes.append(len(outcomes))
        self.probability *= p
        return value

    def token(self, probs):
        return self._choose(list(enumerate(probs.tolist())))

    def accept(self, probability):
        return self._choose([(True, probability), (False, 1 - probability)])


def enumerate_paths(run):
    """run(draws) -> a result, once per path of draws -> [(probability, result)] over every path."""
    paths, choices = [], []
    while True:
        draws = Enumeration(choices)
        result = run(draws)
        paths.append((draws.probability, result))
        choices = [choices[i] if i < len(choices) else 0 for i in range(len(draws.outcomes))]
        while choices and choices[-1] + 1 == draws.outcomes[len(choices) - 1]:
            choices.pop()
        if not choices:
            return paths
        choices[-1] += 1


def distribution(paths) -> dict:
    """{output tokens: probability}, checking each output ends as greedy BiLD's do."""
    dist = defaultdict(float)
    for probability, tokens in paths:
        dist[tuple(tokens)] += probability
    return dict(dist)


def check_output(tokens, max_new_tokens):
    assert 1 <= len(tokens) <= max_new_tokens
    assert EOS not in tokens[:-1]
    assert tokens[-1] == EOS or len(tokens) == max_new_tokens


def large_distribution(large, src, temperature, max_new_tokens) -> dict:
    """The large model's exact distribution over outputs: the product of p over each sequence, from uncached
    forwards and a softmax written out here."""
    dist, V = {}, large.config.vocab_size

    def extend(y, probability):
        if len(y) > 1 and (y[-1] == EOS or len(y) - 1 == max_new_tokens):
            dist[tuple(y[1:])] = probability
            return
        logits = large(src, torch.tensor([y]))[0, -1].double()
        p = torch.exp(logits / temperature - torch.logsumexp(logits / temperature, -1))
        for token in range(V):
            extend(y + [token], probability * p[token].item())

    with torch.inference_mode():
        extend([large.config.decoder_start_token_id], 1.0)
    return dist


def distance(a: dict, b: dict) -> float:
    """Total variation distance between two distributions over outputs."""
    return 0.5 * sum(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in set(a) | set(b))


def bild_paths(large, small, temperature, fallback_threshold, max_small_steps, max_new_tokens, src=SRC):
    """Every path of bild_sample, [(probability, BiLDResult)]."""
    return enumerate_paths(lambda draws: bild_sample(
        large, small, src, temperature=temperature, fallback_threshold=fallback_threshold,
        max_small_steps=max_small_steps, max_new_tokens=max_new_tokens, draws=draws))


def bild_distribution(large, small, temperature, fallback_threshold, max_small_steps, max_new_tokens) -> dict:
    paths = bild_paths(large, small, temperature, fallback_threshold, max_small_steps, max_new_tokens)
    return distribution((p, result.tokens) for p, result in paths)


def loop_paths(paths) -> Counter:
    """Which paths of the loop a set of enumerated runs went through, counted once per run that reached them."""
    seen = Counter()
    for _, result in paths:
        steps = result.trace
        seen.update({step.decision for step in steps if step.model == "small"})
        seen.update({"rollback" for step in steps if step.decision == "rollback"})
        seen.update({"accepted" for step in steps if step.model == "large" and step.accepted})
        seen.update({"EOS drafted" for step in steps if step.model == "small" and step.token == EOS})
        seen["ends at EOS" if result.tokens[-1] == EOS else "ends at cap"] += 1
    return seen


# (seed, vocab size, temperature, fallback threshold, N, max_new_tokens)
CASES = [(0, 4, 1.0, 0.0, 3, 3), (1, 4, 0.7, 0.5, 2, 3), (2, 3, 1.5, 0.4, 1, 3), (3, 5, 1.0, 0.3, 3, 2),
         (4, 4, 2.0, 0.0, 1, 3), (5, 3, 0.5, 0.6, 3, 3), (6, 5, 1.3, 0.0, 2, 2), (7, 4, 1.0, 1.5, 2, 3)]


@pytest.mark.parametrize("seed, vocab_size, temperature, fallback_threshold, N, max_new_tokens", CASES)
def test_bild_sample_is_exactly_the_large_distribution(seed, vocab_size, temperature, fallback_threshold, N,
                                                       max_new_tokens):
    large, small = pair(seed, vocab_size)
    paths = bild_paths(large, small, temperature, fallback_threshold, N, max_new_tokens)
    assert math.isclose(sum(p for p, _ in paths), 1.0, abs_tol=TOLERANCE)
    for _, result in paths:
        check_output(result.tokens, max_new_tokens)
    expected = large_distribution(large, SRC, temperature, max_new_tokens)
    assert distance(distribution((p, r.tokens) for p, r in paths), expected) < TOLERANCE


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 4), st.floats(0.3, 3.0), st.floats(0.0, 1.0), st.integers(1, 3),
       st.integers(2, 3))
def test_random_pairs_and_settings_are_exact(seed, vocab_size, temperature, fallback_threshold, N, max_new_tokens):
    large, small = pair(seed, vocab_size)
    expected = large_distribution(large, SRC, temperature, max_new_tokens)
    got = bild_distribution(large, small, temperature, fallback_threshold, N, max_new_tokens)
    assert distance(got, expected) < TOLERANCE


def test_the_exact_cases_reach_every_path_of_the_loop():
    seen = Counter()
    for seed, vocab_size, temperature, fallback_threshold, N, max_new_tokens in CASES:
        seen.update(loop_paths(bild_paths(*pair(seed, vocab_size), temperature, fallback_threshold, N,
                                          max_new_tokens)))
    paths = ["pending", "handover", "end", "fallback", "rollback", "accepted", "EOS drafted", "ends at EOS",
             "ends at cap"]
    rare = {path: seen[path] for path in paths if seen[path] < 10}
    assert not rare, f"paths reached by fewer than 10 runs: {rare}; all: {dict(seen)}"


def test_ancestral_sample_is_exactly_the_large_distribution():
    large = tiny(0, 5)
    for temperature in (0.5, 1.0, 2.0):
        paths = enumerate_paths(lambda draws: minibild.sample(large, SRC, temperature=temperature,
                                                              max_new_tokens=3, draws=draws))
        for _, tokens in paths:
            check_output(tokens, 3)
        assert distance(distribution(paths), large_distribution(large, SRC, temperature, 3)) < TOLERANCE


def test_fallback_threshold_and_N_change_speed_only():
    large, small = pair(11, 3)
    expected = large_distribution(large, SRC, 0.7, 4)
    large_calls = {}
    for fallback_threshold in (0.0, 0.45, 0.55, 2.0):
        for N in (1, 3):
            paths = bild_paths(large, small, 0.7, fallback_threshold, N, 4)
            assert distance(distribution((p, r.tokens) for p, r in paths), expected) < TOLERANCE
            large_calls[fallback_threshold, N] = sum(p * r.stats.large_calls for p, r in paths)
    # The same outputs with the same probabilities, at different costs: the expected number of large calls.
    assert len({round(calls, 9) for calls in large_calls.values()}) >= 4, large_calls
    assert large_calls[2.0, 1] == max(large_calls.values())  # the small model never drafts: a large call a token


def test_an_early_exit_small_model_keeps_the_distribution():
    large = tiny(21, 4, num_layers=2)
    small = minibild.EarlyExit(large, 1)
    expected = large_distribution(large, SRC, 1.0, 3)
    paths = bild_paths(large, small, 1.0, 0.3, 2, 3)
    assert distance(distribution((p, r.tokens) for p, r in paths), expected) < TOLERANCE
    assert sum(r.stats.rollbacks for _, r in paths) > 0


# --- planted bugs: the exact test must see each of them --------------------------------------------------------

class DraftFrom:
    """Draws whose draft tokens come from f(q) while the acceptance test still reads q."""

    def __init__(self, draws, f):
        self.draws, self.f = draws, f

    def token(self, probs):
        return self.draws.token(self.f(probs))

    def accept(self, probability):
        return self.draws.accept(probability)


def plant_draft(monkeypatch, f):
    propose = sampling.propose
    monkeypatch.setattr(sampling, "propose", lambda y, verified, start, fed, logits, temperature, fallback, N, draws,
                        eos, cap, q_rows: propose(y, verified, start, fed, logits, temperature, fallback, N,
                                                  DraftFrom(draws, f), eos, cap, q_rows))


def one_hot(token, like):
    return torch.nn.functional.one_hot(token, like.shape[-1]).to(like.dtype)


PLANTED = {
    "greedy draft, random acceptance": lambda mp: plant_draft(mp, lambda q: one_hot(q.argmax(), q)),
    "draft drawn at 2T, scored at T": lambda mp: plant_draft(mp, lambda q: (q.log() / 2).softmax(-1)),
    "correction with the large argmax": lambda mp: mp.setattr(sampling, "residual",
                                                             lambda p, q: one_hot(p.argmax(), p)),
    "unnormalized residual": lambda mp: mp.setattr(sampling, "residual", lambda p, q: (p - q).clamp(min=0)),
    "accept with probability p": lambda mp: mp.setattr(sampling, "accept_probability", lambda p, q: p),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_planted_bugs_fail_the_exact_test(monkeypatch, bug):
    large, small = pair(0)
    expected = large_distribution(large, SRC, 1.0, 3)
    PLANTED[bug](monkeypatch)
    tv = distance(bild_distribution(large, small, 1.0, 0.0, 2, 3), expected)
    assert tv > 1e-2, f"{bug}: total variation {tv}"  # the correct loop: below 1e-12


# --- statistical, end to end, with the generator's uniforms ----------------------------------------------------

def l1_bound(categories: int, n: int, false_failure: float) -> float:
    """Bretagnolle-Huber-Carol: for n samples of any distribution over `categories` outcomes,
    P(sum |empirical - true| >= bound) <= 2**categories * exp(-n bound**2 / 2) = false_failure."""
    return math.sqrt(2 * (categories * math.log(2) + math.log(1 / false_failure)) / n)


def empirical(samples) -> dict:
    counts = Counter(map(tuple, samples))
    return {key: count / len(samples) for key, count in counts.items()}


def test_seeded_samples_follow_the_large_distribution():
    """2000 samples each from bild_sample and minibild.sample on two pairs, 13 possible outputs each: each of the
    four comparisons fails a correct sampler with probability below 1e-6 by the bound above (0.151 in L1), all
    four below 4e-6, and the seeds are fixed, so the outcome is too. The small model's own samples (0.65 and 0.25
    from the large distribution in L1) fail the same test: it tells a wrong distribution from the right one."""
    n, max_new_tokens = 2000, 2
    for seed, temperature, fallback_threshold, N in ((0, 1.0, 0.3, 2), (3, 0.8, 0.0, 3)):
        large, small = pair(seed)
        expected = large_distribution(large, SRC, temperature, max_new_tokens)
        bound = l1_bound(len(expected), n, 1e-6)
        generator = torch.Generator().manual_seed(seed)
        samplers = {
            "bild_sample": lambda: bild_sample(large, small, SRC, temperature=temperature,
                                               fallback_threshold=fallback_threshold, max_small_steps=N,
                                               max_new_tokens=max_new_tokens, generator=generator).tokens,
            "minibild.sample": lambda: minibild.sample(large, SRC, temperature=temperature,
                                                       max_new_tokens=max_new_tokens, generator=generator),
            "the small model": lambda: minibild.sample(small, SRC, temperature=temperature,
                                                       max_new_tokens=max_new_tokens, generator=generator)}
        l1 = {name: 2 * distance(empirical([draw() for _ in range(n)]), expected) for name, draw in samplers.items()}
        assert l1["bild_sample"] < bound and l1["minibild.sample"] < bound, (l1, bound)
        assert l1["the small model"] > bound, (l1, bound)


def test_uniforms_draw_by_inverse_cdf():
    draws = sampling.Uniforms(torch.Generator().manual_seed(5))
    again = torch.Generator().manual_seed(5)
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    for _ in range(20):
        u = torch.rand((), dtype=torch.float64, generator=again).item()
        assert draws.token(probs) == (1 if u < 0.25 else 3)
    assert draws.token(torch.tensor([0.5, 0.5, 0.0]) * (1 - 1e-7)) in (0, 1)  # total below 1: never the 0 token


# --- determinism, trace, arguments ------------------------------------------------------------------------------

def test_same_seed_same_output_and_trace():
    large, small = pair(0, 5)
    src = torch.tensor([[2, 3, 4, 2]])

    def run(seed):
        return bild_sample(large, small, src, temperature=1.0, fallback_threshold=0.3, max_small_steps=3,
                           max_new_tokens=12, generator=torch.Generator().manual_seed(seed))

    first, again = run(7), run(7)
    assert first.tokens == again.tokens and first.stats == again.stats
    assert bild.trace_to_jsonl(first.trace) == bild.trace_to_jsonl(again.trace)
    assert len({tuple(run(seed).tokens) for seed in range(8)}) > 1  # the seed matters
    torch.manual_seed(3)
    default = bild_sample(large, small, src, temperature=1.0, max_new_tokens=12).tokens
    torch.manual_seed(3)
    assert bild_sample(large, small, src, temperature=1.0, max_new_tokens=12).tokens == default
    sampled = minibild.sample(large, src, temperature=1.0, max_new_tokens=12,
                              generator=torch.Generator().manual_seed(7))
    assert sampled == minibild.sample(large, src, temperature=1.0, max_new_tokens=12,
                                      generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_temperatures_tend_to_greedy(dtype):
    """softmax(logits / T) overflows for a tiny T (inf - inf: NaN, and a NaN acceptance accepts every draft):
    probabilities stay finite for every T > 0, match softmax(logits / T) where that is finite, and reach argmax
    decoding as T -> 0, in both sampling functions."""
    logits = torch.tensor([[2.0, 7.5, -1.0, 7.5 - 1e-3], [0.3, -4.0, 9.0, 1.0]], dtype=dtype)
    torch.testing.assert_close(sampling.probabilities(logits, 0.7), (logits / 0.7).softmax(-1))
    for temperature in (1e-6, 1e-40, 1e-300, 5e-324):
        probs = sampling.probabilities(logits, temperature)
        assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], temperature
    tie = sampling.probabilities(torch.tensor([1.0, 3.0, 3.0], dtype=dtype), 1e-40)
    assert tie.tolist() == [0.0, 0.5, 0.5]  # a tie shares the mass
    large, small = (model.to(dtype) for model in model_pair("disagree", 0))  # greedy: 12 tokens, many rollbacks
    src = random_source(1)
    greedy = minibild.greedy(large, src, 12)[0]
    for temperature in (1e-40, 5e-324):
        generator = torch.Generator().manual_seed(0)
        assert minibild.sample(large, src, temperature=temperature, max_new_tokens=12, generator=generator) == greedy
        result = bild_sample(large, small, src, temperature=temperature, fallback_threshold=0.3, max_small_steps=3,
                             max_new_tokens=12, generator=generator)
        assert result.tokens == greedy
        assert result.stats.rolled_back_tokens > 0  # the small model's drafts were judged, not all accepted


def test_trace_records_draws_and_round_trips():
    large, small = pair(0, 5)
    result = bild_sample(large, small, torch.tensor([[2, 3, 4, 2]]), temperature=1.0, fallback_threshold=0.3,
                         max_small_steps=3, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    trace = result.trace
    assert all(isinstance(step, (SampledSmallStep, SampledLargeStep)) for step in trace)
    text = bild.trace_to_jsonl(trace)
    assert bild.trace_from_jsonl(text) == trace and bild.trace_to_jsonl(bild.trace_from_jsonl(text)) == text
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(row["kind"] == "sampled" for row in rows)
    assert len(bild.format_trace(trace).splitlines()) == len(trace)
    for step in trace:
        if step.model == "large":
            assert len(step.p) == len(step.q) == len(step.fed) - 1
        elif step.decision == "fallback":
            assert step.token is None and step.confidence < 0.3
        else:
            assert step.confidence >= 0.3 and 0 < step.q <= step.confidence
    stats = result.stats
    assert stats.large_tokens + stats.small_tokens == len(result.tokens)
    assert stats.small_calls == stats.accepted_small_tokens + stats.rolled_back_tokens + stats.fallbacks


def test_probabilities_in_float32_at_least():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert sampling.probabilities(logits.to(torch.bfloat16), 0.7).dtype == torch.float32
    assert sampling.probabilities(logits.double(), 0.7).dtype == torch.float64
    assert torch.allclose(sampling.probabilities(logits.double(), 0.5), (logits.double() * 2).softmax(-1))


@pytest.mark.parametrize("temperature, message", [
    (0, r"temperature must be > 0 to sample, got 0: temperature 0 is argmax decoding, which bild.generate"),
    (0.0, r"temperature 0 is argmax decoding"),
    (-1.0, r"temperature must be a finite number > 0, got -1.0"),
    (math.inf, r"temperature must be a finite number > 0, got inf"),
    (math.nan, r"temperature must be a finite number > 0, got nan"),
])
def test_bad_temperatures_are_refused(temperature, message):
    large, small = pair(0)
    with pytest.raises(ValueError, match=message):
        bild_sample(large, small, SRC, temperature=temperature)
    with pytest.raises(ValueError, match=message.replace("bild.generate", "minibild.greedy")):
        minibild.sample(large, SRC, temperature=temperature)


def test_bad_arguments_are_refused():
    large, small = pair(0)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        bild_sample(large, small, SRC, temperature=1.0, generator=5)
    with pytest.raises(ValueError, match="fallback_threshold must be >= 0, got -0.5"):
        bild_sample(large, small, SRC, temperature=1.0, fallback_threshold=-0.5)
    with pytest.raises(ValueError, match="max_small_steps must be an integer >= 1, got 0"):
        bild_sample(large, small, SRC, temperature=1.0, max_small_steps=0)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(1, S\)"):
        minibild.sample(large, torch.tensor([[2, 3], [2, 3]]), temperature=1.0)
    with pytest.raises(ValueError, match="the small model is in training mode"):
        bild_sample(large, copy.deepcopy(small).train(), SRC, temperature=1.0)
