"""Checkpoints: Hugging Face -> minibild conversion in every file layout, minibild's own format, the way
back to transformers, and every error a user can hit, checked by what its message says."""
import copy
import json
import os
import re
import shutil
import sys

import pytest
import torch
from convert_hf_t5 import main as convert_main
from hf_oracle import hf_logits, load_hf, make_batch, rel_diff
from safetensors.torch import load_file, save_file

import minibild
from minibild import weights

V10 = pytest.mark.parametrize("checkpoint", ["v1.0"], indirect=True)
V11 = pytest.mark.parametrize("checkpoint", ["v1.1"], indirect=True)


def hf_tensors(checkpoint) -> dict:
    return load_file(checkpoint.hf_dir / "model.safetensors")


def hf_copy(checkpoint, out, edit=None, config=None):
    """A copy of the checkpoint's Hugging Face folder, its tensors changed by `edit`, its config.json
    replaced by the dict `config`."""
    out.mkdir()
    tensors = hf_tensors(checkpoint)
    if edit:
        edit(tensors)
    save_file(tensors, out / "model.safetensors")
    config_text = (checkpoint.hf_dir / "config.json").read_text() if config is None else json.dumps(config)
    (out / "config.json").write_text(config_text)
    return out


def assert_same_model(expected, actual):
    assert expected.config == actual.config
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def logits(model, checkpoint):
    input_ids, mask, decoder_ids = make_batch(checkpoint.config["vocab_size"])
    with torch.no_grad():
        return model(input_ids, decoder_ids, mask)


# --- Hugging Face -> minibild -> Hugging Face -----------------------------------------------------------

def test_converted_tensors_are_the_ones_transformers_loads(checkpoint):
    converted = checkpoint.minibild()
    hf = checkpoint.hf()
    hf_state = hf.state_dict()
    for name, tensor in converted.state_dict().items():
        hf_name = "shared.weight" if name == "embed.weight" else weights.to_hf_name(name)
        assert torch.equal(tensor, hf_state[hf_name]), name
    # Nothing dropped: transformers' parameters (tied ones counted once) are all in minibild.
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in hf.parameters())
    assert_same_model(weights.from_hf(checkpoint.hf_dir), converted)


