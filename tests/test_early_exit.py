"""The early-exit small model (minibild.EarlyExit): the large model's first k decoder layers, sharing its
encoder output and its cache. Checked against a separate model built from the same layers, against the
large model's greedy output under BiLD (rollback 0, through test_bild's checked path), and for cache
consistency through rollbacks."""
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minibild import EarlyExit, T5, T5Config
from minibild.bild import generate
from minibild.generate import greedy as minibild_greedy
from minibild.observed import observed
from test_bild import one_thread  # noqa: F401 (an autouse fixture: one torch thread for tiny models)
from test_bild import (ALL_PATHS, EOS, N_CASES, SETTINGS, assert_reached, checked_generate, large_greedy, lengths,
                       paths, random_t5, sources)
from tiny_models import LENGTHS, SOURCE, integer, pick, seeded_cases, uniform

LAYERS = 4
# As test_bild's ENDS_LIKE, for these 4-layer models: EOS takes the place of a token the large model (and, for most
# seeds, its early-exit models) often emits, so outputs end at varied lengths and the early-exit model proposes EOS.
ENDS_LIKE = {0: 35, 1: 26, 2: 32, 3: 52}


def large_model(seed=0):
    large = random_t5(seed, num_decoder_layers=LAYERS)
    with torch.no_grad():
        head = large.lm_head.weight
        head[EOS] = 1.05 * head[ENDS_LIKE[seed]]  # EOS wins where that token would (with a positive logit)
    return large


def truncated_copy(large: T5, k: int) -> T5:
    """A separate model holding the large model's first k decoder layers (and everything else but the rest)."""
    config = T5Config(**{**large.config.to_dict(), "num_decoder_layers": k})
    small = T5(config).double().eval()
    state = large.state_dict()
    small.load_state_dict({name: state[name] for name in small.state_dict()})
    return small


@pytest.mark.parametrize("k", [1, 2, 3])
def test_early_exit_logits_equal_a_separate_truncated_model(k):
    large = large_model()
    separate = truncated_copy(large, k)
    exit_model = EarlyExit(large, k)
    src, y = torch.tensor([[5, 9, 13, 22, 1]]), torch.tensor([[0, 7, 11, 3, 40, 8]])
    expected = separate(src, y)  # uncached forward of the separate model
    cache = exit_model.new_shared_cache(large.encode(src), max_length=8)
    view = cache.exit_view
    one_at_a_time = torch.cat([exit_model.decode(y[:, i:i + 1], view) for i in range(3)], dim=1)
    rest = exit_model.decode(y[:, 3:], view)  # several tokens on a non-empty cache
    torch.testing.assert_close(torch.cat([one_at_a_time, rest], dim=1), expected, rtol=1e-12, atol=1e-12)
    assert (view.length, cache.length) == (6, 0)  # only the first k layers have run


def test_large_model_reads_what_the_early_exit_model_computed():
    large = large_model()
    src, y = torch.tensor([[5, 9, 13, 22, 1]]), torch.tensor([[0, 7, 11, 3, 40, 8, 2]])
    expected = large(src, y)
    exit_model = EarlyExit(large, 2)
    cache = exit_model.new_shared_cache(large.encode(src), max_length=8)
    exit_model.decode(y[:, :5], cache.exit_view)  # the early-exit model runs ahead by 5 positions
    writes = []
    update = cache.kv.update

    def recorded(layer, start, k, v):
        writes.append((layer, start, k.shape[2]))
        return update(layer, start, k, v)
    cache.kv.update = recorded
    got = exit_model.shared_large.decode(y, cache)  # 7 positions: 5 already through layers 0-1, 2 not
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert [w for w in writes if w[0] < 2] == [(0, 5, 2), (1, 5, 2)]  # only the two new positions
    assert [w for w in writes if w[0] >= 2] == [(2, 0, 7), (3, 0, 7)]
    assert (cache.length, cache.exit_length) == (7, 7)


