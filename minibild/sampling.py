"""Sampling at a temperature: plain ancestral sampling (`sample`, the baseline), and BiLD's draft policy as
speculative sampling (`bild_sample`), exact in distribution.

bild_sample runs bild.generate's loop with three changes (docs/BILD.md, "Sampling", proves it exact):
- Small phase: q = softmax(small logits / T). Its top probability below the fallback threshold: *fallback*,
  read before any draw, so nothing is drawn and nothing discarded. Otherwise y_j is drawn from q and is pending.
- Large phase: p = softmax(large logits / T). Pending y_j is accepted with probability min(1, p(y_j) / q(y_j)),
  in order. At the first rejected j (*rollback*, as in BiLD): y is cut before y_j and a token drawn from the
  residual max(0, p - q), normalized, is appended. All accepted: a token drawn from p beyond is appended
  (unless y ended). This is the rejection rule of Leviathan et al. and Chen et al.
- No rollback threshold: any other acceptance rule changes the distribution of the output.
The output is distributed as ancestral sampling from the large model, for every fallback threshold and N.

Random draws, in the order the loop makes them: each is one float64 uniform u in [0, 1) from the CPU
torch.Generator (torch.rand((), dtype=torch.float64, generator=g)). A token drawn from probabilities P is the
first token whose cumulative probability exceeds u; an acceptance with probability a is u < a. Per call: a small
step draws one token, none at a fallback; a large step draws one acceptance per pending token until the first
rejection, then one token (residual at the rejection, or p beyond when all were accepted and y has not ended).
A port fed the same uniforms takes the same decisions (up to floating point).
"""
import math
import numbers

import torch

from .bild import (FALLBACK_THRESHOLD, MAX_NEW_TOKENS, MAX_SMALL_STEPS, BiLDResult, check_settings, check_source,
                   ended, feed, new_caches)
from .generate import check_count, check_eval, check_one_source
from .model import T5
from .trace import BiLDStats, SampledLargeStep, SampledSmallStep


class Uniforms:
    """The random draws, from one float64 uniform each (see the module docstring). Tests pass another object with
    the same two methods to enumerate every outcome with its probability."""

    def __init__(self, generator: torch.Generator | None):
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            raise ValueError(f"generator must be a CPU torch.Generator (the draws do not depend on the models' "
                             f"device), got {generator!r}")
        self.generator = generator  # None: torch's default CPU generator (torch.manual_seed)

    def uniform(self) -> float:
        return torch.rand((), dtype=torch.float64, generator=self.generator).item()

    def token(self, probs) -> int:
        """A token drawn from probs (V,): the first whose cumulative probability exceeds u."""
        cumulative = probs.double().cumsum(-1).cpu()
        token = torch.searchsorted(cumulative, torch.tensor([self.uniform()], dtype=torch.float64), right=True)
        # Rounding can leave the total just below u: then the last token with any probability.
        return min(token.item(), probs.nonzero()[-1].item())

    def accept(self, probability: float) -> bool:
        return self.uniform() < probability


def probabilities(logits, temperature: float):
    """softmax(logits / T), in float32 at least (float64 stays float64): (..., V) -> (..., V).
    Computed as softmax((logits - max) / T), so that no value exceeds 0: logits / T alone overflows to inf for a
    small T (inf - inf is NaN in the softmax). As T -> 0 this tends to argmax decoding (ties share the mass);
    where T is below the dtype's smallest number, (logits - max) / T is 0 at the max and -inf elsewhere."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    below_max = logits - logits.max(-1, keepdim=True).values  # <= 0
    return torch.where(below_max == 0, 0.0, below_max / temperature).softmax(-1)


def accept_probability(p: float, q: float) -> float:
    """Leviathan et al.'s acceptance probability of a token drawn from q, with p and q its two probabilities."""
    return min(1.0, p / q)


def residual(p, q):
    """Where to draw after a rejection: max(0, p - q) normalized (V,). A rejection has probability
    sum max(0, q - p) = sum max(0, p - q), so when that is 0 no rejection happens but by rounding: then p."""
    r = (p - q).clamp(min=0)
    return r / r.sum() if r.sum() > 0 else p


def verify(y: list[int], verified: int, start: int, fed: list[int], logits, q_rows: list, temperature: float,
           draws, eos: int, max_new_tokens: int) -> SampledLargeStep:
    """The large phase's decision, applied to y in place. The large model was fed y[start:] (the last verified
    token, then the pending ones y[verified:]); logits (T, V): row i gives p at position verified + i; q_rows[i]
    (V,) is the q pending token i was drawn from."""
    p_rows = probabilities(logits, temperature)  # (T, V)
    pending = y[verified:]
    p = [p_rows[i, y_j].item() for i, y_j in enumerate(pending)]
    q = [q_rows[i][y_j].item() for i, y_j in enumerate(pending)]
    for i in range(len(pending)):
        if not draws.accept(accept_probability(p[i], q[i])):  # rollback at j: the caller crops both caches
            j = verified + i
            del y[j:]
            y.append(draws.token(residual(p_rows[i], q_rows[i])))
            return SampledLargeStep(start, fed, p, q, "rollback", rollback_at=j, appended=y[-1])
    if ended(y, eos, max_new_tokens):  # all pending tokens accepted, and y is complete
        return SampledLargeStep(start, fed, p, q, "accept", rollback_at=None, appended=None)
    y.append(draws.token(p_rows[-1]))  # all accepted, then a token drawn from p beyond
    return SampledLargeStep(start, fed, p, q, "accept", rollback_at=None, appended=y[-1])


