"""Check transformers' assisted generation (`generate(assistant_model=small, ...)`) with minibild's oracle: its greedy
outputs against the large model's greedy outputs (what assisted generation promises), and its sampled outputs
against exact ancestral sampling from the large model. Prints a Markdown report (docs/ORACLE.md holds one run's).

    python scripts/check_transformers.py                     # everything: about an hour on 2 busy CPU cores
    python scripts/check_transformers.py --verses 5 --n 300  # a quick look

Greedy: the conformance pairs (conformance/models/{v1.0,v1.1}, their Hugging Face folders; the early-exit pair has no
small model transformers can run) on random sources, and the shipped pairs (weights/large + weights/small,
weights/kjv-web/...; written with minibild.weights.save_hf into a temporary folder) on the first --verses verses of
their test splits. transformers runs in float32, minibild's reference in float64, so a departure at a near-tie is
numerics. transformers' generate() raises IndexError on a T5 whose decoder has more layers than its encoder (both
shipped large models: 4 and 8); the report shows the minimal reproducer, and the shipped pairs are checked through
the workaround scripts/evaluate.py's hf_decode uses (a cache built without a config, passed to generate()).

Sampling, against an exact reference: a tiny float64 pair (4 tokens: 13 complete outputs, enumerated), the
conformance pairs (64 tokens) and the shipped Spanish-English pair (8000 tokens), both through the Rosenblatt
transform; plain sampling and assisted sampling, with transformers' default top_k (50), checked against the full and
the top-50 reference, and with top_k=0 (no truncation), n samples each, seeds 0..n-1 through torch.manual_seed.
"""
import argparse
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from evaluate import WEIGHTS, hf_decode, load_hf, load_pair, read_sources  # noqa: E402
from minibild import oracle  # noqa: E402
from minibild.conformance import load_pair as load_conformance_pair  # noqa: E402
from minibild.conformance import tiny_t5  # noqa: E402
from minibild.weights import save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "conformance"
SHIPPED = {"weights/large + weights/small": ("large", "small", "data/test.jsonl"),
           "weights/kjv-web": ("kjv-web/large", "kjv-web/small", "data/kjv-web/test.jsonl")}
SAMPLING_PAIRS = ["tiny", "v1.0", "v1.1", "shipped"]


def crash_reproducer() -> str:
    """transformers' generate(), plain and assisted (by a 1/1-layer T5), on a random T5Config(num_layers=2,
    num_decoder_layers=4): what each raises."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    tiny = dict(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=2, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=4, **tiny)).eval()
    assistant = T5ForConditionalGeneration(T5Config(num_layers=1, num_decoder_layers=1, **tiny)).eval()
    found = []
    for name, options in (("plain", {}), ("assisted", {"assistant_model": assistant})):
        try:
            model.generate(torch.tensor([[3, 4, 5, 1]]), max_new_tokens=3, do_sample=False, **options)
            found.append(f"{name}: no error")
        except Exception as e:  # the finding is whatever it raises, reported as it came
            where = traceback.extract_tb(e.__traceback__)[-1]
            found.append(f"{name}: {type(e).__name__}: {e} (in {Path(where.filename).name}, line {where.lineno})")
    return "; ".join(found)


def hf_folder(model, root: Path, name: str) -> Path:
    return save_hf(model, root / name)


def greedy_verdicts(name: str, large, small, hf_large, hf_small, sources: list, max_new_tokens: int) -> list[str]:
    """check_outputs on transformers' assisted greedy outputs (rule greedy), and how many equal its own plain greedy."""
    assisted = {}

    def decode(input_ids):
        assisted[len(assisted)] = hf_decode(hf_large, hf_small, max_new_tokens, input_ids)[0]
        return assisted[len(assisted) - 1]

    report = oracle.check_outputs(decode, large, None, sources, rule="greedy", max_new_tokens=max_new_tokens)
    plain = sum(hf_decode(hf_large, None, max_new_tokens, s)[0] == assisted[i] for i, s in enumerate(sources))
    lines = [f"- {name}, {len(sources)} sources, max_new_tokens {max_new_tokens}: {report}".replace("\n", "\n  - "),
             f"  - transformers' assisted output equals its own plain greedy output on {plain} of {len(sources)}"]
    return lines


