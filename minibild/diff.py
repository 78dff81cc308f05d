"""Compare two BiLD traces (JSON lines, trace.py): did ACTUAL decode like EXPECTED, and if not, where and why?

    python -m minibild.diff EXPECTED.jsonl ACTUAL.jsonl [--case case.json] [--rule bild|official]
                            [--logits EXPECTED_LOGITS [ACTUAL_LOGITS]] [--dtype float32|float64] [--tolerance NATS]

Two traces are equivalent when they make the same calls (model, start, fed tokens), the same argmaxes (sampled
traces: the same drawn tokens) and the same decisions, with probabilities and cross-entropies equal up to the
tolerance (in nats: differences of log-probability), and ACTUAL follows the expected rule. Exit status 0 when they
are, 1 when not, with a report of the first divergent call and its classification; 2, with one line on stderr
naming the file, the line and the problem, for anything it cannot use: a file that is not a trace (trace.py
checks the schema), an unusable --case or logits file, traces of other settings, or a check that needs a setting
nobody gave.

Settings. A trace's header (trace.TraceHeader, written by trace_to_jsonl) says how it was made: the four settings,
the exit layer, the special ids, the dtype and the rule. --case (a conformance case.json) gives the same for a
trace without one; headers and --case must agree. Without any, the cache and order checks still run, the policy
check is skipped (the report says so), and where the cache check needs to know whether the small model shares the
large model's cache (early exit), the diff stops with exit 2 and names the missing setting instead of guessing.

The expected rule: bild (bild.generate, bild_sample) unless --rule, or else EXPECTED's header, says official
(minibild.official, the official implementation's policy, docs/BILD.md).

Classifications of the first divergence:

  cache     ACTUAL fed a call other tokens than exactly those its model's cache lacks: positions recomputed,
            skipped or fed twice. Read off ACTUAL alone, by replaying y and each model's cache length.
  policy    ACTUAL made a decision the expected rule does not make on ACTUAL's own numbers (its recorded argmaxes,
            probabilities and cross-entropies, replayed through bild.decide_small / bild.decide_large), named by
            the rule it breaks. Needs the settings.
  official  (rule bild) ACTUAL departs from BiLD's rule exactly as the official implementation does: every such
            departure is named, not only the first: D1 (only the first pending token above the rollback threshold
            is examined), D2 / D2c (decoding stops at the small model's EOS / at the length cap, the tail
            unverified), D3 (the large model runs again right after a rollback), the EOS defect (that extra call
            appends a token after an EOS correction), the re-feed (after a fallback the small model feeds again
            positions it had computed: wasted work, not a cache error). With the official rule these are expected.
  numerics  a near-tie: an argmax differs where EXPECTED's top-1/top-2 margin (from --logits) is below the
            tolerance, or a decision differs where EXPECTED's probability or cross-entropy is within the
            tolerance of its threshold. Not a bug; a float32 port may flip such a decision.
  model     ACTUAL follows the rule and its caches, but its numbers differ beyond the tolerance where no decision
            is a near-tie: the model itself computes other logits (weights, layers, output scale). When nearly
            every number is off by a tiny amount (at most 1e-4 nats), the report hints at a layer norm computed in
            float32: transformers 5.x computes T5's layer-norm variance in float32 even for a float64 model.
  draws     (sampled traces) the same probabilities, another token or decision: the random draws differ. A sampled
            trace records q's top probability and each token's p and q, not the uniforms drawn, so the diff replays
            every decision that does not depend on a draw (fallbacks, handovers, ends, the cache) and checks that a
            rejection was possible (p < q), but cannot replay an acceptance or a drawn token.
  unclassified  an argmax differs and neither --logits nor the trace's probabilities bound EXPECTED's margin
            there above the tolerance.

A cache or policy error at or before the first divergence wins: it is a bug whatever the numbers. When the traces
differ, the report ends with where the outputs first differ and, if ACTUAL departs as the official code does, which
named difference decided that token (the large call that kept or appended it, or the unverified tail); D3 fires
at every rollback, so this tells the one that changed the output from those that only cost calls. With ACTUAL's own
logits file too (--logits EXPECTED_LOGITS ACTUAL_LOGITS, records as in logits.DTYPE.jsonl), the report names the
first call and position whose top logits (ids both files list) differ by more than the tolerance, with the largest
difference there.

Traces are read a line at a time, side by side, and checked against trace.py's schema as they are read: memory
stays bounded whatever the files' size. Once ACTUAL's own first error is found the verdict is known, and the lines
after it are counted, not read.
"""
import argparse
import json
import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

# bild's rule is bound here, at import: the diff holds minibild's reading of the policy whatever a caller patches
# (official.py's rule looks bild.decide_large and bild.decide_small up when it runs).
from . import official
from .bild import decide_large, decide_small, ended
from .trace import LargeStep, SampledLargeStep, SampledSmallStep, SmallStep, TraceError, TraceHeader, read_records

