"""The oracle side of the tests: random T5 checkpoints written by transformers, and transformers'
own answers (logits, greedy tokens) to compare minibild against."""
import torch
import transformers
from packaging.version import Version
from transformers import T5Config as HFConfig
from transformers import T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # one bar per checkpoint load drowns pytest's output

# Small T5s covering the variants minibild must read. Dims are tiny so the tests run in seconds.
CONFIGS = {
    "v1.0": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu"),
    "v1.1": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # num_heads * d_kv != d_model, more decoder than encoder layers, few buckets and a short max
    # distance (the test inputs are longer than it), exact-erf GELU.
    "odd": dict(vocab_size=80, d_model=24, d_kv=10, d_ff=40, num_layers=1, num_decoder_layers=3, num_heads=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gelu"),
}
EOS = 1


def random_hf_t5(seed: int = 0, **config) -> T5ForConditionalGeneration:
    """A transformers T5 with random weights that give diverse greedy outputs."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(HFConfig(dropout_rate=0.0, decoder_start_token_id=0, **config))
    if config.get("tie_word_embeddings") is False:
        # transformers >= 5 ties lm_head to the embedding whatever the config says; give it its own tensor.
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    with torch.no_grad():
        # transformers' own init makes greedy emit token 0 forever. A small embedding next to larger
        # layer weights keeps the decoder from repeating its input token.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1 if name == "shared.weight" else 0.3)
    return model.eval()


def load_hf(hf_dir, dtype=torch.float32) -> T5ForConditionalGeneration:
    # Loaded in dtype (not converted after: a float64 checkpoint loaded as float32 loses its precision); the
    # argument is called torch_dtype before transformers 4.56.
    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return T5ForConditionalGeneration.from_pretrained(hf_dir, **{name: dtype}).eval()


def float64_faithful_layer_norm(self, hidden_states):
    """transformers' T5LayerNorm.forward, except that the mean of squares stays in float64 for float64
    input (transformers always uses float32 there, which caps its float64 agreement near 1e-6)."""
    variance = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in (torch.float16, torch.bfloat16):
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states


def make_batch(vocab_size: int, seed: int = 0, source_lengths=(20, 13, 6), target_length: int = 16):
    """Right-padded sources ending in EOS, their mask, and decoder inputs starting with the start token."""
    g = torch.Generator().manual_seed(seed)
    S = max(source_lengths)
    input_ids = torch.zeros(len(source_lengths), S, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(source_lengths):
        input_ids[row, : n - 1] = torch.randint(2, vocab_size, (n - 1,), generator=g)
        input_ids[row, n - 1] = EOS
        attention_mask[row, :n] = 1
    decoder_input_ids = torch.randint(2, vocab_size, (len(source_lengths), target_length), generator=g)
    decoder_input_ids[:, 0] = 0  # decoder start = pad
    return input_ids, attention_mask, decoder_input_ids


@torch.no_grad()
def hf_logits(model, input_ids, attention_mask, decoder_input_ids):
    return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits


@torch.no_grad()
def hf_greedy(model, input_ids, attention_mask, max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens per row, without the start token, cut after EOS like minibild's."""
    # transformers' decoder cache raises IndexError when the decoder has more layers than the encoder;
    # generate() without the cache is then the uncached argmax loop, still transformers' own.
    use_cache = model.config.num_decoder_layers <= model.config.num_layers
    out = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, use_cache=use_cache)
    rows = out[:, 1:].tolist()
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows]


def rel_diff(expected, actual) -> float:
    """max |expected - actual| relative to max |expected|."""
    return ((expected - actual).abs().max() / expected.abs().max()).item()