def sampler(hf_large, hf_small, input_ids, temperature: float, max_new_tokens: int, **options):
    """sample(seed) -> transformers' sampled output (plain, or assisted with hf_small), cut after EOS."""
    eos = hf_large.config.eos_token_id
    if hf_large.config.num_decoder_layers > hf_large.config.num_layers:  # the IndexError's workaround
        from transformers import DynamicCache, EncoderDecoderCache
        options = options | {"cache": lambda: EncoderDecoderCache(DynamicCache(), DynamicCache())}

    def sample(seed):
        torch.manual_seed(seed)
        fresh = {name: value() if callable(value) else value for name, value in options.items()}
        out = hf_large.generate(input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=hf_small,
                                do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens, **fresh)
        tokens = out[0, 1:].tolist()
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    return sample


def truncation_distance(large, input_ids, temperature: float, max_new_tokens: int) -> str:
    """The total variation between ancestral sampling and its top-50 truncation: exact over whole outputs where they
    can be enumerated, else over the first token (a lower bound: a marginal's distance never exceeds the joint's)."""
    if oracle.count_outputs(large.config.vocab_size, max_new_tokens) > 100 * oracle.MAX_OUTPUTS:
        max_new_tokens, what = 1, "at least (the first token's)"
    else:
        what = "exactly"
    full = oracle.exact_distribution(large, input_ids, temperature, max_new_tokens)
    top_50 = oracle.exact_distribution(large, input_ids, temperature, max_new_tokens, top_k=50)  # the same outputs
    return f"{what} {0.5 * sum(abs(full[output] - top_50[output]) for output in full):.3g}"


def sampling_verdicts(name: str, large, hf_large, hf_small, input_ids, temperature: float, max_new_tokens: int,
                      n: int) -> list[str]:
    lines = [f"- {name}: ancestral sampling and its top-50 truncation are "
             f"{truncation_distance(large, input_ids, temperature, max_new_tokens)} apart in total variation"]
    for assistant, label in ((None, "plain"), (hf_small, "assisted")):
        drawn = {}
        for options, how in (({}, "default top_k (50)"), ({"top_k": 0}, "top_k=0")):
            sample = sampler(hf_large, assistant, input_ids, temperature, max_new_tokens, **options)
            drawn[how] = {}
            for top_k in ((None, 50) if not options else (None,)):
                report = oracle.check_sampler(lambda seed: drawn[how].setdefault(seed, sample(seed)), large,
                                              input_ids, temperature=temperature, max_new_tokens=max_new_tokens, n=n,
                                              top_k=top_k)
                reference = "the top-50 reference" if top_k else "the full reference"
                lines.append(f"- {name}, {label}, {how}, against {reference}: {report}")
        same = sum(drawn["default top_k (50)"][seed] == drawn["top_k=0"][seed] for seed in range(n))
        lines.append(f"  - the same output with and without top_k=50 for {same} of {n} seeds")
    return lines


