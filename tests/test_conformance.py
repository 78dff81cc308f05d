"""The conformance suite (conformance/, minibild/conformance.py) and the trace diff (minibild/diff.py).

The suite regenerates byte for byte (and, against the committed one, up to the last digits a CPU rounds its own
way), covers every path (the writer refuses a suite that does not), and minibild passes every case. A port of
the loop with one planted bug at a time (`port`) must fail the diff with the right classification on every case
where it diverges, and diverge on at least one; the same port without a bug passes every case. A planted near-tie
(an argmax, or a probability against its threshold) is numerics, not a bug. The Hugging Face copies of the suite's
models give the expected logits in transformers.
"""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minibild import bild
from minibild.bild import decide_large, decide_small, ended, propose, verify
from minibild.conformance import CASES, EXACT_ONE, OFFICIAL_PATHS, PAIRS, PATHS, load_pair, run_case, write
from minibild.conformance import main as conformance_main
from minibild.diff import TOLERANCE, Settings, diff, first_difference, main
from minibild.early_exit import EarlyExit
from minibild.model import T5LayerNorm, relative_position_bucket
from minibild.observed import observed
from minibild.trace import SmallStep, trace_from_jsonl, trace_to_jsonl

SUITE = Path(__file__).resolve().parents[1] / "conformance"
# Another CPU's BLAS may round the last digits differently: the suite was written on an AMD EPYC, and on an Intel
# Xeon its traces' floats differ by up to 1e-12 nats in float64 and 1e-4 in float32 (every decision the same).
# Against the committed files, decisions and ids must match exactly and floats within these: nats in traces,
# relative to the value in logits. On one machine the suite regenerates byte for byte (a test).
PLATFORM = {"float64": 1e-10, "float32": 1e-3}
# The cases whose expected trace follows minibild's rule, and those that follow the official implementation's
# (minibild/official.py). The diff's cache and policy checks are minibild's, so official-rule traces are compared
# call for call (first_difference) instead.
MINIBILD = [case for case in CASES if case.rule == "minibild"]
OFFICIAL = [case for case in CASES if case.rule == "official"]


def expected(case, dtype="float64"):
    """(trace, logits records, Settings) of a committed case."""
    folder = SUITE / "cases" / case.name
    trace = trace_from_jsonl((folder / f"trace.{dtype}.jsonl").read_text())
    logits = [json.loads(line) for line in (folder / f"logits.{dtype}.jsonl").read_text().splitlines()]
    return trace, logits, Settings.from_case(json.loads((folder / "case.json").read_text()))


def expected_tokens(case, dtype="float64") -> list[int]:
    return json.loads((SUITE / "cases" / case.name / "case.json").read_text())["tokens"][dtype]


def assert_same_up_to_the_cpu(name: Path, ours: str, committed: str):
    """A regenerated suite file against the committed one: traces and logits up to PLATFORM, the rest exactly."""
    kind, dtype = name.name.split(".")[:2]
    if kind == "trace":
        assert first_difference(trace_from_jsonl(committed), trace_from_jsonl(ours), PLATFORM[dtype]) is None, name
    elif kind == "logits":
        for line, their_line in zip(ours.splitlines(), committed.splitlines(), strict=True):
            record, theirs = json.loads(line), json.loads(their_line)
            floats = ("top_logits", "margin")
            assert {k: v for k, v in record.items() if k not in floats} == \
                {k: v for k, v in theirs.items() if k not in floats}, name
            values = [(x, z) for key in floats for x, z in zip(flat(record[key]), flat(theirs[key]), strict=True)]
            assert all(math.isclose(x, z, rel_tol=PLATFORM[dtype], abs_tol=PLATFORM[dtype]) for x, z in values), name
    else:
        assert ours == committed, name


def flat(values) -> list:
    return [x for row in values for x in row] if values and isinstance(values[0], list) else list(values)


def test_the_suite_regenerates_identically(tmp_path):
    """Byte for byte from run to run; against the committed suite, up to the last digits a CPU rounds its own way."""
    first, second = tmp_path / "suite", tmp_path / "again"
    write(first)
    write(second)
    files = sorted(p.relative_to(SUITE) for p in SUITE.rglob("*") if p.is_file())
    for folder in (first, second):
        assert files == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
        if name.suffix == ".jsonl":
            assert_same_up_to_the_cpu(name, (first / name).read_text(), (SUITE / name).read_text())
        else:
            assert (first / name).read_bytes() == (SUITE / name).read_bytes(), name


