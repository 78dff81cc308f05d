"""Plain greedy decoding with the KV cache: the baseline BiLD is measured against. Also the argument checks
every decoding entry point shares (greedy here, bild.generate)."""
import numbers

import torch

from .early_exit import EarlyExit
from .model import T5, check_ids


@torch.inference_mode()
def greedy(model: T5, input_ids, max_new_tokens: int, attention_mask=None) -> list[list[int]]:
    """Argmax decoding for a batch; each row stops at EOS. Returns one token list per row, without
    the decoder-start token and with EOS when it was produced."""
    check_eval("the model", model)
    check_count("max_new_tokens", max_new_tokens)
    config = model.config
    cache = model.new_cache(model.encode(input_ids, attention_mask), attention_mask, max_length=max_new_tokens)
    outputs = [[] for _ in range(input_ids.shape[0])]
    rows = list(range(input_ids.shape[0]))  # the rows still decoding, in the cache's order
    token = torch.full((len(rows), 1), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = model.decode(token, cache)[:, -1].argmax(-1, keepdim=True)  # (rows, 1)
        tokens = token[:, 0].tolist()
        for row, t in zip(rows, tokens):
            outputs[row].append(t)
        going = [i for i, t in enumerate(tokens) if t != config.eos_token_id]
        if not going:
            break
        if len(going) < len(rows):  # a finished row leaves the batch, so that it costs nothing more
            keep = torch.tensor(going, device=input_ids.device)
            cache.keep_rows(keep)
            rows, token = [rows[i] for i in going], token[keep]
    return outputs


def check_eval(name: str, model) -> None:
    """Refuse a model left in training mode: dropout would make every output random."""
    if isinstance(model, EarlyExit):  # it runs its large model's layers
        name, model = "the early-exit model's large model", model.large
    if model.training:
        raise ValueError(f"{name} is in training mode, where dropout makes decoding random: call .eval() on it "
                         "first (minibild.load returns models in eval mode)")


def check_one_source(input_ids, vocab_size: int, who: str, batched: str = "") -> None:
    """Refuse anything but one source (1, S) of ids in [0, vocab_size): `who` decodes one at a time; `batched`
    (if any) names what decodes a batch."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"{who} decodes one source at a time: input_ids must have shape (1, S), got "
                         f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}{batched}")
    check_ids("input_ids", input_ids, vocab_size)


def check_count(name: str, value) -> None:
    """A count is an integer >= 1: 2.5 or inf steps never equal a length, and True is no count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
