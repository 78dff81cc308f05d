"""BiLD's trace: one record per model call, as text to read and as JSON lines to diff; the counts read off it.

JSON lines: a header record, then one object per call, with every field of SmallStep or LargeStep (SampledSmallStep
or SampledLargeStep when sampling) and floats unrounded (json writes the shortest repr that reads back as the same
float). Standard JSON has no infinity or NaN, and a cross-entropy is infinite when a float32 or float16 large model
gives a token probability 0, so non-finite floats are written as the strings "inf", "-inf" and "nan". A reader in
any language parses each line as JSON, then turns those three strings into floats; `trace_from_jsonl` does so,
reading back the exact trace.

The header (TraceHeader) makes a trace self-describing: {"format": "minibild-trace", "version": 1, "rule": "bild"
or "official", "settings": the four settings, "temperature": null when greedy, "exit_layer": null unless early
exit, "decoder_start_token_id", "eos_token_id", "dtype"}. It is optional: a trace without one (an older file, or a
port's) is read all the same, and the diff then asks for what it lacks.

The schema is checked here, in one place (`read_records`): every record is a JSON object with exactly its type's
fields, ids are non-negative integers (7.0 is not an id), floats are numbers or those three strings, decisions
are the lower-case words below, and a trace holds at least one call (the large model always makes the first
token), so an empty file is not a trace. Blank lines may end a file; anywhere else they are refused. A malformed
record raises TraceError naming the file, the line and the field.
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
        i = self.accepted
        if self.decision == "rollback" and 0 <= i < len(self.cross_entropy) and i + 1 < min(len(self.fed),
                                                                                              len(self.argmax) + 1):
            return (f"{text} -> rollback at {self.rollback_at}: {self.fed[i + 1]} != {self.argmax[i]}, "
                    f"ce {self.cross_entropy[i]:.2f}; append {self.appended}")
        if self.decision == "rollback":  # a record that does not score the token it rejects (the diff says why)
            return f"{text} -> rollback at {self.rollback_at}; append {self.appended}"
        appended = "" if self.appended is None else f", append {self.appended}"
        return f"{text} -> accept {self.accepted}{appended}"


@dataclass
class SampledSmallStep:
    """One small-model call when sampling (bild_sample): it fed `fed` at positions start.. and drew `token` from q,
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
    """Counts for one call of `bild.generate` (or `bild_sample`, whose rejections count as rollbacks), read off
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


FORMAT, VERSION = "minibild-trace", 1
RULES = ("bild", "official")  # bild.generate / bild_sample, or minibild.official


@dataclass(frozen=True)
class TraceHeader:
    """What made a trace, written as its first record: everything a diff needs besides the calls."""
    rule: str  # "bild" (bild.generate, bild_sample) or "official" (minibild.official)
    fallback_threshold: float
    rollback_threshold: float | None  # None when sampling, which has none
    max_small_steps: int
    max_new_tokens: int
    temperature: float | None  # None: greedy (SmallStep, LargeStep); T > 0: sampled (SampledSmallStep, ...)
    exit_layer: int | None  # early exit: the small model is the large one's first exit_layer layers, on its cache
    decoder_start_token_id: int
    eos_token_id: int
    dtype: str  # the models' dtype: "float32", "float64", ...

    @classmethod
    def of(cls, large, small, *, fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens,
           rule: str = "bild", temperature: float | None = None) -> "TraceHeader":
        """The header of a trace the pair (large, small) made with these settings (small an EarlyExit or a T5)."""
        return cls(rule, fallback_threshold, rollback_threshold, max_small_steps, max_new_tokens, temperature,
                   getattr(small, "exit_layer", None), large.config.decoder_start_token_id, large.config.eos_token_id,
                   str(large.embed.weight.dtype).removeprefix("torch."))

    @property
    def settings(self) -> dict:
        return dict(fallback_threshold=self.fallback_threshold, rollback_threshold=self.rollback_threshold,
                    max_small_steps=self.max_small_steps, max_new_tokens=self.max_new_tokens)

    def record(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "rule": self.rule, "settings": self.settings,
                "temperature": self.temperature, "exit_layer": self.exit_layer,
                "decoder_start_token_id": self.decoder_start_token_id, "eos_token_id": self.eos_token_id,
                "dtype": self.dtype}

    def __str__(self):
        settings = " ".join(f"{name}={value}" for name, value in self.settings.items())
        extra = "".join(f" {name}={getattr(self, name)}" for name in ("temperature", "exit_layer")
                        if getattr(self, name) is not None)
        return f"{self.rule} {settings}{extra} eos={self.eos_token_id} {self.dtype}"


def trace_to_jsonl(trace, header: TraceHeader | None = None) -> str:
    """One standard JSON object per model call (see the module docstring), after the header when given: diff an
    optimized implementation against this."""
    lines = [] if header is None else [json.dumps(header.record(), allow_nan=False) + "\n"]
    return "".join(lines + [json.dumps(_finite(asdict(step)), allow_nan=False) + "\n" for step in trace])


def trace_from_jsonl(text: str, name: str = "trace") -> list[SmallStep | LargeStep | SampledSmallStep |
                                                              SampledLargeStep]:
    """The calls of the trace that `trace_to_jsonl` wrote, exactly (its header, if any, is checked and left out).
    Raises TraceError on anything else."""
    return [record for record in read_records(text.encode().splitlines(keepends=True), name)
            if not isinstance(record, TraceHeader)]


class TraceError(ValueError):
    """A file that is not a trace, as one line naming the file, the line and the problem."""


MAX_LINE = 16 << 20  # bytes: a call feeds at most max_new_tokens + 1 ids, far below this


def read_records(lines, name: str):
    """The records of a trace, one at a time, checked against the schema: the header (if the first record is
    one), then each call. lines: the file's lines as bytes (an open binary file streams it, in bounded memory);
    name: the file, for the errors."""
    calls, blank, sampled = 0, None, None
    for n, raw in enumerate(lines, 1):
        if len(raw) > MAX_LINE:
            raise TraceError(f"{name}, line {n}: longer than {MAX_LINE >> 20} MiB, which no trace record is")
        if not raw.strip():
            blank = blank or n
            continue
        if blank:
            raise TraceError(f"{name}, line {blank}: a blank line inside the trace (blank lines may only end it)")
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TraceError(f"{name}, line {n}: not UTF-8 text (byte {e.start + 1})") from None
        except ValueError as e:
            raise TraceError(f"{name}, line {n}: not JSON: {getattr(e, 'msg', e)} at column "
                             f"{getattr(e, 'colno', '?')}") from None
        try:
            if isinstance(row, dict) and "format" in row:
                if n > 1:
                    raise _Bad("a header record after the first line")
                header = _header(row)
                sampled = header.temperature is not None
                yield header
                continue
            step = _step(row)
        except _Bad as e:
            raise TraceError(f"{name}, line {n}: {e}") from None
        if sampled is not None and sampled != isinstance(step, (SampledSmallStep, SampledLargeStep)):
            raise TraceError(f"{name}, line {n}: a {'greedy' if sampled else 'sampled'} call in a "
                             f"{'sampled' if sampled else 'greedy'} trace")
        sampled, calls = isinstance(step, (SampledSmallStep, SampledLargeStep)), calls + 1
        yield step
    if not calls:
        raise TraceError(f"{name}: no calls: a trace holds at least the large model's first call (an empty file is "
                         "not a trace)")


class _Bad(Exception):
    """One record's problem; read_records adds the file and the line."""


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _id(value, what="an id"):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"expected {what} (an integer >= 0), got {_show(value)}")
    return value