def test_the_suite_covers_every_path_on_every_pair():
    index = json.loads((SUITE / "index.json").read_text())
    assert [path for path in PATHS + OFFICIAL_PATHS if not index["paths"][path]] == []
    assert {case.pair for case in CASES} == set(PAIRS)
    assert (SUITE / "models/v1.0/large/hf/config.json").exists() and not list(SUITE.rglob("spiece.model"))


def test_the_writer_refuses_an_incomplete_suite(tmp_path):
    with pytest.raises(ValueError, match="no case covers these paths: fallback, "):
        write(tmp_path / "suite", CASES[:1])
    assert list(tmp_path.iterdir()) == []  # neither the suite nor its staging folder


def test_the_writer_replaces_only_a_suite_or_an_empty_folder(tmp_path, monkeypatch, capsys):
    """A suite is replaced and an empty folder filled; a file, a folder holding anything the writer does not write,
    and the current folder are refused in one line (exit 2), before anything is written or removed."""
    shutil.copytree(SUITE, tmp_path / "suite")
    (tmp_path / "suite" / "cases" / "v1.1-bild" / "case.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for folder in ("suite", "empty"):
        assert conformance_main(["write", str(tmp_path / folder)]) == 0
        assert (tmp_path / folder / "cases" / "v1.1-bild" / "case.json").read_text() == \
            (SUITE / "cases" / "v1.1-bild" / "case.json").read_text()
    (tmp_path / "suite" / "cases" / "notes.txt").write_text("mine")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "index.json").write_text("{}")
    (tmp_path / "file").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "work")
    capsys.readouterr()
    for out, words in (("../suite", "it holds cases/notes.txt"), ("../file", "is a file"),
                       (".", "the current folder"), ("..", "the current folder"),
                       ("../none/suite", "none is not a folder")):
        assert conformance_main(["write", out]) == 2, out
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing removed, no staging folder
    assert (tmp_path / "suite" / "cases" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_minibild_passes_every_case(case):
    """float64 gives the float64 trace and float32 the float32 one (up to the last digits a CPU rounds its own way),
    and float32 is equivalent to the float64 one up to float32's tolerance."""
    trace64, logits64, settings = expected(case)
    for dtype in ("float64", "float32"):
        result, _ = run_case(*load_pair(SUITE, case.pair, getattr(torch, dtype)), case)
        name = Path("cases") / case.name / f"trace.{dtype}.jsonl"
        assert_same_up_to_the_cpu(name, trace_to_jsonl(result.trace), (SUITE / name).read_text())
        if case.rule == "official":
            assert first_difference(trace64, result.trace, TOLERANCE[dtype]) is None
        else:
            report = diff(trace64, result.trace, settings, logits64, TOLERANCE[dtype])
            assert report.equivalent, report


@pytest.mark.parametrize("case", OFFICIAL, ids=lambda case: case.name)
def test_the_official_rule_cases_tell_the_rules_apart(case):
    """minibild's rule on an official-rule case gives other tokens: where the case repeats a minibild case's source
    and settings, exactly that case's trace."""
    trace, _, _ = expected(case)
    minibild_rule = dataclasses.replace(case, rule="minibild")
    result, _ = run_case(*load_pair(SUITE, case.pair, torch.float64), minibild_rule)
    assert result.tokens != expected_tokens(case)
    twin = next((other for other in MINIBILD if dataclasses.replace(other, name=case.name, rule="official") == case),
                None)
    if twin is not None:
        assert expected(twin)[0] == result.trace


# --- Planted bugs ----------------------------------------------------------------------------------------------

def port(large, small, case, bug=None) -> list:
    """bild.generate's loop as a port might write it, with one planted bug; its trace, up to a crash if the bug
    causes one. The official rule and the token appended after EOS are planted in bild.decide_large instead."""
    s, eos, src = case.settings, large.config.eos_token_id, torch.tensor([case.input_ids])
    if isinstance(small, EarlyExit):
        large, *pair = small.share_cache(src, max_length=64)
    else:
        pair = [model.new_cache(model.encode(src), max_length=64) for model in (large, small)]
    models, caches = {"large": large, "small": small}, dict(zip(("large", "small"), pair))
    y, verified, trace = [large.config.decoder_start_token_id], 1, []

    def call(name, decide, *settings):
        start = caches[name].length
        fed = y[start:] or y[-1:]  # a cache left uncropped may hold all of y: the newest token goes after it
        trace.append(decide(y, verified, start, fed, models[name].decode(torch.tensor([fed]), caches[name])[0],
                            *settings))
        return trace[-1]

    try:
        while len(trace) < 100:
            step = call("large", verify, s["rollback_threshold"], eos, s["max_new_tokens"])
            if step.decision == "rollback":
                j = step.rollback_at + (bug == "crop off by one")
                for name in ("large",) if bug == "small cache not cropped" else ("large", "small"):
                    caches[name].crop(min(caches[name].length, j))
            verified = len(y)
            if ended(y, eos, s["max_new_tokens"]):
                break
            if bug == "large model again after a rollback" and step.decision == "rollback":
                continue
            while True:
                step = call("small", propose, s["fallback_threshold"], s["max_small_steps"], eos, s["max_new_tokens"])
                if step.decision == "fallback" and bug == "fallback token kept":
                    y.append(step.token)
                if step.decision != "pending":
                    break
            if bug == "EOS tail unverified" and y[-1] == eos:
                break
    except ValueError:  # the bug drove the caches somewhere they refuse to go
        pass
    return trace


def official_rule(y, verified, start, fed, argmax, cross_entropy, rollback_threshold, eos, max_new_tokens):
    """The official implementation's rule: only the first token above the threshold is examined."""
    high = next((i for i, ce in enumerate(cross_entropy) if ce > rollback_threshold), None)
    if high is not None and y[verified + high] == argmax[high]:
        rollback_threshold = math.inf  # it agrees with the large model: no rollback, and no further look
    return decide_large(y, verified, start, fed, argmax, cross_entropy, rollback_threshold, eos, max_new_tokens)


def fallback_at_the_threshold(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos,
                              max_new_tokens):
    """`prob <= threshold` falls back, where minibild's comparison is strict."""
    if prob == fallback_threshold:
        return SmallStep(start, fed, token, prob, "fallback")
    return decide_small(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos, max_new_tokens)


def end_before_handover(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos,
                        max_new_tokens):
    """The N-th pending token labelled `end` when it is also EOS or at the cap, where minibild says `handover`."""
    step = decide_small(y, verified, start, fed, token, prob, fallback_threshold, max_small_steps, eos, max_new_tokens)
    if step.decision == "handover" and ended(y, eos, max_new_tokens):
        step.decision = "end"
    return step


def append_after_eos(y, verified, start, fed, argmax, cross_entropy, rollback_threshold, eos, max_new_tokens):
    step = decide_large(y, verified, start, fed, argmax, cross_entropy, rollback_threshold, eos, max_new_tokens)
    if step.appended is None and y[-1] == eos:
        y.append(argmax[-1])
        step.appended = argmax[-1]
    return step


# bug -> (its classification, words its reason must hold, the rule it plants in bild, if any)
BUGS = {
    "crop off by one": ("cache", "skips position", {}),
    "small cache not cropped": ("cache", "skips position", {}),
    "EOS tail unverified": ("official", "D2: ", {}),
    "official rule": ("official", "D1: official rule", {"decide_large": official_rule}),
    "fallback token kept": ("policy", "fallback token kept", {}),
    "fallback at the threshold": ("policy", "not below the threshold", {"decide_small": fallback_at_the_threshold}),
    "end before handover": ("policy", "decision is handover", {"decide_small": end_before_handover}),
    "token appended after EOS": ("policy", "appended after EOS", {"decide_large": append_after_eos}),
    "large model again after a rollback": ("official", "D3: the large model ran again right after its rollback",
                                           {}),
}


@pytest.mark.parametrize("bug", [None, *BUGS])
def test_planted_bugs_are_caught_and_classified(bug, monkeypatch):
    kind, reason, rules = BUGS.get(bug, (None, None, {}))
    for name, rule in rules.items():
        monkeypatch.setattr(bild, name, rule)
    caught = []
    for case in MINIBILD:
        trace, logits, settings = expected(case)
        report = diff(trace, port(*load_pair(SUITE, case.pair, torch.float64), case, bug), settings, logits,
                      TOLERANCE["float64"])
        if not report.equivalent:
            finding = report.finding or report.official[0]
            assert (finding.kind, reason in finding.why) == (kind, True), f"{case.name}:\n{report}"
            caught.append(case.name)
    assert bool(caught) == (bug is not None), caught


def test_decoder_buckets_computed_as_bidirectional_fail_every_case(monkeypatch):
    """A port that buckets the decoder's relative positions as the encoder's (bidirectional, half the buckets each
    way) sees the same bias at distances 0 and 1 only: every case decodes far enough, with outputs that depend on
    position, to show it as a model error."""
    monkeypatch.setattr("minibild.model.relative_position_bucket", lambda relative, bidirectional, buckets, distance:
                        relative_position_bucket(relative, True, buckets, distance))
    for case in CASES:
        trace, logits, settings = expected(case)
        result, _ = run_case(*load_pair(SUITE, case.pair, torch.float64), case)
        if case.rule == "official":
            assert result.tokens != expected_tokens(case), case.name
            continue
        report = diff(trace, result.trace, settings, logits, TOLERANCE["float64"])
        assert not report.equivalent and report.finding.kind == "model", f"{case.name}:\n{report}"


def test_a_layer_norm_variance_in_float32_fails_every_float64_case(monkeypatch):
    """transformers' T5LayerNorm computes the mean of squares in float32 even for a float64 model; a port that copies
    it is 1e-7 to 1e-4 nats off, a model error at float64's tolerance on every case, equivalent at float32's."""
    def float32_variance(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))
    monkeypatch.setattr(T5LayerNorm, "forward", float32_variance)
    for case in CASES:
        trace, logits, settings = expected(case)
        result, _ = run_case(*load_pair(SUITE, case.pair, torch.float64), case)
        assert first_difference(trace, result.trace, 1e-4) is None, case.name
        if case.rule == "official":
            assert first_difference(trace, result.trace, TOLERANCE["float64"]) is not None, case.name
            continue
        report = diff(trace, result.trace, settings, logits, TOLERANCE["float64"])
        assert not report.equivalent and report.finding.kind == "model", f"{case.name}:\n{report}"