def test_large_model_refuses_ids_the_early_exit_layers_did_not_run():
    """The large model takes the first layers' output from the cache: only for the ids they consumed."""
    large = large_model()
    src = torch.tensor([[5, 9, 13, 22, 1]])
    exit_model = EarlyExit(large, 2)
    cache = exit_model.new_shared_cache(large.encode(src), max_length=8)
    exit_model.decode(torch.tensor([[0, 7, 11]]), cache.exit_view)
    with pytest.raises(ValueError, match=r"at position 1 \(row 0\) is 9, but the early-exit layers ran that position "
                                         r"on id 7: crop the cache to 1"):
        exit_model.shared_large.decode(torch.tensor([[0, 9, 9]]), cache)
    with pytest.raises(ValueError, match="at position 2 .* is 9, .* on id 11"):
        exit_model.shared_large.decode(torch.tensor([[0, 7, 9, 4]]), cache)  # also past what the exit layers ran
    assert (cache.length, cache.exit_length) == (0, 3)  # nothing was run
    cache.exit_view.crop(1)  # as a rollback does: then other tokens may follow
    torch.testing.assert_close(exit_model.shared_large.decode(torch.tensor([[0, 9, 9]]), cache),
                               large(src, torch.tensor([[0, 9, 9]])), rtol=1e-12, atol=1e-12)


def test_t5_decode_refuses_an_early_exit_cache():
    """T5.decode would recompute the first layers and leave the cache's record of them stale."""
    large = large_model()
    cache = EarlyExit(large, 2).new_shared_cache(large.encode(torch.tensor([[5, 1]])), max_length=4)
    with pytest.raises(TypeError, match="not by T5.decode"):
        large.decode(torch.tensor([[0]]), cache)