# Default tolerances (nats) by the dtype ACTUAL computed in: float32 rounding moves a logit of the tiny models by
# about 1e-6; float64 ports agree with minibild to about 1e-13.
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
LAYER_NORM_HINT = 1e-4  # nats: every number off by at most this, and beyond the tolerance, looks like rounding
SAMPLED = (SampledSmallStep, SampledLargeStep)


class Unusable(ValueError):
    """An input the diff cannot use (exit status 2): the message is one line, naming the file or argument."""


@dataclass(frozen=True)
class Settings:
    """What the policy check needs besides the trace: a case's or a header's settings and special ids."""
    fallback_threshold: float
    rollback_threshold: float | None  # None when sampling
    max_small_steps: int
    max_new_tokens: int
    eos_token_id: int = 1
    shared_cache: bool = False  # early exit: a large call also runs the small model's layers over its positions
    decoder_start_token_id: int | None = None  # None: whatever the first call feeds

    @classmethod
    def from_case(cls, case: dict) -> "Settings":
        """A conformance case.json's settings; Unusable if it is not one."""
        if not isinstance(case, dict) or not isinstance(case.get("settings"), dict):
            raise Unusable('expected a conformance case.json, an object with "settings"')
        s = case["settings"]
        names = ("fallback_threshold", "rollback_threshold", "max_small_steps", "max_new_tokens")
        for name in names:
            number = s.get(name)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0 or \
                    name.startswith("max") and (not isinstance(number, int) or number < 1):
                raise Unusable(f'"settings"."{name}": expected a {"count" if name.startswith("max") else "number"}'
                               f", got {json.dumps(number)}")
        for name in ("eos_token_id", "decoder_start_token_id"):
            value = case.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise Unusable(f'"{name}": expected an id, got {json.dumps(value)}')
        exit_layer = case.get("exit_layer")
        if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int)):
            raise Unusable(f'"exit_layer": expected null or a layer count, got {json.dumps(exit_layer)}')
        return cls(*(float(s[n]) if n.endswith("threshold") else s[n] for n in names), case["eos_token_id"],
                   exit_layer is not None, case["decoder_start_token_id"])

    @classmethod
    def from_header(cls, header: TraceHeader) -> "Settings":
        return cls(**header.settings, eos_token_id=header.eos_token_id, shared_cache=header.exit_layer is not None,
                   decoder_start_token_id=header.decoder_start_token_id)


@dataclass(frozen=True)
class Finding:
    kind: str  # cache, policy, official, numerics, model, draws, unclassified or length
    step: int  # index of the call in the trace, from 0
    why: str


def decisions(step) -> tuple:
    """What must match exactly: everything but the floats."""
    if step.model == "small":
        return step.model, step.start, step.fed, step.token, step.decision
    if isinstance(step, SampledLargeStep):
        return step.model, step.start, step.fed, step.decision, step.rollback_at, step.appended
    return step.model, step.start, step.fed, step.argmax, step.decision, step.rollback_at, step.appended