def test_the_tie_case_meets_its_fallback_threshold_exactly():
    """The tie case's threshold is 1.0 and some small call gives probability exactly 1.0 in both dtypes, with a lead
    of more than EXACT_ONE nats (so any softmax rounds it to 1.0): kept, since only prob < threshold falls back."""
    case = next(case for case in CASES if case.fallback_threshold == 1.0)
    for dtype in ("float64", "float32"):
        trace, logits, _ = expected(case, dtype)
        ties = [(step, record) for step, record in zip(trace, logits) if step.model == "small" and step.prob == 1.0]
        assert ties and all(step.decision != "fallback" and record["margin"][-1] > EXACT_ONE
                            for step, record in ties), (dtype, ties)


def test_search_refuses_the_official_rule_on_early_exit(capsys):
    with pytest.raises(SystemExit) as exit:
        conformance_main(["search", "early-exit", "--rule", "official"])
    assert exit.value.code == 2 and "no early-exit small model" in capsys.readouterr().err


def test_the_writer_refuses_an_output_that_is_not_varied(tmp_path):
    with pytest.raises(ValueError, match=r"v1.0-speculative: its output \[45, 45, 25\] is not varied"):
        write(tmp_path / "suite", [dataclasses.replace(CASES[0], max_new_tokens=3)])
    assert list(tmp_path.iterdir()) == []