def tiny_sampling_pair(seed: int) -> tuple:
    """A 4-token float64 pair with soft outputs (the recipe of tests/test_sampling.py's tiny models)."""
    config = dict(vocab_size=4, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, tie_word_embeddings=False)
    large, small = tiny_t5(seed, **config).double(), tiny_t5(seed + 1000, **config).double()
    with torch.no_grad():
        for model in (large, small):
            model.lm_head.weight.mul_(0.05)  # tiny_t5's head has std 3: logits of std ~1 spread the outputs
    return large, small


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verses", type=int, default=50, help="verses per shipped pair (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy output cap (default 64)")
    p.add_argument("--n", type=int, default=2000, help="samples per sampling check (default 2000)")
    p.add_argument("--only", choices=["greedy", "sampling"], help="run one half")
    p.add_argument("--sampling-pairs", nargs="+", choices=SAMPLING_PAIRS, default=SAMPLING_PAIRS,
                   help="which pairs the sampling check runs on (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}\n")
    print(f"Minimal reproducer, generate() on a random T5Config(num_layers=2, num_decoder_layers=4): "
          f"{crash_reproducer()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "sampling":
            check_greedy(Path(tmp), args)
        if args.only != "greedy":
            check_sampling(Path(tmp), args)
    return 0


def check_greedy(tmp: Path, args):
    print("Greedy (rule greedy: the large model's greedy output):\n")
    for pair in ("v1.0", "v1.1"):
        large, small = load_conformance_pair(CONFORMANCE, pair, torch.float64)
        hf = {role: load_hf(CONFORMANCE / "models" / pair / role / "hf", "cpu", torch.float32)
              for role in ("large", "small")}
        g = torch.Generator().manual_seed(0)
        sources = [torch.cat([torch.randint(3, 64, (1, 7), generator=g), torch.tensor([[1]])], 1) for _ in range(20)]
        print("\n".join(greedy_verdicts(f"conformance {pair}", large, small, hf["large"], hf["small"], sources, 32)))
    for name, (large_dir, small_dir, split) in SHIPPED.items():
        large, small, tok = load_pair(WEIGHTS / large_dir, WEIGHTS / small_dir, "cpu", torch.float64)
        hf = {role: load_hf(hf_folder(model, tmp, f"{large_dir}-{role}".replace("/", "-")), "cpu", torch.float32)
              for role, model in (("large", large), ("small", small))}
        try:
            hf["large"].generate(torch.tensor([[3, 4, 1]]), max_new_tokens=2, do_sample=False)
            crash = "no error"
        except IndexError as e:
            crash = f"IndexError: {e}"
        sources, _ = read_sources(str(ROOT / split), args.verses, tok, WEIGHTS / large_dir)
        print(f"- {name} ({large.config.num_layers} encoder, {large.config.num_decoder_layers} decoder layers): "
              f"plain generate() without the workaround: {crash}")
        print("\n".join(greedy_verdicts(name, large, small, hf["large"], hf["small"],
                                        [torch.tensor([s]) for s in sources], args.max_new_tokens)))


def check_sampling(tmp: Path, args):
    print(f"\nSampling against exact ancestral sampling from the large model (false-alarm rate 1e-6), "
          f"n = {args.n}:\n")
    if "tiny" in args.sampling_pairs:
        large, small = tiny_sampling_pair(5)
        hf = {role: load_hf(hf_folder(model, tmp, f"tiny-{role}"), "cpu", torch.float64)
              for role, model in (("large", large), ("small", small))}
        print("\n".join(sampling_verdicts("tiny pair (4 tokens, 2 new, T 0.5)", large, hf["large"], hf["small"],
                                          torch.tensor([[2, 1, 2]]), 0.5, 2, args.n)))
    for pair in ("v1.0", "v1.1"):
        if pair not in args.sampling_pairs:
            continue
        large, _ = load_conformance_pair(CONFORMANCE, pair, torch.float64)
        hf = {role: load_hf(CONFORMANCE / "models" / pair / role / "hf", "cpu", torch.float64)
              for role in ("large", "small")}
        print("\n".join(sampling_verdicts(f"conformance {pair} (64 tokens, 3 new, T 0.5)", large, hf["large"],
                                          hf["small"], torch.tensor([[3, 19, 13, 31, 1]]), 0.5, 3, args.n)))
    if "shipped" in args.sampling_pairs:  # 8000 tokens: the transform, and top_k=50 truncates real mass
        large, small, tok = load_pair(WEIGHTS / "large", WEIGHTS / "small", "cpu", torch.float64)
        hf = {role: load_hf(hf_folder(model, tmp, f"shipped-{role}"), "cpu", torch.float64)
              for role, model in (("large", large), ("small", small))}
        source = torch.tensor([read_sources(str(ROOT / "data/test.jsonl"), 1, tok, WEIGHTS / "large")[0][0]])
        print("\n".join(sampling_verdicts("weights/large + weights/small (8000 tokens, 2 new, T 1, the first test "
                                          "verse)", large, hf["large"], hf["small"], source, 1.0, 2, args.n)))


if __name__ == "__main__":
    sys.exit(main())
