"""The early-exit small model (minibild.EarlyExit): the large model's first k decoder layers, sharing its
encoder output and its cache. Checked against a separate model built from the same layers, against the
large model's greedy output under BiLD (rollback 0), and for cache consistency through rollbacks."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minibild import EarlyExit, T5, T5Config
from minibild.bild import generate
from test_bild import one_thread  # noqa: F401 (an autouse fixture: one torch thread for tiny models)
from test_bild import SETTINGS, large_greedy, random_t5, sources

LAYERS = 4


def large_model(seed=0, eos_bias=1.0):
    return random_t5(seed, num_decoder_layers=LAYERS, eos_bias=eos_bias)


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
    cache = large.new_cache(large.encode(src), max_length=8, exit_layer=k)
    view = exit_model.cache_view(cache)
    one_at_a_time = torch.cat([exit_model.decode(y[:, i:i + 1], view) for i in range(3)], dim=1)
    rest = exit_model.decode(y[:, 3:], view)  # several tokens on a non-empty cache
    torch.testing.assert_close(torch.cat([one_at_a_time, rest], dim=1), expected, rtol=1e-12, atol=1e-12)
    assert (view.length, cache.length) == (6, 0)  # only the first k layers have run


def test_large_model_reads_what_the_early_exit_model_computed():
    large = large_model()
    src, y = torch.tensor([[5, 9, 13, 22, 1]]), torch.tensor([[0, 7, 11, 3, 40, 8, 2]])
    expected = large(src, y)
    cache = large.new_cache(large.encode(src), max_length=8, exit_layer=2)
    exit_model = EarlyExit(large, 2)
    view = exit_model.cache_view(cache)
    exit_model.decode(y[:, :5], view)  # the early-exit model runs ahead by 5 positions
    writes = []
    update = cache.update

    def recorded(layer, start, k, v):
        writes.append((layer, start, k.shape[2]))
        return update(layer, start, k, v)
    cache.update = recorded
    got = large.decode(y, cache)  # 7 positions: 5 already through layers 0-1, 2 not
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert [w for w in writes if w[0] < 2] == [(0, 5, 2), (1, 5, 2)]  # only the two new positions
    assert [w for w in writes if w[0] >= 2] == [(2, 0, 7), (3, 0, 7)]


def replayed_consistency(large, k, src):
    """Wrap both models' decode calls; after each, rebuild the shared cache from scratch for the tokens it
    holds and compare every layer's keys/values (and the exit layer's output) position by position."""
    tokens_at = {}
    checks = []

    def check(cache):
        held = [tokens_at[p] for p in range(cache.exit_length)]
        # The class methods, not the instances' wrapped ones: the rebuild must not be checked itself.
        fresh = large.new_cache(T5.encode(large, src), max_length=cache.max_length, exit_layer=k)
        if cache.length:
            T5.decode(large, torch.tensor([held[:cache.length]]), fresh)
        if cache.exit_length > cache.length:
            exit_model = EarlyExit(large, k)
            EarlyExit.decode(exit_model, torch.tensor([held[cache.length:]]), exit_model.cache_view(fresh))
        for layer in range(LAYERS):
            n = cache.exit_length if layer < k else cache.length
            for ours, theirs in ((cache.keys, fresh.keys), (cache.values, fresh.values)):
                torch.testing.assert_close(ours[layer][:, :, :n], theirs[layer][:, :, :n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.exit_hidden[:, :cache.exit_length], fresh.exit_hidden[:, :cache.exit_length],
                                   rtol=1e-10, atol=1e-10)
        checks.append((cache.length, cache.exit_length))

    def wrap(decode, start_of):
        def checked(ids, cache):
            shared = getattr(cache, "cache", cache)
            start = start_of(shared)
            assert start >= shared.length and shared.exit_length >= shared.length
            for i, t in enumerate(ids[0].tolist()):
                tokens_at[start + i] = t
            out = decode(ids, cache)
            check(shared)
            return out
        return checked
    return tokens_at, checks, wrap


@SETTINGS
@given(st.integers(0, 3), st.sampled_from([1.0, 2.5]), sources, st.floats(0, 1), st.integers(1, 6),
       st.integers(1, 12), st.sampled_from([1, 2, 3]))
def test_bild_with_early_exit_rollback_zero_is_large_greedy(seed, eos_bias, src, fallback, N, max_new_tokens, k):
    large = large_model(seed, eos_bias)
    result = generate(large, EarlyExit(large, k), src, fallback_threshold=fallback, rollback_threshold=0.0,
                      max_small_steps=N, max_new_tokens=max_new_tokens)
    assert result.tokens == large_greedy(large, src, max_new_tokens)


def test_shared_cache_stays_consistent_through_rollbacks(monkeypatch):
    encodes = []
    stats_total = [0, 0]
    for seed in range(4):
        large = large_model(seed)
        k = 1 + seed % 3
        exit_model = EarlyExit(large, k)
        src = torch.tensor([[3 + seed, 17, 29, 8, 1]])
        tokens_at, checks, wrap = replayed_consistency(large, k, src)
        monkeypatch.setattr(large, "decode", wrap(large.decode, lambda c: c.length))
        monkeypatch.setattr(exit_model, "decode", wrap(exit_model.decode, lambda c: c.exit_length))
        encode = large.encode
        monkeypatch.setattr(large, "encode", lambda *a, **kw: encodes.append(seed) or encode(*a, **kw))
        result = generate(large, exit_model, src, fallback_threshold=0.3, rollback_threshold=1.0,
                          max_small_steps=4, max_new_tokens=16)
        monkeypatch.undo()
        assert len(checks) == result.stats.large_calls + result.stats.small_calls
        stats_total[0] += result.stats.rollbacks
        stats_total[1] += result.stats.accepted_small_tokens
    assert encodes == [0, 1, 2, 3]  # one encoder pass per generation: the early-exit model runs none
    assert stats_total[0] > 0 and stats_total[1] > 0  # rollbacks happened, and small tokens were kept


def test_early_exit_arguments_are_checked():
    large = large_model()
    for k in (0, LAYERS):
        with pytest.raises(ValueError, match=rf"exit_layer must be in \[1, {LAYERS - 1}\]"):
            EarlyExit(large, k)
    with pytest.raises(ValueError, match="needs layer 2's"):
        EarlyExit(large, 2).cache_view(large.new_cache(large.encode(torch.tensor([[4, 1]])), exit_layer=1))
    with pytest.raises(ValueError, match="another large model"):
        generate(large_model(seed=1), EarlyExit(large, 2), torch.tensor([[4, 1]]))


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
