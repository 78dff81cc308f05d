"""The diff on the official implementation's recorded traces (tests/data/official/): against bild.generate's trace
of the same source it names every divergence by the official difference that makes it, never a cache error or an
unclassified one; with the official rule expected, the official trace is equivalent to itself and bild's trace
breaks it."""
import json
from pathlib import Path

import pytest
import torch

import minibild
from minibild import bild, official
from minibild.conformance import load_pair
from minibild.diff import Settings, diff, main
from minibild.trace import TraceHeader, trace_from_jsonl, trace_to_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "data" / "official"
PAIRS = {"es-en": ("weights/large", "weights/small"), "kjv-web": ("weights/kjv-web/large", "weights/kjv-web/small")}
NAMES = ("D1", "D2", "D2c", "D3", "EOS defect", "re-feed")
SETTINGS = ("fallback_threshold", "rollback_threshold", "max_small_steps", "max_new_tokens")


def chosen(name: str) -> list[dict]:
    """Every conformance record; of the verses, the first ten at each setting, and every record showing the EOS
    defect (an EOS before the end) or the length cap."""
    records = [json.loads(line) for line in (RECORDS / f"{name}.jsonl").read_text().splitlines()]
    return [r for r in records if name == "conformance" or r["source_index"] < 10 or 1 in r["tokens"][:-1]
            or len(r["tokens"]) == r["max_new_tokens"]]


def models(name: str, record: dict) -> tuple:
    if name == "conformance":
        # The suite as the official code ran on it, kept beside the records (tests/data/official/README.md).
        case = json.loads((RECORDS / "conformance" / "cases" / record["case"] / "case.json").read_text())
        return load_pair(RECORDS / "conformance", case["pair"], torch.float32), case["input_ids"]
    return tuple(minibild.load(ROOT / path) for path in PAIRS[name]), record["input_ids"]


def runs():
    """(name, record, bild's trace, the official trace, Settings) for every chosen record."""
    for name in ("conformance", "es-en", "kjv-web"):
        for record in chosen(name):
            (large, small), ids = models(name, record)
            settings = {key: record[key] for key in SETTINGS}
            ours = bild.generate(large, small, torch.tensor([ids]), **settings)
            theirs = trace_from_jsonl("".join(json.dumps(step) + "\n" for step in record["official_trace"]))
            yield name, record, ours, theirs, Settings(**settings, eos_token_id=large.config.eos_token_id)


@pytest.fixture(scope="module")
def recorded():
    return list(runs())


def test_every_divergence_from_the_official_code_is_named(recorded):
    named, output = set(), set()
    for name, record, ours, theirs, settings in recorded:
        report = diff(ours.trace, theirs, settings)
        where = f"{name} {record.get('source_index', record.get('case'))} {record['fallback_threshold']}"
        if report.equivalent:
            continue
        assert report.finding is None and report.later is None and report.official, f"{where}:\n{report}"
        assert {f.why.split(":")[0] for f in report.official} <= set(NAMES), f"{where}:\n{report}"
        named |= {f.why.split(":")[0] for f in report.official}
        line = next(note for note in report.notes if note.startswith("output"))
        if ours.tokens != record["tokens"]:
            decided = next((n for n in NAMES if f"by {n} at call" in line or f"({n})" in line), None)
            assert decided and "no named difference" not in line, f"{where}:\n{report}"
            output.add(decided)
        else:
            assert line == f"output: the same {len(ours.tokens)} tokens", f"{where}:\n{report}"
    assert named == set(NAMES) and {"D1", "D2", "D3", "EOS defect"} <= output, (named, output)


def test_the_official_rule_expected(recorded):
    """--rule official: the recorded official trace is equivalent to itself; bild's trace, where the two differ,
    breaks the official rule (as a cache or policy error: it neither re-feeds nor runs the large model again)."""
    for name, record, ours, theirs, settings in recorded:
        assert diff(theirs, theirs, settings, rule="official").equivalent, (name, record.get("source_index"))
        report = diff(theirs, ours.trace, settings, rule="official")
        if [step for step in theirs] != ours.trace:
            assert report.finding is not None and report.finding.kind in ("cache", "policy"), str(report)


def test_the_command_line_takes_the_rule_from_the_header(tmp_path, capsys):
    """A trace of minibild.official, with its header, as EXPECTED: the official rule is expected, so a port of the
    official code passes and bild's trace does not; with bild's trace as EXPECTED the official one's divergences
    are named."""
    record = next(r for r in chosen("conformance") if r["case"] == "v1.1-bild")
    (large, small), ids = models("conformance", record)
    settings = {key: record[key] for key in SETTINGS}
    theirs = official.generate(large, small, torch.tensor([ids]), **settings)
    ours = bild.generate(large, small, torch.tensor([ids]), **settings)
    paths = {}
    for rule, result in (("official", theirs), ("bild", ours)):
        paths[rule] = tmp_path / f"{rule}.jsonl"
        paths[rule].write_text(trace_to_jsonl(result.trace, TraceHeader.of(large, small, rule=rule, **settings)))
    port = tmp_path / "port.jsonl"
    port.write_text(trace_to_jsonl(theirs.trace))  # a port's trace: no header
    assert main([str(paths["official"]), str(port)]) == 0
    assert "equivalent" in capsys.readouterr().out
    assert main([str(paths["official"]), str(paths["bild"])]) == 1
    assert main([str(paths["bild"]), str(port)]) == 1
    out = capsys.readouterr().out
    assert "EOS defect at call" not in out and "EOS defect: the rollback's correction was EOS" in out, out
    assert "cache error at" not in out and "unclassified" not in out, out
