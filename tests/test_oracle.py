"""Tests for minibild/oracle.py: both checks pass what is right and fail planted bugs, and say why.

Sampling: the planted samplers' exact distributions are computed by enumerating every path of the real, patched
bild_sample loop (test_sampling.enumerate_paths), so each one's total variation (TV) distance from the reference is
known exactly, and n is chosen so that it lies well above the distance the check detects with probability 0.99. The
check sees outputs only, so most planted samplers are then drawn from by inverse CDF over that exact distribution
(fast, the same distribution); one runs the patched loop itself end to end.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch

import minibild
from minibild import bild, oracle, sampling
from minibild.sampling import bild_sample
from test_sampling import SRC, distance, distribution, enumerate_paths, large_distribution, one_hot, pair, plant_draft
from tiny_models import model_pair, random_source

# --- sampling -----------------------------------------------------------------------------------------------------

# Seed 5's pair at T = 0.5 and two tokens (13 complete outputs): the pair and temperature, of 4 seeds and 4
# temperatures tried, whose smallest planted distance is largest (0.049, T x 1.1).
SEED, T, CAP, FALLBACK, N = 5, 0.5, 2, 0.0, 2


def inverse_cdf_sampler(dist: dict):
    """sample(seed) -> an output drawn from dist by one uniform: the distribution, without the loop's cost."""
    keys = sorted(dist)
    cumulative = np.cumsum([dist[key] for key in keys])

    def sample(seed):
        u = np.random.default_rng(seed).random() * cumulative[-1]
        return list(keys[min(int(np.searchsorted(cumulative, u, side="right")), len(keys) - 1)])
    return sample


def residual_unnormalized(p, q):
    """max(0, p - q) left unnormalized, as sampling.Uniforms draws from it: the missing mass goes to the last token
    with any probability (rounding's rule, there for a total just below 1)."""
    r = (p - q).clamp(min=0)
    r[r.nonzero()[-1]] += 1 - r.sum()
    return r


def temperature_on_the_draft_only(mp):
    verify = sampling.verify
    mp.setattr(sampling, "verify", lambda y, verified, start, fed, logits, q_rows, temperature, *rest: verify(
        y, verified, start, fed, logits, q_rows, 1.0, *rest))


PLANTED = {
    "draft tokens accepted with a greedy draft": lambda mp: plant_draft(mp, lambda q: one_hot(q.argmax(), q)),
    "residual not renormalized": lambda mp: mp.setattr(sampling, "residual", residual_unnormalized),
    "rejected position resampled from p": lambda mp: mp.setattr(sampling, "residual", lambda p, q: p),
    "temperature on the small model only": temperature_on_the_draft_only,
}


def planted_distribution(bug) -> dict:
    large, small = pair(SEED)
    with pytest.MonkeyPatch.context() as mp:
        if bug == "temperature x 1.1":
            return oracle.exact_distribution(large, SRC, 1.1 * T, CAP)
        PLANTED[bug](mp)
        paths = enumerate_paths(lambda draws: bild_sample(large, small, SRC, temperature=T,
                                                          fallback_threshold=FALLBACK, max_small_steps=N,
                                                          max_new_tokens=CAP, draws=draws))
    return distribution((p, result.tokens) for p, result in paths)


def check(sample, n, **options):
    return oracle.check_sampler(sample, pair(SEED)[0], SRC, temperature=T, max_new_tokens=CAP, n=n, **options)


def test_exact_distribution_matches_an_independent_enumeration():
    large = pair(SEED)[0]
    for temperature, cap in ((0.5, 2), (1.3, 3)):
        exact = oracle.exact_distribution(large, SRC, temperature, cap)
        assert len(exact) == oracle.count_outputs(4, cap)
        assert distance(exact, large_distribution(large, SRC, temperature, cap)) < 1e-12


