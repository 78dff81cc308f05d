"""Tests for batched BiLD (minibild/batch.py) and its ragged cache (minibild/ragged.py).

The contract: row i of batch.generate_batch is bild.generate on row i alone (its unpadded source), in tokens,
stats and trace, for every setting. Tokens, decisions, positions and stats are compared exactly; the trace's
probabilities and cross-entropies to 1e-9 relative (float64), since a batched matmul may sum in another order.
Models, sources and settings are test_bild.py's (tests/tiny_models.py).
"""
import ast
import copy
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minibild
from minibild import bild, ragged
from minibild.batch import generate_batch, right_pad
from tiny_models import (EOS, LENGTHS, PAIR, PAD, STEPS, VOCAB, assert_reached, lengths, model_pair, pair_args,
                         random_source, seeded_cases, steps, uniform)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
batches = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6).map(lambda seeds: [random_source(s)[0]
                                                                                         for s in seeds])


def padded(sources: list) -> tuple[torch.Tensor, torch.Tensor]:
    return right_pad(sources, PAD)


def assert_same_result(got: bild.BiLDResult, expected: bild.BiLDResult):
    """Equal tokens, stats and decisions; the trace's floats to 1e-9 relative."""
    assert (got.tokens, got.stats) == (expected.tokens, expected.stats)
    assert len(got.trace) == len(expected.trace)
    for a, b in zip(got.trace, expected.trace):
        floats = ("prob", "cross_entropy")
        assert {k: v for k, v in vars(a).items() if k not in floats} == \
            {k: v for k, v in vars(b).items() if k not in floats}
        if a.model == "small":
            assert math.isclose(a.prob, b.prob, rel_tol=1e-9)
        else:
            assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a.cross_entropy, b.cross_entropy, strict=True))


def rounds(trace) -> list[int]:
    """The round of generate_batch's schedule each step of a row's trace ran in: round k is the row's k-th large
    call and the small calls after it."""
    large_calls = 0
    numbers = []
    for step in trace:
        large_calls += step.model == "large"
        numbers.append(large_calls - 1)
    return numbers


def batch_paths(results) -> Counter:
    """What a batch went through, counted: the rows' interplay the schedule must get right."""
    seen = Counter()
    events = {}  # round -> decisions of the rows' steps in it, and "finish" for a row's last step
    for row, result in enumerate(results):
        for n, (i, step) in zip(rounds(result.trace), enumerate(result.trace)):
            events.setdefault(n, []).append((row, step.decision))
            if i == len(result.trace) - 1:
                events[n].append((row, "finish"))
    for decisions in events.values():
        for row, decision in decisions:
            others = {d for r, d in decisions if r != row}
            if decision == "rollback":
                seen["rollback while another row falls back"] += "fallback" in others
                seen["rollback while another row finishes"] += "finish" in others
                seen["rollback while another row accepts"] += "accept" in others
    ends = {"EOS" if result.tokens[-1] == EOS else "cap" for result in results}
    seen["rows end at EOS and at the cap"] += ends == {"EOS", "cap"}
    seen["rows of different lengths"] += len({len(result.tokens) for result in results}) > 1
    return seen


def each_row_is_bild_generate_alone(args, fallback_threshold, rollback_threshold, N, max_new_tokens, sources):
    large, small = model_pair(*args)
    kwargs = dict(fallback_threshold=fallback_threshold, rollback_threshold=rollback_threshold,
                  max_small_steps=N, max_new_tokens=max_new_tokens)
    results = generate_batch(large, small, *padded(sources), **kwargs)
    assert len(results) == len(sources)
    for src, result in zip(sources, results):
        assert_same_result(result, bild.generate(large, small, src[None], **kwargs))
    return batch_paths(results) + Counter({"padded sources": len({len(src) for src in sources}) > 1})


@SETTINGS
@given(pair_args, st.floats(0, 1.2), st.floats(0, 8), steps, lengths, batches)
def test_each_row_is_bild_generate_on_that_row_alone(args, fallback_threshold, rollback_threshold, N,
                                                     max_new_tokens, sources):
    each_row_is_bild_generate_alone(args, fallback_threshold, rollback_threshold, N, max_new_tokens, sources)


