"""Checkpoints: minibild's own safetensors format, and the road in from (and out to) Hugging Face T5.

minibild format: a folder holding `model.safetensors` (minibild's tensor names, the T5Config as JSON
in the file's metadata) and, when known, the tokenizer `spiece.model`. Nothing is ever unpickled
except a Hugging Face `pytorch_model.bin`, and that only with `torch.load(weights_only=True)`.
"""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import T5Config
from .model import T5
from .tokenizer import Tokenizer

FORMAT = "minibild-t5"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "spiece.model"

# The one name-mapping table: minibild tensor name -> Hugging Face tensor name (first match wins).
TO_HF = [
    (r"^embed\.", "shared."),
    (r"^(encoder|decoder)\.relative_bias\.weight$", r"\1.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^(encoder|decoder)\.final_norm\.", r"\1.final_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.attn\.", r"encoder.block.\1.layer.0.SelfAttention."),
    (r"^encoder\.layers\.(\d+)\.ff_norm\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ff\.", r"encoder.block.\1.layer.1.DenseReluDense."),
    (r"^decoder\.layers\.(\d+)\.self_attn_norm\.", r"decoder.block.\1.layer.0.layer_norm."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.", r"decoder.block.\1.layer.0.SelfAttention."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_norm\.", r"decoder.block.\1.layer.1.layer_norm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.block.\1.layer.1.EncDecAttention."),
    (r"^decoder\.layers\.(\d+)\.ff_norm\.", r"decoder.block.\1.layer.2.layer_norm."),
    (r"^decoder\.layers\.(\d+)\.ff\.", r"decoder.block.\1.layer.2.DenseReluDense."),
    (r"^lm_head\.", "lm_head."),
]
# Hugging Face files may store the shared embedding under any of these names.
HF_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Tensors some Hugging Face T5 files carry that no T5 computation uses.
HF_UNUSED = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


def to_hf_name(name: str) -> str:
    for pattern, replacement in TO_HF:
        hf, n = re.subn(pattern, replacement, name)
        if n:
            return hf
    raise KeyError(f"no Hugging Face name for minibild tensor {name!r}")


def expected_shapes(config: T5Config) -> dict[str, tuple]:
    """minibild tensor name -> shape, for a model of this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in T5(config).state_dict().items()}


def first_few(problems: list[str], n: int = 3) -> str:
    """The first n problems and how many more: an error that lists every tensor buries its cause."""
    more = f" (and {len(problems) - n} more)" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


def check_tensors(config: T5Config, tensors: dict, source, name_in_file=lambda name: name,
                  cause="the config does not match these weights") -> None:
    """Raise a ValueError naming `source`, the first missing, unexpected, mis-shaped or non-float tensors
    (under their names in the file: `name_in_file` maps minibild names to those) and the likely `cause`."""
    expected = expected_shapes(config)
    problems = [f"{name_in_file(name)}: missing" for name in sorted(set(expected) - set(tensors), key=name_in_file)]
    problems += [f"{name}: unexpected" for name in sorted(set(tensors) - set(expected))]
    problems += [f"{name_in_file(name)}: expected shape {list(shape)}, found {list(tensors[name].shape)}"
                 for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    problems += [f"{name_in_file(name)}: {t.dtype}, expected a float dtype" for name, t in tensors.items()
                 if name in expected and not t.is_floating_point()]
    if problems:
        raise ValueError(f"{source}: does not match its config ({config.num_layers} encoder / "
                         f"{config.num_decoder_layers} decoder layers, d_model {config.d_model}, "
                         f"vocab {config.vocab_size}): {first_few(problems)}. Likely cause: {cause}.")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read as safetensors: {e}") from None


# --- minibild's own format -------------------------------------------------------------------------

def _save_safetensors(tensors: dict, path: Path, metadata: dict):
    """safetensors' save_file, with the header's metadata keys in sorted order: the library writes them in hash
    order, which changes from one process to the next, and a model saved twice must be the same bytes."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode().ljust(n)  # same keys, same size
        if len(text) != n:
            raise RuntimeError(f"{path}: could not rewrite the safetensors header in place ({len(text)} != {n} bytes)")
        f.seek(8)
        f.write(text)


def save(model: T5, out, tokenizer=None) -> Path:
    """Write `model` to the folder `out` in minibild's format; copy the sentencepiece file `tokenizer` beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    _save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    if tokenizer is not None and Path(tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return out


def load(path, device=None, dtype=None) -> T5:
    """Load a minibild checkpoint (its folder or its .safetensors file), ready for inference (eval mode),
    in `dtype` (default float32, whatever the file stores: fp16 files are for shipping, not for CPU math)."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.exists():
        hint = (" It looks like a Hugging Face checkpoint: convert it first with "
                f"`python scripts/convert_hf_t5.py {path} OUT`." if (path / "config.json").exists() else "")
        raise FileNotFoundError(f"{file}: no minibild checkpoint here.{hint}")
    tensors, metadata = _read_safetensors(file)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{file}: not a minibild checkpoint (its metadata has no format={FORMAT!r} and config); "
                         "convert Hugging Face checkpoints with scripts/convert_hf_t5.py")
    try:
        config = T5Config.from_dict(json.loads(metadata["config"]), source=f"{file} (config in metadata)")
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: the config in its metadata is not valid JSON: {e}") from None
    return build(config, tensors, source=file, device=device, dtype=dtype or torch.float32,
                 cause="the config in its metadata does not match its tensors; convert or save the model again")


