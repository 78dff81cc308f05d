"""Compare two BiLD traces (JSON lines, trace.py): did ACTUAL decode like EXPECTED, and if not, where and why?

    python -m minibild.diff EXPECTED.jsonl ACTUAL.jsonl [--case case.json] [--logits logits.jsonl] [--dtype float32]

Two traces are equivalent when they make the same calls (model, start, fed tokens), the same argmaxes and the same
decisions, with probabilities and cross-entropies equal up to the tolerance (in nats: differences of log-probability).
Exit status 0 when they are, 1 when not (2: a file it cannot read), with a report of the first divergent call and
one classification:

  cache     ACTUAL fed a call other tokens than exactly those its model's cache lacks: positions recomputed,
            skipped or fed twice. Read off ACTUAL alone, by replaying y and each model's cache length.
  policy    ACTUAL made a decision BiLD's rule does not make on ACTUAL's own numbers (its recorded argmaxes,
            probabilities and cross-entropies, replayed through bild.decide_small / bild.decide_large), named by
            the rule it breaks; the official implementation's known differences (docs/BILD.md) by name.
            Needs the settings: --case gives them.
  numerics  a near-tie: an argmax differs where EXPECTED's top-1/top-2 margin (from --logits) is below the
            tolerance, or a decision differs where EXPECTED's probability or cross-entropy is within the
            tolerance of its threshold. Not a bug; a float32 port may flip such a decision.
  model     ACTUAL follows the policy and its caches, but its numbers differ beyond the tolerance where no decision
            is a near-tie: the model itself computes other logits (weights, layers, output scale).
  unclassified  an argmax differs and neither --logits nor the trace's probabilities bound EXPECTED's margin
            there above the tolerance.

A cache or policy error at or before the first divergence wins: it is a bug whatever the numbers.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# The rule is bound here, at import: the diff holds minibild's reading of the policy whatever a caller patches.
from .bild import decide_large, decide_small, ended
from .trace import LargeStep, SmallStep, trace_from_jsonl

# Default tolerances (nats) by the dtype ACTUAL computed in: float32 rounding moves a logit of the tiny models by
# about 1e-6; float64 ports agree with minibild to about 1e-13.
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


@dataclass(frozen=True)
class Settings:
    """What the policy check needs besides the trace: a conformance case's settings and special ids."""
    fallback_threshold: float
    rollback_threshold: float
    max_small_steps: int
    max_new_tokens: int
    eos_token_id: int = 1
    shared_cache: bool = False  # early exit: a large call also runs the small model's layers over its positions

    @classmethod
    def from_case(cls, case: dict) -> "Settings":
        return cls(**case["settings"], eos_token_id=case["eos_token_id"], shared_cache=case["exit_layer"] is not None)


@dataclass(frozen=True)
class Finding:
    kind: str  # cache, policy, numerics, model, unclassified or length
    step: int  # index of the call in the trace, from 0
    why: str


def decisions(step) -> tuple:
    """What must match exactly: everything but the floats."""
    if step.model == "small":
        return step.model, step.start, step.fed, step.token, step.decision
    return step.model, step.start, step.fed, step.argmax, step.decision, step.rollback_at, step.appended