def test_binomial_mean_absolute_deviation_is_exact():
    for n, p in ((7, 0.5), (200, 0.013), (2000, 0.9), (50, 1.0), (50, 0.0)):
        x = torch.arange(n + 1, dtype=torch.float64)
        pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(x).exp()
        direct = (pmf * (x - n * p).abs()).sum().item()
        assert math.isclose(oracle._binomial_mad(n, p), direct, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("name", ["minibild.sample", "bild_sample"])
def test_correct_samplers_pass(name):
    large, small = pair(SEED)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        if name == "minibild.sample":
            return minibild.sample(large, SRC, temperature=T, max_new_tokens=CAP, generator=generator)
        return bild_sample(large, small, SRC, temperature=T, fallback_threshold=0.3, max_small_steps=N,
                           max_new_tokens=CAP, generator=generator).tokens

    for options in (dict(), dict(max_outputs=0)):  # enumerated (TV) and transformed (KS)
        report = check(sample, 1500, **options)
        assert report.passed, report
        assert report.detectable < 0.2 and "PASS" in str(report)


@pytest.mark.parametrize("bug", [*PLANTED, "temperature x 1.1"])
def test_planted_samplers_fail_with_overwhelming_probability(bug):
    """n = 40000 at false alarm 1e-6 detects a TV of 0.036 with probability 0.99; every planted sampler is at least
    0.049 away, where McDiarmid bounds the probability that it passes by exp(-2n (d - critical - E)^2) < 1e-12."""
    reference = oracle.exact_distribution(pair(SEED)[0], SRC, T, CAP)
    planted = planted_distribution(bug)
    tv = distance(planted, reference)
    report = check(inverse_cdf_sampler(planted), 40_000)
    assert not report.passed, (bug, tv, report)
    assert report.detectable < 0.037 < 0.049 <= tv, (bug, tv, report)
    margin = tv - report.critical - 0.5 * math.sqrt((report.outputs - 1) / report.n)  # d - critical - E
    assert margin > 0 and math.exp(-2 * report.n * margin ** 2) < 1e-12, (bug, tv, report)


def test_a_planted_loop_fails_end_to_end():
    """The patched loop itself, with the generator's uniforms: TV 0.254 against a detectable 0.18 at n = 1500."""
    large, small = pair(SEED)
    with pytest.MonkeyPatch.context() as mp:
        temperature_on_the_draft_only(mp)
        report = check(lambda seed: bild_sample(large, small, SRC, temperature=T, fallback_threshold=FALLBACK,
                                                max_small_steps=N, max_new_tokens=CAP,
                                                generator=torch.Generator().manual_seed(seed)).tokens, 1500)
    assert not report.passed and report.detectable < 0.2, report
    assert report.p_value < 1e-6


def binomial_range(trials: int, rate: float, tail: float = 1e-6) -> tuple[int, int]:
    """Counts outside [low, high] have probability below `tail` each, for Binomial(trials, rate)."""
    pmf = [math.comb(trials, k) * rate ** k * (1 - rate) ** (trials - k) for k in range(trials + 1)]
    low = next(k for k in range(trials + 1) if sum(pmf[:k + 1]) > tail)
    high = next(k for k in range(trials, -1, -1) if sum(pmf[k:]) > tail)
    return low, high


@pytest.mark.parametrize("null, transformed, rate, trials, exact", [
    ("monte-carlo", False, 0.05, 400, True), ("monte-carlo", True, 0.1, 200, True),
    ("bound", False, 0.1, 400, False), ("bound", True, 0.1, 200, False)])
def test_the_false_alarm_rate_is_measured(null, transformed, rate, trials, exact):
    """A correct sampler (the exact reference, by inverse CDF), checked `trials` times with fresh seeds for both the
    samples and the oracle's own draws, at a rate where the count is measurable. The Monte Carlo null has size
    exactly `rate` (ties aside): the count must lie where Binomial(trials, rate) puts all but 2e-6 of its mass. The
    bounds are conservative: the count must not exceed that range's top. Seeds are fixed, so the outcome is too."""
    reference = oracle.exact_distribution(pair(SEED)[0], SRC, T, CAP)
    n = 200
    failures = 0
    for trial in range(trials):
        draw = inverse_cdf_sampler(reference)
        report = check(lambda seed: draw(trial * n + seed + 10**6), n, false_alarm=rate, null=null, seed=trial,
                       max_outputs=0 if transformed else oracle.MAX_OUTPUTS)
        failures += not report.passed
    low, high = binomial_range(trials, rate)
    assert failures <= high, (failures, low, high)
    if exact:
        assert failures >= low, (failures, low, high)


def test_impossible_samples_fail_at_once():
    report = check(lambda seed: [2, 1, 3], 5)
    assert not report.passed and report.p_value == 0 and "[2, 1, 3] has 3 tokens" in str(report)
    assert "goes on after EOS" in check(lambda seed: [1, 3], 5).invalid
    assert "ends before EOS" in oracle.check_sampler(lambda seed: [2], pair(SEED)[0], SRC, temperature=T,
                                                     max_new_tokens=3, n=2).invalid


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="false_alarm must be in"):
        check(lambda seed: [1], 5, false_alarm=0)
    with pytest.raises(ValueError, match="null must be"):
        check(lambda seed: [1], 5, null="asymptotic")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        check(lambda seed: [1], 0)
    with pytest.raises(ValueError, match=r"sample\(0\) must be a list of token ids"):
        check(lambda seed: "1", 3)