def BATCH(rng):  # as `batches`, for seeded_cases
    return [random_source(rng.getrandbits(32))[0] for _ in range(rng.randint(1, 6))]


def test_each_row_alone_reaches_every_interplay_of_rows():
    seen = sum((each_row_is_bild_generate_alone(*case)
                for case in seeded_cases(60, PAIR, uniform(0, 1.2), uniform(0, 8), STEPS, LENGTHS, BATCH)), Counter())
    assert_reached(seen, ["rollback while another row falls back", "rollback while another row finishes",
                          "rollback while another row accepts", "rows end at EOS and at the cap",
                          "rows of different lengths", "padded sources"], least=5)


def test_permuting_rows_permutes_results():
    @SETTINGS
    @given(pair_args, st.floats(0, 1), st.floats(0, 4), steps, lengths, batches, st.randoms(use_true_random=False))
    def check(args, fallback_threshold, rollback_threshold, N, max_new_tokens, sources, rng):
        large, small = model_pair(*args)
        kwargs = dict(fallback_threshold=fallback_threshold, rollback_threshold=rollback_threshold,
                      max_small_steps=N, max_new_tokens=max_new_tokens)
        order = list(range(len(sources)))
        rng.shuffle(order)
        results = generate_batch(large, small, *padded(sources), **kwargs)
        permuted = generate_batch(large, small, *padded([sources[i] for i in order]), **kwargs)
        for i, result in zip(order, permuted):
            assert_same_result(result, results[i])

    check()


def rollback_zero_is_large_greedy(args, fallback_threshold, N, max_new_tokens, sources) -> bool:
    """Row by row and batched; True when a row ends at EOS while another goes on (batched greedy drops it)."""
    large, small = model_pair(*args)
    results = generate_batch(large, small, *padded(sources), fallback_threshold=fallback_threshold,
                                  rollback_threshold=0.0, max_small_steps=N, max_new_tokens=max_new_tokens)
    tokens = [result.tokens for result in results]
    assert tokens == [minibild.greedy(large, src[None], max_new_tokens)[0] for src in sources]
    ids, mask = padded(sources)
    assert tokens == minibild.greedy(large, ids, max_new_tokens, attention_mask=mask)
    longest = max(map(len, tokens))
    return any(t[-1:] == [EOS] and len(t) < longest for t in tokens)


@SETTINGS
@given(pair_args, st.floats(0, 1), steps, lengths, batches)
def test_rollback_threshold_zero_is_large_greedy_row_by_row_and_batched(args, fallback_threshold, N,
                                                                        max_new_tokens, sources):
    rollback_zero_is_large_greedy(args, fallback_threshold, N, max_new_tokens, sources)


def test_rollback_threshold_zero_cases_have_rows_finishing_early():
    early_exits = [rollback_zero_is_large_greedy(*case)
                   for case in seeded_cases(25, PAIR, uniform(0, 1), STEPS, LENGTHS, BATCH)]
    assert sum(early_exits) >= 5, f"only {sum(early_exits)} cases had a row finish before another"