def propose(y: list[int], verified: int, start: int, fed: list[int], logits, temperature: float,
            fallback_threshold: float, max_small_steps: int, draws, eos: int, max_new_tokens: int,
            q_rows: list) -> SampledSmallStep:
    """One small step's decision, applied to y in place (and q_rows, the q of each pending token); logits (T, V)
    of the small model fed y[start:]."""
    q = probabilities(logits[-1], temperature)  # (V,)
    confidence = q.max().item()
    # Decided before the draw, so it depends on the prefix alone: the draft's distribution stays q.
    if confidence < fallback_threshold:
        return SampledSmallStep(start, fed, confidence, None, None, "fallback")
    token = draws.token(q)
    y.append(token)
    q_rows.append(q)
    decision = ("handover" if len(y) - verified == max_small_steps else
                "end" if ended(y, eos, max_new_tokens) else "pending")
    return SampledSmallStep(start, fed, confidence, token, q[token].item(), decision)


@torch.inference_mode()
def bild_sample(large: T5, small: T5, input_ids, *, temperature: float,
                fallback_threshold: float = FALLBACK_THRESHOLD, max_small_steps: int = MAX_SMALL_STEPS,
                max_new_tokens: int = MAX_NEW_TOKENS, generator: torch.Generator | None = None,
                draws=None) -> BiLDResult:
    """Sample one source (1, S) at temperature T > 0 with BiLD's draft policy: the output is distributed as the
    large model's ancestral sampling (`sample`) at T, whatever the fallback threshold and max_small_steps (N),
    which change only how many large calls it takes. Deterministic given the generator (None: torch's default);
    `draws` replaces the generator's uniforms (see Uniforms)."""
    check_source(large, small, input_ids)
    check_settings(fallback_threshold, None, max_small_steps, max_new_tokens)
    check_temperature(temperature, "bild.generate (rollback_threshold 0: the large model's greedy output)")
    draws = Uniforms(generator) if draws is None else draws
    eos = large.config.eos_token_id
    large, large_cache, small_cache = new_caches(large, small, input_ids, max_new_tokens)
    y = [large.config.decoder_start_token_id]
    verified = 1  # y[:verified] is final; y[verified:] is pending
    q_rows = []  # (V,) per pending token: the q it was drawn from
    trace = []

    while True:
        # Large phase: one call over the last verified token and every pending one.
        step = verify(y, verified, *feed(large, large_cache, y), q_rows, temperature, draws, eos, max_new_tokens)
        if step.decision == "rollback":  # both caches keep y[:j] at most
            large_cache.crop(step.rollback_at)
            small_cache.crop(min(small_cache.length, step.rollback_at))
        trace.append(step)
        verified, q_rows = len(y), []
        if ended(y, eos, max_new_tokens):
            break

        # Small phase, one call per token, as in bild.generate.
        while True:
            step = propose(y, verified, *feed(small, small_cache, y), temperature, fallback_threshold,
                           max_small_steps, draws, eos, max_new_tokens, q_rows)
            trace.append(step)
            if step.decision != "pending":
                break

    return BiLDResult(y[1:], BiLDStats.of(trace), trace)


@torch.inference_mode()
def sample(model: T5, input_ids, *, temperature: float, max_new_tokens: int = MAX_NEW_TOKENS,
           generator: torch.Generator | None = None, draws=None) -> list[int]:
    """Ancestral sampling of one source (1, S) at temperature T > 0: each token drawn from softmax(logits / T),
    one uniform per token. Returns the tokens without the decoder-start token, with EOS when it was drawn."""
    check_eval("the model", model)
    check_count("max_new_tokens", max_new_tokens)
    check_temperature(temperature, "minibild.greedy")
    check_one_source(input_ids, model.config.vocab_size, "sample")
    draws = Uniforms(generator) if draws is None else draws
    cache = model.new_cache(model.encode(input_ids), max_length=max_new_tokens)
    y = [model.config.decoder_start_token_id]
    while not (len(y) > 1 and ended(y, model.config.eos_token_id, max_new_tokens)):
        _, _, logits = feed(model, cache, y)
        y.append(draws.token(probabilities(logits[-1], temperature)))
    return y[1:]


def check_temperature(temperature, greedy: str):
    """A temperature is a finite number > 0; temperature 0 is argmax decoding, which `greedy` does."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature == 0:
        raise ValueError(f"temperature must be > 0 to sample, got 0: temperature 0 is argmax decoding, which "
                         f"{greedy} does")
