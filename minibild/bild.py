"""Big Little Decoder (BiLD): a small model drafts tokens, a large model verifies and corrects them.

Kim et al., "Speculative Decoding with Big Little Decoder", NeurIPS 2023 (arXiv 2302.07863).
Greedy decoding, batch size 1 (batch.py decodes many sources at once, each row as here). The loop, in the
paper's words:

1. Encode the source once with each model's encoder.
2. The large model produces the first token (a large phase with nothing pending).
3. Until y ends with EOS or holds max_new_tokens new tokens:
   a. Small phase: the small model appends its argmax to y as a *pending* token, one call per token.
      Its top probability below the fallback threshold: *fallback*, the token is discarded. The phase
      also ends after max_small_steps (N) pending tokens (*handover*), at EOS, or at the length cap.
   b. Large phase: ONE large-model call over every token it has not seen (the last verified token
      and all pending ones) gives p_L[j] at each pending position j and one position beyond. Pending
      y_j is rejected when y_j != argmax p_L[j] and -log p_L[j](y_j) > rollback threshold. At the
      first rejected j: *rollback*, y is cut before y_j and argmax p_L[j] appended. Otherwise all
      pending tokens are accepted and the large model's prediction beyond is appended (unless y ends
      with EOS or is at the cap). Control then returns to the small model.

Positions: y[0] is the decoder-start token and y[p] is fed at decoder position p, so a cache of
length n holds y[:n]. Each call feeds its model exactly the tokens of y its cache does not hold;
after a rollback both caches are cropped to the kept prefix, so nothing is ever recomputed.
Every call is one step of the trace (trace.py); the counts (BiLDStats) are read off the trace.
Sampling at a temperature with the same loop, exact in distribution: sampling.py (bild_sample).
"""
from dataclasses import dataclass

import torch

from .early_exit import EarlyExit
from .generate import check_count, check_eval, check_one_source
from .model import T5
# The trace's types and forms live in trace.py; the CLI, the scripts and the tests take them from here too.
from .trace import BiLDStats, LargeStep, SmallStep, format_trace, trace_from_jsonl, trace_to_jsonl  # noqa: F401

# The official implementation's defaults; the CLI, modes.Mode and the scripts take theirs from here.
FALLBACK_THRESHOLD = 0.6  # alpha_FB
ROLLBACK_THRESHOLD = 5.0  # alpha_RB
MAX_SMALL_STEPS = 10  # N
MAX_NEW_TOKENS = 128


@dataclass
class BiLDResult:
    tokens: list[int]  # without the decoder-start token; EOS included when produced
    stats: BiLDStats  # read off the trace
    trace: list[SmallStep | LargeStep]  # one step per model call, in order


@torch.inference_mode()
def generate(large: T5, small: T5, input_ids, *, fallback_threshold: float = FALLBACK_THRESHOLD,
             rollback_threshold: float = ROLLBACK_THRESHOLD, max_small_steps: int = MAX_SMALL_STEPS,
             max_new_tokens: int = MAX_NEW_TOKENS) -> BiLDResult:
    """BiLD-decode one source (1, S). fallback_threshold > 1 never keeps a small token; rollback_threshold 0
    rejects every small token the large model disagrees with, giving exactly the large model's greedy output."""
    _check_arguments(large, small, input_ids, fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens)
    eos = large.config.eos_token_id
    large, large_cache, small_cache = new_caches(large, small, input_ids, max_new_tokens)
    y = [large.config.decoder_start_token_id]
    verified = 1  # y[:verified] is final; y[verified:] is pending
    trace = []

    while True:
        # Large phase: one call over the last verified token and every pending one.
        step = verify(y, verified, *feed(large, large_cache, y), rollback_threshold, eos, max_new_tokens)
        if step.decision == "rollback":  # both caches keep y[:j] at most
            large_cache.crop(step.rollback_at)
            small_cache.crop(min(small_cache.length, step.rollback_at))
        trace.append(step)
        verified = len(y)
        if ended(y, eos, max_new_tokens):
            break

        # Small phase, one call per token. The first call catches up in one go: the large model's token,
        # and the last pending token when the small model proposed but never fed it.
        while True:
            step = propose(y, verified, *feed(small, small_cache, y), fallback_threshold, max_small_steps, eos,
                           max_new_tokens)
            trace.append(step)
            if step.decision != "pending":
                break

    return BiLDResult(y[1:], BiLDStats.of(trace), trace)


def speculative(large: T5, small: T5, input_ids, k: int, max_new_tokens: int = MAX_NEW_TOKENS) -> BiLDResult:
    """Greedy speculative decoding with k draft tokens (Leviathan et al.; Chen et al.) as a BiLD special
    case: the small model always drafts k tokens and the large model keeps exactly its own argmax."""
    return generate(large, small, input_ids, fallback_threshold=0.0, rollback_threshold=0.0,
                    max_small_steps=k, max_new_tokens=max_new_tokens)


def new_caches(large: T5, small: T5, input_ids, max_new_tokens: int):
    """Encode the source once with each model -> (the large model as it decodes, its cache, the small model's cache).
    A large call feeds the whole of y when it verifies a tail ending at the cap: max_new_tokens + 1 positions."""
    if isinstance(small, EarlyExit):
        # The small model is the large one's first layers: one encoder pass and one cache for both, on which
        # the large model starts at the exit layer wherever the small one has run (see early_exit.py).
        return small.share_cache(input_ids, max_length=max_new_tokens + 1)
    return (large, large.new_cache(large.encode(input_ids), max_length=max_new_tokens + 1),
            small.new_cache(small.encode(input_ids), max_length=max_new_tokens + 1))