def replay_check(large, small, src):
    """Observe both models' decode calls (small and small.shared_large); after each, rebuild the shared cache from
    scratch for the tokens it holds, with the model's layers run uncached, and compare every layer's
    keys/values, the exit layer's output and the ids it consumed. Returns (the observed small model, the list of
    checks made)."""
    k, decoder = small.exit_layer, large.decoder
    tokens_at, checks = {}, []

    def check(cache):
        held = torch.tensor([[tokens_at[p] for p in range(cache.exit_length)]])
        fresh = large.new_cache(T5.encode(large, src), max_length=cache.kv.max_length)
        with torch.no_grad():
            hidden = decoder.run_layers(large.embed(held), fresh, 0, range(k))
            decoder.run_layers(hidden[:, :cache.length], fresh, 0, range(k, LAYERS))
        for layer in range(LAYERS):
            n = cache.exit_length if layer < k else cache.length
            for ours, theirs in ((cache.kv.keys, fresh.keys), (cache.kv.values, fresh.values)):
                torch.testing.assert_close(ours[layer][:, :, :n], theirs[layer][:, :, :n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.exit_hidden[:, :cache.exit_length], hidden, rtol=1e-10, atol=1e-10)
        assert torch.equal(cache.exit_ids[:, :cache.exit_length], held)
        checks.append((cache.length, cache.exit_length))

    def checked(call, method, *args):
        if call == "encode":
            return method(*args)
        ids, cache = args
        shared = getattr(cache, "cache", cache)  # the early-exit model's view -> the cache itself
        assert shared.exit_length >= shared.length
        for i, t in enumerate(ids[0].tolist()):
            tokens_at[cache.length + i] = t
        out = method(ids, cache)
        check(shared)
        return out
    return observed(small, checked), checks  # small and its shared_large observed


def early_exit_rollback_zero_is_large_greedy(seed, src, fallback, N, max_new_tokens, k):
    """Through test_bild's checked path (its replay of every call against the policy, its stats), with the shared
    cache rebuilt and compared after every call."""
    large = large_model(seed)
    small, checks = replay_check(large, EarlyExit(large, k), src)
    result = checked_generate(large, small, src, fallback_threshold=fallback, rollback_threshold=0.0,
                              max_small_steps=N, max_new_tokens=max_new_tokens)
    assert result.tokens == large_greedy(large, src, max_new_tokens)
    assert len(checks) == len(result.trace)
    return paths(result)


@SETTINGS
@given(st.integers(0, 3), sources, st.floats(0, 1), st.integers(1, 6), lengths, st.sampled_from([1, 2, 3]))
def test_bild_with_early_exit_rollback_zero_is_large_greedy(seed, src, fallback, N, max_new_tokens, k):
    early_exit_rollback_zero_is_large_greedy(seed, src, fallback, N, max_new_tokens, k)


def test_bild_with_early_exit_reaches_every_path():
    seen = sum((early_exit_rollback_zero_is_large_greedy(*case)
                for case in seeded_cases(N_CASES, integer(0, 3), SOURCE, uniform(0, 1), integer(1, 6), LENGTHS,
                                         pick(1, 2, 3))), Counter())
    assert_reached(seen, ALL_PATHS, least=5)


def test_shared_cache_stays_consistent_through_rollbacks():
    encodes = []
    stats_total = Counter()
    for seed in range(4):
        large = large_model(seed)
        exit_model = EarlyExit(large, 1 + seed % 3)
        src = torch.tensor([[3 + seed, 17, 29, 8, 1]])
        exit_model, checks = replay_check(large, exit_model, src)

        def count_encodes(call, method, *args, seed=seed):
            if call == "encode":
                encodes.append(seed)
            return method(*args)
        result = generate(large, observed(exit_model, count_encodes), src, fallback_threshold=0.3,
                          rollback_threshold=1.0, max_small_steps=4, max_new_tokens=16)
        assert len(checks) == result.stats.large_calls + result.stats.small_calls
        stats_total.update(vars(result.stats))
    assert encodes == [0, 1, 2, 3]  # one encoder pass per generation: the early-exit model runs none
    assert stats_total["rollbacks"] > 0 and stats_total["accepted_small_tokens"] > 0, stats_total


def test_early_exit_arguments_are_checked():
    large = large_model()
    for k in (0, LAYERS, True, 2.0):
        with pytest.raises(ValueError, match=rf"exit_layer must be in \[1, {LAYERS - 1}\] .*, got {k!r}$"):
            EarlyExit(large, k)
    with pytest.raises(ValueError, match="another large model"):
        generate(large_model(seed=1), EarlyExit(large, 2), torch.tensor([[4, 1]]))
    view = EarlyExit(large, 2).new_cache(large.encode(torch.tensor([[4, 1]])), max_length=4)
    with pytest.raises(ValueError, match=r"crop\(1\): the early-exit layers hold 0 positions"):
        view.crop(1)


def test_training_loss_includes_the_early_exit_model():
    from train import loss_fn

    large = large_model()
    batch = dict(input_ids=torch.tensor([[5, 9, 1]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                 decoder_input_ids=torch.tensor([[0, 7, 11]]), labels=torch.tensor([[7, 11, 1]]))
    plain = loss_fn(large, batch, 0.0)
    both = loss_fn(large, batch, 0.0, exit_layer=2, exit_weight=0.5)
    separate = truncated_copy(large, 2)
    exit_loss = torch.nn.functional.cross_entropy(separate(batch["input_ids"], batch["decoder_input_ids"])[0],
                                                  batch["labels"][0])
    torch.testing.assert_close(both, plain + 0.5 * exit_loss, rtol=1e-12, atol=1e-12)


def test_greedy_decodes_a_batch_with_an_early_exit_model():
    """minibild.greedy drops a finished row from the cache (keep_rows): the early-exit model's cache drops it from
    the first layers' keys/values, outputs and ids alike, and every row is what the truncated model gives alone."""
    from minibild.batch import right_pad
    from tiny_models import PAD, random_source

    sources = [random_source(seed)[0] for seed in range(8)]
    ids, mask = right_pad([s.tolist() for s in sources], PAD)
    for seed, k in ((0, 3), (1, 3), (2, 2), (3, 1)):  # the exits whose rows end at different steps
        large = large_model(seed)
        separate = truncated_copy(large, k)
        alone = [minibild_greedy(separate, source[None], 24)[0] for source in sources]
        assert len({len(tokens) for tokens in alone}) > 1, "rows must finish at different steps"
        assert minibild_greedy(EarlyExit(large, k), ids, 24, mask) == alone
