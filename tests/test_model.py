"""minibild's T5 against transformers' (logits, probabilities, greedy tokens, position buckets), and its
KV cache against its own uncached forward."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hf_oracle import EOS, hf_greedy, hf_logits, make_batch, rel_diff
from transformers import T5Config as HFConfig
from transformers.models.t5.modeling_t5 import T5Attention

from minibild import T5, T5Config, generate_batch, greedy
from minibild import model as model_module
from minibild.model import relative_position_bucket


def batch_for(checkpoint, **kwargs):
    return make_batch(checkpoint.config["vocab_size"], **kwargs)


# --- against transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_logits_and_probabilities_match_hf(checkpoint, dtype, tolerance, request):
    if dtype == torch.float64:
        request.getfixturevalue("hf_float64")
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    expected = hf_logits(checkpoint.hf(dtype), input_ids, mask, decoder_ids)
    with torch.no_grad():
        logits = checkpoint.minibild(dtype)(input_ids, decoder_ids, mask)
    assert logits.dtype == dtype
    assert rel_diff(expected, logits) <= tolerance
    # BiLD's policies read probabilities: a wrong output scale would keep the argmax but not these.
    assert (expected.softmax(-1) - logits.softmax(-1)).abs().max() <= tolerance


def test_padding_does_not_change_a_row(checkpoint):
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    model = checkpoint.minibild(torch.float64)
    with torch.no_grad():
        batched = model(input_ids, decoder_ids, mask)
        n = int(mask[2].sum())
        alone = model(input_ids[2:, :n], decoder_ids[2:])
    assert rel_diff(alone[0], batched[2]) <= 1e-12


def give_eos_the_head_row_of(token: int, hf, model):
    """Wherever `token` would be the argmax (with a positive logit), EOS now wins: rows stop at
    different steps. The same edit on both models, so they stay the same model."""
    with torch.no_grad():
        hf_head = hf.get_output_embeddings().weight
        hf_head[EOS] = 1.05 * hf_head[token]
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        head[EOS] = 1.05 * head[token]


def test_greedy_matches_hf_generate(checkpoint):
    hf, model = checkpoint.hf(), checkpoint.minibild()
    input_ids, mask, _ = batch_for(checkpoint, seed=1, source_lengths=(20, 13, 6, 9, 17))
    max_new_tokens = 12
    expected = hf_greedy(hf, input_ids, mask, max_new_tokens)
    assert greedy(model, input_ids, max_new_tokens, mask) == expected

    give_eos_the_head_row_of(expected[0][2], hf, model)
    expected = hf_greedy(hf, input_ids, mask, max_new_tokens)
    assert any(len(row) < max_new_tokens for row in expected), "no row stops early: per-row EOS untested"
    assert any(len(row) == max_new_tokens and EOS not in row for row in expected), "every row stops early"
    assert greedy(model, input_ids, max_new_tokens, mask) == expected


def test_greedy_with_no_padding_matches_hf(checkpoint):
    input_ids, _, _ = batch_for(checkpoint, seed=2, source_lengths=(11,))
    assert greedy(checkpoint.minibild(), input_ids, 15) == hf_greedy(checkpoint.hf(), input_ids, None, 15)


@settings(max_examples=60, deadline=None)
@given(bidirectional=st.booleans(), num_buckets=st.integers(4, 64), extra_distance=st.integers(1, 200))
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, extra_distance):
    max_distance = num_buckets + extra_distance  # beyond the exact range, as in every T5 config
    relative = torch.arange(-3 * max_distance, 3 * max_distance + 1)  # both directions, past max_distance
    expected = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(relative_position_bucket(relative, bidirectional, num_buckets, max_distance), expected)


def test_fp16_is_as_accurate_as_hf_fp16(checkpoint):
    # fp16 keeps ~3 digits and the random weights amplify errors through the layers (up to ~10% of the
    # largest logit here), so the bar is transformers' own fp16 error, not a fixed tolerance.
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    exact = hf_logits(checkpoint.hf(torch.float32), input_ids, mask, decoder_ids)
    theirs = hf_logits(checkpoint.hf(torch.float16), input_ids, mask, decoder_ids).float()
    with torch.no_grad():
        ours = checkpoint.minibild(torch.float16)(input_ids, decoder_ids, mask)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    ours = ours.float()
    assert rel_diff(exact, ours) <= 2 * rel_diff(exact, theirs)
    assert rel_diff(exact.softmax(-1), ours.softmax(-1)) <= 2 * rel_diff(exact.softmax(-1), theirs.softmax(-1))


def test_fp16_overflow_is_clamped_as_in_hf(checkpoint, monkeypatch):
    """Feed-forward outputs scaled past float16's range (65504; up to ~4e5 in float32 here) overflow the residual
    stream: like transformers, minibild clamps it after each sublayer, and the two agree. transformers runs
    wholly in float16 here: loaded in float16 it keeps `wo` in float32, which keeps its residual stream in
    float32 and out of this code path."""
    hf, model = checkpoint.hf(torch.float32), checkpoint.minibild(torch.float16)
    with torch.no_grad():
        for stack, layer, index in (("encoder", model.encoder.layers[0], 1), ("decoder", model.decoder.layers[0], 2)):
            hf.get_parameter(f"{stack}.block.0.layer.{index}.DenseReluDense.wo.weight").mul_(2.0 ** 14)
            layer.ff.wo.weight.mul_(2.0 ** 14)  # a power of 2: the same float16 weights in both
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    theirs = hf_logits(hf.half(), input_ids, mask, decoder_ids).float()
    with torch.no_grad():
        ours = model(input_ids, decoder_ids, mask)
        assert torch.isfinite(ours).all()
        assert rel_diff(theirs, ours.float()) <= 2e-2
        assert (theirs.softmax(-1) - ours.float().softmax(-1)).abs().max() <= 2e-2
        monkeypatch.setattr(model_module, "clamp_fp16", lambda x: x)
        assert not torch.isfinite(model(input_ids, decoder_ids, mask)).all(), "nothing overflowed: the test is void"


# --- the KV cache against the uncached forward -------------------------------------------------------

def cached_logits(model, input_ids, mask, decoder_ids, chunks):
    """Decode `decoder_ids` in pieces of the given sizes on one cache; the logits of all positions."""
    cache = model.new_cache(model.encode(input_ids, mask), mask, max_length=decoder_ids.shape[1])
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model.decode(decoder_ids[:, start:start + size], cache))
        start += size
    assert cache.length == start
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 16, [3, 5, 8], [16]], ids=["one-by-one", "3-5-8", "all"])
def test_cached_decoding_matches_uncached_forward(checkpoint, chunks):
    # [3, 5, 8]: several tokens at once on a non-empty cache, as BiLD's large model does; a square
    # causal mask instead of a (T, P+T) one fails here.
    model = checkpoint.minibild(torch.float64)
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    with torch.no_grad():
        full = model(input_ids, decoder_ids, mask)
        assert rel_diff(full, cached_logits(model, input_ids, mask, decoder_ids, chunks)) <= 1e-12


@pytest.mark.parametrize("keep", [0, 1, 4])
def test_crop_then_decode_equals_a_fresh_run(checkpoint, keep):
    model = checkpoint.minibild(torch.float64)
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    new_ids = decoder_ids.flip(1)[:, :5]  # tokens different from the dropped ones
    with torch.no_grad():
        encoded = model.encode(input_ids, mask)
        cache = model.new_cache(encoded, mask, max_length=16)
        model.decode(decoder_ids[:, :10], cache)
        cache.crop(keep)
        assert cache.length == keep
        after_crop = model.decode(new_ids, cache)
        fresh = model.new_cache(encoded, mask, max_length=16)
        expected = model.decode(torch.cat([decoder_ids[:, :keep], new_ids], dim=1), fresh)[:, keep:]
    assert rel_diff(expected, after_crop) <= 1e-12


def test_crop_outside_the_held_positions_is_an_error(checkpoint):
    model = checkpoint.minibild()
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    with torch.no_grad():
        cache = model.new_cache(model.encode(input_ids, mask), mask, max_length=8)
        model.decode(decoder_ids[:, :3], cache)
    for n in (-1, 4):
        with pytest.raises(ValueError, match=rf"crop\({n}\): the cache holds 3 positions; n must be in \[0, 3\]"):
            cache.crop(n)
    assert cache.length == 3


def test_cache_overflow_is_an_error_and_leaves_the_cache_usable(checkpoint):
    model = checkpoint.minibild(torch.float64)
    input_ids, mask, decoder_ids = batch_for(checkpoint)
    with torch.no_grad():
        cache = model.new_cache(model.encode(input_ids, mask), mask, max_length=5)
        model.decode(decoder_ids[:, :3], cache)
        with pytest.raises(ValueError, match="at most 5 decoder positions, asked for 6.*larger max_length"):
            model.decode(decoder_ids[:, 3:6], cache)
        assert cache.length == 3
        last_two = model.decode(decoder_ids[:, 3:5], cache)
        expected = model(input_ids, decoder_ids[:, :5], mask)[:, 3:]
    assert rel_diff(expected, last_two) <= 1e-12


def test_encode_rejects_bad_inputs(checkpoint):
    model = checkpoint.minibild()
    input_ids, mask, _ = batch_for(checkpoint)
    with pytest.raises(ValueError, match="input_ids holds ids outside"):
        model.encode(input_ids + checkpoint.config["vocab_size"], mask)
    with pytest.raises(ValueError, match=r"input_ids holds ids outside \[0, \d+\): min -1"):
        greedy(model, input_ids - 1, 4, mask)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model.encode(input_ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.encode(input_ids, mask[:, :-1])


@pytest.mark.parametrize("ids, mask, message", [
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 1], [0, 0]]), "attention_mask row 1 is all zeros"),
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 2], [1, 1]]), r"attention_mask must hold only 0 \(padding\) "
                                                                     r"and 1"),
    (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[1, 1], [0, 1]]), "attention_mask row 1 is not right-padded"),
    (torch.tensor([[3, 4], [5, 6]]), np.ones((2, 2), dtype=np.int64), r"attention_mask must be a torch tensor of 0s "
                                                                      r"and 1s, shaped as input_ids \(2, 2\), got "
                                                                      r"numpy.ndarray$"),
    (torch.tensor([[3, 4], [5, 6]]), torch.ones(2, 3), r"attention_mask has shape \(2, 3\), expected input_ids' "
                                                       r"\(2, 2\)"),
    (torch.zeros(0, 3, dtype=torch.long), None, r"input_ids has no rows: \(0, 3\); give at least one source"),
    (torch.tensor([[3, 40]]), None, r"input_ids holds ids outside \[0, 40\)"),
    (np.array([[3, 4]]), None, "input_ids must be an integer tensor"),
])
def test_one_validator_checks_sources_for_encode_greedy_and_generate_batch(ids, mask, message):
    """encode, greedy and generate_batch refuse the same sources and masks with the same message."""
    config = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0)
    model = T5(config).eval()
    for call in (lambda: model.encode(ids, mask), lambda: greedy(model, ids, 4, mask),
                 lambda: generate_batch(model, model, ids, mask)):
        with pytest.raises(ValueError, match=message):
            call()


def test_decode_never_reads_the_ids_values():
    """A range check on every decode step would sync a GPU each token: decode checks shape and type only (on the
    meta device, which holds no values, any read fails)."""
    config = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with torch.device("meta"):
        model = T5(config).eval()
        cache = model.new_cache(torch.empty(1, 5, config.d_model), max_length=4)
        assert model.decode(torch.zeros(1, 3, dtype=torch.long), cache).shape == (1, 3, config.vocab_size)
        with pytest.raises(ValueError, match="decoder_input_ids must be an integer tensor"):
            model.decode(torch.zeros(1, 1), cache)


# --- T5Config -----------------------------------------------------------------------------------------

def test_config_defaults_are_hugging_faces():
    ours, theirs = T5Config(), HFConfig()
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
                 "layer_norm_epsilon", "pad_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_config_from_dict_fills_derived_defaults():
    c = T5Config.from_dict({"num_layers": 3, "pad_token_id": 5, "num_decoder_layers": None, "architectures": ["x"]})
    assert (c.num_decoder_layers, c.decoder_start_token_id) == (3, 5)
    assert c.relative_attention_max_distance == 128
    assert c.tie_word_embeddings and c.scale_decoder_outputs  # t5 v1.0 when nothing is said
    untied = T5Config.from_dict({"tie_word_embeddings": False})  # a v1.1 config.json before transformers 5
    assert not untied.tie_word_embeddings and not untied.scale_decoder_outputs
    hf5 = T5Config.from_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False})  # v1.1, transformers 5
    assert hf5.tie_word_embeddings and not hf5.scale_decoder_outputs
    gated = T5Config.from_dict({"feed_forward_proj": "gated-gelu"})
    assert gated.is_gated and gated.activation == "gelu_new"  # the tanh GELU, as t5 v1.1 was trained


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "umt5"}, "model_type 'umt5' is not supported"),
    ({"is_encoder_decoder": False}, "needs an encoder-decoder"),
    ({"feed_forward_proj": "gated-swish"}, "feed_forward_proj='gated-swish' is not supported"),
    ({"feed_forward_proj": "tanh"}, "feed_forward_proj='tanh' is not supported"),
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"d_model": "512"}, "d_model must be a positive integer, got '512'"),
    ({"num_layers": True}, "num_layers must be a positive integer, got True"),
    ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets must be at least 4"),
    ({"relative_attention_num_buckets": 32, "relative_attention_max_distance": 16},
     r"relative_attention_max_distance must exceed relative_attention_num_buckets // 2 .*, got "
     r"relative_attention_max_distance=16 with relative_attention_num_buckets=32"),
    ({"vocab_size": 10, "eos_token_id": 10}, r"eos_token_id must be a token id in \[0, 10\), got 10"),
    ({"decoder_start_token_id": -1}, "decoder_start_token_id must be a token id"),
])
def test_config_from_dict_errors_name_the_source_and_field(fields, message):
    with pytest.raises(ValueError, match=rf"^some/config\.json: .*{message}"):
        T5Config.from_dict(fields, source="some/config.json")


@settings(max_examples=100, deadline=None)
@given(num_buckets=st.integers(4, 64), max_distance=st.integers(1, 100))
def test_config_refuses_exactly_the_bucket_settings_that_break(num_buckets, max_distance):
    """Buckets stay in [0, num_buckets) at every distance, in both directions, iff max_distance exceeds
    num_buckets // 2 (the decoder's exact range; the encoder's is half as long). Below it the log-spaced
    buckets turn negative within a few thousand positions (the first forward dies with an IndexError)."""
    relative = torch.arange(-5000, 5001)
    works = all(0 <= b.min() and b.max() < num_buckets
                for b in (relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
                          for bidirectional in (True, False)))
    fields = dict(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance)
    if works:
        T5Config(**fields)
    else:
        with pytest.raises(ValueError, match="relative_attention_max_distance must exceed"):
            T5Config(**fields)
