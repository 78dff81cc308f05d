"""scripts/cost_model.py: the counts it reads off BiLD's traces add up to bild's own stats, its prediction is the sum it
claims on a made-up cost table, its replays take the real runs' decisions again, and it runs end to end on a tiny
random pair. No timing is ever asserted."""
import json
from collections import Counter

import pytest
import torch

import minibild
from cost_model import (Call, CostTable, Replay, bild_calls, counts, greedy_calls, interpolate, main, predict,
                        replay_logits, replay_seconds)
from minibild import EarlyExit, bild
from minibild.early_exit import EarlyExitCache
from minibild.modes import Mode
from minibild.observed import observed
from test_latency_scripts import pair  # noqa: F401 (the fixture: a tiny random pair and a six-sentence split)
from tiny_models import sharp_random_t5
from train import PRESETS

VOCAB = 40
# (fallback, rollback, N): the defaults, aggressive, exact, speculative. Between them they fall back, hand over,
# roll back, accept and end at the length cap.
SETTINGS = [(0.6, 5.0, 10), (0.3, 1.0, 3), (0.6, 0.0, 2), (0.0, 0.0, 4)]
MAX_NEW_TOKENS = 12


def tiny_models(exit_layer: int = 0):
    config = dict(PRESETS["tiny"], vocab_size=VOCAB)
    large = sharp_random_t5(minibild.T5Config(**config), seed=1)
    if exit_layer:
        return large, EarlyExit(large, exit_layer)
    return large, sharp_random_t5(minibild.T5Config(**(config | {"num_decoder_layers": 1})), seed=2)


def sources(n=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (1, 3 + i % 6), generator=g) for i in range(n)]


def runs(large, small):
    """Every (source, setting) run of BiLD on the pair."""
    for ids in sources():
        for fallback, rollback, n in SETTINGS:
            yield bild.generate(large, small, ids, fallback_threshold=fallback, rollback_threshold=rollback,
                                max_small_steps=n, max_new_tokens=MAX_NEW_TOKENS), n


@pytest.mark.parametrize("exit_layer", [0, 1])
def test_counts_add_up_to_bild_stats(exit_layer):
    large, small = tiny_models(exit_layer)
    fresh = []  # early exit: per large call, how many of its tokens the first layers had not run (bild's own cache)

    def recording(call, method, *args):
        if call == "decode" and isinstance(args[1], EarlyExitCache):  # a large call (the small one gets a view)
            ids, cache = args
            fresh.append(ids.shape[1] - min(cache.exit_length - cache.length, ids.shape[1]))
        return method(*args)
    if exit_layer:
        small = observed(small, recording)
    reached = Counter()
    for result, n in runs(large, small):  # each run made its calls just before it is yielded
        s = result.stats
        calls = bild_calls(result.trace, early_exit=bool(exit_layer))
        by_kind = counts(calls)
        large_calls = Counter()
        for kind in by_kind.keys() - {"small"}:
            large_calls.update(by_kind[kind])
        assert sum(by_kind.get("small", {}).values()) == s.small_calls
        assert sum(large_calls.values()) == s.large_calls
        # A large call feeds the last verified token, then each pending token, which it accepts or rolls back.
        assert sum((k - 1) * m for k, m in large_calls.items()) == s.accepted_small_tokens + s.rolled_back_tokens
        assert len(result.tokens) == s.large_tokens + s.small_tokens
        assert set(by_kind.get("small", {})) <= {1, 2} and max(large_calls) <= n + 1
        assert [c.start for c in calls] == [step.start for step in result.trace]
        if exit_layer:
            assert [c.kind for c in calls if c.kind != "small"] == [("shared", "shared+1")[u] for u in fresh]
            reached.update(c.kind for c in calls)
        else:
            assert fresh == [] and set(by_kind) <= {"small", "large"}
        reached.update(f"small fed {k}" for k in by_kind.get("small", {}))
        reached.update(["fallback"] * s.fallbacks + ["handover"] * s.handovers + ["rollback"] * s.rollbacks)
        fresh.clear()
    expected = {"small fed 1", "fallback", "handover", "rollback"} | ({"shared", "shared+1"} if exit_layer else
                                                                       {"small fed 2"})
    assert expected <= set(reached), f"paths never reached: {expected - set(reached)}"


