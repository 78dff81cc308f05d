"""The main job, `python -m minibild`, on the shipped demo pair: output contract and error paths."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minibild
from minibild import bild
from minibild.__main__ import main
from minibild.diff import main as diff_main
from minibild.modes import MODES
from minibild.sampling import bild_sample

ROOT = Path(__file__).resolve().parents[1]
LARGE, SMALL = ROOT / "weights" / "large", ROOT / "weights" / "small"
ALIGNED = ROOT / "weights" / "aligned-small"  # the small model fine-tuned on the large one's outputs
KJV = ROOT / "weights" / "kjv-web"  # the King James -> World English Bible pair
# (large, small, test split) of every shipped pair
PAIRS = {"small": (LARGE, SMALL, ROOT / "data" / "test.jsonl"),
         "aligned-small": (LARGE, ALIGNED, ROOT / "data" / "test.jsonl"),
         "kjv-web": (KJV / "large", KJV / "small", ROOT / "data" / "kjv-web" / "test.jsonl")}


def run_cli(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("pair", PAIRS)
def test_shipped_pair_loads_with_its_tokenizer(pair):
    large_path, small_path, _ = PAIRS[pair]
    large, small = minibild.load(large_path), minibild.load(small_path)
    assert large.embed.weight.dtype == torch.float32  # stored as float16, computed in float32 by default
    vocab_size = minibild.Tokenizer(large_path / "spiece.model").vocab_size
    assert large.config.vocab_size == small.config.vocab_size == vocab_size
    assert (large_path / "spiece.model").read_bytes() == (small_path / "spiece.model").read_bytes()


def test_the_quick_start_prints_what_readme_says(capsys):
    """README's first command, its output as README gives it, and its verse from the test split (never trained on)."""
    readme = (ROOT / "README.md").read_text()
    text = re.search(r'pip install -e \. && python -m minibild "([^"]+)"', readme)[1]
    printed = re.search(r"it prints\s+`([^`]+)`", readme)[1]
    status, out, _ = run_cli(capsys, text)
    assert (status, out) == (0, printed + "\n")
    verse = [row for row in map(json.loads, PAIRS["small"][2].read_text().splitlines()) if row["source"] == text]
    assert [(row["book"], row["chapter"], row["verse"]) for row in verse] == [("1John", 4, 19)], verse


@pytest.mark.parametrize("mode", ["large", "small"])
def test_the_kjv_pair_modernizes_a_known_verse(capsys, mode):
    model = ["--small", str(KJV / "small")] if mode == "small" else []
    status, out, _ = run_cli(capsys, "--large", str(KJV / "large"), *model, "--mode", mode,
                             "And God said, Let there be light: and there was light.")
    assert status == 0 and out.startswith("God said, “Let there be light"), out  # the WEB's wording


@pytest.mark.parametrize("pair", PAIRS)
def test_rollback_zero_on_the_shipped_pair_is_large_greedy_in_float64(pair):
    large_path, small_path, split = PAIRS[pair]
    large, small = minibild.load(large_path, dtype=torch.float64), minibild.load(small_path, dtype=torch.float64)
    tok = minibild.Tokenizer(large_path / "spiece.model")
    rows = [json.loads(line) for line in split.read_text().splitlines()[:3]]
    for row in rows:
        ids = torch.tensor([tok.encode(row["source"])])
        expected = minibild.greedy(large, ids, 48)[0]
        result = bild.generate(large, small, ids, fallback_threshold=0.6, rollback_threshold=0.0, max_new_tokens=48)
        assert result.tokens == expected
        assert result.stats.small_tokens > 0  # the small model did contribute tokens


def test_one_output_line_per_input_line(capsys, monkeypatch):
    lines = ["Dios es amor.", "Y dijo Dios: Sea la luz.", "Jehová es mi pastor."]
    status, out, err = run_cli(capsys, "--max-new-tokens", "16", stdin="\n".join(lines) + "\n",
                               monkeypatch=monkeypatch)
    assert status == 0 and len(out.splitlines()) == 3 and all(out.splitlines())
    assert "translating" in err  # the progress bar goes to stderr


