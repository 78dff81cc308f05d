"""python -m minibild.diff on what an outsider brings: self-describing traces (the header), sampled traces, ACTUAL's
own logits, and every malformed input, which must exit 2 with one line naming the file, the line and the problem,
never a traceback or exit 1 (which means "the traces differ"). The diff's classifications on the conformance suite
are tested in test_conformance.py; its attribution of official differences in test_official_diff.py."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minibild.conformance import CASES, load_pair, run_case
from minibild.diff import main
from minibild.sampling import bild_sample
from minibild.trace import TraceHeader, read_records, trace_from_jsonl, trace_to_jsonl

SUITE = Path(__file__).resolve().parents[1] / "conformance"
ROOT = Path(__file__).resolve().parents[1]


def run_diff(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of python -m minibild.diff ARGS, run in-process."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def case_folder(name: str) -> Path:
    return SUITE / "cases" / name


def header_of(name: str, dtype: str = "float64", **change) -> TraceHeader:
    """A case's header, as TraceHeader.of writes it for its models."""
    case = next(case for case in CASES if case.name == name)
    large, small = load_pair(SUITE, case.pair, getattr(torch, dtype))
    return TraceHeader.of(large, small, **(case.settings | change))


def headerless(tmp_path, name: str, dtype: str = "float64") -> Path:
    """The committed trace of a case without its header: the calls alone, as a port may write them."""
    path = tmp_path / f"{name}.{dtype}.bare.jsonl"
    path.write_text(trace_to_jsonl(trace_from_jsonl((case_folder(name) / f"trace.{dtype}.jsonl").read_text())))
    return path


def with_header(tmp_path, name: str, dtype: str = "float64", **change) -> Path:
    """The committed trace of a case, its header written anew (with `change` to its settings)."""
    path = tmp_path / f"{name}.{dtype}.jsonl"
    trace = trace_from_jsonl((case_folder(name) / f"trace.{dtype}.jsonl").read_text())
    path.write_text(trace_to_jsonl(trace, header_of(name, dtype, **change)))
    return path


# --- The header ------------------------------------------------------------------------------------------------

def test_the_header_says_how_a_trace_was_made():
    case = next(case for case in CASES if case.name == "early-exit-bild")
    large, small = load_pair(SUITE, case.pair, torch.float32)
    result, _ = run_case(large, small, case)
    header = TraceHeader.of(large, small, **case.settings)
    text = trace_to_jsonl(result.trace, header)
    first = json.loads(text.splitlines()[0])
    assert first == {"format": "minibild-trace", "version": 1, "rule": "bild", "settings": case.settings,
                     "temperature": None, "exit_layer": 1, "decoder_start_token_id": 0, "eos_token_id": 1,
                     "dtype": "float32"}
    records = list(read_records(text.encode().splitlines(keepends=True), "t"))
    assert records == [header, *result.trace]
    assert trace_from_jsonl(text) == result.trace  # the calls alone; a trace without header reads the same
    assert trace_from_jsonl(trace_to_jsonl(result.trace)) == result.trace


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_the_suite_writes_each_trace_with_its_header(name):
    """Each committed trace starts with the header of its case's models, settings and rule (the official rule for
    an official-rule case, bild for minibild's)."""
    case = next(case for case in CASES if case.name == name)
    for dtype in ("float32", "float64"):
        text = (case_folder(name) / f"trace.{dtype}.jsonl").read_text()
        header = next(read_records(text.encode().splitlines(keepends=True), name))
        rule = "official" if case.rule == "official" else "bild"
        assert header == TraceHeader.of(*load_pair(SUITE, case.pair, getattr(torch, dtype)), **case.settings,
                                        rule=rule), (dtype, header)


def test_a_port_trace_without_header_diffs_against_the_suite(tmp_path, capsys):
    """A port writes the calls alone: EXPECTED's header gives the settings, so the policy is checked, and a policy
    error in the port's trace is found without --case."""
    expected = case_folder("v1.1-bild") / "trace.float64.jsonl"
    bare = headerless(tmp_path, "v1.1-bild")
    code, out, _ = run_diff(capsys, expected, bare)
    assert code == 0 and out.startswith("equivalent") and "policy not checked" not in out, out
    lines = bare.read_text().splitlines()
    k = next(k for k, line in enumerate(lines) if '"fallback"' in line)
    lines[k] = lines[k].replace('"fallback"', '"handover"')
    bare.write_text("\n".join(lines) + "\n")
    code, out, _ = run_diff(capsys, expected, bare)
    assert code == 1 and f"policy error at call {k + 1}: fallback token kept" in out, out


EARLY_EXIT = [case.name for case in CASES if case.pair == "early-exit"]


