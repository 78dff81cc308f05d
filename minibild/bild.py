"""Big Little Decoder (BiLD): a small model drafts tokens, a large model verifies and corrects them.

Kim et al., "Speculative Decoding with Big Little Decoder", NeurIPS 2023 (arXiv 2302.07863).
Greedy decoding, batch size 1. The loop, in the paper's words:

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
"""
import dataclasses
import json
from dataclasses import dataclass, field

import torch

from .early_exit import EarlyExit
from .model import T5


@dataclass
class BiLDStats:
    """Counts for one call of `generate`. They add up:

        len(tokens)  == large_tokens + small_tokens
        small_tokens == accepted_small_tokens  (an accepted token is never removed again)
        small_calls  == accepted_small_tokens + rolled_back_tokens + fallbacks  (one proposal per call)
        large_calls  == 1 + small phases == 1 + fallbacks + handovers + small phases ended at EOS or the cap
        large_tokens == 1 + rollbacks + predictions appended beyond accepted tokens
                     == large_calls, or large_calls - 1 when the last large call only accepted
        rollbacks    <= rolled_back_tokens
    """
    large_calls: int = 0
    small_calls: int = 0
    fallbacks: int = 0  # small tokens discarded: top probability below the fallback threshold
    handovers: int = 0  # small phases ended by max_small_steps pending tokens
    rollbacks: int = 0
    rolled_back_tokens: int = 0  # pending tokens discarded by rollbacks: each rejected one and all after it
    accepted_small_tokens: int = 0
    large_tokens: int = 0  # output tokens from the large model: the first one, corrections, predictions beyond

    @property
    def small_tokens(self) -> int:
        return self.accepted_small_tokens


def _ids(ids) -> str:
    return " ".join(map(str, ids))


@dataclass
class SmallStep:
    """One small-model call: it fed `fed` at positions start.. and proposed `token`."""
    model: str = field(default="small", init=False)
    start: int
    fed: list[int]
    token: int  # the small model's argmax
    prob: float  # its probability
    decision: str  # "pending" (kept, phase goes on), "handover" (N pending), "end" (EOS or cap), "fallback" (discarded)

    def __str__(self):
        return f"small @{self.start} fed [{_ids(self.fed)}] -> {self.token} p={self.prob:.3f} {self.decision}"


@dataclass
class LargeStep:
    """One large-model call: fed[0] is the last verified token, fed[1:] the pending ones."""
    model: str = field(default="large", init=False)
    start: int
    fed: list[int]
    argmax: list[int]  # argmax p_L[j] at each pending position, then at the one beyond
    cross_entropy: list[float]  # -log p_L[j](y_j) for each pending token
    decision: str  # "accept" (all pending tokens) or "rollback"
    rollback_at: int | None  # position of the first rejected token
    appended: int | None  # the token the large model appended (correction or prediction beyond), if any

    def __str__(self):
        scores = " ".join(f"{ce:.2f}" for ce in self.cross_entropy)
        argmax = _ids(self.argmax[:-1] + ["|", self.argmax[-1]])  # pending positions | the one beyond
        text = f"large @{self.start} fed [{_ids(self.fed)}] argmax [{argmax}] ce [{scores}]"
        if self.decision == "rollback":
            i = self.rollback_at - self.start - 1
            return (f"{text} -> rollback at {self.rollback_at}: {self.fed[i + 1]} != {self.argmax[i]}, "
                    f"ce {self.cross_entropy[i]:.2f}; append {self.appended}")
        appended = "" if self.appended is None else f", append {self.appended}"
        return f"{text} -> accept {len(self.cross_entropy)}{appended}"


@dataclass
class BiLDResult:
    tokens: list[int]  # without the decoder-start token; EOS included when produced
    stats: BiLDStats
    trace: list[SmallStep | LargeStep]  # one step per model call, in order


def format_trace(trace) -> str:
    return "\n".join(map(str, trace))


def trace_to_jsonl(trace) -> str:
    """One JSON object per model call, floats unrounded: diff an optimized implementation against this."""
    return "".join(json.dumps(dataclasses.asdict(step)) + "\n" for step in trace)


