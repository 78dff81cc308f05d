"""BiLD's early-exit variant: the small model is the large model's first k decoder layers, then its final
layer norm and LM head (`EarlyExit`). It owns no weights and runs no encoder of its own.

Under BiLD both models decode on one cache (`EarlyExitCache`): the small model runs the first k layers
ahead of the large one, keeping their keys/values, their output and the ids they consumed; when the large
model verifies those positions it starts from that output at layer k instead of recomputing the first k
layers (`SharedCacheLarge`), after checking it was given the same ids. A rollback crops the one cache for
both models. `EarlyExit.share_cache` sets this up for `bild.generate`.
"""
import torch

from .model import T5, KVCache, check_ids


class EarlyExitCache:
    """The decoder cache a large model shares with its early-exit model (its first `exit_layer` layers).

    `kv` is the large model's KVCache. Its first `length` positions have been through every layer; the first
    `exit_length` >= length positions have been through the first exit_layer layers, whose keys/values sit
    in kv's buffers, their output in `exit_hidden` and the ids they consumed in `exit_ids`. This object is
    the large model's view of the cache (its `length`, its `crop`); `exit_view` is the early-exit model's.
    """

    def __init__(self, kv: KVCache, exit_layer: int, d_model: int):
        B, like = kv.cross_bias.shape[0], kv.cross_keys[0]
        self.kv, self.exit_layer = kv, exit_layer
        self.exit_length = 0
        self.exit_hidden = like.new_zeros(B, kv.capacity, d_model)  # (B, capacity, d_model), grown with kv
        self.exit_ids = torch.zeros(B, kv.capacity, dtype=torch.long, device=like.device)  # (B, capacity)
        self.exit_view = ExitView(self)

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def cross_bias(self):
        return self.kv.cross_bias

    def reserve(self, end: int):
        """Make room for positions up to end - 1 in kv's buffers and in exit_hidden and exit_ids."""
        self.kv.reserve(end)
        extra = self.kv.capacity - self.exit_ids.shape[1]
        if extra > 0:
            self.exit_hidden = torch.cat([self.exit_hidden, self.exit_hidden.new_zeros(
                self.exit_hidden.shape[0], extra, self.exit_hidden.shape[2])], 1)
            self.exit_ids = torch.cat([self.exit_ids, self.exit_ids.new_zeros(self.exit_ids.shape[0], extra)], 1)

    def keep_rows(self, rows):
        """Keep only the batch rows at these indices (B',), in this order; the others leave the batch."""
        self.kv.keep_rows(rows)
        self.exit_hidden, self.exit_ids = self.exit_hidden.index_select(0, rows), self.exit_ids.index_select(0, rows)

    def crop(self, n: int):
        """Keep the first n positions, in every layer (n <= length <= exit_length)."""
        self.kv.crop(n)
        self.exit_length = n

    def positions(self, start: int, T: int):
        # Only reached when T5.decode is given this cache: it would recompute the first layers and leave
        # exit_hidden and exit_ids describing other tokens.
        raise TypeError("an EarlyExitCache is decoded by its EarlyExit model and by that model's shared_large, "
                        "not by T5.decode")


class ExitView:
    """The early-exit model's view of an EarlyExitCache: it holds the positions the first layers hold."""

    def __init__(self, cache: EarlyExitCache):
        self.cache = cache

    @property
    def length(self) -> int:
        return self.cache.exit_length

    @property
    def cross_bias(self):
        return self.cache.cross_bias

    def keep_rows(self, rows):
        """Keep only these batch rows (minibild.greedy drops finished rows): of the whole shared cache."""
        self.cache.keep_rows(rows)

    def crop(self, n: int):
        if not 0 <= n <= self.length:
            raise ValueError(f"crop({n}): the early-exit layers hold {self.length} positions; n must be in "
                             f"[0, {self.length}]")
        # A position dropped from the first layers is dropped from the top ones, which were computed from it.
        self.cache.kv.crop(min(self.cache.length, n))
        self.cache.exit_length = n


def check_exit_layer(large: T5, exit_layer: int):
    """An early exit needs at least one decoder layer below it and one above."""
    n = large.config.num_decoder_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < n:
        raise ValueError(f"exit_layer must be in [1, {n - 1}] for a model of {n} decoder layers, got {exit_layer!r}")


