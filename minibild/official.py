"""The official BiLD implementation's policy, written as minibild's loop: what its code outputs, call for call.

The official code (github.com/kssteven418/BigLittleDecoder, class T5BiLDModel, run as T5BiLDModel(...).eval()
and .generate(input_ids, max_new_tokens=M, num_beams=1, do_sample=False)) decodes greedily like bild.generate,
with these differences, each named again in a comment where it acts below:

- D1: a large call examines only the FIRST pending token whose cross-entropy exceeds the rollback threshold. If
  the large model's argmax there is the small model's token itself, nothing is rolled back and the later pending
  tokens are not examined (bild.generate rejects the first token that differs AND exceeds the threshold).
- D2: when the small model emits EOS, decoding stops: the pending tail is never verified.
- D2c: likewise when the length cap is reached in a small phase.
- D3: after a rollback the large model runs once more, over everything its cache lacks (its rolled-back call is
  discarded with its cache entries), before handing back to the small model.
- A defect, the EOS defect: when a rollback's correction is EOS, nothing checks it; D3's extra call appends a
  token after that EOS and decoding goes on (6 of 600 recorded runs on the shipped pairs).
- The re-feed (wasted work, same output): a small call that falls back is discarded with its cache entries, so
  the next small phase feeds those positions again. The trace shows it: that call's `fed` starts where the
  fallen-back call started, one step per decoder call as the official code calls.
- Thresholds: the official constructor reads `fallback_threshold or 0.6` and `rollback_threshold or 5.0`, so a 0
  silently becomes the default (rollback 0, exactly the large model's greedy output, cannot be asked for). That is
  a trap of its API, not part of its policy: here 0 means 0.

The trace holds ordinary SmallStep and LargeStep records (trace.py), one per decoder call, in call order, with
bild.generate's labels. Where the official loop's decision has no label of its own, the closest one is used:
- a small step that stops decoding at EOS or the cap (D2, D2c) is "end", also when it is the N-th pending token
  (bild would say "handover"); here "end" means decoding stops unverified, not that a large call follows;
- the large call after a rollback (D3) is an ordinary large step: fed is everything the large cache lacks (the
  last verified token, the accepted tokens again, the correction), cross_entropy covers fed[1:] (the correction
  included), and it is "accept" (or "rollback") by the official rule, appending its prediction beyond, after an
  EOS too (the EOS defect);
- a large call where D1 keeps a token above the threshold because the argmax equals it is "accept".
The counts (BiLDStats) are read off the trace as for bild.generate: large_calls and small_calls equal the official
model's forward calls; a rollback's rejected tokens, and the accepted ones it re-feeds, count as in bild.
"""
import math

import torch

from . import bild
from .bild import BiLDResult, BiLDStats, LargeStep, SmallStep, ended, feed, new_caches, propose, verify
from .early_exit import EarlyExit
from .model import T5


@torch.inference_mode()
def generate(large: T5, small: T5, input_ids, *, fallback_threshold: float, rollback_threshold: float,
             max_small_steps: int, max_new_tokens: int) -> BiLDResult:
    """Decode one source (1, S) as the official T5BiLDModel.generate does, greedily: its tokens (the EOS defect
    included) and one trace step per decoder call it makes. Every setting is required: the official defaults
    differ between its class and its script, and its constructor turns a 0 into its default."""
    if isinstance(small, EarlyExit):
        raise ValueError("official.generate: the official implementation has no early-exit small model; give a "
                         "separate small T5")
    bild.check_source(large, small, input_ids)
    bild.check_settings(fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens)
    eos = large.config.eos_token_id
    large, large_cache, small_cache = new_caches(large, small, input_ids, max_new_tokens)
    y = [large.config.decoder_start_token_id]
    trace = []

    while True:
        # Large phase: one call over every token the large cache lacks; its pending tokens are all but the first.
        start, fed, logits = feed(large, large_cache, y)
        numbers = verify(list(y), start + 1, start, fed, logits, math.inf, None, max_new_tokens)  # on a copy of y
        step = decide_large(y, start, fed, numbers.argmax, numbers.cross_entropy, rollback_threshold, max_new_tokens)
        trace.append(step)
        if step.decision == "rollback":
            # The official loop discards the rolled-back call with its cache entries, then crops both caches to the
            # kept prefix (the large one holds less already).
            large_cache.crop(start)
            small_cache.crop(min(small_cache.length, step.rollback_at))
            # D3: the large model runs again before the small model resumes. The EOS defect: nothing checks whether
            # the correction is EOS, so that call appends a token after it and decoding goes on.
            continue
        if ended(y, eos, max_new_tokens):
            break
        verified = len(y)

        # Small phase, one call per token.
        while True:
            start, fed, logits = feed(small, small_cache, y)
            proposal = propose(list(y), verified, start, fed, logits, 0.0, max_small_steps, eos, max_new_tokens)
            step = decide_small(y, verified, start, fed, proposal.token, proposal.prob, fallback_threshold,
                                max_small_steps, eos, max_new_tokens)
            if step.decision == "fallback":
                # The re-feed: the official loop discards a fallen-back call with its cache entries, so the next
                # small call feeds those positions again.
                small_cache.crop(start)
            trace.append(step)
            if step.decision != "pending":
                break
        if step.decision == "end":
            break

    return BiLDResult(y[1:], BiLDStats.of(trace), trace)


def decide_large(y: list[int], start: int, fed: list[int], argmax: list[int], cross_entropy: list[float],
                 rollback_threshold: float, max_new_tokens: int) -> LargeStep:
    """The official large call's rule on the numbers it gave (as bild.decide_large's), applied to y in place. The
    large model was fed y[start:]; all but the first token fed are pending (after a rollback: the accepted tokens
    again, and the correction)."""
    above = [i for i, ce in enumerate(cross_entropy) if ce > rollback_threshold]
    # D1: only the first pending token above the threshold is examined; if the large model's argmax there is the
    # small model's token, nothing is rolled back and the later pending tokens are not examined.
    examined = bool(above) and argmax[above[0]] != fed[1 + above[0]]
    # The EOS defect: no EOS check (eos None) before the large model's prediction beyond is appended.
    return bild.decide_large(y, start + 1, start, fed, argmax, cross_entropy,
                             rollback_threshold if examined else math.inf, None, max_new_tokens)


def decide_small(y: list[int], verified: int, start: int, fed: list[int], token: int, prob: float,
                 fallback_threshold: float, max_small_steps: int, eos: int, max_new_tokens: int) -> SmallStep:
    """The official small call's rule on the small model's argmax and its probability (as bild.decide_small's),
    applied to y in place. "end" here means decoding stops, unverified."""
    step = bild.decide_small(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos,
                             max_new_tokens)
    if step.decision == "handover" and ended(y, eos, max_new_tokens):
        step.decision = "end"  # D2 and D2c: at EOS or the cap decoding stops, also at the N-th pending token
    return step
