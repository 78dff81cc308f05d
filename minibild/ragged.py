"""A decoder cache in which every row holds its own number of positions, for batched BiLD (batch.py).

In batched BiLD each row has its own output y, so its cache holds its own number of positions, and a call
feeds each row its own number of tokens. `RaggedKVCache` keeps KVCache's buffers (B, H, max_length, D) per
layer and one length per row, `lengths` (B,). `decode(model, cache, rows, ids, fed)` runs one decoder call
over some of the rows:

- Inputs: ids (A, T) right-padded, fed (A,) how many of row a's ids are real. Row a's query i sits at
  position lengths[row a] + i, its relative position bias is taken from its own positions, and its causal
  mask hides every key past its own position. Logits come back (A, T, V); only row a's first fed[a] are real.
- Writes: each row's real keys/values go to its own positions, lengths[row] .. lengths[row] + fed - 1.
  Padding slots write nothing, so no valid entry is ever overwritten, whatever the rows' lengths.
- Reads: the call reads every row's keys at 0 .. K-1, K = the longest row's new end. A row shorter than K
  holds stale entries (dropped by a crop) or zeros past its end; its real queries never see them, because
  each real query's causal mask hides every key past its own position, and the row's positions end there.
  A padding slot sits at its row's last real position, so it looks no further than K either; its output is
  garbage that nobody reads.
- crop(row, n) keeps one row's first n positions; the others are untouched.

Rows not in a call are neither read nor written: a call over some rows gathers (copies) their keys and
values; a call over every row, in order, reads the buffers in place. keep_rows(rows) drops finished rows.
"""
import torch

from .model import T5, KVCache


class RaggedKVCache:
    """A KVCache's buffers with one length per row. Made from an empty KVCache for the batch (T5.new_cache)."""

    def __init__(self, kv: KVCache):
        if kv.length != 0:
            raise ValueError(f"RaggedKVCache needs an empty KVCache, got one holding {kv.length} positions")
        for buffer in kv.keys + kv.values:
            # A masked key's weight is exactly 0, but 0 * NaN is NaN: no position may hold garbage from new_empty.
            buffer.zero_()
        self.kv, self.max_length = kv, kv.max_length
        self.lengths = torch.zeros(kv.cross_bias.shape[0], dtype=torch.long, device=kv.cross_bias.device)  # (B,)

    def keep_rows(self, rows: list[int]):
        """Keep only these rows, in this order; the others leave the cache."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.kv.keep_rows(index)
        self.lengths = self.lengths[index]

    def crop(self, row: int, n: int):
        """Keep row's first n decoder positions, dropping the rest; other rows are untouched."""
        length = self.lengths[row].item()
        if not 0 <= n <= length:
            raise ValueError(f"crop({row}, {n}): row {row} holds {length} positions; n must be in [0, {length}]")
        self.lengths[row] = n


class RaggedCall:
    """One call's view of a RaggedKVCache: the interface the decoder's layers use (positions, update and the
    cross-attention keys/values), over the rows of the call only."""

    def __init__(self, cache: RaggedKVCache, rows, fed):
        self.cache, self.rows, self.fed = cache, rows, fed  # (A,) each
        self.start = cache.lengths[rows]  # (A,): each row's first new position
        self.key_length = int((self.start + fed).max())  # the longest row's new end: keys 0..key_length-1
        if self.key_length > cache.max_length:
            raise ValueError(f"RaggedKVCache holds at most {cache.max_length} decoder positions, asked for "
                             f"{self.key_length}: make the cache with a larger max_length")
        kv = cache.kv
        # A call over every row in order reads the buffers themselves; a call over some rows gathers (copies) theirs.
        self.every_row = len(rows) == len(cache.lengths) and bool((rows == torch.arange(len(rows), device=rows.device)).all())
        self.cross_keys = [self.gather(k) for k in kv.cross_keys]  # per layer (A, H, S, D)
        self.cross_values = [self.gather(v) for v in kv.cross_values]
        self.cross_bias = self.gather(kv.cross_bias)  # (A, 1, 1, S)
        T = int(fed.max())
        slot = torch.arange(T, device=rows.device)
        self.real_row, self.real_slot = (slot < fed[:, None]).nonzero(as_tuple=True)  # (n,) each: the real slots

    def gather(self, buffer):
        """The call's rows of a (B, ...) buffer: the buffer itself when the call holds every row."""
        return buffer if self.every_row else buffer[self.rows]

    def positions(self, start, T: int):
        """Row a's query i sits at start[a] + i; a padding slot at its row's last real position, so that no
        query looks past key_length -> positions (A, T), key_length."""
        slot = torch.arange(T, device=start.device)
        return start[:, None] + torch.minimum(slot, self.fed[:, None] - 1), self.key_length

    def update(self, layer: int, start, k, v):
        """Write the real slots' keys/values (A, H, T, D) at their rows' own positions; padding slots write
        nothing. Return the call's rows' keys/values at 0..key_length-1, (A, H, key_length, D) each."""
        rows, position = self.rows[self.real_row], start[self.real_row] + self.real_slot  # (n,) each
        keys, values = self.cache.kv.keys[layer], self.cache.kv.values[layer]  # (B, H, max_length, D)
        keys[rows, :, position] = k[self.real_row, :, self.real_slot]  # (n, H, D)
        values[rows, :, position] = v[self.real_row, :, self.real_slot]
        return self.gather(keys)[:, :, :self.key_length], self.gather(values)[:, :, :self.key_length]


def decode(model: T5, cache: RaggedKVCache, rows, ids, fed):
    """Feed row rows[a] of the cache its tokens ids[a, :fed[a]] after the positions it holds -> logits (A, T, V),
    of which row a's first fed[a] are real. rows (A,) distinct, ids (A, T) right-padded, fed (A,) >= 1."""
    if not ((fed >= 1) & (fed <= ids.shape[1])).all():
        raise ValueError(f"fed must give each row 1 to {ids.shape[1]} tokens (ids' width), got {fed.tolist()}")
    call = RaggedCall(cache, rows, fed)
    decoder = model.decoder
    h = decoder.run_layers(decoder.dropout(model.embed(ids)), call, call.start, range(len(decoder.layers)))
    cache.lengths[rows] += fed
    return model.logits(decoder.dropout(decoder.final_norm(h)))