def test_greedy_calls():
    assert greedy_calls("large", [5, 7, 1]) == [Call("large", 1, 0), Call("large", 1, 1), Call("large", 1, 2)]
    assert counts(greedy_calls("small", [5, 7, 1])) == {"small": {1: 3}}


def test_interpolate():
    points = {0: 1.0, 10: 3.0, 30: 4.0}
    assert [interpolate(points, x) for x in (-5, 0, 5, 10, 20, 30, 99)] == [1.0, 1.0, 2.0, 3.0, 3.5, 4.0, 4.0]
    assert interpolate({8: 2.0}, 100) == 2.0


def test_prediction_is_the_hand_computed_sum():
    table = CostTable(encoders={"large": {10: 0.5, 30: 1.5}, "small": {10: 0.1}},
                      calls={("small", 1): {0: 1.0, 10: 2.0}, ("small", 2): {0: 1.5, 10: 2.5},
                             ("large", 1): {0: 10.0, 10: 20.0}, ("large", 3): {0: 18.0, 10: 28.0}})
    calls = [Call("large", 1, 0), Call("small", 2, 0), Call("small", 1, 2), Call("large", 3, 1), Call("small", 1, 20)]
    parts = predict(table, ["large", "small"], calls, source_length=20, overhead=0.01)
    assert parts == pytest.approx({"encoders": 1.0 + 0.1,  # large halfway from 10 to 30 tokens; small: one point
                                   "small": 1.5 + 1.2 + 2.0,  # at 2: a fifth of the way to 10; at 20: flat beyond
                                   "large": 10.0 + 19.0, "overhead": 5 * 0.01})
    flat = predict(table, ["large", "small"], calls, source_length=20, overhead=0.01, flat=True)
    assert flat == pytest.approx(parts | {"large": 10.0 + 11.0})  # the 3-token call costs a 1-token call at 1
    with pytest.raises(ValueError, match="no large call feeding 2 tokens"):
        predict(table, [], [Call("large", 2, 0)], 20, 0.0)


@pytest.mark.parametrize("exit_layer", [0, 1])
def test_prediction_from_real_traces_matches_the_stats(exit_layer):
    """Small calls cost 1, a large call k (its tokens fed): the prediction counts calls and tokens as the stats do."""
    kinds = ("shared", "shared+1") if exit_layer else ("large",)
    table = CostTable({}, {("small", k): {0: 1.0} for k in (1, 2)} |
                      {(kind, k): {0: float(k)} for kind in kinds for k in range(1, 12)})
    for result, _ in runs(*tiny_models(exit_layer)):
        s = result.stats
        calls = bild_calls(result.trace, bool(exit_layer))
        assert predict(table, [], calls, 5, overhead=0.5) == {
            "encoders": 0, "small": s.small_calls, "large": s.large_calls + s.accepted_small_tokens +
            s.rolled_back_tokens, "overhead": 0.5 * (s.small_calls + s.large_calls)}
        assert predict(table, [], calls, 5, overhead=0.0, flat=True)["large"] == s.large_calls