def perturbed_run(case, model: str, call: int, change) -> list:
    """The case's float64 trace when change(logits (T, V)) is applied to the `call`-th decode call (from 0) of the
    large or small model (a plain pair: observed models, minibild/observed.py)."""
    models = dict(zip(("large", "small"), load_pair(SUITE, case.pair, torch.float64)))
    calls = []

    def perturbed(kind, method, *args):
        out = method(*args)
        if kind == "decode":
            if len(calls) == call:
                change(out[0])
            calls.append(args)
        return out
    models[model] = observed(models[model], perturbed)
    return run_case(models["large"], models["small"], case)[0].trace


def test_a_planted_near_tie_is_numerics():
    """Raise the large model's second-best logit past its best one at its first call: below the tolerance the
    flip is a near-tie, above it the model is wrong."""
    case = next(case for case in CASES if case.name == "v1.1-bild")
    trace, logits, settings = expected(case)
    margin, second = logits[0]["margin"][0], logits[0]["top_ids"][0][1]

    def raise_second(out):
        out[0, second] += 1.01 * margin
    actual = perturbed_run(case, "large", 0, raise_second)
    near = diff(trace, actual, settings, logits, tolerance=2 * margin)
    assert (near.divergence, near.finding.kind) == (0, "numerics"), near
    assert diff(trace, actual, settings, logits, tolerance=margin / 2).finding.kind == "model"
    assert diff(trace, actual, settings, None, tolerance=2 * margin).finding.kind == "unclassified"


