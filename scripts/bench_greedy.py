"""Time minibild's greedy decoding against transformers' on the same weights.

    python scripts/bench_greedy.py [--new-tokens 64] [--rounds 15] [--threads N] [--json results.json]

A random T5 of t5-small's shape (vocab 32128, d_model 512, 6+6 layers, 8 heads, d_ff 2048, relu, tied
embeddings) is saved by transformers and converted with scripts/convert_hf_t5.py; transformers runs the
original, minibild the converted copy. CPU, float32, batch 1, one fixed 20-token source. Both must
produce the same tokens, exactly --new-tokens of them: the EOS row of the (tied) LM head is zeroed,
so EOS's logit is 0 and never the largest. A run is one full greedy call (encoder included); runs
alternate between the two (A, B, A, B...) after warm-up, so drifts in machine load hit both alike.
Reported: the median over runs of milliseconds per generated token.

On a shared or busy machine pass --threads 1: with more threads every matrix product waits for a
descheduled OpenMP thread, and the timings measure the machine's load, not the code.
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from convert_hf_t5 import convert
from transformers import T5Config, T5ForConditionalGeneration

import minibild

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
EOS = 1


def random_t5_small(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**T5_SMALL)).eval()
    with torch.no_grad():
        # transformers' init makes greedy repeat one token. A small embedding, unit-gain layers and a strong
        # position bias give varied tokens (reported as distinct_tokens) while float32 stays well conditioned.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            elif name == "shared.weight":
                p.normal_(0.0, 0.1)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 5.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.shared.weight[EOS] = 0  # tied: EOS's logit is exactly 0, below the maximum, so never chosen
    return model


def time_once(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--rounds", type=int, default=15, help="timed runs of each implementation (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each first (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        random_t5_small().save_pretrained(Path(tmp) / "hf")
        convert(Path(tmp) / "hf", Path(tmp) / "minibild")
        hf = T5ForConditionalGeneration.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        model = minibild.load(Path(tmp) / "minibild", dtype=torch.float32)

    source = torch.randint(2, T5_SMALL["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    source[0, -1] = EOS

    def run_minibild():
        return minibild.greedy(model, source, n)[0]

    def run_transformers():
        out = hf.generate(source, do_sample=False, num_beams=1, max_new_tokens=n)
        return out[0, 1:].tolist()  # without the decoder start token

    runs = {"minibild": run_minibild, "transformers": run_transformers}
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():  # interleaved: A, B, A, B...
            seconds, tokens = time_once(fn)
            times[name].append(seconds)
            if len(tokens) != n:
                sys.exit(f"{name} generated {len(tokens)} tokens, expected {n}")
            if name == "minibild":
                expected = tokens
            elif tokens != expected:
                sys.exit(f"the implementations disagree: minibild {expected}, transformers {tokens}")

    ms_per_token = {name: 1000 * statistics.median(t) / n for name, t in times.items()}
    results = {
        "ms_per_token": ms_per_token,
        "speedup": ms_per_token["transformers"] / ms_per_token["minibild"],
        "new_tokens": n, "rounds": args.rounds, "source_tokens": source.shape[1], "batch": 1, "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        "distinct_tokens": len(set(expected)),
    }
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {results['threads']} threads, "
          f"CPU float32, batch 1, {source.shape[1]}-token source, {n} new tokens (identical in both), "
          f"median of {args.rounds} interleaved runs")
    for name, ms in ms_per_token.items():
        print(f"  {name:13s} {ms:7.2f} ms/token")
    print(f"  minibild is {results['speedup']:.2f}x faster per token")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
