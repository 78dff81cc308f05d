"""The ways minibild decodes, greedy or sampled at a temperature, behind one call (one source, or a batch): used by
the CLI and the scripts alike. `official` is the official BiLD implementation's rule (minibild/official.py)."""
from dataclasses import dataclass

import torch

from . import bild, official
from .batch import generate_batch, right_pad
from .generate import greedy
from .model import T5
from .sampling import bild_sample, check_temperature, sample
from .trace import TraceHeader

# The settings each mode uses, besides max_new_tokens and temperature (every mode's) and seed (any mode's, when it
# samples): Mode's fields, and "small_model", the small model (a checkpoint, or an early exit of the large one).
# The CLI refuses a setting given to a mode that does not use it (check_used); a new mode is one more entry.
MODES = {
    "bild": ("fallback_threshold", "rollback_threshold", "max_small_steps", "small_model"),
    "large": (),
    "small": ("small_model",),
    "speculative": ("max_small_steps", "small_model"),  # max_small_steps is the draft length k
    "official": ("fallback_threshold", "rollback_threshold", "max_small_steps", "small_model"),  # minibild.official
}


def check_used(mode: str, given: dict[str, str], temperature: float):
    """Refuse a setting the mode would ignore. given: each setting given (a name as in MODES, or "seed") -> how it
    was given (a CLI flag), which the one-line error names."""
    for setting, flag in given.items():
        if setting == "seed" and not temperature:
            raise ValueError(f"{flag} seeds sampling, and --mode {mode} decodes greedily at --temperature 0: drop "
                             f"{flag}, or sample with --temperature > 0")
        if setting != "seed" and setting not in MODES[mode]:
            uses = ", ".join(MODES[mode]) or "neither thresholds nor a small model"
            raise ValueError(f"{flag} has no effect in --mode {mode} (it uses {uses}): drop it")


