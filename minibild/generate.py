"""Plain greedy decoding with the KV cache: the baseline BiLD is measured against. Also the argument checks
every decoding entry point shares (greedy here, bild.generate)."""
import numbers

import torch

from .early_exit import EarlyExit
from .model import T5


@torch.inference_mode()
def greedy(model: T5, input_ids, max_new_tokens: int, attention_mask=None) -> list[list[int]]:
    """Argmax decoding for a batch; each row stops at EOS. Returns one token list per row, without
    the decoder-start token and with EOS when it was produced."""
    check_eval("the model", model)
    check_count("max_new_tokens", max_new_tokens)
    config = model.config
    cache = model.new_cache(model.encode(input_ids, attention_mask), attention_mask, max_length=max_new_tokens)
    B = input_ids.shape[0]
    token = torch.full((B, 1), config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    steps = []
    for _ in range(max_new_tokens):
        logits = model.decode(token, cache)[:, -1]  # (B, V)
        token = logits.argmax(-1).masked_fill(done, config.pad_token_id)[:, None]  # finished rows emit pad
        steps.append(token)
        done |= token[:, 0] == config.eos_token_id
        if done.all():
            break
    rows = torch.cat(steps, dim=1).tolist()
    return [row[: row.index(config.eos_token_id) + 1] if config.eos_token_id in row else row for row in rows]


def check_eval(name: str, model) -> None:
    """Refuse a model left in training mode: dropout would make every output random."""
    if isinstance(model, EarlyExit):  # it runs its large model's layers
        name, model = "the early-exit model's large model", model.large
    if model.training:
        raise ValueError(f"{name} is in training mode, where dropout makes decoding random: call .eval() on it "
                         "first (minibild.load returns models in eval mode)")


def check_count(name: str, value) -> None:
    """A count is an integer >= 1: 2.5 or inf steps never equal a length, and True is no count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