def test_ragged_cache_holds_what_one_row_alone_would(monkeypatch):
    """Random calls over random subsets of rows, each row fed 1-3 tokens, with random crops: after every call,
    each row's logits and each layer's keys/values at its positions equal a fresh one-row cache's over the
    tokens that row holds. Calls over few rows gather them; calls over most read in place, the rest riding idle."""
    calls = []

    class Recorded(ragged.RaggedCall):
        def __init__(self, *args):
            super().__init__(*args)
            calls.append(self)

    monkeypatch.setattr(ragged, "RaggedCall", Recorded)
    model, _ = model_pair("disagree", 1)
    rng = random.Random(0)
    sources = [random_source(seed)[0] for seed in range(5)]
    ids, mask = padded(sources)
    cache = ragged.RaggedKVCache(model.new_cache(model.encode(ids, mask), mask, max_length=24))
    held = [[] for _ in sources]  # the tokens each row's cache holds
    seen = Counter()
    for _ in range(60):
        rows = rng.sample(range(len(sources)), rng.randint(1, len(sources)))  # in any order
        if rng.random() < 0.5:
            rows = sorted(rows) if rng.random() < 0.4 else list(range(len(sources)))  # every row: read in place
        fed = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, min(3, 24 - len(held[b]))))] for b in rows]
        logits = ragged.decode(model, cache, rows, fed)
        for a, (b, tokens) in enumerate(zip(rows, fed)):
            alone = model.new_cache(model.encode(sources[b][None]), max_length=24)
            expected = model.decode(torch.tensor([held[b] + tokens]), alone)[0, len(held[b]):]
            torch.testing.assert_close(logits[a], expected, rtol=1e-9, atol=1e-12)
            held[b] += tokens
            n = len(held[b])
            for layer in range(len(model.decoder.layers)):
                torch.testing.assert_close(cache.kv.keys[layer][b, :, :n], alone.keys[layer][0, :, :n],
                                           rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(cache.kv.values[layer][b, :, :n], alone.values[layer][0, :, :n],
                                           rtol=1e-9, atol=1e-12)
        assert cache.lengths == list(map(len, held))
        seen["rows of different lengths in one call"] += len({len(held[b]) for b in rows}) > 1
        seen["padded slots"] += len(set(map(len, fed))) > 1
        seen["every row, in place"] += rows == list(range(len(sources)))
        call = calls[-1]
        seen["in place, with idle rows"] += call.in_place and 0 in call.counts
        seen["an idle row that holds nothing"] += call.in_place and any(
            count == 0 and not held[b] for b, count in enumerate(call.counts))
        seen["gathered"] += not call.in_place
        seen["rows out of the cache's order"] += rows != sorted(rows)
        for b in range(len(sources)):
            if held[b] and rng.random() < 0.3 or len(held[b]) > 20:  # crop one row, the others untouched
                held[b] = held[b][:rng.choice([0, rng.randint(0, len(held[b]))])]  # often all of it
                cache.crop(b, len(held[b]))
                seen["crops"] += 1
    assert_reached(seen, ["rows of different lengths in one call", "padded slots", "crops", "every row, in place",
                          "rows out of the cache's order", "in place, with idle rows", "an idle row that holds nothing",
                          "gathered"], least=4)


def test_ragged_crop_and_length_errors():
    model, _ = model_pair("disagree")
    ids = torch.tensor([[3, 4], [5, 6]])
    cache = ragged.RaggedKVCache(model.new_cache(model.encode(ids), max_length=3))
    ragged.decode(model, cache, [1], [[7, 8]])
    with pytest.raises(ValueError, match=r"crop\(0, 1\): row 0 holds 0 positions; n must be in \[0, 0\]"):
        cache.crop(0, 1)
    for rows, tokens, counts in (([0], [[]], r"rows \[0\], token counts \[0\]"),
                                 ([0, 1], [[7]], r"rows \[0, 1\], token counts \[1\]"),
                                 ([1, 1], [[7], [8]], r"rows \[1, 1\], token counts \[1, 1\]")):
        with pytest.raises(ValueError, match="distinct rows and one non-empty token list per row: " + counts):
            ragged.decode(model, cache, rows, tokens)
    with pytest.raises(ValueError, match=r"decode was given rows \[0, 2\]; the cache holds rows 0..1"):
        ragged.decode(model, cache, [0, 2], [[7], [8]])
    with pytest.raises(ValueError, match="at most 3 decoder positions, asked for 4"):
        ragged.decode(model, cache, [0, 1], [[7, 8], [9, 10]])


@pytest.mark.parametrize("ids, mask, message", [
    (torch.zeros(0, 3, dtype=torch.long), None, r"input_ids has no rows: \(0, 3\); give at least one source"),
    (torch.tensor([[3, 4], [5, 6]]), torch.ones(2, 3), r"attention_mask has shape \(2, 3\), expected input_ids' "
                                                       r"\(2, 2\)"),
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 1], [0, 0]]), "attention_mask row 1 is all zeros: every row "
                                                                     "needs at least one source token"),
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 1], [0, 1]]), "attention_mask row 1 is not right-padded"),
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 2], [1, 1]]), "attention_mask must hold only 0"),
    (torch.tensor([[3, VOCAB]]), None, rf"input_ids holds ids outside \[0, {VOCAB}\)"),
    (torch.tensor([3, 4]), None, "input_ids must be an integer tensor"),
])
def test_bad_inputs_are_refused_before_any_compute(ids, mask, message, monkeypatch):
    large, small = model_pair("disagree")
    monkeypatch.setattr(ragged, "decode", None)  # any model call would fail with a TypeError instead
    for model in (large, small):
        monkeypatch.setattr(model, "encode", None)
    with pytest.raises(ValueError, match=message):
        generate_batch(large, small, ids, mask)


