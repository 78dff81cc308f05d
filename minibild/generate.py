"""Plain greedy decoding with the KV cache: the baseline BiLD is measured against."""
import torch

from .model import T5


@torch.inference_mode()
def greedy(model: T5, input_ids, max_new_tokens: int, attention_mask=None) -> list[list[int]]:
    """Argmax decoding for a batch; each row stops at EOS. Returns one token list per row, without
    the decoder-start token and with EOS when it was produced."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