class Replay:
    """ACTUAL replayed on its own, one call at a time: y, each model's cache length, the phase. `step` returns the
    first error it finds (then stop); the official differences it passes under rule bild collect in `official`."""

    def __init__(self, settings: Settings | None, rule: str = "bild"):
        self.s, self.rule = settings, rule
        self.y, self.verified = [], 1
        # Each model's cache length before its next call: (under the rule, under the other rule). They differ only
        # after a discard: bild keeps a fallen-back small call's entries and crops the large cache to a rollback;
        # the official code drops the fallen-back call's entries and the whole rolled-back call's.
        self.held = {"large": (0, 0), "small": (0, 0)}
        self.previous, self.discarded, self.k = None, None, -1
        self.official: list[Finding] = []
        self.unverified_end = None  # a small "end" where bild says "handover": an official label if nothing follows
        self.decided = []  # for each token of y, the large call that kept it (see apply)
        self.tail_from = None  # D2, D2c: y[tail_from:] was never verified

    def step(self, k: int, step) -> Finding | None:
        self.k, previous, s = k, self.previous, self.s
        if self.rule == "official" and isinstance(step, SAMPLED):
            raise Unusable("the official rule is greedy decoding: a sampled trace has no official counterpart")
        if not self.y:
            self.y, self.decided = [step.fed[0]], [None]  # the decoder-start token: the first call feeds it
            if s and s.decoder_start_token_id is not None and step.fed[0] != s.decoder_start_token_id:
                return Finding("policy", k, f"the first call feeds {step.fed[0]}, not the decoder-start token "
                                            f"{s.decoder_start_token_id}")
        if self.unverified_end is not None:
            return self.unverified_end
        again = step.model == "large" and previous is not None and previous.model == "large" \
            and previous.decision == "rollback"
        if self.rule == "official" and previous is not None and previous.model == "small" and \
                previous.decision == "end":
            return Finding("policy", k, "a call after the official code stopped at the small model's EOS or the cap "
                                        "(D2, D2c: it never verifies that tail)")
        if s and k and self.verified == len(self.y) and ended(self.y, s.eos_token_id, s.max_new_tokens) \
                and not again:
            return Finding("policy", k, f"a call after the output is complete: y = {self.y[1:]}")
        order = _order(step, previous, self.rule)
        if order:
            return Finding("policy", k, order)
        found = self._cache(k, step)
        if found:
            return found
        if again and self.rule == "bild":
            refed = f", re-feeding {_positions(step.start, previous.rollback_at)}" \
                if step.start < previous.rollback_at else ""
            self._name(k, "D3", f"the large model ran again right after its rollback at call {k}{refed} (minibild "
                                "hands control back to the small model at once)")
        return self._small(k, step) if step.model == "small" else self._large(k, step, again)

    def _name(self, k: int, what: str, why: str):
        self.official.append(Finding("official", k, f"{what}: {why}"))

    def _cache(self, k: int, step) -> Finding | None:
        y = self.y
        n, other = self.held[step.model]
        if (step.start, step.fed) == (n, y[n:]):
            return None
        shared = max(n, self.held["large"][0])  # where the small model would start on a shared cache
        if self.s is None and step.model == "small" and shared != n and (step.start, step.fed) == (shared, y[shared:]):
            raise Unusable(f"ACTUAL's call {k + 1} (small @{step.start}) starts where the large model's cache ends, "
                           "as an early-exit small model sharing the large model's cache does: whether it is one "
                           "decides if that is right, and neither a trace header nor --case gives exit_layer")
        if (step.start, step.fed) == (other, y[other:]) and self.rule == "bild" and \
                not (self.s and self.s.shared_cache):
            if step.model == "small":  # the official re-feed: a fallen-back call's entries were dropped
                self._name(k, "re-feed", f"the small model fed {_positions(step.start, n)} again, which its "
                                         "fallen-back call had computed (wasted work, not a cache error)")
            return None  # the large model's re-feed is D3's, named there
        if self.discarded is not None and (step.start, step.fed) == (n, y[n:] + [
                self.discarded]):
            return Finding("policy", k, f"fallback token kept instead of discarded: {self.discarded} (probability "
                                        f"{_confidence(self.previous):.4g}) was fed again as if it were pending")
        return Finding("cache", k, _cache_error(step, n, y))

    def _small(self, k: int, step) -> Finding | None:
        s, y = self.s, self.y
        sampled = isinstance(step, SampledSmallStep)
        if s:
            decide = official.decide_small if self.rule == "official" else decide_small
            rule = decide(y.copy(), self.verified, step.start, step.fed, step.token, _confidence(step),
                          s.fallback_threshold, s.max_small_steps, s.eos_token_id, s.max_new_tokens)
            if self.rule == "bild" and (rule.decision, step.decision) == ("handover", "end") and \
                    ended(y + [step.token], s.eos_token_id, s.max_new_tokens):
                # The official code's label where it stops (D2, D2c): an error only if the trace goes on.
                self.unverified_end = Finding("policy", k, _small_rule(step, rule, s))
                rule.decision = "end"
            if rule.decision != step.decision:
                return Finding("policy", k, _small_rule(step, rule, s))
        start_other = step.start + len(step.fed) if self.rule == "official" else step.start
        if step.decision == "fallback":
            self.discarded = None if sampled else step.token
            self.held["small"] = (step.start, start_other) if self.rule == "official" else \
                (step.start + len(step.fed), start_other)
        else:
            self.discarded = None
            self.held["small"] = (step.start + len(step.fed),) * 2
        apply(y, step, self.decided, k)
        self.previous = step
        return None

    def _large(self, k: int, step, again: bool) -> Finding | None:
        s, y = self.s, self.y
        # Its pending tokens: after a small phase y[verified:]; in the official code's extra call after a rollback
        # (D3), every token it feeds after the first.
        verified = step.start + 1 if again else self.verified
        scores = step.p if isinstance(step, SampledLargeStep) else step.cross_entropy
        pending = len(y) - verified
        if len(scores) != pending:
            return Finding("policy", k, f"a large call over {pending} pending tokens must give {pending + 1} "
                                        f"argmaxes and {pending} cross-entropies (or p and q), got {len(scores)}")
        if s:
            found = self._large_rule(k, step, verified, again)
            if found:
                return found
        self.discarded = None
        apply(y, step, self.decided, k)
        self.verified = len(y)
        large = step.start + len(step.fed)
        if step.decision == "rollback":  # both caches keep y[:rollback_at] at most (the official: the large one less)
            under = {"bild": step.rollback_at, "official": step.start}
            other = "bild" if self.rule == "official" else "official"
            self.held["large"] = (under[self.rule], under[other])
            self.held["small"] = tuple(min(n, step.rollback_at) for n in self.held["small"])
        else:
            self.held["large"] = (large, large)
        if s and s.shared_cache:  # the call ran the early-exit layers over every position it fed
            self.held["small"] = tuple(max(n, large if step.decision == "accept" else step.rollback_at)
                                       for n in self.held["small"])
        self.previous = step
        return None

    def _large_rule(self, k: int, step, verified: int, again: bool) -> Finding | None:
        s, y = self.s, self.y
        if isinstance(step, SampledLargeStep):
            return _sampled_rule(k, step, y, verified, s)
        ours = decide_large(y.copy(), verified, step.start, step.fed, step.argmax, step.cross_entropy,
                            s.rollback_threshold, s.eos_token_id, s.max_new_tokens)
        theirs = official.decide_large(y.copy(), step.start, step.fed, step.argmax, step.cross_entropy,
                                       s.rollback_threshold, s.max_new_tokens)
        rule = theirs if self.rule == "official" else ours
        made = (step.decision, step.rollback_at, step.appended)
        if made == (rule.decision, rule.rollback_at, rule.appended):
            return None
        if self.rule == "bild" and made == (theirs.decision, theirs.rollback_at, theirs.appended):
            if again and y[-1] == s.eos_token_id:
                self._name(k, "EOS defect", f"the rollback's correction was EOS, and the extra large call appended "
                                            f"{step.appended} after it; decoding went on (a defect of the official "
                                            "implementation)")
                return None
            if (ours.decision, theirs.decision) == ("rollback", "accept"):
                self._name(k, "D1", _large_rule(step, ours, y, verified, s))
                return None
        if self.rule == "official":
            return Finding("policy", k, f"the official rule (D1: only the first pending token above the rollback "
                                        f"threshold {s.rollback_threshold} is examined; no EOS check) gives "
                                        f"{_decision(rule)}, not {_decision(step)}")
        return Finding("policy", k, _large_rule(step, rule, y, verified, s))

    def end(self) -> Finding | None:
        """At the end of the trace: is the output complete, and verified as the rule requires?"""
        s, y, k = self.s, self.y, self.k
        if not s or not y:
            return None
        if ended(y, s.eos_token_id, s.max_new_tokens) and self.verified == len(y):
            return None
        if ended(y, s.eos_token_id, s.max_new_tokens) and self.previous.model == "small":
            tail = "EOS" if y[-1] == s.eos_token_id else "the cap"
            if self.rule == "official":
                return None
            self.tail_from = self.verified
            self._name(k, "D2" if tail == "EOS" else "D2c",
                       f"the trace stops after the small model reached {tail}, with y[{self.verified}:] = "
                       f"{y[self.verified:]} never seen by the large model (minibild verifies the tail)")
            return None
        return Finding("length", k, f"the trace stops before the output is complete: y = {y[1:]}")


def apply(y: list[int], step, decided: list, k: int):
    """Call k's effect on y, and on decided: for each token of y, the large call that accepted or appended it
    (None while it is pending)."""
    if step.model == "small":
        if step.decision != "fallback":
            y.append(step.token)
            decided.append(None)
        return
    for i in range(step.start + 1, min(step.rollback_at or len(y), len(y))):  # the pending tokens it keeps
        if decided[i] is None:
            decided[i] = k
    if step.decision == "rollback":
        del y[step.rollback_at:], decided[step.rollback_at:]
    if step.appended is not None:
        y.append(step.appended)
        decided.append(k)


def output_difference(expected_y: list[int], replay: Replay) -> str:
    """Where ACTUAL's output first differs from EXPECTED's, and which named official difference made that token."""
    y = replay.y
    if expected_y == y:
        return f"output: the same {len(y) - 1} tokens"
    p = next((i for i, (x, z) in enumerate(zip(expected_y, y)) if x != z), min(len(expected_y), len(y)))
    shown = lambda ys: ys[p] if p < len(ys) else "(none)"  # noqa: E731
    text = f"output: first differs at token {p}: expected {shown(expected_y)}, actual {shown(y)}"
    named = [f for f in replay.official if not f.why.startswith("re-feed")]
    if not named:
        return text
    if p >= len(y) or (replay.tail_from is not None and p >= replay.tail_from):
        tail = next((f for f in named if f.why.startswith(("D2:", "D2c:"))), None)
        if tail:
            return f"{text}, in the tail left unverified ({tail.why.split(':')[0]})"
    c = replay.decided[p] if p < len(y) and replay.decided[p] is not None else replay.k
    here = sorted((f for f in named if f.step == c), key=lambda f: f.why.startswith("D3"))  # the EOS defect first
    by = next(iter(here), None) or next((f for f in reversed(named) if f.step < c), None)
    if by is None:
        return f"{text}: decided by call {c + 1}, which no named difference explains"
    how = "decided there by" if by.step == c else f"decided by call {c + 1}, in the phases as shifted by"
    return f"{text}, {how} {by.why.split(':')[0]} at call {by.step + 1}"


def _sampled_rule(k: int, step: SampledLargeStep, y: list[int], verified: int, s: Settings) -> Finding | None:
    """What can be checked of a sampled large call without its draws: a rejection needs p < q; after all are
    accepted a token is drawn beyond unless y ended."""
    if step.decision == "rollback":
        i = step.rollback_at - verified
        if not 0 <= i < len(step.p):
            return Finding("policy", k, f"rejection at position {step.rollback_at}, outside the pending positions "
                                        f"{verified}..{len(y) - 1}")
        if step.p[i] >= step.q[i]:
            return Finding("policy", k, f"a token rejected though its acceptance probability min(1, p/q) is 1: "
                                        f"p = {step.p[i]:.4g} >= q = {step.q[i]:.4g} at position {step.rollback_at}")
        return None
    complete = ended(y, s.eos_token_id, s.max_new_tokens)
    if complete and step.appended is not None:
        where = "after EOS" if y[-1] == s.eos_token_id else f"past max_new_tokens = {s.max_new_tokens}"
        return Finding("policy", k, f"token appended {where}: {step.appended}")
    if not complete and step.appended is None:
        return Finding("policy", k, "no token drawn beyond the accepted tokens, though y has not ended")
    return None


def _confidence(step) -> float:
    """What the fallback threshold is compared with: the argmax's probability, or q's top one when sampling."""
    return step.confidence if isinstance(step, SampledSmallStep) else step.prob


def _decision(step) -> str:
    if step.decision == "rollback":
        return f"rollback at {step.rollback_at}, appending {step.appended}"
    return f"accept, appending {step.appended}"


def _order(step, previous, rule: str) -> str | None:
    """The order of calls: the large model first, then small phases and large calls in turn (the official code:
    and the large model again after each rollback)."""
    if previous is None:
        return None if step.model == "large" else "the large model must produce the first token"
    if step.model == "large" and previous.model == "large":
        if previous.decision == "rollback":
            return None  # D3: expected under the official rule, named under bild's
        return "two large calls in a row with no small call between them"
    if step.model == "small" and previous.model == "large" and previous.decision == "rollback" and rule == "official":
        return "the small model ran right after a rollback: the official code runs the large model again first (D3)"
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


def _small_rule(step, rule: SmallStep, s: Settings) -> str:
    p = f"probability {_confidence(step):.4g}, fallback threshold {s.fallback_threshold}"
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


def first_difference(expected: list, actual: list, tolerance: float) -> int | None:
    """Index of the first call that differs (a missing call counts), or None when the traces are equivalent."""
    for k, (e, a) in enumerate(zip(expected, actual)):
        if decisions(e) != decisions(a) or _float_difference(e, a, tolerance):
            return k
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def _floats(step) -> list[tuple[str, float]]:
    """A call's compared floats, as (what, log-probability or cross-entropy)."""
    if isinstance(step, SmallStep):
        return [("probability", _log(step.prob))]
    if isinstance(step, SampledSmallStep):
        return [("top probability", _log(step.confidence))] + ([] if step.q is None else [("q", _log(step.q))])
    if isinstance(step, LargeStep):
        return [(f"cross-entropy at position {step.start + 1 + i}", ce) for i, ce in enumerate(step.cross_entropy)]
    return [(f"{name} at position {step.start + 1 + i}", _log(x)) for name, values in (("p", step.p), ("q", step.q))
            for i, x in enumerate(values)]


def _float_difference(e, a, tolerance: float) -> str | None:
    for (what, x), (_, z) in zip(_floats(e), _floats(a)):
        if _far(x, z, tolerance):
            return f"{what}: {_shown(x, what)} vs {_shown(z, what)}"
    return None


def _shown(value: float, what: str) -> str:
    return f"{value:.6g}" if what.startswith("cross") else f"{math.exp(value):.6g}"


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _far(x: float, z: float, tolerance: float) -> bool:
    return not (x == z or abs(x - z) <= tolerance)  # x == z: equal infinities


def classify(e, a, k: int, margins: list[float] | None, settings: Settings | None, tolerance: float) -> Finding:
    """Why call k differs, ACTUAL being consistent with the rule and its caches up to it."""
    floats = _float_difference(e, a, tolerance)
    if isinstance(e, SAMPLED):
        if floats:
            return Finding("model", k, f"{floats}: more than the tolerance {tolerance:g} nats apart")
        return Finding("draws", k, "the same probabilities, another draw: the random draws differ (another seed or "
                                   "generator, or draws in another order than sampling.py states); a sampled trace "
                                   "does not record them, so this decision cannot be replayed")
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
    elif i < len(e.cross_entropy) and 1 + i < len(e.fed) and e.fed[1 + i] == e.argmax[i]:
        p = math.exp(-e.cross_entropy[i])
    else:
        return -math.inf
    return _log(p) - _log(1 - p) if p < 1 else math.inf


@dataclass
class Report:
    expected_calls: int
    actual_calls: int
    divergence: int | None  # first differing call, None when the calls are equivalent
    pair: tuple  # (EXPECTED's call, ACTUAL's call) at the divergence, None where a trace has no such call
    finding: Finding | None  # the error or classification; its step may precede the divergence (a bug shows there)
    later: Finding | None = None  # an error of ACTUAL alone after a numerical divergence
    official: list[Finding] = field(default_factory=list)  # ACTUAL's official differences, under rule bild
    notes: list[str] = field(default_factory=list)  # what was not checked, and hints

    @property
    def equivalent(self) -> bool:
        return self.divergence is None and self.finding is None and not self.official

    def __str__(self) -> str:
        lines = []
        if self.equivalent:
            lines.append(f"equivalent: {self.actual_calls} calls, the same fed tokens, argmaxes and decisions")
        k = self.divergence
        if k is not None:
            e, a = self.pair
            lines.append(f"first divergent call: {k + 1} of {self.expected_calls} expected, {self.actual_calls} actual")
            lines.append(f"  expected: {e if e is not None else '(no call)'}")
            lines.append(f"  actual:   {a if a is not None else '(no call)'}")
            if e is not None and a is not None:
                lines += [f"  differs: {d}" for d in differences(e, a)]
        if self.official:
            n = len(self.official)
            lines.append(f"ACTUAL departs from BiLD's rule as the official implementation does, {n} "
                         f"time{'s' * (n != 1)} (docs/BILD.md; --rule official expects it):")
            lines += [f"  call {f.step + 1}: {f.why}" for f in self.official]
        f = self.finding
        if f:
            lines.append(f"{f.kind} error at call {f.step + 1}: {f.why}" if f.kind in ("cache", "policy", "model")
                         else f"{f.kind} at call {f.step + 1}: {f.why}")
        if self.later:
            lines.append(f"also, later: {self.later.kind} error at call {self.later.step + 1}: {self.later.why}")
        return "\n".join(lines + self.notes)


def differences(e, a) -> list[str]:
    names = ["model", "start", "fed"] + (["token", "decision"] if e.model == "small" else
                                         ["decision", "rollback_at", "appended"] if isinstance(e, SampledLargeStep)
                                         else ["argmax", "decision", "rollback_at", "appended"])
    return [f"{name}: {x} vs {z}" for name, x, z in zip(names, decisions(e), decisions(a)) if x != z]


@dataclass
class _Spread:
    """How far apart the floats of the calls that agree are: for the layer-norm hint."""
    values: int = 0
    beyond: int = 0
    largest: float = 0.0
    smallest: float = math.inf

    def add(self, e, a, tolerance: float):
        for (_, x), (_, z) in zip(_floats(e), _floats(a)):
            if x == z:
                self.values += 1
                continue
            d = abs(x - z)
            self.values, self.beyond = self.values + 1, self.beyond + (d > tolerance)
            self.largest, self.smallest = max(self.largest, d), min(self.smallest, d)

    def hint(self) -> str | None:
        if self.values and self.beyond >= 0.9 * self.values and self.largest <= LAYER_NORM_HINT:
            return (f"hint: {self.beyond} of the {self.values} probabilities and cross-entropies compared differ, all "
                    f"by {self.smallest:.1g} to {self.largest:.1g} nats: a model that is right but rounds one step "
                    "in float32, as T5's layer norm in transformers 5.x does (it computes the variance in float32 "
                    "even for a float64 model); compute it in the model's dtype")
        return None


def diff(expected, actual, settings: Settings | None = None, logits=None, tolerance: float = TOLERANCE["float32"],
         *, rule: str = "bild", actual_logits=None) -> Report:
    """Compare ACTUAL with EXPECTED (see the module docstring), one call of each at a time: each an iterable of
    steps; logits: EXPECTED's logits records, one per call; actual_logits: ACTUAL's. Once the verdict is known
    (ACTUAL's own first error; or the first divergence, and then ACTUAL replayed to its end) the rest is counted,
    not read: an iterable with a `count_rest()` method (TraceFile) counts its remaining lines."""
    if rule == "official" and settings is None:
        raise Unusable("--rule official replays the official rule, which needs the settings: give --case or "
                       "traces with a header")
    replay, spread, agreeing = Replay(settings, rule), _Spread(), True
    expected, actual = iter(expected), iter(actual)
    logits = iter(logits) if logits is not None else None
    actual_logits = iter(actual_logits) if actual_logits is not None else None
    divergence = own = pair = margins = logit_note = None
    counts, k, expected_y = [0, 0], -1, []
    while own is None:
        k += 1
        reading = divergence is None or agreeing  # EXPECTED: up to the divergence, and on while the calls agree
        e, a = next(expected, None), next(actual, None)
        if e is None and a is None:
            break
        counts[0] += e is not None
        counts[1] += a is not None
        le = next(logits, None) if logits is not None and e is not None and reading else None
        la = next(actual_logits, None) if actual_logits is not None and divergence is None and a is not None else None
        if e is not None and a is not None and isinstance(e, SAMPLED) != isinstance(a, SAMPLED):
            raise Unusable(f"EXPECTED's call {k + 1} is {'sampled' if isinstance(e, SAMPLED) else 'greedy'}, "
                           f"ACTUAL's {'sampled' if isinstance(a, SAMPLED) else 'greedy'}: compare traces of one kind")
        if le is not None or logits is not None and e is not None and reading:
            _check_logits_record(le, e, k, "EXPECTED", logits)
        if e is not None:  # EXPECTED's output, to say where ACTUAL's differs
            expected_y = expected_y or [e.fed[0]]
            apply(expected_y, e, [None] * len(expected_y), k)
        if la is not None or actual_logits is not None and divergence is None and a is not None:
            _check_logits_record(la, a, k, "ACTUAL", actual_logits)
        if a is not None:
            own = replay.step(k, a)
        if reading:
            both = e is not None and a is not None
            agreeing = agreeing and both and decisions(e) == decisions(a)
            if agreeing:  # past the divergence too, while the calls agree: how far apart are their numbers?
                spread.add(e, a, tolerance)
        if divergence is None:
            if logit_note is None and la is not None and le is not None and decisions(e)[:3] == decisions(a)[:3]:
                logit_note = _logits_moved(le, la, k, e, tolerance)
            if not both or decisions(e) != decisions(a) or _float_difference(e, a, tolerance):
                divergence, pair, margins = k, (e, a), le["margin"] if le is not None else None
    counts[0] += _count_rest(expected)
    counts[1] += _count_rest(actual)
    if own is None:
        for extra, name in ((logits, "EXPECTED"), (actual_logits, "ACTUAL")):
            if extra is not None and divergence is None and next(extra, None) is not None:
                where = getattr(extra, "where", f"the logits of {name}")
                raise Unusable(f"{where}: more records than {name} has calls: give the logits file of the same trace")
    output = None
    if own is None and counts[1]:
        own = replay.end()
        output = output_difference(expected_y, replay) if divergence is not None else None
    expected_calls, actual_calls = counts
    notes = [output] if output else []
    if settings is None:
        notes.append("policy not checked: no header and no --case gives the settings")
    if actual_logits is not None:
        notes.append(logit_note or f"logits: every top logit of the calls both traces share up to the first "
                                   f"divergence is within {tolerance:g} of EXPECTED's")
    hint = spread.hint()  # the layer-norm hint
    if own is not None and (divergence is None or own.step <= divergence) and own.kind != "length":
        return Report(expected_calls, actual_calls, divergence, pair, own, None, replay.official, notes)
    if replay.official and divergence is not None and replay.official[0].step <= divergence:
        return Report(expected_calls, actual_calls, divergence, pair, own, None, replay.official, notes)
    if divergence is None:
        return Report(expected_calls, actual_calls, None, None, own, None, replay.official, notes)
    e, a = pair
    if e is None or a is None:
        longer = "ACTUAL" if a is not None else "EXPECTED"
        finding = Finding("length", divergence, f"{longer} goes on after the other stops")
    elif decisions(e)[:3] != decisions(a)[:3]:  # another call altogether: an earlier decision differs in effect
        finding = Finding("unclassified", divergence, "another call than expected; give --case to check ACTUAL's "
                                                      "policy")
    else:
        finding = classify(e, a, divergence, margins, settings, tolerance)
    if finding.kind == "model" and hint:
        notes.append(hint)
    return Report(expected_calls, actual_calls, divergence, pair, finding, own, replay.official, notes)


def _count_rest(calls) -> int:
    count_rest = getattr(calls, "count_rest", None)
    return count_rest() if count_rest else sum(1 for _ in calls)


def _check_logits_record(record, step, k: int, whose: str, records):
    """A logits record that can stand beside call k: an object with the call's model and start, and a margin and
    top logits per position fed."""
    where = getattr(records, "where", f"the logits of {whose}, record {k + 1}")
    if record is None:
        raise Unusable(f"{where.split(', line')[0]}: {k} records, fewer than {whose}'s calls: give the logits file of "
                       "the same trace")
    if not isinstance(record, dict):
        raise Unusable(f"{where}: expected a JSON object, got {json.dumps(record)[:40]}")
    for key in ("model", "start", "margin", "top_ids", "top_logits"):
        if key not in record:
            raise Unusable(f'{where}: missing field "{key}"')
    if (record["model"], record["start"]) != (step.model, step.start):
        raise Unusable(f"{where}: a record of the {record['model']} model at {record['start']}, but call {k + 1} is "
                       f"the {step.model} model's at {step.start}: give the logits file of the same trace")
    for key in ("margin", "top_ids", "top_logits"):
        rows = record[key]
        if not isinstance(rows, list) or len(rows) != len(step.fed) or not all(
                _numbers(row if key != "margin" else [row]) for row in rows):
            raise Unusable(f'{where}: field "{key}": expected one {"number" if key == "margin" else "list of numbers"}'
                           f" per position fed ({len(step.fed)}), got {json.dumps(rows)[:40]}")


def _numbers(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _logits_moved(expected: dict, actual: dict, k: int, step, tolerance: float) -> str | None:
    """Where ACTUAL's top logits at call k first move beyond the tolerance from EXPECTED's (the ids both list)."""
    worst = None
    for i, (ids, values, their_ids, theirs) in enumerate(zip(expected["top_ids"], expected["top_logits"],
                                                             actual["top_ids"], actual["top_logits"])):
        theirs = dict(zip(their_ids, theirs))
        for token, value in zip(ids, values):
            if token in theirs and (worst is None or abs(theirs[token] - value) > worst[0]):
                worst = (abs(theirs[token] - value), i, token, value, theirs[token])
    if worst is None or worst[0] <= tolerance:
        return None
    d, i, token, value, their = worst
    return (f"logits: first beyond the tolerance at call {k + 1} ({step.model} @{step.start}), position "
            f"{step.start + i}: largest difference {d:.3g}, for id {token}: expected {value:.6g}, actual {their:.6g}")


def fail(message: str):
    """A file or argument it cannot use: exit status 2, as argparse's own errors, not 1 (the traces differ)."""
    print(f"minibild.diff: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class TraceFile:
    """A trace file's calls, read and checked one line at a time (trace.read_records); `header` is its header
    record or None. `count_rest` counts the lines left unread once the diff has its verdict."""

    def __init__(self, stack: ExitStack, path):
        try:
            self.file = stack.enter_context(open(path, "rb"))
        except OSError as e:
            raise Unusable(f"cannot read {path}: {e.strerror}") from None
        self.records = read_records(self.file, str(path))
        first = next(self.records)  # read_records raises TraceError on a file without calls
        self.header, self.first = (first, None) if isinstance(first, TraceHeader) else (None, first)

    def __iter__(self):
        return self

    def __next__(self):
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return next(self.records)

    def count_rest(self) -> int:
        return (self.first is not None) + sum(1 for line in self.file if line.strip())


class LogitsFile:
    """A logits file's records (logits.DTYPE.jsonl), read one line at a time; `where` names the last one read."""

    def __init__(self, stack: ExitStack, path):
        try:
            self.file = stack.enter_context(open(path, "rb"))
        except OSError as e:
            raise Unusable(f"cannot read --logits {path}: {e.strerror}") from None
        self.path, self.line = path, 0

    def __iter__(self):
        return self

    def __next__(self):
        for raw in self.file:
            self.line += 1
            try:
                return json.loads(raw.decode("utf-8"))
            except ValueError as e:
                raise Unusable(f"{self.where}: not JSON: {e}") from None
        raise StopIteration

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def agreed_settings(case: Settings | None, headers: dict) -> Settings | None:
    """One set of settings from --case and the traces' headers, which must agree; None if none gives any."""
    given = ([("--case", case)] if case else []) + [(f"{name}'s header", Settings.from_header(h))
                                                      for name, h in headers.items() if h is not None]
    for (name, s), (other, t) in zip(given, given[1:]):
        for key in ("fallback_threshold", "rollback_threshold", "max_small_steps", "max_new_tokens", "eos_token_id",
                    "shared_cache", "decoder_start_token_id"):
            if getattr(s, key) != getattr(t, key):
                raise Unusable(f"{name} and {other} give other settings: {key} {getattr(s, key)} vs "
                               f"{getattr(t, key)}: compare traces of one case")
    return given[0][1] if given else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minibild.diff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expected", help="the expected trace (JSON lines), e.g. a conformance case's trace.float32.jsonl")
    p.add_argument("actual", help="the trace to check (JSON lines)")
    p.add_argument("--case", help="the conformance case's case.json: settings for traces without a header")
    p.add_argument("--rule", choices=("bild", "official"),
                   help="the expected policy: bild (bild.generate) or official (minibild.official); default: "
                        "EXPECTED's header, else bild")
    p.add_argument("--logits", nargs="+", metavar="LOGITS",
                   help="EXPECTED's logits records (logits.DTYPE.jsonl): margins for near-ties; then, optionally, "
                        "ACTUAL's own, to find where its logits move")
    p.add_argument("--dtype", choices=sorted(TOLERANCE),
                   help="what ACTUAL computed in; sets the default tolerance (default: ACTUAL's header, else float32)")
    p.add_argument("--tolerance", type=float, help="nats (default: 1e-3 for float32, 1e-9 for float64)")
    args = p.parse_args(argv)
    if args.logits and len(args.logits) > 2:
        p.error(f"--logits takes EXPECTED's logits file and optionally ACTUAL's, got {len(args.logits)} files")
    if args.tolerance is not None and not args.tolerance >= 0:
        p.error(f"--tolerance must be a number of nats >= 0, got {args.tolerance}")
    try:
        with ExitStack() as stack:
            report = run(stack, args)
    except (Unusable, TraceError) as e:
        fail(str(e))
    print(report)
    return 0 if report.equivalent else 1


def run(stack: ExitStack, args) -> Report:
    case = None
    if args.case:
        try:
            case = Settings.from_case(json.loads(Path(args.case).read_text()))
        except OSError as e:
            raise Unusable(f"cannot read --case {args.case}: {e.strerror}") from None
        except (ValueError, Unusable) as e:
            raise Unusable(f"--case {args.case}: {e}") from None
    expected, actual = TraceFile(stack, args.expected), TraceFile(stack, args.actual)
    headers = {"EXPECTED": expected.header, "ACTUAL": actual.header}
    settings = agreed_settings(case, headers)
    rule = args.rule or (headers["EXPECTED"].rule if headers["EXPECTED"] else "bild")
    dtype = args.dtype or (headers["ACTUAL"].dtype if headers["ACTUAL"] and headers["ACTUAL"].dtype in TOLERANCE
                           else "float32")
    tolerance = TOLERANCE[dtype] if args.tolerance is None else args.tolerance
    logits = [LogitsFile(stack, path) for path in args.logits or []]
    return diff(expected, actual, settings, logits[0] if logits else None, tolerance, rule=rule,
                actual_logits=logits[1] if len(logits) > 1 else None)


if __name__ == "__main__":
    sys.exit(main())
