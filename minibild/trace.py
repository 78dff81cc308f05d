"""BiLD's trace: one record per model call, as text to read and as JSON lines to diff; the counts read off it.

JSON lines: one object per call, with every field of SmallStep or LargeStep and floats unrounded (json writes
the shortest repr that reads back as the same float). Standard JSON has no infinity or NaN, and a
cross-entropy is infinite when a float32 or float16 large model gives a token probability 0, so non-finite
floats are written as the strings "inf", "-inf" and "nan". A reader in any language parses each line as
JSON, then turns those three strings into floats; `trace_from_jsonl` does so, reading back the exact trace.
"""
import json
import math
from dataclasses import asdict, dataclass, field


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

    @property
    def accepted(self) -> int:
        """How many pending tokens this call kept: all of them, or those before the first rejected one."""
        return len(self.cross_entropy) if self.rollback_at is None else self.rollback_at - self.start - 1

    def __str__(self):
        scores = " ".join(f"{ce:.2f}" for ce in self.cross_entropy)
        argmax = _ids(self.argmax[:-1] + ["|", self.argmax[-1]])  # pending positions | the one beyond
        text = f"large @{self.start} fed [{_ids(self.fed)}] argmax [{argmax}] ce [{scores}]"
        if self.decision == "rollback":
            i = self.accepted
            return (f"{text} -> rollback at {self.rollback_at}: {self.fed[i + 1]} != {self.argmax[i]}, "
                    f"ce {self.cross_entropy[i]:.2f}; append {self.appended}")
        appended = "" if self.appended is None else f", append {self.appended}"
        return f"{text} -> accept {self.accepted}{appended}"


@dataclass
class SampledSmallStep:
    """One small-model call when sampling (bild.sample): it fed `fed` at positions start.. and drew `token` from q,
    its distribution at the temperature, unless q's top probability fell below the fallback threshold."""
    model: str = field(default="small", init=False)
    kind: str = field(default="sampled", init=False)
    start: int
    fed: list[int]
    confidence: float  # q's top probability, read before any draw
    token: int | None  # drawn from q; None at a fallback, which draws nothing
    q: float | None  # q(token): the probability it was drawn with
    decision: str  # "pending", "handover", "end" or "fallback", as in SmallStep

    def __str__(self):
        drawn = "" if self.token is None else f" -> {self.token} q={self.q:.3f}"
        return f"small @{self.start} fed [{_ids(self.fed)}] max q={self.confidence:.3f}{drawn} {self.decision}"


@dataclass
class SampledLargeStep:
    """One large-model call when sampling: fed[0] is the last verified token, fed[1:] the pending (drafted) ones,
    each accepted with probability min(1, p/q) until the first rejection."""
    model: str = field(default="large", init=False)
    kind: str = field(default="sampled", init=False)
    start: int
    fed: list[int]
    p: list[float]  # p(y_j): the large model's probability of each pending token at the temperature
    q: list[float]  # q(y_j): the small model's, the one it was drawn with
    decision: str  # "accept" (all pending tokens) or "rollback" (at the first rejected one)
    rollback_at: int | None  # position of the first rejected token
    appended: int | None  # drawn from the residual max(0, p - q) at a rollback, else from p beyond; None if y ended

    @property
    def accepted(self) -> int:
        return len(self.p) if self.rollback_at is None else self.rollback_at - self.start - 1

    def __str__(self):
        pq = " ".join(f"{p:.3f}/{q:.3f}" for p, q in zip(self.p, self.q))
        text = f"large @{self.start} fed [{_ids(self.fed)}] p/q [{pq}]"
        if self.decision == "rollback":
            return f"{text} -> accept {self.accepted}, reject at {self.rollback_at}; resample {self.appended}"
        appended = "" if self.appended is None else f", sample {self.appended}"
        return f"{text} -> accept {self.accepted}{appended}"


def _ids(ids) -> str:
    return " ".join(map(str, ids))


@dataclass(frozen=True)
class BiLDStats:
    """Counts for one call of `bild.generate` (or `bild.sample`, whose rejections count as rollbacks), read off
    its trace. They add up:

        len(tokens)  == large_tokens + small_tokens
        small_tokens == accepted_small_tokens  (an accepted token is never removed again)
        small_calls  == accepted_small_tokens + rolled_back_tokens + fallbacks  (one proposal per call)
        large_calls  == 1 + small phases == 1 + fallbacks + handovers + small phases ended at EOS or the cap
        large_tokens == 1 + rollbacks + predictions appended beyond accepted tokens
                     == large_calls, or large_calls - 1 when the last large call only accepted
        rollbacks    <= rolled_back_tokens
    """
    large_calls: int
    small_calls: int
    fallbacks: int  # small tokens discarded: top probability below the fallback threshold
    handovers: int  # small phases ended by max_small_steps pending tokens
    rollbacks: int
    rolled_back_tokens: int  # pending tokens discarded by rollbacks: each rejected one and all after it
    accepted_small_tokens: int
    large_tokens: int  # output tokens from the large model: the first one, corrections, predictions beyond

    @classmethod
    def of(cls, trace: list[SmallStep | LargeStep]) -> "BiLDStats":
        small = [step for step in trace if step.model == "small"]
        large = [step for step in trace if step.model == "large"]
        return cls(large_calls=len(large), small_calls=len(small),
                   fallbacks=sum(step.decision == "fallback" for step in small),
                   handovers=sum(step.decision == "handover" for step in small),
                   rollbacks=sum(step.decision == "rollback" for step in large),
                   rolled_back_tokens=sum(len(step.fed) - 1 - step.accepted for step in large),
                   accepted_small_tokens=sum(step.accepted for step in large),
                   large_tokens=sum(step.appended is not None for step in large))

    @property
    def small_tokens(self) -> int:
        return self.accepted_small_tokens


def format_trace(trace) -> str:
    return "\n".join(map(str, trace))


def trace_to_jsonl(trace) -> str:
    """One standard JSON object per model call (see the module docstring): diff an optimized implementation
    against this."""
    return "".join(json.dumps(_finite(asdict(step)), allow_nan=False) + "\n" for step in trace)


def trace_from_jsonl(text: str) -> list[SmallStep | LargeStep | SampledSmallStep | SampledLargeStep]:
    """The trace that `trace_to_jsonl` wrote, exactly."""
    trace = []
    for line in text.splitlines():
        row = json.loads(line)
        model = row.pop("model")
        if row.pop("kind", None) == "sampled":  # probabilities, never infinite
            trace.append((SampledSmallStep if model == "small" else SampledLargeStep)(**row))
        elif model == "small":
            trace.append(SmallStep(**(row | {"prob": float(row["prob"])})))
        else:  # float() reads the strings "inf", "-inf" and "nan" too
            trace.append(LargeStep(**(row | {"cross_entropy": [float(ce) for ce in row["cross_entropy"]]})))
    return trace


def _finite(value):
    """value with each non-finite float replaced by its name: "inf", "-inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