def check(trace: list, settings: Settings | None = None) -> Finding | None:
    """The first call where `trace` alone breaks the cache rule or, given settings, BiLD's policy; None if none."""
    y = [trace[0].fed[0]] if trace else []  # the decoder-start token: the first call feeds it
    verified, held, discarded = 1, {"large": 0, "small": 0}, None
    for k, step in enumerate(trace):
        previous = trace[k - 1] if k else None
        if settings and k and verified == len(y) and ended(y, settings.eos_token_id, settings.max_new_tokens):
            return Finding("policy", k, f"a call after the output is complete: y = {y[1:]}")
        order = _order(step, previous)
        if order:
            return Finding("policy", k, order)
        n = held[step.model]
        if (step.start, step.fed) != (n, y[n:]):
            if discarded is not None and (step.start, step.fed) == (n, y[n:] + [discarded]):
                return Finding("policy", k, f"fallback token kept instead of discarded: {discarded} (probability "
                                            f"{previous.prob:.4g}) was fed again as if it were pending")
            return Finding("cache", k, _cache_error(step, n, y))
        held[step.model] = step.start + len(step.fed)
        discarded = None
        if step.model == "small":
            if settings:
                rule = decide_small(y.copy(), verified, step.start, step.fed, step.token, step.prob,
                                    settings.fallback_threshold, settings.max_small_steps, settings.eos_token_id,
                                    settings.max_new_tokens)
                if rule.decision != step.decision:
                    return Finding("policy", k, _small_rule(step, rule, settings))
            if step.decision == "fallback":
                discarded = step.token
            else:
                y.append(step.token)
            continue
        if len(step.argmax) != len(y) - verified + 1 or len(step.cross_entropy) != len(y) - verified:
            return Finding("policy", k, f"a large call over {len(y) - verified} pending tokens must give "
                                        f"{len(y) - verified + 1} argmaxes and {len(y) - verified} cross-entropies, "
                                        f"got {len(step.argmax)} and {len(step.cross_entropy)}")
        if settings:
            rule = decide_large(y.copy(), verified, step.start, step.fed, step.argmax, step.cross_entropy,
                                settings.rollback_threshold, settings.eos_token_id, settings.max_new_tokens)
            if (rule.decision, rule.rollback_at, rule.appended) != (step.decision, step.rollback_at, step.appended):
                return Finding("policy", k, _large_rule(step, rule, y, verified, settings))
        if step.decision == "rollback":
            del y[step.rollback_at:]
        if step.appended is not None:
            y.append(step.appended)
        verified = len(y)
        if settings and settings.shared_cache:  # the call ran the early-exit layers over every position it fed
            held["small"] = max(held["small"], held["large"])
        if step.decision == "rollback":  # both caches keep y[:rollback_at] at most
            held = {model: min(length, step.rollback_at) for model, length in held.items()}
    if settings and trace:
        return _end(trace, y, verified, settings)
    return None


def _order(step, previous) -> str | None:
    """The order of calls: the large model first, then small phases and large calls in turn."""
    if previous is None:
        return None if step.model == "large" else "the large model must produce the first token"
    if step.model == "large" and previous.model == "large":
        if previous.decision == "rollback":
            return ("the large model ran again right after its rollback (the official implementation does; minibild "
                    "hands control back to the small model at once, docs/BILD.md)")
        return "two large calls in a row with no small call between them"
    if step.model == "large" and previous.decision == "pending":
        return "the large model ran while the small phase went on (the last small decision was pending)"
    if step.model == "small" and previous.model == "small" and previous.decision != "pending":
        return f"the small model ran on after its phase ended ({previous.decision})"
    return None


def _cache_error(step, n: int, y: list[int]) -> str:
    held = f"its cache holds positions 0..{n - 1}" if n else "its cache is empty"
    expected = f"it should feed y[{n}:] = {y[n:]} at position {n}"
    if step.start < n:
        what = f"recomputes {_positions(step.start, n)}"
    elif step.start > n:
        what = f"skips {_positions(n, step.start)} (a crop that kept too much, or a token never fed)"
    else:
        what = "feeds other tokens than those y holds there"
    return f"the {step.model} model fed {step.fed} at position {step.start}: it {what}; {held}, so {expected}"


def _positions(first: int, end: int) -> str:
    return f"position {first}" if end == first + 1 else f"positions {first}..{end - 1}"


def _small_rule(step: SmallStep, rule: SmallStep, s: Settings) -> str:
    p = f"probability {step.prob:.4g}, fallback threshold {s.fallback_threshold}"
    if rule.decision == "fallback":
        return f"fallback token kept instead of discarded: {step.token} ({p}) was marked {step.decision}"
    if step.decision == "fallback":
        return f"a token discarded though its probability is not below the threshold: {step.token} ({p})"
    reasons = {"handover": f"it is the max_small_steps = {s.max_small_steps}th pending token",
               "end": "y ends with EOS or holds max_new_tokens tokens", "pending": "the phase goes on"}
    return f"the small phase's decision is {rule.decision} ({reasons[rule.decision]}), not {step.decision}"


def _large_rule(step: LargeStep, rule: LargeStep, y: list[int], verified: int, s: Settings) -> str:
    pending, ce, argmax = y[verified:], step.cross_entropy, step.argmax
    if step.decision == "accept" and rule.decision == "rollback":
        j = rule.rollback_at - verified
        high = next((i for i, c in enumerate(ce) if c > s.rollback_threshold), None)
        if high is not None and high < j and pending[high] == argmax[high]:
            return (f"official rule: only the first token above the rollback threshold was examined (position "
                    f"{verified + high}, equal to the large argmax, so no rollback), but the first rejected token is "
                    f"at position {rule.rollback_at}: {pending[j]} != {argmax[j]}, cross-entropy {ce[j]:.4g} > "
                    f"{s.rollback_threshold} (docs/BILD.md, where the official implementation differs)")
        return (f"a rejected token accepted: position {rule.rollback_at}, {pending[j]} != {argmax[j]}, "
                f"cross-entropy {ce[j]:.4g} > {s.rollback_threshold}")
    if step.decision == "rollback":
        i = step.rollback_at - verified
        if not 0 <= i < len(pending):
            return f"rollback at position {step.rollback_at}, outside the pending positions {verified}..{len(y) - 1}"
        if pending[i] == argmax[i]:
            return f"rollback at a token equal to the large model's argmax: {pending[i]} at position {step.rollback_at}"
        if ce[i] <= s.rollback_threshold:
            return (f"rollback at a token whose cross-entropy {ce[i]:.4g} is not above the rollback threshold "
                    f"{s.rollback_threshold} (position {step.rollback_at})")
        if rule.decision == "rollback" and rule.rollback_at < step.rollback_at:
            return f"rollback at position {step.rollback_at}, not at the first rejected token ({rule.rollback_at})"
        return f"the rollback appended {step.appended}, not the large model's argmax {argmax[i]}"
    if rule.decision == "rollback":
        return f"rollback at position {rule.rollback_at} expected, got {step.decision}"
    if rule.appended is None:
        where = "after EOS" if y[-1] == s.eos_token_id else f"past max_new_tokens = {s.max_new_tokens}"
        return f"token appended {where}: {step.appended}"
    if step.appended is None:
        return f"the large model's token {rule.appended} not appended after every pending token was accepted"
    return f"appended {step.appended}, not the large model's argmax beyond the pending tokens, {rule.appended}"


def _end(trace, y, verified, s: Settings) -> Finding | None:
    if ended(y, s.eos_token_id, s.max_new_tokens) and verified == len(y):
        return None
    k = len(trace) - 1
    if ended(y, s.eos_token_id, s.max_new_tokens):
        tail = "EOS" if y[-1] == s.eos_token_id else "the cap"
        return Finding("policy", k, f"tail left unverified: the trace stops after the small model reached {tail}, "
                                    f"with y[{verified}:] = {y[verified:]} never seen by the large model (the "
                                    "official implementation stops at the small model's EOS; minibild verifies "
                                    "the tail, docs/BILD.md)")
    return Finding("length", k, f"the trace stops before the output is complete: y = {y[1:]}")


def first_difference(expected: list, actual: list, tolerance: float) -> int | None:
    """Index of the first call that differs (a missing call counts), or None when the traces are equivalent."""
    for k, (e, a) in enumerate(zip(expected, actual)):
        if decisions(e) != decisions(a) or _float_difference(e, a, tolerance):
            return k
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def _float_difference(e, a, tolerance: float) -> str | None:
    if e.model == "small":
        if _far(_log(e.prob), _log(a.prob), tolerance):
            return f"probability {e.prob:.6g} vs {a.prob:.6g}"
        return None
    for i, (x, z) in enumerate(zip(e.cross_entropy, a.cross_entropy)):
        if _far(x, z, tolerance):
            return f"cross-entropy at position {e.start + 1 + i}: {x:.6g} vs {z:.6g}"
    return None


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _far(x: float, z: float, tolerance: float) -> bool:
    return not (x == z or abs(x - z) <= tolerance)  # x == z: equal infinities


