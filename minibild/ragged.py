"""A decoder cache in which every row holds its own number of positions, for batched BiLD (batch.py).

In batched BiLD each row has its own output y, so its cache holds its own number of positions, and a call
feeds each row its own number of tokens. `RaggedKVCache` keeps KVCache's buffers (B, H, capacity, D) per
layer and one length per row, `lengths` (a list of B ints, kept on the host). `decode(model, cache, rows,
tokens)` runs one decoder call over some of the rows:

- Inputs: tokens[a], the fed[a] >= 1 tokens for row rows[a]. They travel packed, (1, n) with n = sum of fed,
  so linear layers and the LM head work on real tokens only; attention regroups them by row, (A, T) with T
  = max fed, a row's padding slots repeating its last token. Row a's query i sits at position
  lengths[row a] + i, its relative position bias is taken from its own positions, and its causal mask hides
  every key past its own position. Logits come back per row, (fed[a], V).
- Writes: each row's real keys/values go to its own positions, lengths[row] .. lengths[row] + fed - 1.
  Padding slots write nothing, so no valid entry is ever overwritten, whatever the rows' lengths.
- Reads: the call reads every row's keys at 0 .. K-1, K = the longest row's new end. A row shorter than K
  holds stale entries (dropped by a crop) or zeros past its end; its real queries never see them, because
  each real query's causal mask hides every key past its own position, and the row's positions end there.
  A padding slot repeats its row's last real token at that token's position, so it looks no further than K
  either; its output is dropped when attention packs its output back.
- crop(row, n) keeps one row's first n positions; the others are untouched.

Rows not in a call are never written. A call fed fewer than half the rows gathers (copies) their keys and
values; a call fed more reads the buffers in place, the rows it does not feed riding along idle (their
attention is computed and dropped): on the CPU, gathering a few rows costs less than idle ones, and many
rows more. keep_rows(rows) drops finished rows.
"""
import torch

from .model import T5, KVCache


class RaggedKVCache:
    """A KVCache's buffers with one length per row. Made from an empty KVCache for the batch (T5.new_cache)."""

    def __init__(self, kv: KVCache):
        if kv.length != 0:
            raise ValueError(f"RaggedKVCache needs an empty KVCache, got one holding {kv.length} positions")
        # A masked key's weight is exactly 0, but 0 * NaN is NaN: no position may hold garbage. KVCache's
        # unwritten positions hold zeros, also after it grows.
        self.kv, self.max_length = kv, kv.max_length
        self.lengths = [0] * kv.cross_bias.shape[0]  # decoder positions held, per row (kept on the host)

    def keep_rows(self, rows: list[int]):
        """Keep only these rows, in this order; the others leave the cache."""
        self.kv.keep_rows(torch.tensor(rows, dtype=torch.long, device=self.kv.cross_bias.device))
        self.lengths = [self.lengths[b] for b in rows]

    def crop(self, row: int, n: int):
        """Keep row's first n decoder positions, dropping the rest; other rows are untouched."""
        length = self.lengths[row]
        if not 0 <= n <= length:
            raise ValueError(f"crop({row}, {n}): row {row} holds {length} positions; n must be in [0, {length}]")
        self.lengths[row] = n