@pytest.mark.parametrize("exit_layer", [0, 1])
def test_replay_takes_the_same_decisions(exit_layer):
    large, small = tiny_models(exit_layer)
    like = torch.empty(0)
    modes = [Mode("large", max_new_tokens=MAX_NEW_TOKENS), Mode("small", max_new_tokens=MAX_NEW_TOKENS)]
    modes += [Mode("bild", fb, rb, n, MAX_NEW_TOKENS) for fb, rb, n in SETTINGS]
    for ids in sources(6):
        for mode in modes:
            tokens, result = mode.decode(large, small, ids)
            logits = replay_logits(mode, tokens, result, VOCAB, like)
            replayed, replayed_result = mode.decode(Replay(large.config, logits["large"], like),
                                                    Replay(large.config, logits["small"], like), ids)
            assert replayed == tokens
            if result:
                for real, again in zip(result.trace, replayed_result.trace, strict=True):
                    assert (again.model, again.decision) == (real.model, real.decision)
                    if not exit_layer:  # with early exit the replay's small model catches up on its own cache
                        assert (again.start, again.fed) == (real.start, real.fed)
                    if real.model == "small":
                        assert (again.token, again.prob) == (real.token, pytest.approx(real.prob, rel=1e-5))
                    else:
                        assert (again.argmax, again.rollback_at, again.appended) == \
                            (real.argmax, real.rollback_at, real.appended)
            assert replay_seconds(mode, large.config, tokens, result, ids, like, lambda: None) is not None


def run_script(pair, tmp_path, *arguments):
    out = tmp_path / "cost.json"
    assert main(["--split", str(pair / "dev.jsonl"), "--large", str(pair / "large"), "--limit", "2",
                 "--max-new-tokens", "10", "--positions", "0", "4", "--table-rounds", "2", "--warmup", "0",
                 "--threads", "1", "--no-progress", "--json", str(out), *arguments]) == 0
    return json.loads(out.read_text())


def test_end_to_end(pair, tmp_path, capsys):  # noqa: F811 (pair is the imported fixture)
    report = run_script(pair, tmp_path, "--small", str(pair / "small"))
    systems = ["large", "small", "bild(fb=0.6,rb=5,N=10)", "bild(fb=0.6,rb=0,N=10)", "speculative(k=5)"]
    assert list(report["systems"]) == list(report["sentences"]) == systems
    assert report["meta"]["sentences"] == 2 and report["meta"]["positions"] == [0, 4]
    calls = {(c["kind"], c["fed"]) for c in report["cost_table"]["calls"]}
    assert calls == {("small", 1), ("small", 2)} | {("large", k) for k in range(1, 12)}
    assert set(report["cost_table"]["encoders"]) == {"large", "small"}
    for label, entries in report["sentences"].items():
        assert len(entries) == 2
        for entry in entries:
            assert entry["predicted"] == pytest.approx(sum(entry["parts"].values()))
            if label in ("large", "small"):  # greedy: one 1-token call per output token
                assert entry["counts"] == {label: {"1": entry["output_tokens"]}}
                assert entry["predicted_flat"] == entry["predicted"]
        entry = report["systems"][label]
        assert sum(entry[f"{part}_share"] for part in ("encoders", "small", "large", "overhead")) == pytest.approx(1)
        if label.startswith(("bild", "speculative")):
            assert entry["tokens_per_large_call"] >= 1 and 0 <= entry["fallback_rate"] <= 1
    assert report["systems"]["speculative(k=5)"]["fallback_rate"] == 0
    printed = capsys.readouterr().out
    assert "Predicted against measured" in printed and "flat verify" in printed
    assert "large calls by tokens fed" in printed


def test_end_to_end_early_exit(pair, tmp_path):  # noqa: F811
    report = run_script(pair, tmp_path, "--exit-layer", "1", "--systems", "small", "bild:0.3,2,3")
    assert report["meta"]["small"] == "exit:1"
    calls = {(c["kind"], c["fed"]) for c in report["cost_table"]["calls"]}
    assert calls == {("small", 1), ("small", 2), ("large", 1)} | {(kind, k) for kind in ("shared", "shared+1")
                                                                  for k in range(1, 5)}
    assert set(report["cost_table"]["encoders"]) == {"large", "small", "shared"}
    for entry in report["sentences"]["bild(fb=0.3,rb=2,N=3)"]:
        assert set(entry["counts"]) <= {"small", "shared", "shared+1"}


def test_refuses_negative_positions(pair, tmp_path, capsys):  # noqa: F811
    assert main(["--split", str(pair / "dev.jsonl"), "--large", str(pair / "large"), "--small", str(pair / "small"),
                 "--positions", "-1", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("cost_model: error: --positions must be >= 0")