# --- outputs --------------------------------------------------------------------------------------------------------

SOURCES = [random_source(i) for i in range(12)]
SETTINGS = dict(fallback_threshold=0.3, rollback_threshold=5.0, max_small_steps=4, max_new_tokens=16)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_correct_decoders_pass():
    large, small = model_pair("disagree", 0)
    greedy = oracle.check_outputs(lambda ids: minibild.greedy(large, ids, 16)[0], large, None, SOURCES,
                                  rule="greedy", max_new_tokens=16)
    # bild.generate with rollback threshold 0 is the large model's greedy output, by construction.
    as_greedy = oracle.check_outputs(lambda ids: bild.generate(large, small, ids, **SETTINGS | dict(
        rollback_threshold=0.0)).tokens, large, small, SOURCES, rule="greedy", max_new_tokens=16)
    bild_ = oracle.check_outputs(lambda ids: bild.generate(large, small, ids, **SETTINGS).tokens, large, small,
                                 SOURCES, rule="bild", **SETTINGS)
    for report in (greedy, as_greedy, bild_):
        assert report.passed and report.equal == report.total == 12 and not report.departures, report
    # and these settings make BiLD's outputs differ from greedy's, so the bild rule is not the greedy one
    assert not oracle.check_outputs(lambda ids: minibild.greedy(large, ids, 16)[0], large, small, SOURCES,
                                    rule="bild", **SETTINGS).passed


def off_by_one_cache(model, at=3, cap=16):
    """Greedy with the cache, except that before token `at` the cache forgets its last position, so the new token
    overwrites its predecessor's keys and values."""
    def decode(input_ids):
        cache, y = model.new_cache(model.encode(input_ids), max_length=cap), [model.config.decoder_start_token_id]
        while not (len(y) > 1 and bild.ended(y, model.config.eos_token_id, cap)):
            if len(y) == at:
                cache.crop(cache.length - 1)
            y.append(model.decode(torch.tensor([[y[-1]]]), cache)[0, -1].argmax().item())
        return y[1:]
    return decode


def rollback_to_the_next_row(y, verified, start, fed, argmax, *rest, decide=bild.decide_large):
    """A wrong rollback: the correction is read from the row after the rejected token's."""
    step = decide(y, verified, start, fed, argmax, *rest)
    if step.decision == "rollback":
        y[-1] = argmax[step.rollback_at - verified + 1]
    return step


def test_planted_bugs_fail_with_the_position_named():
    large, small = model_pair("disagree", 0)
    decode = off_by_one_cache(large)
    report = oracle.check_outputs(decode, large, None, SOURCES, rule="greedy", max_new_tokens=16)
    assert not report.passed and report.equal == 6 and len(report.bugs) == 6, report
    for d in report.departures:
        expected, actual = minibild.greedy(large, SOURCES[d.source], 16)[0], decode(SOURCES[d.source])
        assert d.position == first_difference(expected, actual) >= 2  # the cache is right before token 2
        assert (d.expected, d.actual) == (expected[d.position], actual[d.position])
        assert f"departs at token {d.position}" in str(d) and str(d).endswith(": bug") and d.distance > 0.01

    def wrong_rollback(input_ids):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bild, "decide_large", rollback_to_the_next_row)
            return bild.generate(large, small, input_ids, **SETTINGS).tokens

    report = oracle.check_outputs(wrong_rollback, large, small, SOURCES, rule="bild", **SETTINGS)
    assert not report.passed and len(report.bugs) >= 4, report
    for d in report.departures:
        assert d.position == first_difference(bild.generate(large, small, SOURCES[d.source], **SETTINGS).tokens,
                                              wrong_rollback(SOURCES[d.source]))


def near_tie(model, source, k, delta):
    """A copy of model whose LM head gives the runner-up at greedy token k the top token's logit minus delta there
    (delta < 0: the runner-up wins by |delta|)."""
    model = copy.deepcopy(model)
    tokens = minibild.greedy(model, source, 16)[0]
    y = torch.tensor([[model.config.decoder_start_token_id] + tokens[:k]])
    with torch.inference_mode():
        cache = model.new_cache(model.encode(source), max_length=k + 1)
        h = model.decoder(model.embed(y), cache)[0, -1]  # (d_model,) the LM head's input at token k
        logits = model.logits(h[None, None])[0, 0]
    top, runner_up = logits.topk(2).indices.tolist()
    with torch.no_grad():
        model.lm_head.weight[runner_up] = model.lm_head.weight[top] - delta * h / h.dot(h)
    return model