def test_minibild_save_load_round_trip(checkpoint, tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = checkpoint.minibild(dtype)
        tokenizer = tmp_path / "any.model"
        tokenizer.write_bytes(b"sentencepiece bytes")
        reloaded = minibild.load(weights.save(model, tmp_path / str(dtype), tokenizer=tokenizer), dtype=dtype)
        assert not any(m.training for m in reloaded.modules()), "load() must return a model in eval mode"
        assert_same_model(model, reloaded)
        assert torch.equal(logits(model, checkpoint), logits(reloaded, checkpoint))
        assert weights.tokenizer_path(tmp_path / str(dtype)).read_bytes() == b"sentencepiece bytes"


def test_loaded_tall_matrices_are_column_major(checkpoint, tmp_path):
    """load() stores each matrix with rows >= columns transposed in memory (the fast layout for decoding
    one token), the rest as they were; the values, the saved file and the logits do not change."""
    loaded = checkpoint.minibild()
    row_major = copy.deepcopy(loaded)
    for p in row_major.parameters():  # undo the relayout by hand: this model is the reference
        p.data = p.data.contiguous()
    for name, p in loaded.named_parameters():
        tall = p.dim() == 2 and p.shape[0] >= p.shape[1] and "relative_bias" not in name
        assert p.t().is_contiguous() if tall else p.is_contiguous(), name
    assert any(p.dim() == 2 and not p.is_contiguous() for p in loaded.parameters())
    assert_same_model(row_major, loaded)
    assert torch.allclose(logits(row_major, checkpoint), logits(loaded, checkpoint), rtol=1e-5, atol=1e-6)
    saved = load_file(weights.save(loaded, tmp_path / "out") / weights.WEIGHTS_FILE)
    assert all(torch.equal(saved[name], p) for name, p in loaded.state_dict().items())


def test_save_hf_is_read_back_by_transformers(checkpoint, tmp_path):
    weights.save_hf(checkpoint.minibild(), tmp_path)
    original, written = checkpoint.hf(), load_hf(tmp_path)
    assert written.config.scale_decoder_outputs == original.config.scale_decoder_outputs
    for name, tensor in original.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name
    input_ids, mask, decoder_ids = make_batch(checkpoint.config["vocab_size"])
    assert torch.equal(hf_logits(written, input_ids, mask, decoder_ids),
                       hf_logits(original, input_ids, mask, decoder_ids))
    assert_same_model(checkpoint.minibild(), weights.from_hf(tmp_path))


# --- Hugging Face file layouts ----------------------------------------------------------------------------

def test_sharded_safetensors_with_index(checkpoint, tmp_path):
    checkpoint.hf().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_model(checkpoint.minibild(), weights.from_hf(tmp_path))


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_model_bin(checkpoint, tmp_path, sharded):
    # transformers 5 writes only safetensors, so the older .bin layout is written here by hand.
    shutil.copyfile(checkpoint.hf_dir / "config.json", tmp_path / "config.json")
    tensors = hf_tensors(checkpoint)
    if sharded:
        names = sorted(tensors)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, shard_names in shards.items():
            torch.save({name: tensors[name] for name in shard_names}, tmp_path / file)
        weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert_same_model(checkpoint.minibild(), weights.from_hf(tmp_path))


@pytest.mark.parametrize("embedding_name", ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"])
def test_embedding_stored_under_an_alias(checkpoint, tmp_path, embedding_name):
    def rename(tensors):
        tensors[embedding_name] = tensors.pop("shared.weight")

    assert_same_model(checkpoint.minibild(), weights.from_hf(hf_copy(checkpoint, tmp_path / "hf", rename)))


@V10
def test_tied_file_has_no_lm_head(checkpoint, tmp_path):
    assert "lm_head.weight" not in hf_tensors(checkpoint)  # transformers drops the tied copy
    model = checkpoint.minibild()
    assert model.lm_head is None and model.config.tie_word_embeddings and model.config.scale_decoder_outputs

    def store_a_copy(tensors):  # as transformers < 5 sometimes wrote it
        tensors["lm_head.weight"] = tensors["shared.weight"].clone()

    assert_same_model(model, weights.from_hf(hf_copy(checkpoint, tmp_path / "hf", store_a_copy)))


@V11
def test_untied_file_keeps_its_lm_head(checkpoint):
    tensors = hf_tensors(checkpoint)
    assert not torch.equal(tensors["lm_head.weight"], tensors["shared.weight"])
    assert json.loads((checkpoint.hf_dir / "config.json").read_text())["tie_word_embeddings"] is True  # transformers 5
    model = checkpoint.minibild()
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    assert not model.config.scale_decoder_outputs
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


@pytest.mark.parametrize("checkpoint", ["v1.0", "v1.1"], indirect=True)
def test_config_written_before_transformers_5(checkpoint, tmp_path):
    # As t5-small's and t5-v1_1-small's config.json read: no scale_decoder_outputs; v1.1 says untied.
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "decoder_start_token_id": 0,
              "dropout_rate": 0.0, **checkpoint.config}
    hf_dir = hf_copy(checkpoint, tmp_path / "hf", config=config)
    model = weights.from_hf(hf_dir)
    assert model.config.tie_word_embeddings == model.config.scale_decoder_outputs == (checkpoint.name == "v1.0")
    expected = hf_logits(load_hf(hf_dir), *make_batch(checkpoint.config["vocab_size"]))
    assert rel_diff(expected, logits(model, checkpoint)) <= 1e-5


# --- errors -------------------------------------------------------------------------------------------

def drop(name):
    return lambda tensors: tensors.pop(name)


def add(name, shape):
    return lambda tensors: tensors.__setitem__(name, torch.zeros(shape))


@V10
@pytest.mark.parametrize("edit, message", [
    (drop("decoder.block.1.layer.2.DenseReluDense.wo.weight"),
     "decoder.block.1.layer.2.DenseReluDense.wo.weight: missing"),
    (drop("shared.weight"), "shared.weight: missing"),
    (add("encoder.block.2.layer.0.SelfAttention.q.weight", (32, 32)),
     "unexpected tensors (is this a T5 checkpoint of this config?): encoder.block.2.layer.0.SelfAttention.q.weight"),
    (add("encoder.block.0.layer.0.SelfAttention.q.weight", (32, 31)),
     "encoder.block.0.layer.0.SelfAttention.q.weight: expected shape [32, 32], found [32, 31]"),
    (lambda t: t.__setitem__("encoder.final_layer_norm.weight", torch.ones(32, dtype=torch.long)),
     "encoder.final_layer_norm.weight: torch.int64, expected a float dtype"),
], ids=["missing", "missing-embedding", "unexpected", "shape", "dtype"])
def test_tensor_errors_name_the_folder_and_tensor(checkpoint, tmp_path, edit, message):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf", edit)
    with pytest.raises(ValueError) as error:
        weights.from_hf(hf_dir)
    assert str(error.value).startswith(f"{hf_dir}: ")
    assert message in str(error.value)


@V10
def test_a_config_that_does_not_fit_the_weights_gets_a_short_error(checkpoint, tmp_path):
    # Every tensor but the relative biases and layer norms has the wrong shape: list a few, count the rest.
    config = {**json.loads((checkpoint.hf_dir / "config.json").read_text()), "d_model": 64}
    with pytest.raises(ValueError) as error:
        weights.from_hf(hf_copy(checkpoint, tmp_path / "hf", config=config))
    message = str(error.value)
    assert len(message) < 600 and "\n" not in message, message
    assert re.search(r"expected shape \[64\], found \[32\].* \(and \d+ more\)\. Likely cause: config.json does not "
                     "match these weights", message), message

    tensors = load_file(checkpoint.minibild_dir / weights.WEIGHTS_FILE)
    config = {**checkpoint.minibild().config.to_dict(), "d_model": 64}
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"format": "minibild-t5", "config": json.dumps(config)})
    with pytest.raises(ValueError) as error:
        minibild.load(tmp_path / "bad.safetensors")
    message = str(error.value)
    assert len(message) < 600 and "(and " in message and "Likely cause: the config in its metadata" in message


