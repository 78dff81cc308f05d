"""Tiny random T5s: for the script tests (sharp_random_t5), and the float64 model pairs, sources and settings
the BiLD property tests draw from (tests/test_bild.py, tests/test_batch.py), with the paths of the loop they count."""
import copy
import random
from collections import Counter
from functools import lru_cache

import torch
from hypothesis import strategies as st

import minibild
from minibild.conformance import tiny_t5

VOCAB, PAD, EOS = 56, 0, 1


def sharp_random_t5(config: minibild.T5Config, seed: int) -> minibild.T5:
    """A random T5 whose greedy output depends on its input and whose top probabilities spread over (0, 1)
    (sharp, but not one-hot), so that BiLD falls back, rolls back and accepts small tokens."""
    torch.manual_seed(seed)
    model = minibild.T5(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "decoder.final_norm.weight":
                p.normal_(3.0, 0.3)  # sharper output distributions
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 1.0 if name == "embed.weight" else 0.3)
    return model.eval()


# Random models never pick EOS by themselves. EOS takes the place of a token each model emits in a fifth to a
# half of its outputs, first a few tokens in, so outputs end at varied lengths (or reach the cap). SEEDS: of the
# first 16 large models (their small models' seeds: seed + 1000), those that do this most often.
SEEDS = (0, 1, 7, 15)
ENDS_LIKE = {0: 17, 1: 15, 7: 15, 15: 27, 1000: 20, 1001: 2, 1007: 25, 1015: 49}


def random_t5(seed, d_model=24, num_layers=2, ends_like=None, **config):
    """conformance.tiny_t5's recipe (confident outputs; EOS where ends_like would win) at this file's shapes, in
    float64."""
    config = dict(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, tie_word_embeddings=False,
                  dropout_rate=0.0) | config
    return tiny_t5(seed, ends_like, **config).double()


@lru_cache(maxsize=None)
def model_pair(kind, seed=0):
    large = random_t5(seed, ends_like=ENDS_LIKE[seed])
    if kind == "same":
        return large, large
    if kind == "agree":
        small = copy.deepcopy(large)
        torch.manual_seed(seed + 1000)
        with torch.no_grad():
            for p in small.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return large, small
    return large, random_t5(seed + 1000, d_model=16, num_layers=1, ends_like=ENDS_LIKE[seed + 1000])


seeds = st.sampled_from(SEEDS)
pair_args = st.tuples(st.sampled_from(["agree", "disagree"]), seeds)


def random_source(seed) -> torch.Tensor:
    """1 to 8 random source ids: hypothesis' own lists repeat a few short sources, which end alike."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, int(torch.randint(1, 9, (), generator=generator))), generator=generator)


sources = st.integers(0, 2**32 - 1).map(random_source)
lengths = st.integers(2, 24)  # from 2: with 1, the small model never runs (a test of its own)
steps = st.integers(1, 8)


# The same draws for the path-coverage tests, which run a fixed list of seeded cases (seeded_cases) rather than
# Hypothesis' examples: which examples Hypothesis draws changes with its version, the paths those cases reach never.
def uniform(low, high):
    return lambda rng: rng.uniform(low, high)


def integer(low, high):
    return lambda rng: rng.randint(low, high)


def pick(*values):
    return lambda rng: rng.choice(values)


def PAIR(rng):
    return rng.choice(["agree", "disagree"]), rng.choice(SEEDS)


def SOURCE(rng):
    return random_source(rng.getrandbits(32))


STEPS, LENGTHS = integer(1, 8), integer(2, 24)


def seeded_cases(n: int, *draws) -> list[tuple]:
    """n fixed cases: case i is one value from each draw (a function of a random.Random seeded with i)."""
    return [tuple(draw(rng) for draw in draws) for rng in map(random.Random, range(n))]


def paths(result) -> Counter:
    """The paths of the loop one result went through, counted. Each property is also checked on seeded cases,
    which sum them and assert a minimum for every path they can reach: a property proves nothing about a path it
    never saw."""
    small = [step for step in result.trace if step.model == "small"]
    rollbacks = [step for step in result.trace if step.decision == "rollback"]
    seen = Counter(step.decision for step in small)  # pending, fallback, handover, end
    seen["accepted"] = result.stats.accepted_small_tokens
    seen["rollback"] = len(rollbacks)
    seen["rollback of several tokens"] = sum(len(step.cross_entropy) - step.accepted > 1 for step in rollbacks)
    seen["EOS pending"] = sum(step.token == EOS and step.decision != "fallback" for step in small)
    seen["EOS rolled back"] = sum(EOS in step.fed[1 + step.accepted:] for step in rollbacks)
    seen["ends at EOS" if result.tokens[-1] == EOS else "ends at cap"] += 1
    return seen


def assert_reached(seen: Counter, paths: list[str], least: int):
    rare = {path: seen[path] for path in paths if seen[path] < least}
    assert not rare, f"paths reached fewer than {least} times: {rare}; all: {dict(seen)}"


ALL_PATHS = ["pending", "fallback", "handover", "end", "accepted", "rollback", "rollback of several tokens",
             "EOS pending", "EOS rolled back", "ends at EOS", "ends at cap"]