def classify(e, a, k: int, margins: list[float] | None, settings: Settings | None, tolerance: float) -> Finding:
    """Why call k differs, ACTUAL being consistent with the policy and its caches up to it."""
    if e.model == "small":
        argmaxes = [(e.start + len(e.fed) - 1, e.token, a.token, -1)]  # (position, expected, actual, logits row)
    else:
        argmaxes = [(e.start + i, x, z, i) for i, (x, z) in enumerate(zip(e.argmax, a.argmax))]
    for position, x, z, i in argmaxes:
        if x == z:
            continue
        where = f"argmax at position {position}: expected {x}, actual {z}"
        if margins is not None:
            kind = "numerics" if margins[i] < tolerance else "model"
            return Finding(kind, k, f"{where}, where the expected top-1/top-2 margin is {margins[i]:.3g} nats, "
                                    f"{'below' if kind == 'numerics' else 'not below'} the tolerance {tolerance:g}")
        bound = _margin_bound(e, i)
        if bound >= tolerance:
            return Finding("model", k, f"{where}, where the expected top-1/top-2 margin is at least {bound:.3g} nats "
                                       f"(from the trace's probability), not below the tolerance {tolerance:g}")
        return Finding("unclassified", k, f"{where}; give --logits to tell a near-tie from a model error")
    floats = _float_difference(e, a, tolerance)
    if floats:
        return Finding("model", k, f"{floats}: more than the tolerance {tolerance:g} nats apart")
    if settings:  # same argmaxes, numbers within the tolerance, another decision: a threshold near-tie?
        if e.model == "small":
            gap = abs(_log(e.prob) - math.log(settings.fallback_threshold)) if settings.fallback_threshold else math.inf
            what = f"probability {e.prob:.6g}, fallback threshold {settings.fallback_threshold}"
        else:
            gaps = [abs(ce - settings.rollback_threshold) for ce, token, argmax
                    in zip(e.cross_entropy, e.fed[1:], e.argmax) if token != argmax]
            gap, what = min(gaps, default=math.inf), f"rollback threshold {settings.rollback_threshold}"
        if gap < tolerance:
            return Finding("numerics", k, f"decision {e.decision} vs {a.decision}, {gap:.3g} nats from the "
                                          f"threshold ({what}), below the tolerance {tolerance:g}")
        return Finding("unclassified", k, f"decision {e.decision} vs {a.decision} on the same numbers, no "
                                          "threshold near-tie: was EXPECTED made with these settings?")
    return Finding("unclassified", k, f"decision {e.decision} vs {a.decision}; give --case to check the policy")


def _margin_bound(e, i: int) -> float:
    """Without logits, the trace still bounds EXPECTED's margin where it knows the top probability p: the second
    one is at most 1 - p, so the margin is at least log p - log(1 - p). Known at a small call, and at a pending
    position of a large call whose token is the argmax (its cross-entropy is -log p); -inf elsewhere."""
    if e.model == "small":
        p = e.prob
    elif i < len(e.cross_entropy) and e.fed[1 + i] == e.argmax[i]:
        p = math.exp(-e.cross_entropy[i])
    else:
        return -math.inf
    return _log(p) - _log(1 - p) if p < 1 else math.inf


@dataclass
class Report:
    expected: list
    actual: list
    divergence: int | None  # first differing call, None when equivalent
    finding: Finding | None  # the classification; its step may precede the divergence (a bug shows up there)
    later: Finding | None = None  # an error of ACTUAL alone after a numerical divergence

    @property
    def equivalent(self) -> bool:
        return self.divergence is None and self.finding is None

    def __str__(self) -> str:
        if self.equivalent:
            return f"equivalent: {len(self.actual)} calls, the same fed tokens, argmaxes and decisions"
        lines = []
        k = self.divergence
        if k is not None:
            lines.append(f"first divergent call: {k + 1} of {len(self.expected)} expected, {len(self.actual)} actual")
            lines.append(f"  expected: {self.expected[k] if k < len(self.expected) else '(no call)'}")
            lines.append(f"  actual:   {self.actual[k] if k < len(self.actual) else '(no call)'}")
            if k < min(len(self.expected), len(self.actual)):
                lines += [f"  differs: {d}" for d in differences(self.expected[k], self.actual[k])]
        f = self.finding
        lines.append(f"{f.kind} error at call {f.step + 1}: {f.why}" if f.kind in ("cache", "policy", "model")
                     else f"{f.kind} at call {f.step + 1}: {f.why}")
        if self.later:
            lines.append(f"also, later: {self.later.kind} error at call {self.later.step + 1}: {self.later.why}")
        return "\n".join(lines)


def differences(e, a) -> list[str]:
    names = ["model", "start", "fed"] + (["token", "decision"] if e.model == "small" else
                                         ["argmax", "decision", "rollback_at", "appended"])
    return [f"{name}: {x} vs {z}" for name, x, z in zip(names, decisions(e), decisions(a)) if x != z]


def diff(expected: list, actual: list, settings: Settings | None = None, logits: list[dict] | None = None,
         tolerance: float = TOLERANCE["float32"]) -> Report:
    """Compare ACTUAL with EXPECTED (see the module docstring); logits: EXPECTED's logits records, one per call."""
    k = first_difference(expected, actual, tolerance)
    own = check(actual, settings)
    if own is not None and (k is None or own.step <= k):
        return Report(expected, actual, k, own)
    if k is None:
        return Report(expected, actual, None, None)
    if k >= len(expected) or k >= len(actual):
        longer = "ACTUAL" if len(actual) > len(expected) else "EXPECTED"
        return Report(expected, actual, k, Finding("length", k, f"{longer} goes on after the other stops"), own)
    e, a = expected[k], actual[k]
    if decisions(e)[:3] != decisions(a)[:3]:  # another call altogether: an earlier decision differs in effect
        return Report(expected, actual, k, Finding("unclassified", k, "another call than expected; give --case to "
                                                                      "check ACTUAL's policy"), own)
    margins = logits[k]["margin"] if logits else None
    return Report(expected, actual, k, classify(e, a, k, margins, settings, tolerance), own)


def fail(message: str):
    """A file or argument it cannot use: exit status 2, as argparse's own errors, not 1 (the traces differ)."""
    print(f"minibild.diff: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_trace(path) -> list:
    try:
        return trace_from_jsonl(Path(path).read_text())
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{path} is not a BiLD trace (JSON lines as minibild.trace writes them): {e}")


def read_json_lines(path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines()]
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read JSON lines: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minibild.diff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expected", help="the expected trace (JSON lines), e.g. a conformance case's trace.float32.jsonl")
    p.add_argument("actual", help="the trace to check (JSON lines)")
    p.add_argument("--case", help="the conformance case's case.json: settings for the policy check")
    p.add_argument("--logits", help="the expected logits records (logits.DTYPE.jsonl): margins for near-ties")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32",
                   help="what ACTUAL computed in; sets the default tolerance (default float32)")
    p.add_argument("--tolerance", type=float, help="nats (default: 1e-3 for float32, 1e-9 for float64)")
    args = p.parse_args(argv)
    expected, actual = read_trace(args.expected), read_trace(args.actual)
    settings = None
    if args.case:
        try:
            settings = Settings.from_case(json.loads(Path(args.case).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"--case {args.case}: expected a conformance case.json: {e}")
    logits = read_json_lines(args.logits) if args.logits else None
    if logits is not None and len(logits) != len(expected):
        fail(f"--logits {args.logits} has {len(logits)} records, the expected trace {len(expected)} calls: give the "
             "logits file of the same case and dtype")
    tolerance = TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
    report = diff(expected, actual, settings, logits, tolerance)
    print(report)
    return 0 if report.equivalent else 1


if __name__ == "__main__":
    sys.exit(main())
