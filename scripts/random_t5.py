"""Write a random T5 of t5-small's shape, for timing minibild's greedy decoding against transformers' on the same
weights.

    python scripts/random_t5.py runs/t5-small-random
    python scripts/evaluate.py --large runs/t5-small-random --hf-large runs/t5-small-random/hf --systems large \\
        hf-greedy --synthetic 1 --source-length 20 --max-new-tokens 64 --repeats 11 --warmup 2 --threads 1

t5-small's shape: vocab 32128, d_model 512, 6+6 layers, 8 heads, d_ff 2048, relu, tied embeddings. transformers
writes the Hugging Face folder OUT/hf, and scripts/convert_hf_t5.py converts it into OUT. The EOS row of the (tied)
embedding is zeroed, so EOS's logit is 0, never the largest: every greedy run writes exactly --max-new-tokens tokens,
and milliseconds per sentence divided by that count are milliseconds per token.
"""
import argparse
import sys
from pathlib import Path

import torch
from convert_hf_t5 import convert
from transformers import T5Config, T5ForConditionalGeneration

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
EOS = 1


def random_t5_small(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**T5_SMALL)).eval()
    with torch.no_grad():
        # transformers' init makes greedy repeat one token. A small embedding, unit-gain layers and a strong
        # position bias give varied tokens while float32 stays well conditioned.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="minibild checkpoint folder to write; the Hugging Face one is OUT/hf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random_t5_small(args.seed).save_pretrained(args.out / "hf")
    convert(args.out / "hf", args.out)
    print(f"wrote {args.out} (minibild) and {args.out / 'hf'} (transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
