"""scripts/align.py on a tiny random pair: the calibration set holds the large model's unbatched greedy outputs,
agreement adds up BiLD's own counts, a short fine-tune on the calibration set aligns the small model, and the
commands refuse bad input in one line."""
import contextlib
import io
import json
import random

import pytest
import torch

import minibild
from align import main as align_main
from minibild import bild
from minibild.weights import from_hf, save_hf
from tiny_models import sharp_random_t5
from train import PRESETS
from train import main as train_main

WORDS = "el la de que y en un una es por con para los las dios señor tierra cielo pueblo casa".split()
MAX_NEW_TOKENS = 8
FINETUNE = ["--max-tokens", "200", "--warmup", "5", "--dropout", "0", "--label-smoothing", "0", "--ema", "0",
            "--log-every", "1000", "--device", "cpu"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Synthetic train/dev splits, a tokenizer trained on them, a large model of train.py's "tiny" preset
    trained briefly on them (so that most of its outputs end with EOS, as a real model's do; a random model
    loops) and a random small model of the same preset (in minibild's format and as a Hugging Face folder)."""
    root = tmp_path_factory.mktemp("align")
    rng = random.Random(0)
    for name, n in (("train", 40), ("dev", 6)):
        with open(root / f"{name}.jsonl", "w") as f:
            for verse in range(n):
                words = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(2)]
                f.write(json.dumps({"source": words[0], "reference": words[1], "book": "Gen", "verse": verse}) + "\n")
    train_main(["tokenizer", "--data", str(root), "--out", str(root / "spiece.model"), "--vocab-size", "40"])
    vocab_size = minibild.Tokenizer(root / "spiece.model").vocab_size
    train_main(["model", "--preset", "tiny", "--data", str(root), "--tokenizer", str(root / "spiece.model"),
                "--out", str(root / "large-run"), "--max-steps", "120", "--lr", "1e-2", "--seed", "3", *FINETUNE])
    small = sharp_random_t5(minibild.T5Config(vocab_size=vocab_size, **PRESETS["tiny"]), seed=1)
    minibild.save(from_hf(root / "large-run" / "hf"), root / "large", tokenizer=root / "spiece.model")
    minibild.save(small, root / "small", tokenizer=root / "spiece.model")
    save_hf(small, root / "small-hf", tokenizer=root / "spiece.model")
    return root


@pytest.fixture(scope="module")
def calibration(pair):
    """The calibration set `generate` writes, in batches of 8 of different lengths, and its report line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert align_main(["generate", "--large", str(pair / "large"), "--data", str(pair), "--out",
                           str(pair / "calibration"), "--batch-size", "8", "--max-new-tokens", str(MAX_NEW_TOKENS),
                           "--no-progress"]) == 0
    return pair / "calibration", stderr.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def greedy_text(model, tok, source: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    return tok.decode(minibild.greedy(model, torch.tensor([tok.encode(source)]), max_new_tokens)[0])


def run(argv, capsys) -> tuple[int, str]:
    status = align_main(argv)
    return status, capsys.readouterr().err


# --- generate ----------------------------------------------------------------------------------------------

def test_generate_writes_the_large_models_unbatched_greedy_outputs(pair, calibration):
    out, report = calibration
    tok, large = minibild.Tokenizer(pair / "spiece.model"), minibild.load(pair / "large")
    train, written = read_jsonl(pair / "train.jsonl"), read_jsonl(out / "train.jsonl")
    lengths = sorted(len(tok.encode(row["source"])) for row in train)
    assert any(len(set(lengths[i:i + 8])) > 1 for i in range(0, len(lengths), 8))  # batches were padded
    # One sentence at a time, no padding: batching must not change a single output.
    outputs = [minibild.greedy(large, torch.tensor([tok.encode(row["source"])]), MAX_NEW_TOKENS)[0] for row in train]
    # Outputs cut at --max-new-tokens without EOS are runaways: left out, counted.
    kept = [1 in ids for ids in outputs]
    assert [{**row, "reference": None} for row in written] == \
        [{**row, "reference": None} for row, keep in zip(train, kept) if keep]
    assert [row["reference"] for row in written] == [tok.decode(ids) for ids, keep in zip(outputs, kept) if keep]
    assert (out / "dev.jsonl").read_bytes() == (pair / "dev.jsonl").read_bytes()  # real references, unchanged
    assert 0 < sum(kept) < len(train) and f"{len(train) - sum(kept)} runaway outputs" in report
    assert report.count("runaway, left out: ") == min(3, len(train) - sum(kept))


@pytest.mark.parametrize("problem, message", [
    ("no-large", "no minibild checkpoint"), ("no-train", "train.jsonl: no such split"),
    ("no-dev", "dev.jsonl: no such split"), ("out-is-data", "would overwrite the training data"),
    ("mark", "holds verses of Mark"), ("batch-size", "--batch-size must be >= 1"),
    ("max-ratio", "--max-ratio must be > 0")])
def test_generate_refuses(pair, tmp_path, capsys, problem, message):
    data = tmp_path / "data"
    data.mkdir()
    rows = read_jsonl(pair / "train.jsonl")[:3]
    if problem == "mark":
        rows[1]["book"] = "Mark"
    if problem != "no-train":
        (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if problem != "no-dev":
        (data / "dev.jsonl").write_text((pair / "dev.jsonl").read_text())
    argv = ["generate", "--large", str(tmp_path / "nothing" if problem == "no-large" else pair / "large"),
            "--data", str(data), "--out", str(data if problem == "out-is-data" else tmp_path / "out"),
            "--batch-size", "0" if problem == "batch-size" else "8",
            "--max-ratio", "0" if problem == "max-ratio" else "2", "--no-progress"]
    status, err = run(argv, capsys)
    assert status == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- agreement -----------------------------------------------------------------------------------------------

def test_agreement_adds_up_bilds_own_counts(pair, tmp_path, capsys):
    report_path = tmp_path / "agreement.json"
    # The large model as its own small model: every proposal it keeps is accepted.
    smalls = [str(pair / "small"), str(pair / "large")]
    status, _ = run(["agreement", "--large", str(pair / "large"), "--small", smalls[0], "--small", smalls[1],
                     "--exit-layer", "1",
                     "--split", str(pair / "train.jsonl"), "--limit", "10", "--fallback-threshold", "0.5",
                     "--rollback-threshold", "4", "--max-small-steps", "3", "--max-new-tokens", str(MAX_NEW_TOKENS),
                     "--no-progress", "--json", str(report_path)], capsys)
    assert status == 0
    report = json.loads(report_path.read_text())
    assert list(report["small_models"]) == smalls + ["early exit (layer 1)"] and report["meta"]["sentences"] == 10
    tok, large = minibild.Tokenizer(pair / "spiece.model"), minibild.load(pair / "large")
    rows = read_jsonl(pair / "train.jsonl")[:10]
    for small, entry in zip([*map(minibild.load, smalls), minibild.EarlyExit(large, 1)],
                            report["small_models"].values()):
        results = [bild.generate(large, small, torch.tensor([tok.encode(row["source"])]), fallback_threshold=0.5,
                                 rollback_threshold=4, max_small_steps=3, max_new_tokens=MAX_NEW_TOKENS)
                   for row in rows]
        total = {name: sum(getattr(r.stats, name) for r in results)
                 for name in ("accepted_small_tokens", "rolled_back_tokens", "fallbacks", "small_calls")}
        assert {name: entry[name] for name in total} == total
        assert entry["acceptance"] == total["accepted_small_tokens"] / (total["accepted_small_tokens"] +
                                                                          total["rolled_back_tokens"])
        assert entry["fallback_rate"] == total["fallbacks"] / total["small_calls"]
        assert entry["small_token_share"] == total["accepted_small_tokens"] / sum(len(r.tokens) for r in results)
    assert report["small_models"][smalls[1]]["acceptance"] == 1.0
    assert 0 < report["small_models"][smalls[0]]["acceptance"] < 1  # the random small model is rolled back


def test_agreement_prints_one_row_per_small_model(pair, capsys):
    assert align_main(["agreement", "--large", str(pair / "large"), "--small", str(pair / "small"), "--split",
                       str(pair / "dev.jsonl"), "--max-new-tokens", "4", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "accepted" in lines[1] and "fallback rate" in lines[1] and "small share" in lines[1]
    assert len(lines) == 3 and lines[2].startswith(str(pair / "small"))


@pytest.mark.parametrize("problem, message", [
    ("split", "no such split"), ("small", "no minibild checkpoint"), ("twice", "given twice"),
    ("vocab", "must share vocab_size"), ("tokenizer", "must share one tokenizer"),
    ("threshold", "fallback_threshold must be >= 0"), ("exit-layer", "exit_layer must be in [1, 1]")])
def test_agreement_refuses(pair, tmp_path, capsys, problem, message):
    small = pair / "small"
    if problem == "vocab":
        config = minibild.T5Config(vocab_size=minibild.load(small).config.vocab_size + 5, **PRESETS["tiny"])
        small = minibild.save(sharp_random_t5(config, seed=3), tmp_path / "other-vocab")
    if problem == "tokenizer":
        small = minibild.save(minibild.load(small), tmp_path / "other-tokenizer")
        (small / "spiece.model").write_bytes(b"another sentencepiece model")
    small = tmp_path / "none" if problem == "small" else small
    argv = ["agreement", "--large", str(pair / "large"), "--small", str(small),
            "--split", str(tmp_path / "none.jsonl" if problem == "split" else pair / "dev.jsonl"),
            "--fallback-threshold", "-1" if problem == "threshold" else "0.6", "--no-progress"]
    if problem == "twice":
        argv += ["--small", str(small)]
    if problem == "exit-layer":
        argv += ["--exit-layer", "2"]
    status, err = run(argv, capsys)
    assert status == 2 and message in err and err.count("\n") == 1


# --- finetune ------------------------------------------------------------------------------------------------


def test_finetune_on_the_calibration_set_aligns_the_small_model(pair, calibration, tmp_path, capsys):
    out, _ = calibration
    assert align_main(["finetune", "--small", str(pair / "small-hf"), "--data", str(out), "--out",
                       str(tmp_path / "aligned"), "--max-steps", "60", "--lr", "1e-2", *FINETUNE]) == 0
    minibild.save(from_hf(tmp_path / "aligned" / "hf"), tmp_path / "aligned-small", tokenizer=pair / "spiece.model")
    # Sources on which the small model's greedy output is the large model's, before and after.
    tok, rows = minibild.Tokenizer(pair / "spiece.model"), read_jsonl(out / "train.jsonl")
    before, after = ([greedy_text(minibild.load(path), tok, row["source"]) == row["reference"] for row in rows]
                     for path in (pair / "small", tmp_path / "aligned-small"))
    assert sum(after) >= sum(before) + 10, (sum(before), sum(after))
    # And the share of its proposals that BiLD's large model accepts, at the default thresholds.
    report_path = tmp_path / "agreement.json"
    assert align_main(["agreement", "--large", str(pair / "large"), "--small", str(pair / "small"), "--small",
                       str(tmp_path / "aligned-small"), "--split", str(out / "train.jsonl"), "--max-new-tokens",
                       str(MAX_NEW_TOKENS), "--no-progress", "--json", str(report_path)]) == 0
    vanilla, aligned = json.loads(report_path.read_text())["small_models"].values()
    assert aligned["acceptance"] > vanilla["acceptance"] + 0.2, (vanilla["acceptance"], aligned["acceptance"])
    assert aligned["small_token_share"] > vanilla["small_token_share"]


def test_finetune_starts_a_minibild_checkpoint_as_its_hugging_face_folder(pair, calibration, tmp_path):
    out, _ = calibration
    for name, small in (("from-minibild", pair / "small"), ("from-hf", pair / "small-hf")):
        assert align_main(["finetune", "--small", str(small), "--data", str(out), "--out", str(tmp_path / name),
                           "--max-steps", "2", *FINETUNE]) == 0
    assert (tmp_path / "from-minibild" / "init" / "config.json").exists()
    a, b = (from_hf(tmp_path / name / "hf").state_dict() for name in ("from-minibild", "from-hf"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("problem, message", [("no-preset", "no preset of scripts/train.py"),
                                              ("preset-given", "--preset: finetune sets this itself")])
def test_finetune_refuses(pair, tmp_path, capsys, problem, message):
    small = pair / "small"
    if problem == "no-preset":
        small = tmp_path / "odd-shape"
        config = minibild.T5Config(vocab_size=minibild.Tokenizer(pair / "spiece.model").vocab_size,
                                   **{**PRESETS["tiny"], "num_decoder_layers": 3})
        minibild.save(sharp_random_t5(config, seed=2), small, tokenizer=pair / "spiece.model")
    extra = ["--preset", "tiny"] if problem == "preset-given" else []
    status, err = run(["finetune", "--small", str(small), "--data", str(pair), "--out", str(tmp_path / "out"), *extra],
                      capsys)
    assert status == 2 and message in err and err.count("\n") == 1
