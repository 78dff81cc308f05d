"""Batched BiLD: many sources decoded together, every row exactly as `bild.generate` decodes it alone.

Rows are independent: batching changes when work happens, never what is decided. Each row keeps its own
output y, its own count of verified tokens and its own trace, and takes bild.verify's and bild.propose's
decisions on its own logits, so row i's tokens, stats and trace are those of bild.generate on row i alone
(its unpadded source). Both models' caches are RaggedKVCaches (ragged.py): each row holds its own number of
positions, a call feeds each row its own tokens at its own positions, and a rollback crops one row.

Schedule, in rounds. A row is waiting for the large model, in its small phase, or finished. Each round:
1. one large-model call over every unfinished row (all are waiting for it), each fed the tokens its large
   cache lacks (its last verified token and its pending ones); each row accepts or rolls back, then either
   finishes or starts its small phase;
2. small-model calls, one per step, over the rows still in their small phase, each fed the tokens its small
   cache lacks; a row whose phase ends (fallback, handover, EOS or the cap) waits for the next round.
So every large call holds every unfinished row: the large model, the expensive one, is called as few times
as the row that needs the most large calls needs, with as many rows as possible. A finished row leaves both
caches after the large call, so the large call reads the caches in place. A call's linear layers and LM head
see only the real tokens, packed; only attention groups them by row, padded to the longest row, and a small
call over most rows lets the waiting ones ride along idle in attention rather than copy the others' caches
(ragged.py).

Like bild.generate, an early-exit small model is batch-1 only (its shared cache has one length). Outputs
match bild.generate's exactly in tokens, decisions and stats; a probability or cross-entropy in the trace
can differ from batch-1's in its last bits (a batched matmul sums in another order), which in float64 moves
no decision in practice; the tests compare those floats to 1e-9 relative.
"""
from dataclasses import dataclass, field

import torch

from . import ragged
from .bild import (FALLBACK_THRESHOLD, MAX_NEW_TOKENS, MAX_SMALL_STEPS, ROLLBACK_THRESHOLD, BiLDResult, BiLDStats,
                   check_pair, check_settings, ended, propose, verify)
from .early_exit import EarlyExit
from .model import T5, check_sources
from .observed import Observed


@dataclass
class Row:
    """One source's decoding state: bild.generate's local variables, kept per row."""
    y: list[int]  # decoder-start token first
    verified: int = 1  # y[:verified] is final; y[verified:] is pending
    state: str = "large"  # "large": waiting for the large model; "small": in its small phase; "done"
    trace: list = field(default_factory=list)


@torch.inference_mode()
def generate_batch(large: T5, small: T5, input_ids, attention_mask=None, *,
                   fallback_threshold: float = FALLBACK_THRESHOLD, rollback_threshold: float = ROLLBACK_THRESHOLD,
                   max_small_steps: int = MAX_SMALL_STEPS, max_new_tokens: int = MAX_NEW_TOKENS) -> list[BiLDResult]:
    """BiLD-decode a batch of sources (B, S), right-padded as attention_mask (B, S) says (1 for tokens, 0 for
    padding; None: no padding) -> one BiLDResult per row, equal to bild.generate's on that row alone."""
    attention_mask = check_batch(large, small, input_ids, attention_mask)
    check_settings(fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens)
    eos = large.config.eos_token_id
    models = {"large": large, "small": small}
    # As in bild.generate: a large call that verifies a tail ending at the cap feeds max_new_tokens + 1 positions.
    caches = {name: ragged.RaggedKVCache(model.new_cache(model.encode(input_ids, attention_mask), attention_mask,
                                                         max_length=max_new_tokens + 1))
              for name, model in models.items()}
    results = [Row([large.config.decoder_start_token_id]) for _ in range(input_ids.shape[0])]
    rows = list(results)  # the unfinished rows, in the caches' order: row b is the caches' row b

    def call(name: str):
        """One call of the named model over the rows in that state; each row then takes its decision."""
        batch = [b for b, row in enumerate(rows) if row.state == name]
        for b, (start, fed, logits) in zip(batch, feed(models[name], caches[name], rows, batch)):
            row = rows[b]
            if name == "large":
                step = verify(row.y, row.verified, start, fed, logits, rollback_threshold, eos, max_new_tokens)
                if step.decision == "rollback":  # both caches keep y[:j] at most, in this row
                    caches["large"].crop(b, step.rollback_at)
                    caches["small"].crop(b, min(caches["small"].lengths[b], step.rollback_at))
                row.verified = len(row.y)
                row.state = "done" if ended(row.y, eos, max_new_tokens) else "small"
            else:
                step = propose(row.y, row.verified, start, fed, logits, fallback_threshold, max_small_steps, eos,
                               max_new_tokens)
                row.state = "small" if step.decision == "pending" else "large"
            row.trace.append(step)

    while rows:
        call("large")  # every unfinished row: none is in its small phase here
        going = [b for b, row in enumerate(rows) if row.state != "done"]
        if len(going) < len(rows):  # finished rows leave both caches, so that no call gathers them again
            for cache in caches.values():
                cache.keep_rows(going)
            rows = [rows[b] for b in going]
        while any(row.state == "small" for row in rows):
            call("small")  # a row whose phase ended waits for the next large call
    return [BiLDResult(row.y[1:], BiLDStats.of(row.trace), row.trace) for row in results]


def feed(model: T5, cache: ragged.RaggedKVCache, rows: list[Row], batch: list[int]):
    """One call feeding each row b in batch the tokens of its y its cache lacks -> per row (their start position,
    them, their logits (T_b, V)), as bild.generate's feed gives them for one row."""
    starts = [cache.lengths[b] for b in batch]
    fed = [rows[b].y[start:] for b, start in zip(batch, starts)]
    # An observed model (observed.py) sees the call; ragged.decode runs the model's layers directly.
    logits = model.decode_rows(cache, batch, fed) if isinstance(model, Observed) else ragged.decode(model, cache,
                                                                                                  batch, fed)
    return zip(starts, fed, logits)


def right_pad(sources, pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources (token lists or 1-D tensors) -> input_ids (B, S) right-padded with pad_token_id, and the
    attention_mask (B, S) generate_batch and greedy take: 1 for tokens, 0 for padding."""
    ids = torch.full((len(sources), max(map(len, sources))), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, src in enumerate(sources):
        ids[i, :len(src)], mask[i, :len(src)] = torch.as_tensor(src), 1
    return ids.to(device), mask.to(device)


def check_batch(large: T5, small: T5, input_ids, attention_mask):
    """generate_batch's models and inputs, checked before any model runs -> the attention mask (all ones if None)."""
    if isinstance(small, EarlyExit):
        raise ValueError("an early-exit small model is batch-1 only: use bild.generate, one source at a time")
    check_pair(large, small)
    check_sources(input_ids, attention_mask, large.config.vocab_size)
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask
