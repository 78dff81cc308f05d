"""An oracle for black boxes: check a decoder's outputs, or a sampler's distribution, against minibild, when all the
implementation under test can give is outputs (a fused loop, a serving engine, transformers' assisted generation).

    python -m minibild.oracle outputs --large L [--small S] --rule bild OUTPUTS.jsonl   # {"input_ids", "tokens"}
    python -m minibild.oracle sampler --large L --input-ids 3,4,1 --temperature 1 --max-new-tokens 2 SAMPLES.jsonl

check_outputs: each output must equal minibild's (the large model's greedy output, bild.generate's, or the official
implementation's). At the first differing token the report says whether that was a near-tie, from minibild's run on
the shared prefix: the large model's logit gap between the two tokens (greedy), or the decision of the run that came
closest to flipping at or before that token (BiLD: each argmax margin, each fallback probability's log-distance from
the fallback threshold, each cross-entropy's distance from the rollback threshold). Below `tolerance` nats it is
numerics (a float32 port may flip it), above it a bug.

check_sampler: n outputs, one per seed, tested against ancestral sampling from the large model at the temperature
(docs/ORACLE.md derives every number):
- Enumerated: when the complete outputs number at most max_outputs, their exact probabilities are computed, and the
  statistic is the total variation (TV) distance between the samples' empirical distribution and the exact one.
- Otherwise a probability integral transform (Rosenblatt): outputs ordered lexicographically by token id, each sample
  x becomes u = P(X < x) + v P(X = x) with v uniform, computed exactly from the conditionals along x's own prefixes
  (one teacher-forced forward); under the reference the u are exactly iid uniform. The statistic is the
  Kolmogorov-Smirnov distance of the u from uniform, i.e. of the samples' lexicographic CDF from the exact one.
The p-value is valid at every n, with no asymptotics: exact from a Monte Carlo null drawn from the exact reference,
p = (1 + #{null >= observed}) / (M + 1), when false_alarm >= 1e-3 (M = 20 / false_alarm - 1 draws); below that, from
a bound proven for every n (McDiarmid for TV, Dvoretzky-Kiefer-Wolfowitz-Massart for KS), which is conservative.
The detectable distance is the smallest distance from the reference at which this n fails a sampler with
probability at least 0.99.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import bild, official
from .conformance import recording_logits
from .generate import check_count, check_eval, check_one_source, greedy
from .model import T5
from .sampling import check_temperature

NEAR_TIE = 1e-3  # nats: float32 rounding moves a logit by ~1e-6 on tiny models, more on large ones (diff.TOLERANCE)
MAX_OUTPUTS = 10_000  # enumerate the reference when the complete outputs are at most this many
MONTE_CARLO_LEAST = 1e-3  # the smallest false-alarm rate given a Monte Carlo null (20 / rate draws)
POWER = 0.99  # the detectable distance is detected with at least this probability


# --- outputs ----------------------------------------------------------------------------------------------------

@dataclass
class Departure:
    source: int  # index of the source in `sources`
    position: int  # first differing output token, from 0 (decoder-start token excluded)
    expected: int | None  # minibild's token there; None: minibild's output ended before
    actual: int | None  # the checked output's token; None: it ended before
    distance: float  # nats from flipping, of the closest decision (inf: a length error, no decision explains it)
    where: str  # that decision, in words
    verdict: str  # "numerics" (distance below the tolerance) or "bug"

    def __str__(self):
        tokens = f"minibild {_token(self.expected)}, yours {_token(self.actual)}"
        head = f"source {self.source}: departs at token {self.position} ({tokens})"
        if math.isinf(self.distance):
            return f"{head}: {self.where}: a bug"
        return f"{head}, where {self.where} differ by {self.distance:.2g} nats: {self.verdict}"


@dataclass
class OutputsReport:
    rule: str
    total: int
    equal: int
    tolerance: float
    departures: list[Departure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.equal == self.total

    @property
    def bugs(self) -> list[Departure]:
        return [d for d in self.departures if d.verdict == "bug"]

    def __str__(self):
        head = (f"{self.rule}: {self.equal} of {self.total} outputs equal minibild's "
                f"({len(self.bugs)} bugs, {len(self.departures) - len(self.bugs)} numerics at tolerance "
                f"{self.tolerance:g} nats): {'PASS' if self.passed else 'FAIL'}")
        return "\n".join([head] + [str(d) for d in self.departures])


def check_outputs(decode, large: T5, small: T5 | None, sources, *, rule: str, tolerance: float = NEAR_TIE,
                  **settings) -> OutputsReport:
    """decode(input_ids (1, S)) -> list[int] is the decoder under test; each output is compared with minibild's
    under `rule`: "greedy" (the large model's greedy output; settings: max_new_tokens), "bild" (bild.generate with
    the settings) or "official" (minibild.official.generate with the settings)."""
    reference = _reference(rule, large, small, settings)
    report = OutputsReport(rule, 0, 0, tolerance)
    for index, input_ids in enumerate(sources):
        input_ids = torch.as_tensor(input_ids).reshape(1, -1)
        expected, closest = reference(input_ids)
        actual = _tokens(decode(input_ids), f"decode's output for source {index}", large.config.vocab_size)
        report.total += 1
        if actual == expected:
            report.equal += 1
            continue
        k = next((i for i, (e, a) in enumerate(zip(expected, actual)) if e != a), min(len(expected), len(actual)))
        e, a = (expected[k] if k < len(expected) else None), (actual[k] if k < len(actual) else None)
        if e is None or a is None:
            where = "minibild's output ended" if e is None else "your output ended"
            report.departures.append(Departure(index, k, e, a, math.inf, where, "bug"))
            continue
        distance, where = closest(k, e, a)
        report.departures.append(Departure(index, k, e, a, distance, where,
                                           "numerics" if distance < tolerance else "bug"))
    return report


def _reference(rule: str, large: T5, small, settings: dict):
    """input_ids -> (minibild's tokens, closest(k, e, a) -> (distance in nats, what)) for the rule."""
    if rule == "greedy":
        max_new_tokens = settings.pop("max_new_tokens", bild.MAX_NEW_TOKENS)
        if settings:
            raise ValueError(f"rule 'greedy' takes only max_new_tokens, got {sorted(settings)}")
        check_count("max_new_tokens", max_new_tokens)

        def run(input_ids):
            tokens = greedy(large, input_ids, max_new_tokens)[0]
            return tokens, lambda k, e, a: _large_gap(large, input_ids, tokens[:k], e, a)
        return run
    if rule not in ("bild", "official"):
        raise ValueError(f"rule must be 'greedy', 'bild' or 'official', got {rule!r}")
    if small is None:
        raise ValueError(f"rule {rule!r} needs the small model, got small=None")
    if rule == "official":
        generate = official.generate
    else:
        generate = bild.generate

    def run(input_ids):
        recording_large, recording_small, calls = recording_logits(large, small)
        result = generate(recording_large, recording_small, input_ids, **settings)
        if len(calls) != len(result.trace):
            raise RuntimeError(f"rule {rule!r}: {len(calls)} model calls but {len(result.trace)} trace steps; the "
                               "closest decision needs one step per call")
        return result.tokens, lambda k, e, a: _closest_decision(result.trace, calls, settings, k)
    return run


@torch.inference_mode()
def _large_gap(large: T5, input_ids, prefix: list[int], expected: int, actual: int):
    """The large model's logit of minibild's token minus that of the other, after the shared prefix."""
    y = torch.tensor([[large.config.decoder_start_token_id] + prefix], device=large.embed.weight.device)
    logits = large(input_ids.to(y.device), y)[0, -1].double()
    rank = int((logits > logits[actual]).sum())  # how many tokens the large model prefers to yours
    return (logits[expected] - logits[actual]).item(), f"the large model's logits for them (yours its number " \
                                                       f"{rank + 1})"


def _closest_decision(trace: list, calls: list, settings: dict, k: int):
    """The decision of minibild's BiLD run that came closest to flipping among those about output tokens 0..k, and
    its distance in nats. Token k sits at decoder position k + 1. A small call proposes position start + len(fed);
    row i of a large call predicts position start + 1 + i; rows after a rollback were never used."""
    fallback = settings.get("fallback_threshold", bild.FALLBACK_THRESHOLD)
    rollback = settings.get("rollback_threshold", bild.ROLLBACK_THRESHOLD)
    candidates = []
    for n, (step, logits) in enumerate(zip(trace, calls)):
        top = logits.double().topk(2, dim=-1).values  # (T, 2)
        if step.model == "small":
            position = step.start + len(step.fed)
            if position > k + 1:
                continue
            if step.decision != "fallback":
                margin = (top[-1, 0] - top[-1, 1]).item()
                candidates.append((margin, f"the small model's top two logits at token {position - 1} (call {n})"))
            if fallback > 0:
                gap = abs(math.log(step.prob) - math.log(fallback)) if step.prob > 0 else math.inf
                candidates.append((gap, f"the small model's log top probability at token {position - 1} (call {n}) "
                                        f"and log fallback_threshold {fallback}"))
            continue
        used = step.accepted + 1  # the rows read: up to the rejected one, or all but the one beyond, then that one
        for i in range(min(used, len(step.argmax))):
            position = step.start + 1 + i
            if position > k + 1:
                break
            margin = (top[i, 0] - top[i, 1]).item()
            candidates.append((margin, f"the large model's top two logits at token {position - 1} (call {n})"))
            if i < len(step.cross_entropy) and step.fed[1 + i] != step.argmax[i]:
                candidates.append((abs(step.cross_entropy[i] - rollback),
                                   f"the cross-entropy of the small model's token {position - 1} (call {n}) and "
                                   f"rollback_threshold {rollback}"))
    return min(candidates, key=lambda c: c[0])


def _tokens(output, what: str, vocab_size: int) -> list[int]:
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    if not isinstance(output, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in output):
        raise ValueError(f"{what} must be a list of token ids, got {output!r}")
    bad = [t for t in output if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} holds ids outside [0, {vocab_size}): {bad[:3]}")
    return list(output)


def _token(token) -> str:
    return "(ended)" if token is None else str(token)


# --- sampling ---------------------------------------------------------------------------------------------------

@dataclass
class SamplerReport:
    passed: bool
    p_value: float
    statistic: float  # the distance observed
    critical: float  # the statistic fails the sampler above this
    detectable: float  # the smallest distance failed with probability >= POWER at this n and false-alarm rate
    metric: str  # what the distances measure
    null: str  # how the p-value was computed
    n: int
    false_alarm: float
    outputs: int  # how many complete outputs there are
    invalid: str | None = None  # a sample that cannot come from the reference at all

    def __str__(self):
        if self.invalid:
            return f"FAIL: {self.invalid}"
        ruled_out = (f"a sampler {self.detectable:.3g} or more from the reference in {self.metric} fails with "
                     f"probability >= {POWER}" if self.detectable < 1 else
                     f"this n detects no {self.metric} for sure (the bound is {self.detectable:.3g} >= 1): draw more")
        return (f"{'PASS' if self.passed else 'FAIL'}: p = {self.p_value:.3g} at false-alarm rate {self.false_alarm:g} "
                f"({self.null}); {self.metric} {self.statistic:.4f} (fails above {self.critical:.4f}), "
                f"n = {self.n} of {self.outputs} possible outputs; {ruled_out}")


def check_sampler(sample, large: T5, input_ids, *, temperature: float, max_new_tokens: int, n: int,
                  false_alarm: float = 1e-6, top_k: int | None = None, max_outputs: int = MAX_OUTPUTS,
                  null: str = "auto", seed: int = 0) -> SamplerReport:
    """sample(seed) -> one complete output (decoder-start token excluded, EOS included) for seeds 0..n-1, tested
    against ancestral sampling from `large` at `temperature` (from its top_k tokens at each step, if given, as
    transformers' top_k does). null: "auto" (Monte Carlo when false_alarm >= 1e-3, else the bound), "monte-carlo"
    or "bound". seed: the oracle's own randomness (null draws, the transform's v)."""
    check_temperature(temperature, "check_outputs (rule 'greedy')")
    check_count("max_new_tokens", max_new_tokens)
    check_count("n", n)
    if top_k is not None:
        check_count("top_k", top_k)
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm!r}")
    if null not in ("auto", "monte-carlo", "bound"):
        raise ValueError(f"null must be 'auto', 'monte-carlo' or 'bound', got {null!r}")
    monte_carlo = null == "monte-carlo" or (null == "auto" and false_alarm >= MONTE_CARLO_LEAST)
    config = large.config
    check_eval("the large model", large)
    check_one_source(input_ids, config.vocab_size, "check_sampler")
    outputs = count_outputs(config.vocab_size, max_new_tokens)
    samples = [_tokens(sample(s), f"sample({s})", config.vocab_size) for s in range(n)]
    report = dict(n=n, false_alarm=false_alarm, outputs=outputs)

    def impossible(s: int, problem: str) -> SamplerReport:
        return SamplerReport(False, 0.0, math.inf, 0.0, math.nan, "", "", **report,
                             invalid=f"sample({s}) = {samples[s]} {problem}: the reference never gives it")

    for s, tokens in enumerate(samples):
        problem = _incomplete(tokens, config.eos_token_id, max_new_tokens)
        if problem:
            return impossible(s, problem)
    rng = np.random.default_rng(seed)
    if outputs <= max_outputs:
        metric = "total variation"
        reference = exact_distribution(large, input_ids, temperature, max_new_tokens, top_k)
        keys = list(reference)
        p = np.array([reference[key] for key in keys])
        index = {key: i for i, key in enumerate(keys)}
        zero = next((s for s, t in enumerate(samples) if reference[tuple(t)] == 0), None)
        if zero is not None:
            return impossible(zero, f"has probability 0 (a token outside the top {top_k})")
        counts = np.bincount([index[tuple(t)] for t in samples], minlength=len(keys))
        statistic = _tv(counts[None], p, n)[0]
        null_draws = lambda m: _tv(rng.multinomial(n, p / p.sum(), size=m), p, n)  # noqa: E731
        bound_mean = sum(_binomial_mad(n, p_i) for p_i in p) / (2 * n)  # E[TV] under the reference, exactly
        width = len(p)
        # How far the empirical distribution of n samples from any sampler Q strays from Q, with probability POWER:
        # E[TV] <= (1/2) sum sqrt(q(1-q)/n) <= (1/2) sqrt((outputs-1)/n) (Cauchy-Schwarz), plus McDiarmid's deviation.
        spread = 0.5 * math.sqrt((outputs - 1) / n) + math.sqrt(math.log(1 / (1 - POWER)) / (2 * n))
    else:
        metric = "Kolmogorov distance of the lexicographic CDF (at most the total variation)"
        u, at = _transform(large, input_ids, temperature, top_k, samples, rng)
        if not at.all():
            return impossible(int(np.argmin(at)), f"has probability 0 (a token outside the top {top_k})")
        statistic = _ks(u[None])[0]
        null_draws = lambda m: _ks(rng.random((m, n)))  # noqa: E731
        bound_mean, width = None, n
        spread = math.sqrt(math.log(2 / (1 - POWER)) / (2 * n))  # DKW-Massart for the sampler's own U
    if monte_carlo:
        draws = math.ceil(20 / false_alarm) - 1
        simulated = np.concatenate([null_draws(m) for m in _chunks(draws, max(1, 10_000_000 // width))])
        # Ties count against the sampler; rounding in the sums, too (1e-12).
        p_value = (1 + int((simulated >= statistic - 1e-12).sum())) / (draws + 1)
        k = math.floor(false_alarm * (draws + 1))  # p <= false_alarm iff the statistic beats the k-th largest draw
        critical = float(np.sort(simulated)[-k])
        how = f"Monte Carlo null, {draws} draws from the exact reference: exact"
    elif bound_mean is not None:
        p_value = min(1.0, math.exp(-2 * n * max(0.0, statistic - bound_mean) ** 2))
        critical = bound_mean + math.sqrt(math.log(1 / false_alarm) / (2 * n))
        how = "McDiarmid bound around the exact mean: valid at every n, conservative"
    else:
        p_value = min(1.0, 2 * math.exp(-2 * n * statistic ** 2))
        critical = math.sqrt(math.log(2 / false_alarm) / (2 * n))
        how = "Dvoretzky-Kiefer-Wolfowitz-Massart bound: valid at every n, conservative"
    # Under a sampler Q at distance d the statistic is at least d - dist(empirical, Q) (triangle inequality), and
    # dist(empirical, Q) <= spread with probability POWER: so d > critical + spread fails Q with that probability.
    detectable = critical + spread
    return SamplerReport(p_value > false_alarm, p_value, float(statistic), critical, detectable, metric, how,
                         **report)


def count_outputs(vocab_size: int, max_new_tokens: int) -> int:
    """How many complete outputs there are: ending at EOS after t-1 other tokens, for t < max_new_tokens, or any
    max_new_tokens tokens without an earlier EOS."""
    V, N = vocab_size, max_new_tokens
    return sum((V - 1) ** (t - 1) for t in range(1, N)) + V * (V - 1) ** (N - 1)


def step_probabilities(logits, temperature: float, top_k: int | None = None):
    """softmax(logits / T) in float64 (..., V), over the top_k largest logits only if given (ties at the k-th kept,
    as transformers' TopKLogitsWarper does)."""
    scores = logits.double() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[..., -1:], -math.inf)
    return scores.softmax(-1)


@torch.inference_mode()
def exact_distribution(large: T5, input_ids, temperature: float, max_new_tokens: int,
                       top_k: int | None = None) -> dict[tuple, float]:
    """{complete output: its probability under ancestral sampling at the temperature (from the top_k tokens at each
    step, if given)}, in float64, one batched uncached forward per output length."""
    eos, device = large.config.eos_token_id, large.embed.weight.device
    input_ids = input_ids.to(device)
    prefixes, probabilities, outputs = [[large.config.decoder_start_token_id]], [1.0], {}
    for t in range(1, max_new_tokens + 1):
        logits = large(input_ids.expand(len(prefixes), -1), torch.tensor(prefixes, device=device))[:, -1]
        going, going_p = [], []
        for y, p, row in zip(prefixes, probabilities, step_probabilities(logits, temperature, top_k).cpu().tolist()):
            for token, q in enumerate(row):
                if token == eos or t == max_new_tokens:
                    outputs[tuple(y[1:]) + (token,)] = p * q
                else:
                    going.append(y + [token])
                    going_p.append(p * q)
        prefixes, probabilities = going, going_p
    return outputs


@torch.inference_mode()
def _transform(large: T5, input_ids, temperature: float, top_k: int | None, samples: list[list[int]],
               rng) -> tuple[np.ndarray, np.ndarray]:
    """Each sample x -> (P(X < x) + v P(X = x) with v uniform, P(X = x)): X the reference's output, in lexicographic
    token order."""
    device = large.embed.weight.device
    below_and_at = {}
    for tokens in map(tuple, samples):
        if tokens in below_and_at:
            continue
        y = torch.tensor([[large.config.decoder_start_token_id, *tokens[:-1]]], device=device)
        p = step_probabilities(large(input_ids.to(device), y)[0], temperature, top_k).cpu()  # (len, V)
        below, prefix = 0.0, 1.0  # P(X < x) so far; P(X starts with x[:t])
        for t, token in enumerate(tokens):
            below += prefix * p[t, :token].sum().item()
            prefix *= p[t, token].item()
        below_and_at[tokens] = (below, prefix)
    below, at = np.array([below_and_at[tuple(t)] for t in samples]).T
    return below + rng.random(len(samples)) * at, at


def _incomplete(tokens: list[int], eos: int, max_new_tokens: int) -> str | None:
    if not 1 <= len(tokens) <= max_new_tokens:
        return f"has {len(tokens)} tokens, not 1 to max_new_tokens = {max_new_tokens}"
    if eos in tokens[:-1]:
        return f"goes on after EOS ({eos})"
    if tokens[-1] != eos and len(tokens) < max_new_tokens:
        return f"ends before EOS ({eos}) and before max_new_tokens = {max_new_tokens}"
    return None


def _tv(counts: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """(m, K) counts of n samples each -> (m,) total variation distances from p."""
    return 0.5 * np.abs(counts / n - p).sum(-1)


def _ks(u: np.ndarray) -> np.ndarray:
    """(m, n) numbers in [0, 1] -> (m,) Kolmogorov-Smirnov distances of each row's empirical CDF from uniform."""
    u = np.sort(u, axis=-1)
    n = u.shape[-1]
    i = np.arange(1, n + 1)
    return np.maximum((i / n - u).max(-1), (u - (i - 1) / n).max(-1))


def _binomial_mad(n: int, p: float) -> float:
    """E|X - np| for X ~ Binomial(n, p), by de Moivre's formula: 2 m C(n, m) p^m (1 - p)^(n - m + 1),
    m = floor(np) + 1."""
    m = math.floor(n * p) + 1
    if p <= 0 or m > n:
        return 0.0
    log = (math.log(2 * m) + math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1) + m * math.log(p)
           + (n - m + 1) * math.log1p(-p))
    return math.exp(log)


def _chunks(total: int, size: int):
    while total > 0:
        yield min(total, size)
        total -= size


# --- command line -----------------------------------------------------------------------------------------------

def read_outputs(path) -> list[dict]:
    """JSON lines, one object per output with a "tokens" list (and "input_ids" for check_outputs)."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
        if not isinstance(rows[-1], dict) or "tokens" not in rows[-1]:
            raise ValueError(f"{path}, line {number}: expected an object with a \"tokens\" list, got {line[:80]}")
    if not rows:
        raise ValueError(f"{path}: no outputs in it")
    return rows


def main(argv=None) -> int:
    from .weights import load
    p = argparse.ArgumentParser(prog="python -m minibild.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    outputs = commands.add_parser("outputs", help="check decoded outputs (one per source) against minibild's")
    outputs.add_argument("--small", help="small model (minibild checkpoint folder); rules bild and official")
    outputs.add_argument("--rule", choices=["greedy", "bild", "official"], required=True)
    outputs.add_argument("--fallback-threshold", type=float, default=bild.FALLBACK_THRESHOLD)
    outputs.add_argument("--rollback-threshold", type=float, default=bild.ROLLBACK_THRESHOLD)
    outputs.add_argument("--max-small-steps", type=int, default=bild.MAX_SMALL_STEPS)
    outputs.add_argument("--tolerance", type=float, default=NEAR_TIE, help=f"near-tie, nats (default {NEAR_TIE:g})")
    sampler = commands.add_parser("sampler", help="check samples of one source against ancestral sampling")
    sampler.add_argument("--input-ids", required=True, help="the source, comma-separated ids")
    sampler.add_argument("--temperature", type=float, required=True)
    sampler.add_argument("--false-alarm", type=float, default=1e-6)
    for command in (outputs, sampler):
        command.add_argument("--large", required=True, help="large model (minibild checkpoint folder)")
        command.add_argument("--max-new-tokens", type=int, default=bild.MAX_NEW_TOKENS)
        command.add_argument("file", help="JSON lines: {\"input_ids\": [...], \"tokens\": [...]} per output "
                                          "(outputs), {\"tokens\": [...]} per sample (sampler)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # float32 results can depend on how many threads split a matmul
    try:
        rows = read_outputs(args.file)
        large = load(args.large, dtype=torch.float64)
        if args.command == "sampler":
            try:
                input_ids = torch.tensor([[int(t) for t in args.input_ids.split(",")]])
            except ValueError:
                raise ValueError(f"--input-ids must be comma-separated ids, got {args.input_ids!r}") from None
            report = check_sampler(lambda seed: rows[seed]["tokens"], large, input_ids, temperature=args.temperature,
                                   max_new_tokens=args.max_new_tokens, n=len(rows), false_alarm=args.false_alarm)
        else:
            small = load(args.small, dtype=torch.float64) if args.small else None
            settings = dict(max_new_tokens=args.max_new_tokens)
            if args.rule != "greedy":
                settings |= dict(fallback_threshold=args.fallback_threshold,
                                 rollback_threshold=args.rollback_threshold, max_small_steps=args.max_small_steps)
            missing = [number for number, row in enumerate(rows, 1) if "input_ids" not in row]
            if missing:
                raise ValueError(f"{args.file}: outputs {missing[:3]} (counting from 1) have no \"input_ids\"")
            given = iter(rows)
            report = check_outputs(lambda input_ids: next(given)["tokens"], large, small,
                                   [row.get("input_ids") for row in rows], rule=args.rule, tolerance=args.tolerance,
                                   **settings)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