def _id_list(value):
    if not isinstance(value, list) or not value:
        raise _Bad(f"expected a non-empty list of ids, got {_show(value)}")
    if set(map(type, value)) == {int} and min(value) >= 0:  # the common case, checked at C speed
        return value
    return [_id(v) for v in value]


def _float(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f'expected a number (or "inf", "-inf", "nan"), got {_show(value)}')
    return float(value)


def _floats(value):
    if not isinstance(value, list):
        raise _Bad(f"expected a list of numbers, got {_show(value)}")
    if set(map(type, value)) <= {float, int}:  # the common case, checked at C speed
        return list(map(float, value))
    return [_float(v) for v in value]


def _optional(check):
    return lambda value: None if value is None else check(value)


def _one_of(*words):
    def check(value):
        if value not in words:
            raise _Bad(f"expected one of {', '.join(map(json.dumps, words))}, got {_show(value)}")
        return value
    return check


_SMALL_DECISION = _one_of("pending", "handover", "end", "fallback")
_LARGE_DECISION = _one_of("accept", "rollback")
# Each record type's fields (besides "model" and "kind") and how each is read.
SCHEMA = {
    SmallStep: dict(start=_id, fed=_id_list, token=_id, prob=_float, decision=_SMALL_DECISION),
    LargeStep: dict(start=_id, fed=_id_list, argmax=_id_list, cross_entropy=_floats, decision=_LARGE_DECISION,
                    rollback_at=_optional(_id), appended=_optional(_id)),
    SampledSmallStep: dict(start=_id, fed=_id_list, confidence=_float, token=_optional(_id), q=_optional(_float),
                           decision=_SMALL_DECISION),
    SampledLargeStep: dict(start=_id, fed=_id_list, p=_floats, q=_floats, decision=_LARGE_DECISION,
                           rollback_at=_optional(_id), appended=_optional(_id)),
}


