"""Convert a Hugging Face T5 checkpoint into minibild's format.

    python scripts/convert_hf_t5.py path/to/hf_folder weights/t5-small
    python scripts/convert_hf_t5.py google/flan-t5-small weights/flan-t5-small --dtype bfloat16

HF_DIR_OR_NAME is a folder holding config.json and the weights (model.safetensors, a sharded
safetensors index, or pytorch_model.bin), or, when no such folder exists and `huggingface_hub` is
installed, a Hub model name: only the files listed in HUB_FILES are downloaded. The tokenizer
spiece.model is copied beside the converted weights when the checkpoint has one.
"""
import argparse
import sys
from pathlib import Path

import torch

from minibild import weights
from minibild.model import T5

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Everything from_hf may read, and the tokenizer; never the TensorFlow, Flax or ONNX copies.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
             "pytorch_model*.bin", "pytorch_model.bin.index.json", weights.TOKENIZER_FILE]


def checkpoint_folder(source: str) -> Path:
    """`source` itself when it is a folder, else the local snapshot of the Hub model it names."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: is a file; give the Hugging Face checkpoint's folder (the one with config.json)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{source}: no such folder. To download it as a Hugging Face Hub model name, install "
                         "huggingface_hub: pip install huggingface_hub (or pip install 'minibild[hub]')") from None
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except Exception as e:  # the Hub raises many types: unknown repo, no network, gated model...
        raise ValueError(f"{source}: no such folder, and downloading it from the Hugging Face Hub failed: "
                         f"{e}") from None


def convert(source, out, dtype: torch.dtype = torch.float32) -> T5:
    """Read the Hugging Face checkpoint `source` (folder or Hub name), write it to `out` in minibild's
    format with its tokenizer, and return the converted model."""
    hf_dir = checkpoint_folder(str(source))
    model = weights.from_hf(hf_dir).to(dtype)
    tokenizer = hf_dir / weights.TOKENIZER_FILE
    weights.save(model, out, tokenizer=tokenizer if tokenizer.exists() else None)
    return model


def describe(model: T5) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    head = "tied to the embedding" if c.tie_word_embeddings else "separate"
    return (f"{params:,} parameters, {dtype}; {c.num_layers} encoder + {c.num_decoder_layers} decoder "
            f"layers, d_model {c.d_model}, {c.num_heads} heads x d_kv {c.d_kv}, d_ff {c.d_ff} "
            f"({c.feed_forward_proj}), vocab {c.vocab_size}, LM head {head}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="HF_DIR_OR_NAME", help="Hugging Face checkpoint folder or Hub model name")
    parser.add_argument("out", metavar="OUT", help="folder to write the minibild checkpoint to")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the written weights (default float32; T5 activations can overflow in float16)")
    args = parser.parse_args(argv)
    try:
        model = convert(args.source, args.out, DTYPES[args.dtype])
    except (ValueError, OSError) as e:  # a bad input or an unwritable OUT, not a bug: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tokenizer = weights.tokenizer_path(out)
    print(f"wrote {out / weights.WEIGHTS_FILE}: {describe(model)}")
    print(f"tokenizer: {tokenizer}" if tokenizer else "tokenizer: none in the checkpoint (no spiece.model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