class RaggedCall:
    """One call's view of a RaggedKVCache: the interface the decoder's layers use (positions, update and the
    cross-attention keys/values), over the call's rows.

    The call's tokens travel packed: the hidden states hold only the real tokens, (1, n, d_model), n = sum of
    fed, row after row, so that the linear layers and the LM head compute nothing for padding. Attention
    regroups them by row, (A, T, ...) with T = max fed, with by_row, and packs its output back with pack.

    A call fed at least half the cache's rows reads the buffers in place: its rows are all the cache's rows, and
    a row it does not feed rides along idle (its attention is computed, and dropped). A call fed fewer rows
    gathers (copies) their keys and values: copying a few rows costs less than many idle ones, and copying
    many more than a few idle ones.
    The index tensors are built on the host from Python lists: a call costs no device synchronisation."""

    def __init__(self, cache: RaggedKVCache, fed: dict[int, int]):
        B = len(cache.lengths)
        self.in_place = 2 * len(fed) >= B
        rows = list(range(B)) if self.in_place else sorted(fed)  # the call's rows, in the cache's order
        counts = [fed.get(b, 0) for b in rows]  # tokens fed per call row; 0: idle
        starts = [cache.lengths[b] for b in rows]  # each row's first new position
        self.key_length = max(s + f for s, f in zip(starts, counts))  # the longest row's new end: keys 0..key_length-1
        cache.kv.reserve(self.key_length)  # grows the buffers (B, H, capacity, D) when needed
        device, (A, T) = cache.kv.cross_bias.device, (len(rows), max(counts))
        self.cache, self.shape, self.row_list, self.counts = cache, (A, T), rows, counts
        self.rows, self.start = torch.tensor(rows, device=device), torch.tensor(starts, device=device)  # (A,) each
        # A padding slot repeats its row's last real token: same query, same position, output never read. An idle
        # row's slots repeat some packed token at the row's last held position (start - 1), their output never read.
        slot_of = [[min(i, f - 1) for i in range(T)] for f in counts]
        self.slot_of = torch.tensor(slot_of, device=device)  # (A, T)
        self.real_rows = torch.tensor([b for b, f in zip(rows, counts) for _ in range(f)], device=device)  # (n,)
        self.real_positions = torch.tensor([s + i for s, f in zip(starts, counts) for i in range(f)], device=device)
        self.uniform = min(counts) == T  # every row fed T tokens: no padding, and packing is a reshape
        if not self.uniform:  # by_row and pack regroup the packed tokens through these
            firsts = [sum(counts[:a]) for a in range(A)]  # where row a's tokens begin in the packed tokens
            self.packed_index = torch.tensor([[max(first + i, 0) for i in row] for first, row in zip(firsts, slot_of)],
                                             device=device).view(-1)  # (A*T,): the packed token each slot reads
            self.real_index = torch.tensor([a * T + i for a, f in enumerate(counts) for i in range(f)],
                                           device=device)  # (n,): the real slots, in (A*T,)
        kv = cache.kv
        self.cross_keys = [self.gather(k) for k in kv.cross_keys]  # per layer (A, H, S, D)
        self.cross_values = [self.gather(v) for v in kv.cross_values]
        self.cross_bias = self.gather(kv.cross_bias)  # (A, 1, 1, S)
        self.packed = self  # tells the decoder's layers that their tokens are packed

    def gather(self, buffer):
        """The call's rows of a (B, ...) buffer: the buffer itself when the call reads in place."""
        return buffer if self.in_place else buffer.index_select(0, self.rows)

    def by_row(self, x):
        """Packed tokens (1, n, C) -> (A, T, C), row a's real tokens first, then copies."""
        return (x if self.uniform else x[0].index_select(0, self.packed_index)).view(*self.shape, -1)

    def pack(self, x):
        """(A, T, C) -> the real slots only, packed (1, n, C)."""
        x = x.reshape(1, -1, x.shape[-1])
        return x if self.uniform else x[0].index_select(0, self.real_index)[None]

    def positions(self, start, T: int):
        """Row a's query i sits at start[a] + i; a copy at the position of the token it repeats (an idle row's at
        start[a] - 1), so that no query looks past key_length -> positions (A, T), key_length."""
        return start[:, None] + self.slot_of, self.key_length

    def update(self, layer: int, start, k, v):
        """Write the packed tokens' keys/values (1, H, n, D) at their rows' own positions. Return the call's rows'
        keys/values at 0..key_length-1, (A, H, key_length, D) each."""
        keys, values = self.cache.kv.keys[layer], self.cache.kv.values[layer]  # (B, H, capacity, D)
        keys[self.real_rows, :, self.real_positions] = k[0].transpose(0, 1)  # (n, H, D)
        values[self.real_rows, :, self.real_positions] = v[0].transpose(0, 1)
        return self.gather(keys[:, :, :self.key_length]), self.gather(values[:, :, :self.key_length])


def decode(model: T5, cache: RaggedKVCache, rows: list[int], tokens: list[list[int]]) -> list[torch.Tensor]:
    """Feed row rows[a] of the cache the tokens tokens[a] after the positions it holds -> their logits, per row
    (len(tokens[a]), V). rows distinct; every row is fed at least one token; the other rows are untouched."""
    if len(rows) != len(tokens) or not all(tokens) or len(set(rows)) != len(rows):
        raise ValueError(f"decode needs distinct rows and one non-empty token list per row: rows {rows}, token "
                         f"counts {list(map(len, tokens))}")
    if not all(0 <= b < len(cache.lengths) for b in rows):
        raise ValueError(f"decode was given rows {rows}; the cache holds rows 0..{len(cache.lengths) - 1}")
    fed = dict(zip(rows, tokens))
    call = RaggedCall(cache, {b: len(t) for b, t in fed.items()})
    order = [b for b in call.row_list if b in fed]  # the packed tokens go in the call's row order
    ids = torch.tensor([t for b in order for t in fed[b]], device=call.start.device)[None]  # (1, n)
    decoder = model.decoder
    h = decoder.run_layers(decoder.dropout(model.embed(ids)), call, call.start, range(len(decoder.layers)))
    logits = model.logits(decoder.dropout(decoder.final_norm(h)))[0].split([len(fed[b]) for b in order])
    for b in rows:
        cache.lengths[b] += len(fed[b])
    by_row = dict(zip(order, logits))
    return [by_row[b] for b in rows]  # per row (len(tokens[a]), V)