@V10
@pytest.mark.parametrize("config_text, message", [
    (None, "config.json: cannot read a JSON config"),
    ("{not json", "config.json: cannot read a JSON config"),
    ("[1, 2]", "config.json: expected a JSON object, got list"),
    ('{"model_type": "umt5"}', "config.json: model_type 'umt5' is not supported"),
    ('{"num_heads": 0}', "config.json: T5Config.num_heads must be a positive integer, got 0"),
], ids=["missing", "not-json", "not-object", "umt5", "bad-value"])
def test_config_errors_name_the_file(checkpoint, tmp_path, config_text, message):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf")
    if config_text is None:
        (hf_dir / "config.json").unlink()
    else:
        (hf_dir / "config.json").write_text(config_text)
    with pytest.raises(ValueError, match=f"^{hf_dir}/" + message.replace("(", r"\(").replace("[", r"\[")):
        weights.from_hf(hf_dir)


@V10
@pytest.mark.parametrize("file, content, error, message", [
    ("model.safetensors", b"\x00" * 100, ValueError, "model.safetensors: cannot read as safetensors"),
    ("model.safetensors", "truncated", ValueError, "model.safetensors: cannot read as safetensors"),
    ("pytorch_model.bin", b"not a zip nor a pickle", ValueError,
     "pytorch_model.bin: cannot load with torch.load(weights_only=True)"),
    ("model.safetensors.index.json", b"{}", ValueError, "model.safetensors.index.json: not a valid shard index"),
    ("model.safetensors.index.json", b'{"weight_map": {"shared.weight": "model-1-of-2.safetensors"}}',
     FileNotFoundError, "model-1-of-2.safetensors: listed in the shard index but missing"),
    ("model.safetensors.index.json", b"[1, 2]", ValueError, "model.safetensors.index.json: not a valid shard index"),
    ("model.safetensors.index.json", b'{"weight_map": ["model-1-of-2.safetensors"]}', ValueError,
     "model.safetensors.index.json: not a valid shard index"),
    ("model.safetensors.index.json", b'{"weight_map": {"shared.weight": 1}}', ValueError,
     "model.safetensors.index.json: not a valid shard index"),
], ids=["garbage", "truncated", "bin", "index", "shard", "index-list", "weight-map-list", "shard-not-a-name"])
def test_unreadable_weights_name_the_file(checkpoint, tmp_path, file, content, error, message):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf")
    if content == "truncated":
        content = (hf_dir / file).read_bytes()[:1000]
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / file).write_bytes(content)
    with pytest.raises(error) as e:
        weights.from_hf(hf_dir)
    assert message in str(e.value) and str(hf_dir) in str(e.value)