@pytest.mark.parametrize("name", EARLY_EXIT)
def test_an_early_exit_trace_diffed_against_itself_is_equivalent(name, tmp_path, capsys):
    """Its small calls start where the large model's cache ends: right on a shared cache. The header (or --case)
    says it is one; without either the diff names the missing setting instead of calling it a cache error."""
    path = with_header(tmp_path, name)
    code, out, _ = run_diff(capsys, path, path)
    assert (code, out.splitlines()[0]) == (0, f"equivalent: {out.split()[1]} calls, the same fed tokens, argmaxes "
                                              "and decisions"), out
    bare = headerless(tmp_path, name)
    assert run_diff(capsys, bare, bare, "--case", case_folder(name) / "case.json")[0] == 0
    code, out, err = run_diff(capsys, bare, bare)
    assert (code, out, err.count("\n")) == (2, "", 1) and "exit_layer" in err and "cache error" not in err, err


def test_without_settings_the_report_says_the_policy_was_not_checked(tmp_path, capsys):
    path = headerless(tmp_path, "v1.1-bild")
    code, out, _ = run_diff(capsys, path, path)
    assert code == 0 and "policy not checked" in out


def test_the_header_gives_the_policy_check_its_settings(tmp_path, capsys):
    """A fallback token kept, in a trace whose header gives the settings: a policy error without --case."""
    expected = with_header(tmp_path, "v1.1-bild")
    lines = expected.read_text().splitlines()
    k = next(k for k, line in enumerate(lines) if '"fallback"' in line)
    lines[k] = lines[k].replace('"fallback"', '"handover"')
    (tmp_path / "actual.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = run_diff(capsys, expected, tmp_path / "actual.jsonl")
    assert code == 1 and f"policy error at call {k}: fallback token kept" in out, out


def test_headers_and_case_must_agree(tmp_path, capsys):
    ours, theirs = with_header(tmp_path, "v1.1-bild"), with_header(tmp_path, "v1.1-bild", "float32",
                                                                    fallback_threshold=0.5)
    code, out, err = run_diff(capsys, ours, theirs)
    assert (code, out, err.count("\n")) == (2, "", 1) and "fallback_threshold 0.4 vs 0.5" in err, err
    code, _, err = run_diff(capsys, ours, ours, "--case", case_folder("v1.1-speculative") / "case.json")
    assert code == 2 and "--case and EXPECTED's header give other settings" in err, err


# --- Sampled traces ---------------------------------------------------------------------------------------------

def sampled(tmp_path, seed: int, name="sampled") -> Path:
    large, small = load_pair(SUITE, "v1.1", torch.float64)
    settings = dict(fallback_threshold=0.3, max_small_steps=3, max_new_tokens=12)
    result = bild_sample(large, small, torch.tensor([[3, 19, 13, 31, 9, 60, 43, 1]]), temperature=1.0,
                         generator=torch.Generator().manual_seed(seed), **settings)
    header = TraceHeader.of(large, small, rollback_threshold=None, temperature=1.0, **settings)
    path = tmp_path / f"{name}.{seed}.jsonl"
    path.write_text(trace_to_jsonl(result.trace, header))
    return path


def test_a_sampled_trace_is_diffed(tmp_path, capsys):
    """Against itself: equivalent. Another seed: the same probabilities, another draw. A rejection of a token whose
    acceptance probability is 1: a policy error, which needs no draw to see."""
    path = sampled(tmp_path, 0)
    code, out, _ = run_diff(capsys, path, path)
    assert code == 0 and out.startswith("equivalent"), out
    other = next(p for p in (sampled(tmp_path, seed) for seed in range(1, 20))
                 if p.read_text().splitlines()[1] != path.read_text().splitlines()[1])
    code, out, _ = run_diff(capsys, path, other)
    assert code == 1 and "draws at call 1: the same probabilities, another draw" in out, out
    lines = path.read_text().splitlines()
    k, record = next((k, json.loads(line)) for k, line in enumerate(lines)
                     if '"rollback"' in line and '"large"' in line)
    i = record["rollback_at"] - record["start"] - 1
    record["p"][i] = record["q"][i]  # then min(1, p/q) = 1: it cannot be rejected
    lines[k] = json.dumps(record)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = run_diff(capsys, path, tmp_path / "bad.jsonl")
    assert code == 1 and f"policy error at call {k}: a token rejected though its acceptance probability" in out, out


def test_a_sampled_trace_against_a_greedy_one_is_refused(tmp_path, capsys):
    code, out, err = run_diff(capsys, sampled(tmp_path, 0), with_header(tmp_path, "v1.1-bild"))
    assert (code, out, err.count("\n")) == (2, "", 1), err


# --- Malformed inputs -------------------------------------------------------------------------------------------

BASE = case_folder("v1.1-bild") / "trace.float64.jsonl"  # its header, then its calls
LINES = len(BASE.read_text().splitlines())
CALLS = len(trace_from_jsonl(BASE.read_text()))
assert LINES == CALLS + 1


def edited(line: int, change) -> str:
    """The base trace with record `line` (from 1, the header's line) changed: change(dict) edits it in place."""
    lines = BASE.read_text().splitlines()
    record = json.loads(lines[line - 1])
    change(record)
    lines[line - 1] = json.dumps(record)
    return "\n".join(lines) + "\n"


def set_field(key, value):
    return lambda record: record.__setitem__(key, value)


# name -> (the text of ACTUAL, the line the error names, words it must hold)
MALFORMED = {
    "fed empty": (edited(2, set_field("fed", [])), 2, ['"fed"', "non-empty list of ids", "[]"]),
    "argmax empty": (edited(2, set_field("argmax", [])), 2, ['"argmax"', "[]"]),
    "fed a number": (edited(3, set_field("fed", 5)), 3, ['"fed"', "5"]),
    "id as a float": (edited(3, set_field("token", 7.0)), 3, ['"token"', "an id", "7.0"]),
    "id in a list as a float": (edited(2, set_field("fed", [0.0])), 2, ['"fed"', "0.0"]),
    "negative id": (edited(2, set_field("appended", -3)), 2, ['"appended"', "-3"]),
    "unknown key": (edited(4, set_field("extra", 1)), 4, ['unknown field "extra"']),
    "missing key": (edited(3, lambda r: r.pop("prob")), 3, ['missing field "prob"']),
    "upper-case decision": (edited(2, set_field("decision", "ACCEPT")), 2, ['"decision"', '"ACCEPT"', '"accept"']),
    "probability as text": (edited(3, set_field("prob", "0.5")), 3, ['"prob"', "a number"]),
    "unknown model": (edited(3, set_field("model", "medium")), 3, ['"model"', '"medium"']),
    "rollback without position": (edited(2, set_field("decision", "rollback")), 2, ['"rollback_at"']),
    "not an object": (BASE.read_text() + "[1, 2]\n", LINES + 1, ["a JSON object"]),
    "not JSON": (BASE.read_text().replace("}", "", 1), 1, ["not JSON"]),
    "blank line inside": (BASE.read_text().replace("\n", "\n\n", 1), 2, ["blank line"]),
    "header after line 1": (BASE.read_text() + trace_to_jsonl([], header_of("v1.1-bild")), LINES + 1, ["header"]),
    "header of another version": (edited(1, set_field("version", 2)), 1, ['"version"', "2"]),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_trace_exits_2_naming_file_line_and_field(name, tmp_path, capsys):
    text, line, words = MALFORMED[name]
    path = tmp_path / "actual.jsonl"
    path.write_text(text)
    for args in ([BASE, path], [path, BASE]):  # as ACTUAL and as EXPECTED
        code, out, err = run_diff(capsys, *args)
        assert (code, out, err.count("\n")) == (2, "", 1), err
        assert err.startswith(f"minibild.diff: error: {path}, line {line}: ") and all(w in err for w in words), err


def test_random_bytes_and_empty_files_exit_2(tmp_path, capsys):
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(random.Random(0).randbytes(1 << 20))
    code, out, err = run_diff(capsys, BASE, noise)
    assert (code, out, err.count("\n")) == (2, "", 1) and f"{noise}, line 1: not" in err, err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = run_diff(capsys, empty, empty)
    assert (code, out, err.count("\n")) == (2, "", 1) and f"{empty}: no calls" in err, err
    only_header = tmp_path / "header.jsonl"
    only_header.write_text(trace_to_jsonl([], header_of("v1.1-bild")))
    code, out, err = run_diff(capsys, only_header, BASE)
    assert code == 2 and f"{only_header}: no calls" in err, err


def test_trailing_blank_lines_end_a_trace(tmp_path, capsys):
    path = tmp_path / "trailing.jsonl"
    path.write_text(BASE.read_text() + "\n  \n")
    code, out, _ = run_diff(capsys, BASE, path)
    assert code == 0 and out.startswith(f"equivalent: {CALLS} calls"), out


def test_bad_logits_and_case_files_exit_2(tmp_path, capsys):
    logits = case_folder("v1.1-bild") / "logits.float64.jsonl"
    lines = logits.read_text().splitlines()
    record = json.loads(lines[0])
    del record["margin"]
    (tmp_path / "logits.jsonl").write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    code, out, err = run_diff(capsys, BASE, BASE, "--logits", tmp_path / "logits.jsonl")
    assert (code, out, err.count("\n")) == (2, "", 1) and \
        f'{tmp_path / "logits.jsonl"}, line 1: missing field "margin"' in err, err
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    code, out, err = run_diff(capsys, BASE, BASE, "--logits", tmp_path / "short.jsonl")
    assert code == 2 and "fewer than EXPECTED's calls" in err, err
    case = json.loads((case_folder("v1.1-bild") / "case.json").read_text())
    case["settings"]["fallback_threshold"] = "0.4"
    (tmp_path / "case.json").write_text(json.dumps(case))
    code, out, err = run_diff(capsys, BASE, BASE, "--case", tmp_path / "case.json")
    assert (code, out, err.count("\n")) == (2, "", 1) and "fallback_threshold" in err and '"0.4"' in err, err


def test_a_100_mb_trace_gets_a_verdict_in_seconds_in_bounded_memory(tmp_path):
    """The suite's trace repeated to 100 MB: a cache error at its second copy, in seconds; the rest is counted, not
    held. Memory: the interpreter with torch, whatever the file's size."""
    text, big = trace_to_jsonl(trace_from_jsonl(BASE.read_text())), tmp_path / "big.jsonl"  # calls alone
    with open(big, "w") as f:
        f.write(text * (100_000_000 // len(text) + 1))
    # CPU seconds (the machine may be shared) and the peak memory since exec (VmHWM: ru_maxrss would count the
    # forked pytest process too).
    code = ("import resource, sys\nfrom minibild.diff import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nuse = resource.getrusage(resource.RUSAGE_SELF)\n"
            "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
            "print(use.ru_utime + use.ru_stime, peak, file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code, str(big), str(big)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    seconds, kilobytes = float(run.stderr.split()[-2]), int(run.stderr.split()[-1])
    assert run.stdout.startswith(f"cache error at call {CALLS + 1}"), run.stdout
    assert seconds < 30 and kilobytes < 600_000, (seconds, kilobytes)


# --- ACTUAL's own logits, and the layer-norm hint ---------------------------------------------------------------

def test_actual_logits_name_the_first_call_and_position_that_moved(tmp_path, capsys):
    logits = case_folder("v1.1-bild") / "logits.float64.jsonl"
    lines = logits.read_text().splitlines()
    record = json.loads(lines[3])
    record["top_logits"][0][2] += 0.01
    record["top_logits"][0][1] += 0.004
    (tmp_path / "mine.jsonl").write_text("\n".join(lines[:3] + [json.dumps(record)] + lines[4:]) + "\n")
    code, out, _ = run_diff(capsys, BASE, BASE, "--logits", logits, tmp_path / "mine.jsonl", "--dtype", "float64")
    assert code == 0 and "logits: first beyond the tolerance at call 4" in out, out
    assert f"position {record['start']}: largest difference 0.01, for id {record['top_ids'][0][2]}" in out, out
    code, out, _ = run_diff(capsys, BASE, BASE, "--logits", logits, logits)
    assert code == 0 and "every top logit" in out, out


def off_everywhere(tmp_path, relative: float, every: bool = True) -> Path:
    """The base trace with its probabilities scaled by 1 + relative and cross-entropies moved by as much (every
    call, or only the first small one)."""
    trace = trace_from_jsonl(BASE.read_text())
    first_small = next(k for k, step in enumerate(trace) if step.model == "small")
    for k, step in enumerate(trace):
        if not every and k != first_small:
            continue
        if step.model == "small":
            step.prob *= 1 + relative
        else:
            step.cross_entropy = [ce + relative for ce in step.cross_entropy]
    path = tmp_path / f"off.{every}.jsonl"
    path.write_text(trace_to_jsonl(trace))
    return path


def test_every_probability_slightly_off_hints_at_the_layer_norm(tmp_path, capsys):
    """A float64 port that copies transformers' float32 layer-norm variance is about 1e-6 off everywhere."""
    code, out, _ = run_diff(capsys, BASE, off_everywhere(tmp_path, 1e-6), "--dtype", "float64")
    assert code == 1 and "model error at call 2: probability" in out and "layer norm" in out, out
    code, out, _ = run_diff(capsys, BASE, off_everywhere(tmp_path, 1e-6, every=False), "--dtype", "float64")
    assert code == 1 and "model error" in out and "layer norm" not in out, out
    code, out, _ = run_diff(capsys, BASE, off_everywhere(tmp_path, 1e-2), "--dtype", "float64")
    assert code == 1 and "model error" in out and "layer norm" not in out, out


def test_no_input_gives_a_traceback(tmp_path, capsys):
    """Each malformed input through the real command line: one line on stderr, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(MALFORMED["id as a float"][0])
    run = subprocess.run([sys.executable, "-m", "minibild.diff", str(BASE), str(bad)], capture_output=True,
                         text=True, cwd=ROOT)
    assert (run.returncode, run.stdout, run.stderr.count("\n")) == (2, "", 1), run.stderr
    assert "Traceback" not in run.stderr