def test_a_planted_threshold_near_tie_is_numerics():
    """Raise the small model's top logit, at the fallback closest to the threshold, just enough to keep the token:
    a tolerance above the distance to the threshold makes it a near-tie, one below it a model error."""
    case = next(case for case in CASES if case.name == "v1.1-bild")
    trace, logits, settings = expected(case)
    k = max((k for k, step in enumerate(trace) if step.decision == "fallback"), key=lambda k: trace[k].prob)
    p, token = trace[k].prob, trace[k].token
    gap = math.log(case.fallback_threshold) - math.log(p)
    target = case.fallback_threshold * math.exp(gap / 2)  # just above the threshold

    def raise_top(out):  # by the logit difference that takes its probability from p to target
        out[-1, token] += math.log(target / (1 - target)) - math.log(p / (1 - p))
    actual = perturbed_run(case, "small", sum(step.model == "small" for step in trace[:k]), raise_top)
    assert (actual[k].token, actual[k].decision) == (token, "pending")
    near = diff(trace, actual, settings, logits, tolerance=3 * gap)
    assert (near.divergence, near.finding.kind) == (k, "numerics") and "from the threshold" in near.finding.why, near
    assert diff(trace, actual, settings, logits, tolerance=gap).finding.kind == "model"


def test_without_logits_the_trace_bounds_the_margin():
    """A confident small token changed: its probability alone shows the argmax was no near-tie."""
    case = next(case for case in CASES if case.name == "v1.1-bild")
    trace, _, settings = expected(case)
    k = next(k for k, step in enumerate(trace) if step.model == "small" and step.prob > 0.9)
    actual = trace_from_jsonl(trace_to_jsonl(trace))
    actual[k].token += 1
    report = diff(trace, actual, settings, None)
    assert (report.divergence, report.finding.kind) == (k, "model") and "at least" in report.finding.why, report


def test_the_command_line(tmp_path, capsys):
    folder = SUITE / "cases" / "v1.1-bild"
    args = [str(folder / "trace.float64.jsonl"), "--case", str(folder / "case.json"), "--logits",
            str(folder / "logits.float64.jsonl")]
    assert main([args[0], str(folder / "trace.float32.jsonl"), *args[1:]]) == 0
    assert capsys.readouterr().out.startswith("equivalent")
    trace = trace_from_jsonl((folder / "trace.float64.jsonl").read_text())
    trace[-1].start += 1
    (tmp_path / "bad.jsonl").write_text(trace_to_jsonl(trace))
    assert main([args[0], str(tmp_path / "bad.jsonl"), *args[1:]]) == 1
    out = capsys.readouterr().out
    assert f"first divergent call: {len(trace)}" in out and "cache error" in out
    with pytest.raises(SystemExit) as exit:
        main([args[0], str(folder / "case.json")])
    assert exit.value.code == 2 and "case.json, line 1: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("pair", PAIRS)
def test_the_hugging_face_copies_give_the_expected_logits(pair):
    """Each call of each case on this pair, fed to transformers as one uncached forward over its decoder prefix,
    gives the recorded top logits (float32). The early-exit small model has no Hugging Face counterpart."""
    from hf_oracle import load_hf
    hf = {name: load_hf(SUITE / "models" / pair / name / "hf") for name in ("large", "small")
          if (SUITE / "models" / pair / name / "hf").exists()}
    compared = 0
    for case in (case for case in CASES if case.pair == pair):
        trace, logits, _ = expected(case, "float32")
        held = {"large": [], "small": []}
        for step, record in zip(trace, logits):
            held[step.model] = held[step.model][:step.start] + step.fed  # the model's decoder input so far
            if step.model not in hf:
                continue
            with torch.no_grad():
                out = hf[step.model](input_ids=torch.tensor([case.input_ids]),
                                     decoder_input_ids=torch.tensor([held[step.model]])).logits[0, step.start:]
            values, ids = out.topk(len(record["top_ids"][0]), dim=-1)
            assert ids[:, 0].tolist() == [row[0] for row in record["top_ids"]], (case.name, step)
            torch.testing.assert_close(values, torch.tensor(record["top_logits"]), atol=1e-4, rtol=1e-4)
            compared += 1
    assert compared > 10


def test_recording_a_case_leaves_the_callers_models_untouched():
    """run_case records logits through observed models (minibild/observed.py): a decode the caller set on its own
    model (here a counting one) is used and left in place, and nothing is added to the models."""
    case = next(case for case in CASES if case.name == "v1.1-bild")
    large, small = load_pair(SUITE, case.pair, torch.float64)
    counted = []
    small.decode = lambda ids, cache: counted.append(ids) or type(small).decode(small, ids, cache)
    attributes = [set(vars(model)) for model in (large, small)]
    result, logits = run_case(large, small, case)
    assert [set(vars(model)) for model in (large, small)] == attributes and "decode" in vars(small)
    assert len(counted) == result.stats.small_calls and len(logits) == len(result.trace)