def test_a_blank_input_line_gives_a_blank_output_line(capsys, monkeypatch):
    # Line 2 is blank, line 4 only spaces, line 5 a zero-width space (no token); line 3 holds a line separator
    # (U+2028) that str.splitlines would split at: still one line.
    lines = ["Dios es amor.", "", "Jehová es mi pastor.\u2028Y dijo Dios: Sea la luz.", "   ", "\u200b", "Dios"]
    status, out, err = run_cli(capsys, "--max-new-tokens", "16", stdin="\n".join(lines) + "\n",
                               monkeypatch=monkeypatch)
    assert status == 0 and out.count("\n") == 6
    assert [bool(line) for line in out.split("\n")[:6]] == [True, False, True, False, False, True], out
    assert "blank input lines give blank output lines (3, the first at line 2)" in err


def test_stdin_that_is_not_utf8_gives_a_clear_error(capsys, monkeypatch):
    # A Latin-1 file read in a UTF-8 locale: "strict" decoding fails, C.UTF-8's "surrogateescape" lets it through.
    for errors in ("strict", "surrogateescape"):
        stdin = io.TextIOWrapper(io.BytesIO("Dios es amor.\nJehová es mi pastor.\n".encode("latin-1")),
                                 encoding="utf-8", errors=errors)
        monkeypatch.setattr(sys, "stdin", stdin)
        status, out, err = run_cli(capsys)
        assert status == 2 and out == "" and err.startswith("minibild: error: ") and "not UTF-8 text" in err, err


def test_every_mode_runs_and_trace_goes_to_stderr(capsys):
    for mode in ("bild", "large", "small", "speculative"):
        status, out, _ = run_cli(capsys, "--mode", mode, "--max-new-tokens", "12", "Dios es amor.")
        assert status == 0 and len(out.splitlines()) == 1
    status, out, err = run_cli(capsys, "--trace", "--max-new-tokens", "12", "Dios es amor.")
    assert status == 0 and len(out.splitlines()) == 1 and "large @0 fed [0]" in err and "BiLDStats" in err


def test_sampling_in_every_mode_is_seeded(capsys):
    """--temperature > 0 samples (bild_sample in the bild and speculative modes, minibild.sample in the others),
    each input with a generator seeded with --seed: the same seed gives the same line, wherever the input sits."""
    text = "Y dijo Dios: Sea la luz."
    large, small = minibild.load(LARGE), minibild.load(SMALL)
    tok = minibild.Tokenizer(LARGE / "spiece.model")
    ids = torch.tensor([tok.encode(text)])

    def expected(mode, seed):  # the library's own sampling with a generator seeded with seed
        generator = torch.Generator().manual_seed(seed)
        if mode in ("large", "small"):
            tokens = minibild.sample(large if mode == "large" else small, ids, temperature=1.5, max_new_tokens=12,
                                     generator=generator)
        else:
            tokens = bild_sample(large, small, ids, temperature=1.5, max_new_tokens=12, generator=generator,
                                 fallback_threshold=0.0 if mode == "speculative" else bild.FALLBACK_THRESHOLD).tokens
        return tok.decode(tokens) + "\n"

    for mode in ("bild", "speculative", "large", "small"):
        runs = [run_cli(capsys, "--mode", mode, "--temperature", "1.5", "--seed", seed, "--max-new-tokens", "12",
                        *texts) for seed, texts in (("3", [text]), ("3", ["Dios es amor.", text]), ("4", [text]))]
        assert all(status == 0 for status, _, _ in runs)
        assert runs[0][1] == runs[1][1].splitlines(keepends=True)[1], mode
        assert (runs[0][1], runs[2][1]) == (expected(mode, 3), expected(mode, 4)), mode
        assert runs[0][1] != runs[2][1], mode  # the seed matters
    status, _, err = run_cli(capsys, "--temperature", "0.8", "--trace", "--max-new-tokens", "12", text)
    assert status == 0 and "p/q [" in err and "max q=" in err and "BiLDStats" in err