@pytest.mark.parametrize("pair, kwargs, message", [
    (lambda large, small: (large, minibild.EarlyExit(large, 1)), {},
     "early-exit small model is batch-1 only: use bild.generate"),
    (lambda large, small: (large, small.train()), {}, "the small model is in training mode"),
    (lambda large, small: (large, small.float()), {}, "the small model torch.float32"),
    (lambda large, small: (large, small), {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    (lambda large, small: (large, small), {"rollback_threshold": -1.0}, "rollback_threshold must be >= 0"),
])
def test_bad_models_and_settings_are_refused(pair, kwargs, message):
    large, small = pair(*copy.deepcopy(model_pair("disagree")))
    with pytest.raises(ValueError, match=message):
        generate_batch(large, small, torch.tensor([[3, 4]]), **kwargs)


def test_schedule_one_large_call_per_round_over_every_unfinished_row(monkeypatch):
    calls = []
    decode = ragged.decode

    def recorded(model, cache, rows, tokens):
        calls.append((model, list(rows)))
        return decode(model, cache, rows, tokens)

    monkeypatch.setattr(ragged, "decode", recorded)
    large, small = model_pair("disagree")
    sources = [random_source(seed)[0] for seed in range(6)]
    results = generate_batch(large, small, *padded(sources), rollback_threshold=2.0, max_small_steps=4,
                                  max_new_tokens=16)
    large_calls = [rows for model, rows in calls if model is large]
    assert len(large_calls) == max(result.stats.large_calls for result in results) > 1
    for k, rows in enumerate(large_calls):  # round k's large call holds every row still going, and only those:
        assert rows == list(range(sum(result.stats.large_calls > k for result in results)))  # the rest left
    assert len({len(rows) for rows in large_calls}) > 1  # rows finished along the way
    small_rows = sum(len(rows) for model, rows in calls if model is small)
    assert small_rows == sum(result.stats.small_calls for result in results)


@pytest.mark.parametrize("statement", ["import minibild.batch", "from minibild.batch import right_pad",
                                       "from minibild.batch import generate_batch", "import minibild.ragged"])
def test_any_import_order_works(statement):
    subprocess.run([sys.executable, "-c", statement], check=True)


def test_bild_imports_none_of_the_modules_built_on_it():
    """batch.py, sampling.py and official.py take bild's decisions; bild.py imports none of them (no import circle)."""
    tree = ast.parse(Path(bild.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported & {"batch", "sampling", "official"} == set(), imported


def test_caches_grow_as_they_fill(monkeypatch):
    """A cache allocates KVCache.initial_capacity positions, whatever its max_length, and doubles as decoding writes
    past them: a large max_new_tokens costs no memory until it is used (batch 2 with --max-new-tokens 20000 took
    1.9 GB). Growing from capacity 1 (at every power of 2) changes no output of greedy, BiLD, batched BiLD or
    early-exit BiLD, whose caches (KVCache, RaggedKVCache, EarlyExitCache) all grow."""
    large, small = model_pair("disagree", 1)
    sources = [random_source(seed)[0] for seed in range(3)]
    ids, mask = padded(sources)
    early_exit = minibild.EarlyExit(large, 1)
    encoded = large.encode(ids, mask)
    assert large.new_cache(encoded, mask, max_length=20000).keys[0].shape[2] == 64
    assert ragged.RaggedKVCache(large.new_cache(encoded, mask, max_length=20000)).kv.values[0].shape[2] == 64
    _, shared, _ = early_exit.share_cache(sources[0][None], max_length=20000)
    assert shared.kv.keys[0].shape[2] == shared.exit_hidden.shape[1] == shared.exit_ids.shape[1] == 64

    def outputs():
        settings = dict(fallback_threshold=0.5, rollback_threshold=1.0, max_small_steps=3, max_new_tokens=24)
        return (minibild.greedy(large, ids, 24, mask),
                [bild.generate(large, small, source[None], **settings).tokens for source in sources],
                [result.tokens for result in generate_batch(large, small, ids, mask, **settings)],
                [bild.generate(large, early_exit, source[None], **settings).tokens for source in sources])

    expected = outputs()
    assert max(len(tokens) for tokens in expected[0]) == 24
    monkeypatch.setattr(minibild.model.KVCache, "initial_capacity", 1)
    assert outputs() == expected


def first_divergence(alone: bild.BiLDResult, batched: bild.BiLDResult):
    """The first step at which two traces take another decision (or feed other tokens), or None."""
    return next((i for i, (a, b) in enumerate(zip(alone.trace, batched.trace))
                 if (a.model, a.start, a.fed, a.decision) != (b.model, b.start, b.fed, b.decision)), None)


def test_float32_batches_are_batch_one_except_at_near_ties_on_real_sentences():
    """README's statement, on the shipped pair in float32 (the CLI's default): a batched call sums in another order,
    so a row's probabilities differ from batch 1's by up to about 3e-6, and its tokens and decisions are batch 1's
    except where a probability lies that close to a threshold. A fallback threshold placed between a probability's
    two values changes the decision there, and only there."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    large, small = (minibild.load(root / "weights" / name) for name in ("large", "small"))
    tok = minibild.Tokenizer(root / "weights" / "large" / "spiece.model")
    lines = (root / "data" / "test.jsonl").read_text().splitlines()[:4]
    sources = [torch.tensor(tok.encode(json.loads(line)["source"])) for line in lines]
    batched = generate_batch(large, small, *padded(sources))
    alone = [bild.generate(large, small, src[None]) for src in sources]
    pairs = []  # (batch 1's, batch 4's) probability at every small step
    for a, b in zip(alone, batched):
        assert (a.tokens, first_divergence(a, b)) == (b.tokens, None)
        pairs += [(s.prob, t.prob) for s, t in zip(a.trace, b.trace) if s.model == "small"]
        for s, t in zip(a.trace, b.trace):
            if s.model == "large":
                assert all(abs(x - y) <= 2e-5 for x, y in zip(s.cross_entropy, t.cross_entropy))
    differences = [abs(p - q) for p, q in pairs]
    assert max(differences) <= 5e-6 and sum(d > 0 for d in differences) > len(pairs) / 4  # not bit-identical
    # Between the two values of the most different probability (which decided "pending"), the decision flips.
    row = next(i for i, (a, b) in enumerate(zip(alone, batched))
               if max(abs(s.prob - t.prob) for s, t in zip(a.trace, b.trace) if s.model == "small") == max(differences))
    p, q = max(((s.prob, t.prob) for s, t in zip(alone[row].trace, batched[row].trace) if s.model == "small"),
               key=lambda pq: abs(pq[0] - pq[1]))
    threshold = (p + q) / 2
    a = bild.generate(large, small, sources[row][None], fallback_threshold=threshold)
    b = generate_batch(large, small, *padded(sources), fallback_threshold=threshold)[row]
    i = first_divergence(a, b)
    assert i is not None and a.trace[i].model == "small" and abs(a.trace[i].prob - threshold) < 5e-6