def test_missing_weights_and_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin or shard index found"):
        weights.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        weights.from_hf(tmp_path / "nowhere")


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@V10
def test_pickle_that_runs_code_is_refused(checkpoint, tmp_path):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"shared.weight": RunsCodeWhenUnpickled(marker)}, hf_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot load with torch.load\(weights_only=True\)"):
        weights.from_hf(hf_dir)
    assert not marker.exists()
    torch.load(hf_dir / "pytorch_model.bin", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()


@V10
def test_minibild_load_errors(checkpoint, tmp_path):
    # A Hugging Face folder, with model.safetensors or sharded: both errors say to convert it.
    with pytest.raises(ValueError, match="model.safetensors: not a minibild checkpoint.*scripts/convert_hf_t5.py"):
        minibild.load(checkpoint.hf_dir)
    checkpoint.hf().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    with pytest.raises(FileNotFoundError, match=r"convert it first with `python scripts/convert_hf_t5.py"):
        minibild.load(tmp_path / "sharded")
    with pytest.raises(FileNotFoundError, match=r"no minibild checkpoint here\.$"):
        minibild.load(tmp_path)
    tensors = load_file(checkpoint.minibild_dir / "model.safetensors")
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"format": "minibild-t5", "config": "{oops"})
    with pytest.raises(ValueError, match="bad.safetensors: the config in its metadata is not valid JSON"):
        minibild.load(tmp_path / "bad.safetensors")
    save_file(tensors, tmp_path / "list.safetensors", metadata={"format": "minibild-t5", "config": "[1, 2]"})
    with pytest.raises(ValueError, match=r"list.safetensors \(config in metadata\): expected a JSON object, got list"):
        minibild.load(tmp_path / "list.safetensors")


# --- scripts/convert_hf_t5.py ---------------------------------------------------------------------------

@V11
def test_convert_script_writes_the_checkpoint_and_tokenizer(checkpoint, tmp_path, capsys):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf")
    (hf_dir / "spiece.model").write_bytes(b"sentencepiece bytes")
    assert convert_main([str(hf_dir), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    model = minibild.load(tmp_path / "out", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert f"wrote {tmp_path / 'out' / 'model.safetensors'}: {params:,} parameters, bfloat16" in out
    assert "2 encoder + 2 decoder layers" in out and "LM head separate" in out
    assert f"tokenizer: {tmp_path / 'out' / 'spiece.model'}" in out
    assert (tmp_path / "out" / "spiece.model").read_bytes() == b"sentencepiece bytes"
    assert_same_model(checkpoint.minibild().to(torch.bfloat16), model)


@V10
def test_convert_script_reports_user_errors_without_traceback(checkpoint, tmp_path, capsys, monkeypatch):
    hf_dir = hf_copy(checkpoint, tmp_path / "hf", drop("encoder.final_layer_norm.weight"))
    assert convert_main([str(hf_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "encoder.final_layer_norm.weight: missing" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    assert convert_main(["google/flan-t5-small", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "google/flan-t5-small: no such folder" in err and "pip install huggingface_hub" in err