def _step(row):
    """The step a call's record describes, or _Bad naming the field."""
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object (one model call), got {_show(row)}")
    if "model" not in row:
        raise _Bad('missing field "model"')
    try:
        model = _one_of("small", "large")(row["model"])
    except _Bad as e:
        raise _Bad(f'field "model": {e}') from None
    kind = row.get("kind")
    if "kind" in row and kind != "sampled":
        raise _Bad(f'field "kind": expected "sampled" or no such field, got {_show(kind)}')
    cls = {("small", None): SmallStep, ("large", None): LargeStep, ("small", "sampled"): SampledSmallStep,
           ("large", "sampled"): SampledLargeStep}[model, kind]
    schema = SCHEMA[cls]
    what = f"a {'sampled ' if kind else ''}{model} call"
    unknown = [] if len(row) == len(schema) + 1 + (kind is not None) else \
        [key for key in row if key not in schema and key not in ("model", "kind")]
    if unknown:
        raise _Bad(f"unknown field {json.dumps(unknown[0])} in {what} (its fields: {', '.join(schema)})")
    values = {}
    for key, check in schema.items():
        if key not in row:
            raise _Bad(f"missing field {json.dumps(key)} in {what}")
        try:
            values[key] = check(row[key])
        except _Bad as e:
            raise _Bad(f"field {json.dumps(key)}: {e}") from None
    step = cls(**values)
    problem = _inconsistent(step)
    if problem:
        raise _Bad(f"{what}: {problem}")
    return step


def _inconsistent(step) -> str | None:
    """What a record says against itself, whatever the policy: the shapes every reader of it relies on."""
    if step.model == "small":
        if isinstance(step, SampledSmallStep) and (step.decision == "fallback") != (step.token is None) or \
                isinstance(step, SampledSmallStep) and (step.token is None) != (step.q is None):
            return '"token" and "q" are null exactly at a "fallback" (which draws nothing)'
        return None
    # How many pending tokens a call scores, against the cache and y, is the diff's to judge: a port that feeds
    # the wrong positions still writes a well-formed record, and the diff names its cache error.
    if isinstance(step, SampledLargeStep) and len(step.q) != len(step.p):
        return f'"p" and "q" hold one probability per pending token each: got {len(step.p)} and {len(step.q)}'
    if (step.decision == "rollback") != (step.rollback_at is not None):
        return '"rollback_at" is a position exactly at a "rollback", null otherwise'
    if step.decision == "rollback" and step.appended is None:
        return 'a "rollback" appends the large model\'s token: "appended" is null'
    return None


def _header(row) -> TraceHeader:
    """The header record, or _Bad naming the field."""
    if row.get("format") != FORMAT:
        raise _Bad(f'field "format": expected {json.dumps(FORMAT)}, got {_show(row.get("format"))}')
    if row.get("version") != VERSION:
        raise _Bad(f'field "version": this reader reads version {VERSION}, got {_show(row.get("version"))}')
    fields = {"format", "version", "rule", "settings", "temperature", "exit_layer", "decoder_start_token_id",
              "eos_token_id", "dtype"}
    unknown, missing = sorted(set(row) - fields), sorted(fields - set(row))
    if unknown or missing:
        raise _Bad(f"header: unknown field {json.dumps(unknown[0])}" if unknown else
                   f"header: missing field {json.dumps(missing[0])}")
    settings = row["settings"]
    names = ("fallback_threshold", "rollback_threshold", "max_small_steps", "max_new_tokens")
    if not isinstance(settings, dict) or sorted(settings) != sorted(names):
        raise _Bad(f'header: field "settings": expected an object with exactly {", ".join(names)}, got '
                   f"{_show(settings)}")
    checks = dict(rule=_one_of(*RULES), temperature=_optional(_positive), exit_layer=_optional(_count),
                  decoder_start_token_id=_id, eos_token_id=_id, dtype=_text, fallback_threshold=_threshold,
                  rollback_threshold=_optional(_threshold), max_small_steps=_count, max_new_tokens=_count)
    values = {}
    for key, check in checks.items():
        try:
            values[key] = check(settings[key] if key in names else row[key])
        except _Bad as e:
            raise _Bad(f'header: field {json.dumps(key)}: {e}') from None
    if (values["temperature"] is None) == (values["rollback_threshold"] is None):
        raise _Bad('header: "rollback_threshold" is null exactly when sampling ("temperature" > 0), which has none')
    return TraceHeader(**values)


def _threshold(value):
    value = _float(value)
    if not value >= 0:
        raise _Bad(f"expected a number >= 0, got {value}")
    return value


def _positive(value):
    value = _float(value)
    if not 0 < value < math.inf:
        raise _Bad(f"expected a finite number > 0, got {value}")
    return value


def _count(value):
    if _id(value, "a count") < 1:
        raise _Bad(f"expected a count (an integer >= 1), got {value}")
    return value


def _text(value):
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_show(value)}")
    return value


def _finite(value):
    """value with each non-finite float replaced by its name: "inf", "-inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