def _log_probs(logits):
    # float32 at least: fp16/bf16 log-probabilities are too coarse for the thresholds; float64 stays exact.
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def _check_arguments(large: T5, small: T5, input_ids, fallback_threshold, rollback_threshold,
                     max_small_steps, max_new_tokens):
    if isinstance(small, EarlyExit) and small.large is not large:
        raise ValueError("the early-exit small model was built from another large model than the one given")
    for name in ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        a, b = getattr(large.config, name), getattr(small.config, name)
        if a != b:
            raise ValueError(f"the large and small models must share {name}: large has {a}, small has {b}")
    a, b = large.embed.weight, small.embed.weight
    if a.device != b.device:
        raise ValueError(f"the large model is on {a.device}, the small model on {b.device}: move both to one device")
    if a.dtype != b.dtype:
        raise ValueError(f"the large model is {a.dtype}, the small model {b.dtype}: convert both to one dtype")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("BiLD decodes one source at a time: input_ids must have shape (1, S), got "
                         f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
    for name, value in (("fallback_threshold", fallback_threshold), ("rollback_threshold", rollback_threshold)):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("max_small_steps", max_small_steps), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@torch.inference_mode()
def generate(large: T5, small: T5, input_ids, *, fallback_threshold: float = 0.6, rollback_threshold: float = 5.0,
             max_small_steps: int = 10, max_new_tokens: int = 128) -> BiLDResult:
    """BiLD-decode one source (1, S). fallback_threshold > 1 never keeps a small token; rollback_threshold 0
    rejects every small token the large model disagrees with, giving exactly the large model's greedy output."""
    _check_arguments(large, small, input_ids, fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens)
    eos = large.config.eos_token_id
    # A large call feeds the whole of y when it verifies a tail ending at the cap: max_new_tokens + 1 positions.
    if isinstance(small, EarlyExit):
        # The small model is the large one's first layers: one encoder pass and one cache for both, on which
        # the large model starts at the exit layer wherever the small one has run (see early_exit.py).
        large, large_cache, small_cache = small.share_cache(input_ids, max_length=max_new_tokens + 1)
    else:
        large_cache = large.new_cache(large.encode(input_ids), max_length=max_new_tokens + 1)
        small_cache = small.new_cache(small.encode(input_ids), max_length=max_new_tokens + 1)
    y = [large.config.decoder_start_token_id]
    verified = 1  # y[:verified] is final; y[verified:] is pending
    stats, trace = BiLDStats(), []

    def feed(model, cache):
        """Feed the tokens of y the cache does not hold -> (their start position, them, their logits (T, V))."""
        start, fed = cache.length, y[cache.length:]
        logits = model.decode(torch.tensor([fed], device=cache.cross_bias.device), cache)[0]
        return start, fed, logits

    def done():
        return y[-1] == eos or len(y) - 1 == max_new_tokens

    while True:
        # Large phase. The large cache holds y[:verified - 1], so fed = last verified token + pending tokens.
        start, fed, logits = feed(large, large_cache)
        stats.large_calls += 1
        pending = y[verified:]
        argmax = logits.argmax(-1).tolist()  # row i predicts position start + i + 1
        log_probs = _log_probs(logits)
        cross_entropy = [-log_probs[i, token].item() for i, token in enumerate(pending)]
        rejected = next((i for i, token in enumerate(pending)
                         if token != argmax[i] and cross_entropy[i] > rollback_threshold), None)
        if rejected is not None:
            decision, rollback_at = "rollback", verified + rejected
            stats.rollbacks += 1
            stats.rolled_back_tokens += len(pending) - rejected
            stats.accepted_small_tokens += rejected
            del y[rollback_at:]
            large_cache.crop(rollback_at)
            small_cache.crop(min(small_cache.length, rollback_at))
            appended = argmax[rejected]
        else:
            decision, rollback_at = "accept", None
            stats.accepted_small_tokens += len(pending)
            appended = None if done() else argmax[-1]
        if appended is not None:
            y.append(appended)
            stats.large_tokens += 1
        verified = len(y)
        trace.append(LargeStep(start, fed, argmax, cross_entropy, decision, rollback_at, appended))
        if done():
            break

        # Small phase, one call per token. The first call catches up in one go: the large model's token,
        # and the last pending token when the small model proposed but never fed it.
        while True:
            start, fed, logits = feed(small, small_cache)
            stats.small_calls += 1
            token = logits[-1].argmax().item()
            prob = _log_probs(logits[-1])[token].exp().item()
            if prob < fallback_threshold:
                decision = "fallback"  # discarded: the large model produces this position itself
                stats.fallbacks += 1
            else:
                y.append(token)
                decision = "handover" if len(y) - verified == max_small_steps else "end" if done() else "pending"
                stats.handovers += decision == "handover"
            trace.append(SmallStep(start, fed, token, prob, decision))
            if decision != "pending":
                break

    return BiLDResult(y[1:], stats, trace)


def speculative(large: T5, small: T5, input_ids, k: int, max_new_tokens: int = 128) -> BiLDResult:
    """Greedy speculative decoding with k draft tokens (Leviathan et al.; Chen et al.) as a BiLD special
    case: the small model always drafts k tokens and the large model keeps exactly its own argmax."""
    return generate(large, small, input_ids, fallback_threshold=0.0, rollback_threshold=0.0,
                    max_small_steps=k, max_new_tokens=max_new_tokens)
