"""A T5 encoder-decoder in plain PyTorch, with an explicit decoder KV cache.

Read top to bottom: layer norm, relative position bias, attention, feed-forward, the two kinds of
layer, the two stacks, the cache, and the `T5` module that ties them together. Module and tensor
names follow Hugging Face's T5 closely enough that `minibild/weights.py` maps them with one table.

Shapes: B batch, S source length, T new decoder tokens, P decoder positions already in the cache,
H heads, D = d_kv head width, V vocabulary.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import T5Config


class T5LayerNorm(nn.Module):
    """RMS norm: T5 neither subtracts the mean nor adds a bias."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):
        # Mean of squares in float32 at least: in fp16 it overflows. (Hugging Face uses float32 even for
        # float64 input; minibild keeps float64 exact, which is what an oracle is for.)
        variance = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


def clamp_fp16(x):
    """fp16 T5 activations overflow; like Hugging Face, clamp them to finite values after each sublayer."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)  # a tensor, so no host sync
    return torch.clamp(x, min=-limit, max=limit)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Map key_position - query_position to a bucket: exact for small distances, logarithmic up to
    max_distance, and one shared bucket beyond. Bidirectional (encoder) buckets spend half their
    range on keys to the right; causal (decoder) ones see only keys at or left of the query."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only avoids log(0) for the positions that take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's only position signal: a learned per-head scalar added to attention scores, looked up by
    bucketed relative distance. Computed once by each stack and shared by all its layers."""

    def __init__(self, config: T5Config, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.relative_attention_num_buckets, config.num_heads))
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def forward(self, query_position, key_length: int):
        """Queries at query_position, (T,) or one row of positions per batch row (B, T), over keys at positions
        0..key_length-1 -> bias (1, H, T, K) or (B, H, T, K)."""
        key_position = torch.arange(key_length, device=self.weight.device)
        relative_position = key_position - query_position[..., None]  # (T, K) or (B, T, K)
        bucket = relative_position_bucket(relative_position, self.bidirectional, self.num_buckets, self.max_distance)
        bias = F.embedding(bucket, self.weight).movedim(-1, -3)  # (H, T, K) or (B, H, T, K)
        if not self.bidirectional:
            # Causal mask for queries at P.. over keys 0..: a (T, P+T) mask, not a square one.
            bias = bias.masked_fill(relative_position.unsqueeze(-3) > 0, torch.finfo(bias.dtype).min)
        return bias if bias.dim() == 4 else bias[None]


class Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv  # need not equal d_model (t5-3b: 32 x 128 vs 1024)
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def split_heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, T, D)

    def keys_values(self, x):
        return self.split_heads(self.k(x)), self.split_heads(self.v(x))

    def forward(self, x, keys, values, bias, packed=None):
        """x (B, T, d_model); or, with `packed` (a ragged.RaggedCall), only a batched call's real tokens (1, n,
        d_model), which the scores need grouped by row: the projections then skip the rows' padding."""
        q = self.q(x) if packed is None else packed.by_row(self.q(x))
        q = self.split_heads(q)  # (B, H, T, D)
        # softmax(q k^T + bias) v, with no 1/sqrt(D) scaling (scale=1): T5 folds it into the initialisation of q.
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0,
                                             dropout_p=self.dropout.p if self.training else 0.0)  # (B, H, T, D)
        out = out.transpose(1, 2)  # (B, T, H, D)
        out = out.reshape(*out.shape[:2], -1)  # (B, T, H * D)
        return self.o(out if packed is None else packed.pack(out))


ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # what t5 v1.1 calls gated-gelu
    "gelu": F.gelu,
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """relu (t5 v1.0) or gated: act(wi_0 x) * wi_1 x (v1.1, flan-t5, mT5)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.is_gated = config.is_gated
        if self.is_gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.is_gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class EncoderLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ff_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias):
        h = self.attn_norm(x)  # pre-norm: T5 normalises each sublayer's input, not its output
        x = clamp_fp16(x + self.dropout(self.attn(h, *self.attn.keys_values(h), bias)))
        return clamp_fp16(x + self.dropout(self.ff(self.ff_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.self_attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = Attention(config)
        self.cross_attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.cross_attn = Attention(config)
        self.ff_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, cache: "KVCache", layer: int, start: int, self_bias):
        h = self.self_attn_norm(x)
        keys, values = cache.update(layer, start, *self.self_attn.keys_values(h))  # (B, H, P+T, D) each
        x = clamp_fp16(x + self.dropout(self.self_attn(h, keys, values, self_bias, cache.packed)))
        h = self.cross_attn_norm(x)
        # Cross-attention has no position bias: only the source padding mask.
        x = clamp_fp16(x + self.dropout(self.cross_attn(h, cache.cross_keys[layer], cache.cross_values[layer],
                                                        cache.cross_bias, cache.packed)))
        return clamp_fp16(x + self.dropout(self.ff(self.ff_norm(x))))


class Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, padding_bias):
        S = x.shape[1]
        bias = self.relative_bias(torch.arange(S, device=x.device), S) + padding_bias  # (B, H, S, S): every layer's
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, bias)
        return self.dropout(self.final_norm(x))


class Decoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, cache: "KVCache"):
        """Embedded tokens (B, T, d_model) at positions P.. (P = cache.length) -> final hidden states."""
        P, T = cache.length, x.shape[1]
        x = self.run_layers(self.dropout(x), cache, P, range(len(self.layers)))
        cache.length = P + T  # every layer has written positions P..P+T-1
        return self.dropout(self.final_norm(x))

    def run_layers(self, x, cache: "KVCache", start: int, layers: range):
        """Hidden states (B, T, d_model) at positions start.. through `layers`, writing their keys/values.
        (On batch.RaggedKVCache's view, start is one position per row and the cache says where each query sits.)"""
        query_position, key_length = cache.positions(start, x.shape[1])
        self_bias = self.relative_bias(query_position, key_length)  # (1, H, T, start+T), causal; (B, ...) per row
        for i in layers:
            x = self.layers[i](x, cache, i, start, self_bias)
        return x


class KVCache:
    """The decoder's state for one batch of sources.

    Self-attention keys/values sit in buffers of `capacity` positions; only the first `length` are valid, so
    crop(n) is O(1) and later decoding simply overwrites the dropped positions. A write past the capacity doubles
    it (amortized O(1) per position) up to `max_length`, the most positions the cache accepts, so a generous
    max_length costs no memory until it is used. Unwritten positions hold zeros, never garbage.
    Cross-attention keys/values are computed once from the encoder output and never change.
    """
    initial_capacity = 64  # positions allocated up front (at most max_length)
    packed = None  # the decoder's tokens come as (B, T, d_model); batched BiLD's ragged.RaggedCall packs them

    def __init__(self, cross_keys, cross_values, cross_bias, max_length: int):
        B, H, _, D = cross_keys[0].shape
        like = cross_keys[0]
        self.cross_keys, self.cross_values = cross_keys, cross_values  # per layer (B, H, S, D)
        self.cross_bias = cross_bias  # (B, 1, 1, S): 0 for source tokens, -inf-like for padding
        self.max_length, self.capacity = max_length, min(max_length, self.initial_capacity)
        self.keys = [like.new_zeros(B, H, self.capacity, D) for _ in cross_keys]  # per layer (B, H, capacity, D)
        self.values = [like.new_zeros(B, H, self.capacity, D) for _ in cross_keys]
        self.length = 0  # decoder positions held by every layer

    def reserve(self, end: int):
        """Make room for positions up to end - 1: double the capacity (at least to end), at most max_length."""
        if end > self.max_length:
            raise ValueError(f"KVCache holds at most {self.max_length} decoder positions, asked for {end}: "
                             "make the cache with a larger max_length")
        if end > self.capacity:
            self.capacity = min(self.max_length, max(end, 2 * self.capacity))

            def grown(buffer):  # (B, H, capacity, D), the old positions copied, the new ones zero
                new = buffer.new_zeros(*buffer.shape[:2], self.capacity, buffer.shape[3])
                new[:, :, :buffer.shape[2]] = buffer
                return new
            self.keys, self.values = list(map(grown, self.keys)), list(map(grown, self.values))

    def positions(self, start: int, T: int):
        """Where T queries fed at start sit, (T,), and how many keys they see: start + T."""
        return torch.arange(start, start + T, device=self.cross_bias.device), start + T

    def update(self, layer: int, start: int, k, v):
        """Write keys/values of positions start.. ; return the layer's keys/values up to the last one."""
        end = start + k.shape[2]
        self.reserve(end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep_rows(self, rows):
        """Keep only the batch rows at these indices (B',), in this order; the others leave the batch."""
        def keep(buffer):
            return buffer.index_select(0, rows)  # on the CPU about 3x faster than buffer[rows]
        self.cross_keys, self.cross_values = list(map(keep, self.cross_keys)), list(map(keep, self.cross_values))
        self.cross_bias = keep(self.cross_bias)
        self.keys, self.values = list(map(keep, self.keys)), list(map(keep, self.values))

    def crop(self, n: int):
        """Keep the first n decoder positions, dropping the rest."""
        if not 0 <= n <= self.length:
            raise ValueError(f"crop({n}): the cache holds {self.length} positions; n must be in [0, {self.length}]")
        self.length = n


def check_ids(name: str, ids, vocab_size: int | None = None):
    """Refuse anything but a non-empty integer tensor (B, T); with vocab_size, ids outside [0, vocab_size) too.
    The range check reads the values (a host sync on a GPU): run it once per source, not on every decode step."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"{name} must be an integer tensor [batch, length], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(ids.shape)}")
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): min {ids.min().item()}, max {ids.max().item()}")


def check_sources(input_ids, attention_mask=None, vocab_size: int | None = None):
    """The one check of a batch of sources, for T5.encode, minibild.greedy and batch.generate_batch: input_ids a
    non-empty integer tensor (B, S) of ids in [0, vocab_size), and attention_mask None (no padding) or a tensor of
    the same shape holding, in each row, 1s (source tokens) then 0s (padding), at least one 1."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise ValueError(f"input_ids has no rows: {tuple(input_ids.shape)}; give at least one source")
    check_ids("input_ids", input_ids, vocab_size)
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch tensor of 0s and 1s, shaped as input_ids "
                         f"{tuple(input_ids.shape)}, got {type(attention_mask).__module__}.{type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected input_ids' "
                         f"{tuple(input_ids.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (source tokens)")
    lengths = attention_mask.long().sum(1)
    if (lengths == 0).any():
        row = (lengths == 0).nonzero()[0].item()
        raise ValueError(f"attention_mask row {row} is all zeros: every row needs at least one source token")
    right_padded = torch.arange(input_ids.shape[1], device=lengths.device) < lengths[:, None]
    if (attention_mask != right_padded).any():
        row = (attention_mask != right_padded).any(1).nonzero()[0].item()
        raise ValueError(f"attention_mask row {row} is not right-padded: it must be 1s, then 0s")


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # shared by encoder and decoder
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # t5 v1.0 reuses the embedding as LM head; v1.1, flan-t5 and mT5 have their own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids, attention_mask=None):
        """Source ids (B, S), right-padded: mask 1 for tokens, then 0 for padding -> encoder output (B, S, d_model)."""
        check_sources(input_ids, attention_mask, self.config.vocab_size)
        return self.encoder(self.embed(input_ids), self._padding_bias(attention_mask, *input_ids.shape))

    def _padding_bias(self, attention_mask, batch: int, length: int):
        """(B, 1, 1, S) additive bias: 0 for source tokens, the dtype's minimum for padding."""
        weight = self.embed.weight
        bias = torch.zeros(batch, 1, 1, length, dtype=weight.dtype, device=weight.device)
        if attention_mask is None:
            return bias
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected the source's "
                             f"{(batch, length)}")
        padding = (attention_mask == 0).to(weight.device)[:, None, None, :]
        return bias.masked_fill(padding, torch.finfo(weight.dtype).min)

    def new_cache(self, encoder_output, attention_mask=None, max_length: int = 512) -> KVCache:
        """An empty decoder cache for these encoded sources, holding up to max_length decoder positions."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        cross = [layer.cross_attn.keys_values(encoder_output) for layer in self.decoder.layers]
        cross_bias = self._padding_bias(attention_mask, *encoder_output.shape[:2])
        return KVCache([k for k, _ in cross], [v for _, v in cross], cross_bias, max_length)

    def decode(self, decoder_input_ids, cache: KVCache):
        """Feed T >= 1 new decoder tokens (B, T) after the cache's positions -> logits (B, T, V). The ids are
        not range-checked here (that would sync a GPU on every step): encode and the decoding loops check."""
        check_ids("decoder_input_ids", decoder_input_ids)
        return self.logits(self.decoder(self.embed(decoder_input_ids), cache))

    def logits(self, h):
        """Final decoder hidden states (B, T, d_model) -> logits (B, T, V)."""
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5  # t5 v1.0 rescales because its LM head is the embedding
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight  # (V, d_model)
        return F.linear(h, weight)  # (B, T, V)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        """Full, uncached forward: (B, S) source and (B, T) decoder ids -> logits (B, T, V)."""
        cache = self.new_cache(self.encode(input_ids, attention_mask), attention_mask,
                               max_length=decoder_input_ids.shape[1])
        return self.decode(decoder_input_ids, cache)