@dataclass(frozen=True)
class Mode:
    """A decoding mode with its settings; `speculative` uses max_small_steps as its draft length k. Temperature > 0
    samples: large and small with minibild.sample, bild with bild_sample (no rollback threshold), speculative with
    bild_sample at fallback threshold 0 (speculative sampling); each source with a generator seeded with `seed`."""
    name: str = "bild"
    fallback_threshold: float = bild.FALLBACK_THRESHOLD
    rollback_threshold: float = bild.ROLLBACK_THRESHOLD
    max_small_steps: int = bild.MAX_SMALL_STEPS
    max_new_tokens: int = bild.MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    seed: int = 0

    def __post_init__(self):
        if self.name not in MODES:
            raise ValueError(f"unknown mode {self.name!r}; expected one of {', '.join(MODES)}")
        # Checked here, so that the CLI refuses bad settings before it prints any output.
        bild.check_settings(self.fallback_threshold, self.rollback_threshold, self.max_small_steps,
                            self.max_new_tokens)
        if self.temperature != 0:
            check_temperature(self.temperature, "greedy decoding")
        if self.name == "official" and self.temperature != 0:
            raise ValueError("mode official decodes greedily, as the official implementation does: use temperature 0")

    @property
    def label(self) -> str:
        if self.temperature:
            settings = {"bild": f"fb={self.fallback_threshold:g},N={self.max_small_steps},",
                        "speculative": f"k={self.max_small_steps},"}.get(self.name, "")
            return f"{self.name}-sample({settings}T={self.temperature:g})"
        if self.name in ("bild", "official"):
            settings = f"fb={self.fallback_threshold:g},rb={self.rollback_threshold:g},N={self.max_small_steps}"
            return f"{self.name}({settings})"
        return f"speculative(k={self.max_small_steps})" if self.name == "speculative" else self.name

    @property
    def thresholds(self) -> tuple[float, float | None]:
        """(fallback, rollback) thresholds of the mode's BiLD runs: speculative decoding is BiLD with both at 0
        (bild.speculative); sampling has no rollback threshold (None)."""
        fallback, rollback = (0.0, 0.0) if self.name == "speculative" else (self.fallback_threshold,
                                                                              self.rollback_threshold)
        return fallback, None if self.temperature else rollback

    def decode(self, large: T5 | None, small: T5 | None, input_ids) -> tuple[list[int], "bild.BiLDResult | None"]:
        """Decode one source (1, S) -> (tokens, the BiLD result with stats and trace, or None for one model)."""
        if self.temperature:
            return self._sample(large, small, input_ids)
        if self.name in ("large", "small"):
            return greedy(large if self.name == "large" else small, input_ids, self.max_new_tokens)[0], None
        if self.name == "speculative":
            result = bild.speculative(large, small, input_ids, k=self.max_small_steps,
                                      max_new_tokens=self.max_new_tokens)
        else:
            rule = official.generate if self.name == "official" else bild.generate
            result = rule(large, small, input_ids, fallback_threshold=self.fallback_threshold,
                          rollback_threshold=self.rollback_threshold, max_small_steps=self.max_small_steps,
                          max_new_tokens=self.max_new_tokens)
        return result.tokens, result

    def _sample(self, large: T5 | None, small: T5 | None, input_ids) -> tuple[list[int], "bild.BiLDResult | None"]:
        generator = torch.Generator().manual_seed(self.seed)  # per source: its output does not depend on the others
        if self.name in ("large", "small"):
            return sample(large if self.name == "large" else small, input_ids, temperature=self.temperature,
                          max_new_tokens=self.max_new_tokens, generator=generator), None
        fallback, _ = self.thresholds
        result = bild_sample(large, small, input_ids, temperature=self.temperature, fallback_threshold=fallback,
                             max_small_steps=self.max_small_steps, max_new_tokens=self.max_new_tokens,
                             generator=generator)
        return result.tokens, result

    def decode_batch(self, large: T5 | None, small: T5 | None, input_ids,
                     attention_mask) -> list[tuple[list[int], "bild.BiLDResult | None"]]:
        """Decode a right-padded batch (B, S) -> per row what decode gives on that row alone: batched greedy
        (minibild.greedy) or batched BiLD (batch.generate_batch). Sampling decodes one source at a time."""
        if self.temperature:
            raise ValueError("sampling (temperature > 0) decodes one source at a time: use batch size 1")
        if self.name == "official":
            raise ValueError("mode official decodes one source at a time (minibild.official is batch-1 code): use "
                             "batch size 1")
        if self.name in ("large", "small"):
            model = large if self.name == "large" else small
            return [(tokens, None) for tokens in greedy(model, input_ids, self.max_new_tokens, attention_mask)]
        fallback, rollback = self.thresholds
        results = generate_batch(large, small, input_ids, attention_mask, fallback_threshold=fallback,
                                 rollback_threshold=rollback, max_small_steps=self.max_small_steps,
                                 max_new_tokens=self.max_new_tokens)
        return [(result.tokens, result) for result in results]

    def decode_batches(self, large: T5 | None, small: T5 | None, sources: list[list[int]], batch_size: int,
                       device=None):
        """Decode sources (token lists) batch_size at a time, in order: yield each batch's list of (tokens, BiLD
        result or None). Batch size 1 runs decode (the batch-1 code), larger ones decode_batch."""
        pad = (large or small).config.pad_token_id
        for i in range(0, len(sources), batch_size):
            batch = sources[i:i + batch_size]
            if batch_size == 1:
                yield [self.decode(large, small, torch.tensor(batch, device=device))]
            else:
                yield self.decode_batch(large, small, *right_pad(batch, pad, device))

    def header(self, large: T5, small) -> TraceHeader:
        """The header of this mode's traces (trace.py): the settings its BiLD runs use (speculative: fallback 0 and,
        greedy, rollback 0; sampled: no rollback threshold), the rule, the temperature; not for large or small."""
        fallback, rollback = self.thresholds
        return TraceHeader.of(large, small, fallback_threshold=fallback,
                              rollback_threshold=rollback, max_small_steps=self.max_small_steps,
                              max_new_tokens=self.max_new_tokens, rule="official" if self.name == "official" else
                              "bild", temperature=self.temperature or None)

    def models(self) -> tuple[str, ...]:
        """Which of the pair this mode runs."""
        return (self.name,) if self.name in ("large", "small") else ("large", "small")