class EarlyExit:
    """BiLD's early-exit small model: `large`'s first `exit_layer` decoder layers, then its final norm and LM head."""

    def __init__(self, large: T5, exit_layer: int):
        check_exit_layer(large, exit_layer)
        self.large, self.exit_layer = large, exit_layer
        self.config, self.embed = large.config, large.embed  # what makes it a valid BiLD partner
        self.shared_large = SharedCacheLarge(self)

    def encode(self, input_ids, attention_mask=None):
        return self.large.encode(input_ids, attention_mask)

    def new_cache(self, encoder_output, attention_mask=None, max_length: int = 512) -> ExitView:
        """A cache of its own, for decoding alone (greedy)."""
        return self.new_shared_cache(encoder_output, attention_mask, max_length).exit_view

    def new_shared_cache(self, encoder_output, attention_mask=None, max_length: int = 512) -> EarlyExitCache:
        """An empty cache for this model (through its exit_view) and its large model (through shared_large)."""
        kv = self.large.new_cache(encoder_output, attention_mask, max_length)
        return EarlyExitCache(kv, self.exit_layer, self.config.d_model)

    def share_cache(self, input_ids, max_length: int) -> tuple["SharedCacheLarge", EarlyExitCache, ExitView]:
        """For BiLD: one encoder pass and one cache -> (the large model as it decodes on that cache, its view of
        the cache, this model's view of it)."""
        cache = self.new_shared_cache(self.shared_large.encode(input_ids), max_length=max_length)
        return self.shared_large, cache, cache.exit_view

    def decode(self, decoder_input_ids, view: ExitView):
        """Feed T >= 1 new tokens after the view's positions -> logits (B, T, V) at the exit layer."""
        check_ids("decoder_input_ids", decoder_input_ids)
        return self.head(self.run_exit_layers(decoder_input_ids, view.cache))

    def run_exit_layers(self, ids, cache: EarlyExitCache):
        """Run the first exit_layer layers over new positions exit_length..; keep their output and ids."""
        decoder, start, T = self.large.decoder, cache.exit_length, ids.shape[1]
        cache.reserve(start + T)
        h = decoder.run_layers(decoder.dropout(self.embed(ids)), cache.kv, start, range(self.exit_layer))
        cache.exit_hidden[:, start:start + T] = h  # (B, T, d_model)
        cache.exit_ids[:, start:start + T] = ids
        cache.exit_length = start + T
        return h

    def head(self, h):
        """Output of a decoder layer (B, T, d_model) -> logits, through the large model's final norm and head."""
        decoder = self.large.decoder
        return self.large.logits(decoder.dropout(decoder.final_norm(h)))


class SharedCacheLarge:
    """The large model as it decodes on an EarlyExitCache: BiLD's large model when the small one is an
    EarlyExit. Positions the first exit_layer layers already ran start at the exit layer from their stored
    output; new positions go through the first layers too, which records them for the early-exit model."""

    def __init__(self, early_exit: EarlyExit):
        self.early_exit = early_exit
        self.large = early_exit.large
        self.config, self.embed = self.large.config, self.large.embed

    def encode(self, input_ids, attention_mask=None):
        return self.large.encode(input_ids, attention_mask)

    def decode(self, decoder_input_ids, cache: EarlyExitCache):
        """Feed T >= 1 new tokens after the cache's `length` positions -> the large model's logits (B, T, V)."""
        check_ids("decoder_input_ids", decoder_input_ids)
        P, T = cache.length, decoder_input_ids.shape[1]
        ran = min(cache.exit_length - P, T)  # how many of these positions the first layers already ran
        check_same_ids(decoder_input_ids[:, :ran], cache.exit_ids[:, P:P + ran], P)
        if ran < T:
            self.early_exit.run_exit_layers(decoder_input_ids[:, ran:], cache)
        decoder = self.large.decoder
        h = decoder.run_layers(cache.exit_hidden[:, P:P + T], cache.kv, P, range(cache.exit_layer, len(decoder.layers)))
        cache.kv.length = P + T  # every layer has written positions P..P+T-1
        return self.early_exit.head(h)  # the early-exit model's head is the large model's


def check_same_ids(given, consumed, start: int):
    """The first layers' output at a position is only valid for the id they consumed there."""
    differ = given != consumed  # (B, ran)
    if differ.any():
        row, i = differ.nonzero()[0].tolist()
        raise ValueError(f"decoder_input_ids at position {start + i} (row {row}) is {given[row, i].item()}, but the "
                         f"early-exit layers ran that position on id {consumed[row, i].item()}: crop the cache to "
                         f"{start + i} before feeding other tokens there")