def test_a_tiny_temperature_samples_the_large_models_greedy_output(capsys):
    """softmax(logits / 1e-40) overflowed to NaN, and NaN acceptances accepted every draft: garbage, exit 0."""
    text = "Y dijo Dios: Sea la luz."
    status, greedy, _ = run_cli(capsys, "--mode", "large", "--max-new-tokens", "12", text)
    for mode in ("bild", "large"):
        assert run_cli(capsys, "--mode", mode, "--temperature", "1e-40", "--max-new-tokens", "12", text)[:2] == \
            (0, greedy), mode


@pytest.mark.parametrize("mode", ["bild", "speculative", "large", "small"])
def test_batched_decoding_prints_what_batch_size_one_prints(capsys, monkeypatch, mode):
    """Five lines (one blank) in batches of 2: the same outputs in input order, warnings and traces per input."""
    lines = "Dios es amor.\n\nY dijo Dios: Sea la luz.\nJehová es mi pastor.\nEn el principio creó Dios los cielos.\n"
    trace = ["--trace"] if mode in ("bild", "speculative") else []
    runs = [run_cli(capsys, "--mode", mode, "--dtype", "float64", "--max-new-tokens", "8", *trace,
                    "--batch-size", size, stdin=lines, monkeypatch=monkeypatch) for size in ("1", "2")]
    runs = [(status, out, re.sub(r"\r[^\r\n]*ETA \d+s", "", err)) for status, out, err in runs]  # no rates
    assert runs[0] == runs[1]
    status, out, err = runs[0]
    assert status == 0 and len(out.splitlines()) == 5 and out.splitlines()[1] == ""
    assert "reached --max-new-tokens 8" in err and err.count("--- input") == (4 if trace else 0)


@pytest.mark.parametrize("args, message", [
    (["--device", "quantum", "hola"], "'quantum' is not a device"),
    (["--device", "cuda", "hola"], "CUDA is not available"),
    (["--dtype", "float16", "hola"], "float16 is for GPUs"),
    (["--large", "/nonexistent/model", "hola"], "/nonexistent/model: no minibild checkpoint"),
    (["--max-input-tokens", "3", "Y dijo Dios: Sea la luz."], "more than --max-input-tokens 3"),
    (["--rollback-threshold", "-1", "hola"], "rollback_threshold must be >= 0"),
    (["--max-small-steps", "0", "hola"], "max_small_steps must be"),
    (["   "], "input 1 is empty"),
    (["--small", str(SMALL), "--exit-layer", "2", "hola"], "--small and --exit-layer"),
    (["--exit-layer", "0", "hola"], "exit_layer must be in [1, 7]"),
    (["--mode", "large", "--trace", "hola"], "--trace shows BiLD's decisions; --mode large has none"),
    (["--mode", "small", "--trace-jsonl", "t", "hola"], "--trace-jsonl shows BiLD's decisions; --mode small has"),
    (["Dios es amor \udce1."], "input 1 is not UTF-8 text"),  # a Latin-1 byte, as Python passes it on
    (["--batch-size", "0", "hola"], "--batch-size must be an integer >= 1, got 0"),
    (["--exit-layer", "2", "--batch-size", "2", "hola"], "--exit-layer is batch-1 only"),
    (["--batch-size", "2", "--max-input-tokens", "3", "hola", "Y dijo Dios: Sea la luz."],
     "input 2 has 9 tokens, more than --max-input-tokens 3"),
    (["--temperature", "-1", "hola"], "temperature must be a finite number > 0, got -1.0"),
    (["--temperature", "0.7", "--batch-size", "2", "hola"], "--temperature > 0 samples one input at a time"),
    (["--temperature", "0.7", "--rollback-threshold", "3", "hola"], "--rollback-threshold has no place in sampling"),
], ids=["device", "cuda", "dtype", "weights", "too-long", "threshold", "N", "empty", "small-and-exit", "exit-0",
        "trace-greedy", "trace-jsonl-greedy", "latin-1", "batch-0", "batch-exit", "batch-too-long", "temperature",
        "batch-sampling", "sampling-rollback"])
