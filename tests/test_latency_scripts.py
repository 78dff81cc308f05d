"""scripts/evaluate.py and scripts/sweep.py end to end on a tiny random pair, their refusals, and the ROUGE-L and
Pareto-front helpers on hand-computed examples."""
import importlib.util
import json
import statistics

import pytest
import torch

import minibild
from bench_batch import main as bench_batch_main
from evaluate import main as evaluate_main
from minibild.weights import save_hf
from sweep import fastest_within, lcs_length, pareto_front, rouge_l
from sweep import main as sweep_main
from tiny_models import sharp_random_t5
from train import PRESETS
from train import main as train_main

WORDS = "el la de que y en un dios señor tierra cielo pueblo casa the of and lord earth heaven people house".split()
SENTENCES = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(40)]


def random_t5(vocab_size: int, layers: int, seed: int) -> minibild.T5:
    config = minibild.T5Config(vocab_size=vocab_size,
                               **{**PRESETS["tiny"], "num_layers": layers, "num_decoder_layers": layers})
    return sharp_random_t5(config, seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random large/small pair sharing a sentencepiece tokenizer, in minibild's format and as Hugging
    Face folders, and a six-sentence split whose references are the large model's greedy translations."""
    root = tmp_path_factory.mktemp("pair")
    (root / "train.jsonl").write_text("".join(json.dumps({"source": s, "reference": s}) + "\n" for s in SENTENCES))
    train_main(["tokenizer", "--data", str(root), "--out", str(root / "spiece.model"), "--vocab-size", "40"])
    tok = minibild.Tokenizer(root / "spiece.model")
    for name, layers in (("large", 2), ("small", 1)):
        model = random_t5(tok.vocab_size, layers, seed=layers)
        minibild.save(model, root / name, tokenizer=root / "spiece.model")
        save_hf(model, root / name / "hf")
    large = minibild.load(root / "large")
    references = [tok.decode(minibild.greedy(large, torch.tensor([tok.encode(s)]), 10)[0]) for s in SENTENCES[:6]]
    (root / "dev.jsonl").write_text("".join(json.dumps({"source": s, "reference": r}) + "\n"
                                            for s, r in zip(SENTENCES, references)))
    return root


def models(pair):
    return ["--large", str(pair / "large"), "--small", str(pair / "small")]


# --- evaluate.py ---------------------------------------------------------------------------------------------

EXACT = ["bild(fb=0.6,rb=0,N=10)", "speculative(k=5)", "hf-greedy", "hf-assisted"]


def test_evaluate_split_with_transformers(pair, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "eval.json"
    # float64: a k-token and k one-token forwards, or two implementations, could flip a float32 near-tie.
    assert evaluate_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--hf-large", str(pair / "large" / "hf"),
                          "--hf-small", str(pair / "small" / "hf"), "--dtype", "float64", "--max-new-tokens", "10",
                          "--repeats", "2", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "threads", "torch", "transformers", "repeats", "warmup"} <= set(report["meta"])
    [run] = report["runs"]
    assert run["dtype"] == "float64" and run["sentences"] == 6
    systems = run["systems"]
    assert list(systems) == ["large", "small", "bild(fb=0.6,rb=5,N=10)", "bild(fb=0.6,rb=0,N=10)",
                             "speculative(k=5)", "hf-greedy", "hf-assisted"]
    assert [label for label, entry in systems.items() if "differs_from_large" in entry] == EXACT
    for label, entry in systems.items():
        assert {"bleu", "chrf", "median_ms", "mean_ms", "speedup", "median_speedup", "same_as_large"} <= set(entry)
        assert entry["median_ms"] > 0
        if label == "large" or label in EXACT:
            assert entry["bleu"] == pytest.approx(100)  # the references are large greedy's own outputs
            assert entry["same_as_large"] == 1 and entry.get("differs_from_large", []) == []
        if label.startswith(("bild", "speculative")):
            assert 0 < entry["large_share"] <= 1 and entry["tokens_per_large_call"] >= 1
            assert {"fallbacks_per_sentence", "rollbacks_per_sentence"} <= set(entry)
            assert 0 <= entry["small_token_share"] <= 1
    assert systems["large"]["speedup"] == 1
    assert systems["small"]["bleu"] < 100  # the pair disagrees
    printed = capsys.readouterr().out
    assert "float64, 1 threads" in printed and "BLEU" in printed and "large share" in printed
    assert printed.count("identical to large greedy") == len(EXACT)


def test_evaluate_early_exit(pair, tmp_path, capsys):
    """The early-exit small model shares the large model's caches: its BiLD runs, timed, stay exact."""
    out = tmp_path / "eval.json"
    assert evaluate_main(["--split", str(pair / "dev.jsonl"), "--large", str(pair / "large"), "--exit-layer", "1",
                          "--dtype", "float64", "--max-new-tokens", "10", "--systems", "small", "bild:0.6,0",
                          "bild:0.3,2", "speculative:3", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["small"] == "exit:1"
    systems = report["runs"][0]["systems"]
    for label in ("bild(fb=0.6,rb=0,N=10)", "speculative(k=3)"):
        assert systems[label]["differs_from_large"] == [] and systems[label]["bleu"] == pytest.approx(100)
    for label in ("bild(fb=0.6,rb=0,N=10)", "bild(fb=0.3,rb=2,N=10)", "speculative(k=3)"):
        assert 0 < systems[label]["large_share"] < 1
    assert capsys.readouterr().out.count("identical to large greedy") == 2


def test_evaluate_synthetic_several_dtypes(pair, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate_main(["--synthetic", "3", "--source-length", "6", *models(pair), "--dtype", "float32", "float64",
                          "--systems", "bild:0.5,1,3", "speculative:3", "--max-new-tokens", "8", "--warmup", "0",
                          "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["inputs"].startswith("3 synthetic sources of 6 tokens")
    assert [r["dtype"] for r in report["runs"]] == ["float32", "float64"]
    for run in report["runs"]:
        assert list(run["systems"]) == ["large", "bild(fb=0.5,rb=1,N=3)", "speculative(k=3)"]  # large added
        assert [label for label, entry in run["systems"].items() if "differs_from_large" in entry] == \
            ["speculative(k=3)"]
        assert not any("bleu" in entry for entry in run["systems"].values())  # no references, no quality
    assert "BLEU" not in capsys.readouterr().out


def test_evaluate_sampled_systems(pair, tmp_path):
    """sample and bild-sample at --temperature, seeded per source: quality and counts, reproducible, never checked
    token for token against large greedy."""
    reports = []
    for _ in range(2):
        out = tmp_path / "eval.json"
        assert evaluate_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--dtype", "float64",
                              "--max-new-tokens", "10", "--systems", "sample", "bild-sample:0.3,2", "--temperature",
                              "0.8", "--seed", "5", "--no-progress", "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text())["runs"][0]["systems"])
    systems = reports[0]
    assert list(systems) == ["large", "large-sample(T=0.8)", "bild-sample(fb=0.3,N=2,T=0.8)"]
    assert not any("differs_from_large" in entry for entry in systems.values())
    assert "bleu" in systems["large-sample(T=0.8)"]
    assert "fallbacks_per_sentence" in systems["bild-sample(fb=0.3,N=2,T=0.8)"]
    timing = ("median_ms", "mean_ms", "speedup", "median_speedup", "large_share")
    first, again = ({label: {k: v for k, v in entry.items() if k not in timing} for label, entry in report.items()}
                    for report in reports)
    assert first == again


def test_evaluate_batched_gives_batch_one_outputs(pair, tmp_path):
    """--batch-size 4 over six sources (a full and a partial batch): every system's outputs, quality and counts are
    batch 1's; each source's latency is its batch's."""
    reports = []
    for size in ("1", "4"):
        out = tmp_path / f"eval{size}.json"
        assert evaluate_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--dtype", "float64",
                              "--max-new-tokens", "10", "--systems", "small", "bild:0.6,5", "bild:0.3,0",
                              "speculative:3", "--batch-size", size, "--no-progress", "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[1]["meta"]["batch_size"] == 4
    timing = ("median_ms", "mean_ms", "speedup", "median_speedup", "large_share")
    one, batched = ({label: {k: v for k, v in entry.items() if k not in timing} for label, entry in
                     report["runs"][0]["systems"].items()} for report in reports)
    assert one == batched and len(one) == 5
    assert batched["bild(fb=0.3,rb=0,N=10)"]["differs_from_large"] == []
    assert all("large_share" not in entry for entry in reports[1]["runs"][0]["systems"].values())


@pytest.mark.parametrize("arguments, message", [
    (["--systems", "large", "beam:4"], "bad system 'beam:4'"),
    (["--systems", "bild:x"], "bad system 'bild:x'"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--split", "EMPTY"], "the split is empty"),
    (["--large", "MISSING"], "no minibild checkpoint here"),
    (["--systems", "hf-greedy"], "hf-greedy needs --hf-large"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--synthetic", "-1"], "--synthetic must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "2", "--exit-layer", "1"], "hf-greedy, hf-assisted and --exit-layer decode one source at a time"),
    (["--systems", "sample", "--batch-size", "2"], "sample and bild-sample decode one source at a time"),
    (["--systems", "bild-sample:0.5", "--temperature", "0"], "temperature must be > 0 to sample"),
    (["--systems", "bild-sample:0.5,x"], "bad system 'bild-sample:0.5,x'"),
])
def test_evaluate_refuses(pair, tmp_path, capsys, arguments, message):
    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "empty.jsonl").write_text("\n")
    arguments = [a.replace("EMPTY", str(tmp_path / "empty.jsonl")).replace("MISSING", str(tmp_path / "none"))
                 for a in arguments]
    assert evaluate_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--no-progress", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error: ") and message in err and err.count("\n") == 1


def test_evaluate_and_sweep_refuse_a_small_model_with_another_tokenizer(pair, tmp_path, capsys):
    other = minibild.save(minibild.load(pair / "small"), tmp_path / "other-tokenizer")
    (other / "spiece.model").write_bytes(b"another sentencepiece model")
    split = ["--split", str(pair / "dev.jsonl"), "--large", str(pair / "large"), "--no-progress"]
    assert evaluate_main([*split, "--small", str(other)]) == 2
    assert sweep_main([*split, "--variant", f"a={pair / 'small'}", "--variant", f"b={other}",
                       "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("evaluate: error: the large and small models have different tokenizers")
    assert err[1].startswith("sweep: error: the large and b models have different tokenizers")


# --- bench_batch.py ------------------------------------------------------------------------------------------

def test_bench_batch_end_to_end(pair, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_batch_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--limit", "6", "--dtype", "float64",
                             "--batch-sizes", "4", "1", "--rounds", "2", "--max-new-tokens", "10",
                             "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["sentences"] == 6 and report["meta"]["rounds"] == 2
    assert report["identical_across_batch_sizes"] == {system: True for system in
                                                      ("large greedy", "BiLD", "exact BiLD", "speculative")}
    assert len(report["figures"]) == 8 and all(entry["tokens_per_s"] > 0 and entry["latency_ms"] > 0
                                               for entry in report["figures"].values())
    scaling = report["scaling"]
    assert scaling["batch_size"] == 4
    assert scaling["ratio"] == pytest.approx(scaling["exact_bild_gain"] / scaling["large_greedy_gain"])
    for system in ("large greedy", "BiLD", "exact BiLD", "speculative"):  # every row makes the calls it makes alone
        alone, batched = (report["figures"][f"{system} @ {b}"]["calls"] for b in (1, 4))
        assert alone.keys() == batched.keys() == ({"large"} if system == "large greedy" else {"large", "small"})
        for entry in alone.values():
            assert entry["rows_per_call"] == 1 and entry["seconds"] > 0
        for name, entry in batched.items():
            assert entry["calls"] < alone[name]["calls"]
            for per_call in ("rows_per_call", "tokens_per_call"):
                assert entry["calls"] * entry[per_call] == pytest.approx(alone[name]["calls"] * alone[name][per_call])
    rounds = {key: entry["round_seconds"] for key, entry in report["figures"].items()}
    assert all(len(seconds) == 2 and report["figures"][key]["seconds"] == pytest.approx(statistics.median(seconds))
               for key, seconds in rounds.items())
    for r, ratio in enumerate(scaling["ratio_per_round"]):  # each round's four passes alone
        gain = {system: rounds[f"{system} @ 1"][r] / rounds[f"{system} @ 4"][r]
                for system in ("exact BiLD", "large greedy")}
        assert ratio == pytest.approx(gain["exact BiLD"] / gain["large greedy"])
    inside = scaling["inside_calls"]
    assert inside["ratio"] == pytest.approx(inside["exact_bild_gain"] / inside["large_greedy_gain"])
    seconds = {b: sum(entry["seconds"] for entry in report["figures"][f"large greedy @ {b}"]["calls"].values())
               for b in (1, 4)}
    assert inside["large_greedy_gain"] == pytest.approx(seconds[1] / seconds[4])
    bild = {b: report["figures"][f"exact BiLD @ {b}"]["calls"] for b in (1, 4)}
    by_model = inside["exact_bild_gain_by_model"]
    for name in ("large", "small"):
        assert by_model[name] == pytest.approx(bild[1][name]["seconds"] / bild[4][name]["seconds"])
    # The whole is the parts' harmonic mean, weighted by their shares of the batch-1 seconds.
    share = {name: bild[1][name]["seconds"] / sum(entry["seconds"] for entry in bild[1].values()) for name in by_model}
    assert inside["exact_bild_gain"] == pytest.approx(1 / sum(share[name] / by_model[name] for name in by_model))
    printed = capsys.readouterr().out
    assert printed.count("identical across batch sizes [1, 4]") == 4 and "ratio" in printed
    assert "Where the time goes" in printed and "inside the decoder calls only" in printed


def test_bench_batch_runs_only_the_systems_asked_for(pair, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_batch_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--limit", "3", "--batch-sizes", "1",
                             "2", "--rounds", "1", "--max-new-tokens", "6", "--systems", "speculative", "large greedy",
                             "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["systems"] == ["large greedy", "speculative"]  # in the script's order
    assert set(report["figures"]) == {f"{system} @ {b}" for system in ("large greedy", "speculative") for b in (1, 2)}
    assert "scaling" not in report  # the ratio needs exact BiLD
    assert "exact BiLD" not in capsys.readouterr().out


def test_bench_batch_refuses_a_bad_batch_size(pair, capsys):
    assert bench_batch_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--batch-sizes", "0"]) == 2
    assert capsys.readouterr().err.startswith("bench_batch: error: --limit must be >= 0, and --rounds, --batch-sizes")


# --- sweep.py ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["bleu", "rougeL"])
def test_sweep_end_to_end(pair, tmp_path, capsys, metric):
    out = tmp_path / "sweep"
    assert sweep_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--fallback", "0.3", "0.9",
                       "--rollback", "0", "2", "--n", "4", "--k", "3", "--metric", metric, "--max-new-tokens", "10",
                       "--no-progress", "--out", str(out)]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert {"meta", "points", "pareto_front", "fastest_within_1", "systems"} <= set(result)
    labels = [p["label"] for p in result["points"]]
    assert labels[:3] == ["large", "small", "speculative(k=3)"] and len(labels) == 3 + 4
    for point in result["points"]:
        assert point["quality"] == result["systems"][point["label"]][metric]
        assert point["speedup"] == result["systems"][point["label"]]["speedup"]
    assert set(result["pareto_front"]) <= set(labels) and result["fastest_within_1"] in labels
    quality = {p["label"]: p["quality"] for p in result["points"]}
    assert quality["large"] == pytest.approx(100)  # the references are its own translations
    for exact in ("speculative(k=3)", "bild(fb=0.3,rb=0,N=4)", "bild(fb=0.9,rb=0,N=4)"):
        assert quality[exact] == quality["large"] and result["systems"][exact]["same_as_large"] == 1
    assert quality["small"] < 100 and quality["bild(fb=0.3,rb=2,N=4)"] < 100  # the pair disagrees
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "fastest within 1 point of large greedy: " in printed
    assert printed.count("identical to large greedy") == 3  # speculative and both rollback-0 points
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_variants_side_by_side(pair, tmp_path, capsys):
    """Two names for the same small model must score alike; every exact system of every variant, the early-exit
    one included, must reproduce large greedy; all against one large greedy run."""
    out = tmp_path / "sweep"
    assert sweep_main(["--split", str(pair / "dev.jsonl"), "--large", str(pair / "large"), "--fallback", "0.3",
                       "--rollback", "0", "2", "--n", "4", "--k", "3", "--max-new-tokens", "10", "--no-progress",
                       "--variant", f"a={pair / 'small'}", "--variant", f"b={pair / 'small'}",
                       "--variant", "ee=exit:1", "--out", str(out)]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    modes = ["small", "speculative(k=3)", "bild(fb=0.3,rb=0,N=4)", "bild(fb=0.3,rb=2,N=4)"]
    labels = [p["label"] for p in result["points"]]
    assert labels == ["large"] + [f"{v}: {m}" for v in ("a", "b", "ee") for m in modes]
    assert [p["variant"] for p in result["points"]] == [""] + [v for v in ("a", "b", "ee") for _ in modes]
    quality = {p["label"]: p["quality"] for p in result["points"]}
    for mode in modes:
        assert quality[f"a: {mode}"] == quality[f"b: {mode}"]
    for variant in ("a", "b", "ee"):
        for exact in ("speculative(k=3)", "bild(fb=0.3,rb=0,N=4)"):
            assert result["systems"][f"{variant}: {exact}"]["same_as_large"] == 1
            assert quality[f"{variant}: {exact}"] == quality["large"] == pytest.approx(100)
    assert set(result["fastest_within_1_by_variant"]) == {"a", "b", "ee"}
    assert result["meta"]["small"] == f"a={pair / 'small'} / b={pair / 'small'} / ee=exit:1"
    printed = capsys.readouterr().out
    assert "fastest within 1 point of large greedy (ee): " in printed


def test_sweep_without_matplotlib_writes_json(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert sweep_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--fallback", "0.5", "--rollback", "1",
                       "--max-new-tokens", "6", "--no-progress", "--out", str(tmp_path / "sweep")]) == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert not (tmp_path / "sweep.png").exists()
    assert "pip install -e '.[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--split", "EMPTY"], "the split is empty"),
    (["--rollback", "inf"], "--rollback thresholds must be finite and >= 0"),
    (["--fallback", "-0.5"], "--fallback thresholds must be finite and >= 0"),
    (["--variant", "small"], "bad --variant 'small'; use NAME=SMALL_FOLDER or NAME=exit:K"),
    (["--variant", "ee=exit:0"], "exit:K needs a whole number K >= 1"),
    (["--variant", "ee=exit:x"], "exit:K needs a whole number K >= 1"),
    (["--variant", "a=x", "--variant", "a=y"], "--variant names must differ"),
    (["--variant", "ee=exit:1", "--exit-layer", "1"], "give the early-exit model as a variant"),
])
def test_sweep_refuses(pair, tmp_path, capsys, arguments, message):
    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "empty.jsonl").write_text("")
    arguments = [a.replace("EMPTY", str(tmp_path / "empty.jsonl")) for a in arguments]
    assert sweep_main(["--split", str(pair / "dev.jsonl"), *models(pair), "--no-progress",
                       "--out", str(tmp_path / "sweep"), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: error: ") and message in err and err.count("\n") == 1


# --- helpers -----------------------------------------------------------------------------------------------

def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA (CLRS)
    assert lcs_length([], list("abc")) == lcs_length(list("abc"), []) == 0
    assert lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_by_hand():
    # LCS "the cat on the mat": 5 of 6 tokens each way, F1 = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # Lowercased; LCS 1 (any single word): P = R = 1/3.
    assert rouge_l(["A B C"], ["c b a"]) == pytest.approx(100 / 3)
    # LCS 2 of a 2-token hypothesis and a 4-token reference: P = 1, R = 1/2, F1 = 2/3. Averaged with 0.
    assert rouge_l(["police killed", ""], ["police killed the gunman", "anything"]) == pytest.approx(100 / 3)
    # An empty output against an empty reference is identical (a model that stops at once, scored on its own outputs).
    assert rouge_l(["", "a b"], ["", "a b"]) == 100


def test_pareto_front_and_fastest_within():
    def point(label, quality, speedup):
        return {"label": label, "quality": quality, "speedup": speedup}

    points = [point("large", 30.0, 1.0), point("small", 20.0, 3.0), point("a", 29.5, 1.6),
              point("b", 29.0, 1.5),  # dominated by a
              point("c", 28.5, 2.0), point("d", 30.0, 0.9),  # dominated by large (same quality, slower)
              point("e", 25.0, 2.0)]  # dominated by c (same speed, worse)
    assert [p["label"] for p in pareto_front(points)] == ["large", "a", "c", "small"]
    assert fastest_within(points, 30.0)["label"] == "a"  # c is 1.5 below
    assert fastest_within(points, 30.0, tolerance=1.5)["label"] == "c"
    assert fastest_within(points, 40.0) is None
