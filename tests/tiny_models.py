"""Tiny random T5s for the script tests."""
import torch

import minibild


def sharp_random_t5(config: minibild.T5Config, seed: int) -> minibild.T5:
    """A random T5 whose greedy output depends on its input and whose top probabilities spread over (0, 1)
    (sharp, but not one-hot), so that BiLD falls back, rolls back and accepts small tokens."""
    torch.manual_seed(seed)
    model = minibild.T5(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "decoder.final_norm.weight":
                p.normal_(3.0, 0.3)  # sharper output distributions
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 1.0 if name == "embed.weight" else 0.3)
    return model.eval()