def test_bad_input_gives_a_clear_error(capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, out, err = run_cli(capsys, *args)
    assert status == 2 and out == "" and message in err and err.startswith("minibild: error:")


@pytest.mark.parametrize("args, message", [
    (["--mode", "speculative", "--fallback-threshold", "0.9"], "--fallback-threshold has no effect in --mode "
                                                               "speculative (it uses max_small_steps, small_model)"),
    (["--mode", "speculative", "--rollback-threshold", "2"], "--rollback-threshold has no effect in --mode speculative"),
    (["--mode", "large", "--small", "/nonexistent"], "--small has no effect in --mode large"),
    (["--mode", "large", "--exit-layer", "2"], "--exit-layer has no effect in --mode large"),
    (["--mode", "large", "--max-small-steps", "3"], "--max-small-steps has no effect in --mode large"),
    (["--mode", "small", "--fallback-threshold", "0.9"], "--fallback-threshold has no effect in --mode small"),
    (["--mode", "large", "--seed", "5"], "--seed seeds sampling, and --mode large decodes greedily"),
    (["--seed", "5"], "--seed seeds sampling, and --mode bild decodes greedily"),
    (["--mode", "speculative", "--temperature", "0.7", "--fallback-threshold", "0.3"],
     "--fallback-threshold has no effect in --mode speculative"),
])
def test_a_setting_the_mode_does_not_use_is_refused(capsys, args, message):
    """Each mode declares the settings it uses (modes.MODES); any other setting given is an error, not ignored."""
    status, out, err = run_cli(capsys, *args, "Dios es amor.")
    assert (status, out, err.count("\n")) == (2, "", 1) and err.startswith("minibild: error: " + message), err


def test_every_setting_a_mode_declares_is_accepted(capsys):
    for mode, settings in MODES.items():
        args = {"fallback_threshold": ["--fallback-threshold", "0.5"], "rollback_threshold": ["--rollback-threshold",
                "2"], "max_small_steps": ["--max-small-steps", "3"],
                # the official implementation has no early exit: its small model is a separate one
                "small_model": ["--small", str(SMALL)] if mode == "official" else ["--exit-layer", "2"]}
        given = [arg for setting in settings for arg in args[setting]]
        status, out, err = run_cli(capsys, "--mode", mode, *given, "--max-new-tokens", "4", "Dios es amor.")
        assert status == 0 and out.count("\n") == 1, (mode, err)


@pytest.mark.parametrize("setting", [["--max-new-tokens", "0"], ["--max-small-steps", "0"],
                                     ["--fallback-threshold", "nan"], ["--temperature", "inf"]])
def test_bad_settings_are_refused_before_any_output(capsys, monkeypatch, setting):
    # A leading blank line gives a blank output line at once, unless the settings are checked first.
    status, out, err = run_cli(capsys, *setting, stdin="\nDios es amor.\n", monkeypatch=monkeypatch)
    assert status == 2 and out == "" and err.startswith("minibild: error:"), (status, out, err)


def tiny_checkpoint(folder, **config):
    """A random one-layer T5 saved with the shipped tokenizer; `config` overrides its T5Config fields."""
    config = minibild.T5Config(**{"vocab_size": 8000, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                                  "num_heads": 2, **config})
    return minibild.save(minibild.T5(config), folder, tokenizer=LARGE / "spiece.model")


def test_a_pair_with_different_tokenizers_is_refused(capsys, tmp_path):
    # The shipped small model beside a tokenizer of the same size whose pieces "▁God" and "▁man" trade ids.
    data = bytearray((LARGE / "spiece.model").read_bytes())
    god, man = (b"\n" + bytes([len(p.encode())]) + p.encode() + b"\x15" for p in ("▁God", "▁man"))  # piece, score
    i, j = data.index(god), data.index(man)
    data[i:i + len(god)], data[j:j + len(man)] = man, god
    other = tmp_path / "small"
    other.mkdir()
    (other / "model.safetensors").symlink_to(SMALL / "model.safetensors")
    (other / "spiece.model").write_bytes(data)
    sizes = {minibild.Tokenizer(folder / "spiece.model").vocab_size for folder in (LARGE, other)}
    assert len(sizes) == 1  # same size: only two words differ
    status, out, err = run_cli(capsys, "--small", str(other), "Dios es amor.")
    assert status == 2 and out == "" and err.count("\n") == 1 and "different tokenizers" in err
    assert str(other / "spiece.model") in err and str(LARGE / "spiece.model") in err


@pytest.mark.parametrize("mode, config, message", [
    ("small", {"eos_token_id": 3}, "eos_token_id 3"),
    ("small", {"decoder_start_token_id": 5}, "decoder_start_token_id 5"),
    ("small", {"pad_token_id": 4}, "pad_token_id 4, decoder_start_token_id 4"),
    ("small", {"vocab_size": 7999}, "has 8000 pieces, more than its vocab_size 7999"),
    ("bild", {"vocab_size": 100}, "has 8000 pieces, more than its vocab_size 100"),
], ids=["eos", "decoder-start", "pad", "vocab", "vocab-bild"])
def test_a_model_its_tokenizer_does_not_fit_is_refused(capsys, tmp_path, mode, config, message):
    tiny = tiny_checkpoint(tmp_path / "tiny", **config)
    status, out, err = run_cli(capsys, "--mode", mode, "--small", str(tiny), "Dios es amor.")
    assert status == 2 and out == "" and err.count("\n") == 1 and message in err and str(tiny) in err


def test_trace_shows_ids_beyond_the_tokenizer_as_ids(capsys, tmp_path):
    # A converted Hugging Face T5 has more ids than pieces (32128 and 32100); this model outputs only such ids.
    config = minibild.T5Config(vocab_size=8128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                               tie_word_embeddings=False)
    model = minibild.T5(config)
    with torch.no_grad():
        model.decoder.final_norm.weight.zero_()[0] = 1  # the decoder output is a multiple of e_0
        model.lm_head.weight.zero_()[8100, 0], model.lm_head.weight[8101, 0] = 1, -1  # argmax: 8100 or 8101
    minibild.save(model, tmp_path / "wide", tokenizer=LARGE / "spiece.model")
    status, out, err = run_cli(capsys, "--large", str(tmp_path / "wide"), "--small", str(tmp_path / "wide"),
                               "--trace", "--max-new-tokens", "3", "Dios es amor.")
    assert status == 0 and out == "\n"  # ids without a piece decode to nothing
    pieces = err.split("pieces: ")[1].splitlines()[0].split()
    assert pieces[0] == "0=<pad>" and set(pieces[1:]) <= {"8100", "8101"} and pieces[1:], err


# args -> what the header must say besides the defaults' max_small_steps and max_new_tokens
TRACE_JSONL = {
    "bild": ([], dict(rule="bild", fallback_threshold=bild.FALLBACK_THRESHOLD,
                      rollback_threshold=bild.ROLLBACK_THRESHOLD, temperature=None, exit_layer=None)),
    "official": (["--mode", "official", "--rollback-threshold", "3"],
                 dict(rule="official", fallback_threshold=bild.FALLBACK_THRESHOLD, rollback_threshold=3.0,
                      temperature=None, exit_layer=None)),
    "early-exit": (["--exit-layer", "2", "--fallback-threshold", "0.8"],
                   dict(rule="bild", fallback_threshold=0.8, rollback_threshold=bild.ROLLBACK_THRESHOLD,
                        temperature=None, exit_layer=2)),
    "speculative": (["--mode", "speculative"], dict(rule="bild", fallback_threshold=0.0, rollback_threshold=0.0,
                                                    temperature=None, exit_layer=None)),
    "sampled": (["--temperature", "0.8"], dict(rule="bild", fallback_threshold=bild.FALLBACK_THRESHOLD,
                                              rollback_threshold=None, temperature=0.8, exit_layer=None)),
    "sampled-speculative": (["--mode", "speculative", "--temperature", "0.8"],
                            dict(rule="bild", fallback_threshold=0.0, rollback_threshold=None, temperature=0.8,
                                 exit_layer=None)),
}


@pytest.mark.parametrize("name", TRACE_JSONL)
def test_trace_jsonl_writes_self_describing_traces(capsys, tmp_path, name):
    """--trace-jsonl DIR: one file per input, its header first; python -m minibild.diff takes the settings from
    the header (no --case) and, checking the policy with them, finds each trace equivalent to itself."""
    args, expected = TRACE_JSONL[name]
    folder = tmp_path / "traces"
    status, out, _ = run_cli(capsys, *args, "--trace-jsonl", str(folder), "--max-new-tokens", "12",
                             "Dios es amor.", "Jesús lloró.")
    assert status == 0 and len(out.splitlines()) == 2
    assert sorted(path.name for path in folder.iterdir()) == ["input-1.jsonl", "input-2.jsonl"]
    for path in sorted(folder.iterdir()):
        header = json.loads(path.read_text().splitlines()[0])
        settings = header.pop("settings")
        assert (settings["max_small_steps"], settings["max_new_tokens"], header["dtype"]) == \
            (bild.MAX_SMALL_STEPS, 12, "float32")
        assert {key: (settings | header)[key] for key in expected} == expected, header
        status = diff_main([str(path), str(path)])
        out = capsys.readouterr().out
        assert status == 0 and out.startswith("equivalent") and "policy not checked" not in out, out


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_text("x"), "is not a folder"),
    (lambda path: (path.mkdir(), (path / "input-1.jsonl").write_text("")), "is not empty"),
])
def test_trace_jsonl_refuses_a_file_or_a_folder_holding_anything(capsys, tmp_path, make, message):
    make(tmp_path / "traces")
    status, out, err = run_cli(capsys, "--trace-jsonl", str(tmp_path / "traces"), "hola")
    assert (status, out, err.count("\n")) == (2, "", 1) and f"--trace-jsonl {tmp_path / 'traces'} {message}" in err