def feed(model, cache, y: list[int]):
    """Feed the tokens of y the cache does not hold -> (their start position, them, their logits (T, V))."""
    start, fed = cache.length, y[cache.length:]
    logits = model.decode(torch.tensor([fed], device=cache.cross_bias.device), cache)[0]
    return start, fed, logits


def ended(y: list[int], eos: int, max_new_tokens: int) -> bool:
    """y (decoder-start token first) is complete: it ends with EOS or holds max_new_tokens new tokens."""
    return y[-1] == eos or len(y) - 1 == max_new_tokens


def verify(y: list[int], verified: int, start: int, fed: list[int], logits, rollback_threshold: float, eos: int,
           max_new_tokens: int) -> LargeStep:
    """The large phase's decision, applied to y in place. The large model was fed y[start:] (the last verified
    token, then the pending ones y[verified:]); logits (T, V): row i is p_L at position verified + i."""
    log_probs = _log_probs(logits)
    cross_entropy = [-log_probs[i, y_j].item() for i, y_j in enumerate(y[verified:])]
    return decide_large(y, verified, start, fed, logits.argmax(-1).tolist(), cross_entropy, rollback_threshold, eos,
                        max_new_tokens)


def decide_large(y: list[int], verified: int, start: int, fed: list[int], argmax: list[int],
                 cross_entropy: list[float], rollback_threshold: float, eos: int, max_new_tokens: int) -> LargeStep:
    """verify's rule on the numbers a large call gave (argmax at each pending position and beyond, cross-entropy
    of each pending token), applied to y in place. The trace diff replays a trace's own numbers through it."""
    pending = y[verified:]
    rejected = [verified + i for i, y_j in enumerate(pending)
                if y_j != argmax[i] and cross_entropy[i] > rollback_threshold]
    if rejected:  # rollback at the first rejected position j; the caller crops both caches to j
        j = rejected[0]
        del y[j:]
        y.append(argmax[j - verified])
        return LargeStep(start, fed, argmax, cross_entropy, "rollback", rollback_at=j, appended=y[-1])
    if ended(y, eos, max_new_tokens):  # all pending tokens accepted, and y is complete
        return LargeStep(start, fed, argmax, cross_entropy, "accept", rollback_at=None, appended=None)
    y.append(argmax[-1])  # all pending tokens accepted, then the large model's own prediction beyond
    return LargeStep(start, fed, argmax, cross_entropy, "accept", rollback_at=None, appended=y[-1])


def propose(y: list[int], verified: int, start: int, fed: list[int], logits, fallback_threshold: float,
            max_small_steps: int, eos: int, max_new_tokens: int) -> SmallStep:
    """One small step's decision, applied to y in place; logits (T, V) of the small model fed y[start:]."""
    token = logits[-1].argmax().item()
    prob = _log_probs(logits[-1])[token].exp().item()
    return decide_small(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos, max_new_tokens)


def decide_small(y: list[int], verified: int, start: int, fed: list[int], token: int, prob: float,
                 fallback_threshold: float, max_small_steps: int, eos: int, max_new_tokens: int) -> SmallStep:
    """propose's rule on the small model's argmax and its probability, applied to y in place."""
    if prob < fallback_threshold:
        return SmallStep(start, fed, token, prob, "fallback")  # discarded: the large model produces this position
    y.append(token)
    if len(y) - verified == max_small_steps:
        return SmallStep(start, fed, token, prob, "handover")
    return SmallStep(start, fed, token, prob, "end" if ended(y, eos, max_new_tokens) else "pending")


def _log_probs(logits):
    # float32 at least: fp16/bf16 log-probabilities are too coarse for the thresholds; float64 stays exact.
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def _check_arguments(large: T5, small: T5, input_ids, fallback_threshold, rollback_threshold,
                     max_small_steps, max_new_tokens):
    check_source(large, small, input_ids)
    check_settings(fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens)


def check_source(large: T5, small: T5, input_ids):
    """The pair can decode together (check_pair) and input_ids is one source (1, S) of their vocabulary."""
    check_pair(large, small)
    check_one_source(input_ids, large.config.vocab_size, "BiLD", "; batch.generate_batch decodes a batch")


def check_pair(large: T5, small: T5):
    """The two models can decode together: eval mode, one vocabulary and special ids, one device and dtype."""
    if isinstance(small, EarlyExit) and small.large is not large:
        raise ValueError("the early-exit small model was built from another large model than the one given")
    check_eval("the large model", large)
    check_eval("the small model", small)
    for name in ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        a, b = getattr(large.config, name), getattr(small.config, name)
        if a != b:
            raise ValueError(f"the large and small models must share {name}: large has {a}, small has {b}")
    a, b = large.embed.weight, small.embed.weight
    if a.device != b.device:
        raise ValueError(f"the large model is on {a.device}, the small model on {b.device}: move both to one device")
    if a.dtype != b.dtype:
        raise ValueError(f"the large model is {a.dtype}, the small model {b.dtype}: convert both to one dtype")


def check_settings(fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens):
    """BiLD's four settings, checked before any model runs (the CLI checks them at start-up too). Sampling has no
    rollback threshold: None."""
    for name, value in (("fallback_threshold", fallback_threshold), ("rollback_threshold", rollback_threshold)):
        if value is not None and not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_count("max_small_steps", max_small_steps)
    check_count("max_new_tokens", max_new_tokens)