def test_a_near_tie_is_called_numerics():
    large, small = model_pair("disagree", 0)
    source = SOURCES[0]
    reference, flipped = near_tie(large, source, 2, 1e-9), near_tie(large, source, 2, -1e-9)
    report = oracle.check_outputs(lambda ids: minibild.greedy(flipped, ids, 16)[0], reference, None, [source],
                                  rule="greedy", max_new_tokens=16)
    (d,) = report.departures
    assert not report.passed and d.position == 2 and d.verdict == "numerics" and d.distance < 1e-8, report
    assert "differ by" in str(d) and str(d).endswith("nats: numerics")
    report = oracle.check_outputs(lambda ids: bild.generate(flipped, small, ids, **SETTINGS).tokens, reference,
                                  small, [source], rule="bild", **SETTINGS)
    assert not report.passed and [d.verdict for d in report.departures] == ["numerics"], report
    # A float32 run of the near-tie model against the float64 reference: equal, or departs at a near-tie, never a bug.
    float32 = copy.deepcopy(reference).float()
    report = oracle.check_outputs(lambda ids: minibild.greedy(float32, ids, 16)[0], reference, None,
                                  [source] + SOURCES[1:4], rule="greedy", max_new_tokens=16)
    assert not report.bugs, report


def test_official_rule_when_present():
    official = pytest.importorskip("minibild.official")
    large, small = model_pair("disagree", 0)
    report = oracle.check_outputs(lambda ids: official.generate(large, small, ids, **SETTINGS).tokens, large, small,
                                  SOURCES, rule="official", **SETTINGS)
    assert report.passed, report
    # bild.generate against the official rule: where they differ, the departure is named at the first difference
    report = oracle.check_outputs(lambda ids: bild.generate(large, small, ids, **SETTINGS).tokens, large, small,
                                  SOURCES, rule="official", **SETTINGS)
    for d in report.departures:
        assert d.position == first_difference(official.generate(large, small, SOURCES[d.source], **SETTINGS).tokens,
                                              bild.generate(large, small, SOURCES[d.source], **SETTINGS).tokens)


def test_bad_rules_and_outputs_are_refused():
    large, small = model_pair("disagree", 0)
    with pytest.raises(ValueError, match="rule must be 'greedy', 'bild' or 'official', got 'beam'"):
        oracle.check_outputs(lambda ids: [1], large, small, SOURCES, rule="beam")
    with pytest.raises(ValueError, match="rule 'bild' needs the small model"):
        oracle.check_outputs(lambda ids: [1], large, None, SOURCES, rule="bild")
    with pytest.raises(ValueError, match="rule 'greedy' takes only max_new_tokens"):
        oracle.check_outputs(lambda ids: [1], large, None, SOURCES, rule="greedy", fallback_threshold=0.5)
    with pytest.raises(ValueError, match=r"decode's output for source 0 holds ids outside \[0, 56\)"):
        oracle.check_outputs(lambda ids: [99], large, None, SOURCES, rule="greedy")


# --- the command line ---------------------------------------------------------------------------------------------