def build(config: T5Config, tensors: dict, source, device=None, dtype=None, name_in_file=lambda name: name,
          cause="the config does not match these weights") -> T5:
    """A T5 in eval mode holding `tensors` (minibild names), checked against `config` (see check_tensors)."""
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
    check_tensors(config, tensors, source, name_in_file, cause)
    with torch.device("meta"):
        model = T5(config)
    model.load_state_dict(tensors, assign=True)  # assign: take the tensors as they are, no copy
    return use_column_major(model.to(device=device, dtype=dtype).eval())


def use_column_major(model: T5) -> T5:
    """Store each weight matrix that has at least as many rows as columns (LM head, embedding, q/k/v/o, wi)
    column-major, as the transpose of a contiguous (in, out) tensor; shapes and values are unchanged. One
    decoder token is one row times each matrix, and CPU BLAS (MKL) reads a matrix up to 2x faster in this
    layout than in nn.Linear's row-major (out, in). `build` applies it to every model it loads; returns model."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[0] >= module.weight.shape[1]:
                module.weight.set_(module.weight.t().contiguous().t())
    return model


def tokenizer_path(path) -> Path | None:
    """The spiece.model stored beside a minibild checkpoint, or None."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / TOKENIZER_FILE
    return candidate if candidate.exists() else None


def load_tokenizer(models: dict) -> Tokenizer:
    """The tokenizer stored beside one model or a pair ({name: (checkpoint, its T5Config)}), refused unless each
    stores the same one and it fits each model: a pair that tokenizes differently translates into garbage."""
    files = {}
    for name, (path, _) in models.items():
        files[name] = tokenizer_path(path)
        if files[name] is None:
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} beside the weights; convert the checkpoint with "
                                    "its tokenizer (scripts/convert_hf_t5.py)")
    (first, spiece), *others = files.items()
    for name, other in others:
        if other.read_bytes() != spiece.read_bytes():
            raise ValueError(f"the {first} and {name} models have different tokenizers ({spiece} and {other}); "
                             "both models of a pair must use the same one")
    tok = Tokenizer(spiece)
    for name, (path, config) in models.items():
        tok.check_model(config, f"the {name} model {path}")
    return tok


# --- Hugging Face checkpoints ----------------------------------------------------------------------

def read_hf_tensors(hf_dir: Path) -> dict:
    """All tensors of a Hugging Face checkpoint folder, under their Hugging Face names."""
    for index_name, reader in (("model.safetensors.index.json", "safetensors"),
                               ("pytorch_model.bin.index.json", "bin")):
        index = hf_dir / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map'): {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index}: not a valid shard index: its 'weight_map' must map tensor names "
                                 "to file names")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_read_hf_file(hf_dir / shard, reader))
            return tensors
    for name, reader in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (hf_dir / name).exists():
            return _read_hf_file(hf_dir / name, reader)
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or shard index found")


def _read_hf_file(path: Path, reader: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: listed in the shard index but missing")
    if reader == "safetensors":
        return _read_safetensors(path)[0]
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary code
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    return tensors


def from_hf(hf_dir) -> T5:
    """Read a Hugging Face T5 checkpoint folder (config.json plus weights) into a minibild T5."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a folder; expected a Hugging Face checkpoint folder")
    config = T5Config.from_json(hf_dir / "config.json")
    hf = read_hf_tensors(hf_dir)
    embedding = next((name for name in HF_EMBEDDING_NAMES if name in hf), "shared.weight")
    # The file decides whether the LM head is tied: transformers >= 5 writes tie_word_embeddings=true for
    # every T5 and ties a head that is absent, yet keeps a stored head that differs from the embedding.
    head = hf.get("lm_head.weight")
    tied = head is None or (embedding in hf and head.shape == hf[embedding].shape and torch.equal(head, hf[embedding]))
    config = dataclasses.replace(config, tie_word_embeddings=tied, scale_decoder_outputs=config.scale_decoder_outputs)

    def name_in_file(name):
        return embedding if name == "embed.weight" else to_hf_name(name)

    tensors = {name: hf[name_in_file(name)] for name in expected_shapes(config) if name_in_file(name) in hf}
    known = set(map(name_in_file, tensors)) | set(HF_EMBEDDING_NAMES) | HF_UNUSED  # embedding aliases too
    if tied:
        known.add("lm_head.weight")  # a copy of the embedding
    unexpected = sorted(set(hf) - known)
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensors (is this a T5 checkpoint of this config?): "
                         f"{first_few(unexpected)}")
    return build(config, tensors, source=hf_dir, name_in_file=name_in_file,
                 cause="config.json does not match these weights")


def save_hf(model: T5, out, tokenizer=None, dtype=None) -> Path:
    """Write `model` as a Hugging Face T5 checkpoint folder (config.json, model.safetensors), its tensors
    stored in `dtype` (default: as they are)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
              **model.config.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {to_hf_name(name): t.detach().to(dtype=dtype).contiguous().cpu()
               for name, t in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return out