def test_empty_stdin_and_console_script(capsys, monkeypatch):
    status, _, err = run_cli(capsys, stdin="", monkeypatch=monkeypatch)
    assert status == 2 and "no input" in err
    done = subprocess.run([sys.executable, "-m", "minibild", "--mode", "small", "--max-new-tokens", "8", "Dios"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1


def test_a_plain_translation_prints_only_the_translation():
    done = subprocess.run([sys.executable, "-m", "minibild", "--max-new-tokens", "16", "Dios es amor."],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "" and len(done.stdout.splitlines()) == 1


def test_numpy_is_declared_because_torch_warns_without_it():
    """torch does not depend on numpy, yet its import warns "Failed to initialize NumPy" without it: a fresh
    install would print that before every translation unless minibild installs numpy itself."""
    without_numpy = subprocess.run([sys.executable, "-c", "import sys; sys.modules['numpy'] = None; import torch"],
                                   capture_output=True, text=True)
    assert "Failed to initialize NumPy" in without_numpy.stderr
    dependencies = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)[1]
    assert '"numpy' in dependencies, dependencies


def test_a_reader_that_leaves_early_stops_it_quietly():
    # `python -m minibild < in.txt | head -1`: once stdout's reader is gone, it stops without a traceback.
    proc = subprocess.Popen([sys.executable, "-m", "minibild", "--mode", "small", "--max-new-tokens", "8"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader leaves before the first line
    proc.stdin.write(b"Dios es amor.\n" * 3)
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