def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_command_line(tmp_path, capsys):
    large, small = model_pair("disagree", 0)
    minibild.save(large, tmp_path / "large")
    rows = [{"input_ids": s[0].tolist(), "tokens": minibild.greedy(large, s, 16)[0]} for s in SOURCES[:3]]
    assert oracle.main(["outputs", "--large", str(tmp_path / "large"), "--rule", "greedy", "--max-new-tokens", "16",
                        write_lines(tmp_path / "good.jsonl", rows)]) == 0
    assert "3 of 3 outputs equal minibild's" in capsys.readouterr().out
    rows[1]["tokens"] = rows[1]["tokens"][:1] + [(rows[1]["tokens"][1] + 1) % 56] + rows[1]["tokens"][2:]
    assert oracle.main(["outputs", "--large", str(tmp_path / "large"), "--rule", "greedy", "--max-new-tokens", "16",
                        write_lines(tmp_path / "bad.jsonl", rows)]) == 1
    assert "source 1: departs at token 1" in capsys.readouterr().out

    tiny_large = pair(SEED)[0]
    minibild.save(tiny_large, tmp_path / "tiny")
    samples = [{"tokens": minibild.sample(tiny_large, SRC, temperature=T, max_new_tokens=CAP,
                                          generator=torch.Generator().manual_seed(seed))} for seed in range(300)]
    command = ["sampler", "--large", str(tmp_path / "tiny"), "--input-ids", "2,1,2", "--temperature", str(T),
               "--max-new-tokens", str(CAP)]
    assert oracle.main(command + [write_lines(tmp_path / "samples.jsonl", samples)]) == 0
    assert "PASS: p = " in capsys.readouterr().out
    assert oracle.main(command + [write_lines(tmp_path / "wrong.jsonl", [{"tokens": [1, 1]}])]) == 1
    assert "goes on after EOS" in capsys.readouterr().out
    assert oracle.main(command[:4] + ["2;1"] + command[5:] + [str(tmp_path / "samples.jsonl")]) == 2
    assert "--input-ids must be comma-separated ids, got '2;1'" in capsys.readouterr().err
    assert oracle.main(["outputs", "--large", str(tmp_path / "large"), "--rule", "greedy",
                        write_lines(tmp_path / "no-ids.jsonl", [{"tokens": [1]}])]) == 2
    assert "have no \"input_ids\"" in capsys.readouterr().err


# --- scripts/check_transformers.py ----------------------------------------------------------------------------------

def test_check_transformers_core_path(tmp_path):
    """transformers' own sampling (top_k=0 and its default), plain and assisted, passes on a tiny pair exported with
    save_hf; its assisted greedy output passes the greedy rule."""
    pytest.importorskip("transformers")
    import check_transformers
    from evaluate import load_hf

    large, small = check_transformers.tiny_sampling_pair(5)
    hf = {role: load_hf(check_transformers.hf_folder(model, tmp_path, role), "cpu", torch.float64)
          for role, model in (("large", large), ("small", small))}
    lines = check_transformers.sampling_verdicts("tiny", large, hf["large"], hf["small"], SRC, 0.5, 2, 200)
    assert sum(line.startswith("- tiny, ") and ": PASS: p = " in line for line in lines) == 6, lines
    assert "are exactly 0 apart in total variation" in lines[0], lines
    assert "the same output with and without top_k=50 for 200 of 200 seeds" in lines[4]  # 4 tokens: top_k=50 is moot
    big, little = model_pair("disagree", 0)
    hf = {role: load_hf(check_transformers.hf_folder(model, tmp_path, role + "-greedy"), "cpu", torch.float64)
          for role, model in (("large", big), ("small", little))}
    lines = check_transformers.greedy_verdicts("pair", big, little, hf["large"], hf["small"], SOURCES[:4], 16)
    assert "4 of 4 outputs equal minibild's" in lines[0] and "PASS" in lines[0], lines
    assert lines[1].endswith("plain greedy output on 4 of 4"), lines
    import transformers
    if transformers.__version__ == "5.25.0":  # the version docs/ORACLE.md records it for
        found = check_transformers.crash_reproducer()
        assert found.startswith("plain: IndexError: list index out of range") and "assisted: IndexError" in found


def test_top_k_reference():
    """With top_k, the reference samples from the top_k tokens at each step: minibild.sample on a model whose logits
    outside the top 2 are pushed to -inf has that distribution, and samples holding a token outside are impossible."""
    large = pair(SEED)[0]
    exact = oracle.exact_distribution(large, SRC, T, CAP, top_k=2)
    assert math.isclose(sum(exact.values()), 1.0, abs_tol=1e-12)
    # 0.30 from the full reference in TV: above the 0.16 that n = 2000 detects with probability 0.99
    assert sum(p > 0 for p in exact.values()) <= 2 + 2 * 2 and distance(exact, oracle.exact_distribution(
        large, SRC, T, CAP)) > 0.3
    for options in (dict(), dict(max_outputs=0)):
        assert check(inverse_cdf_sampler(exact), 2000, top_k=2, **options).passed
        assert not check(inverse_cdf_sampler(exact), 2000, **options).passed  # top_k=2 against the full reference
    full = oracle.exact_distribution(large, SRC, T, CAP)
    outside = next(key for key, p in exact.items() if p == 0)
    for options in (dict(), dict(max_outputs=0)):
        report = check(lambda seed: list(outside), 3, top_k=2, **options)
        assert not report.passed and "has probability 0 (a token outside the top 2)" in report.invalid
    assert full[outside] > 0
