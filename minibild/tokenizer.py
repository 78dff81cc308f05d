"""A sentencepiece tokenizer with T5's conventions: pad 0, eos 1, unk 2, EOS after every source."""
from pathlib import Path

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: cannot load as a sentencepiece model: {e}") from None
        ids = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"{self.path}: pad/eos/unk ids are {ids}; T5 needs {(PAD_ID, EOS_ID, UNK_ID)}")

    @property
    def vocab_size(self) -> int:
        """Pieces in the sentencepiece model; a T5 embedding may be larger (extra ids, padding)."""
        return self.sp.GetPieceSize()

    def check_model(self, config, model: str) -> None:
        """Refuse a model (its T5Config; `model` names it) this tokenizer cannot serve: more pieces than the
        model has ids, or special ids that are not the tokenizer's (T5 starts decoding with pad)."""
        if self.vocab_size > config.vocab_size:
            raise ValueError(f"{model}: its tokenizer {self.path} has {self.vocab_size} pieces, more than its "
                             f"vocab_size {config.vocab_size}")
        expected = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID}
        wrong = [f"{name} {getattr(config, name)}" for name, i in expected.items() if getattr(config, name) != i]
        if wrong:
            raise ValueError(f"{model}: its config has {', '.join(wrong)}; its tokenizer {self.path} needs "
                             f"pad_token_id {PAD_ID}, eos_token_id {EOS_ID}, decoder_start_token_id {PAD_ID}")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` followed by EOS, as T5 expects its source."""
        return self.sp.EncodeAsIds(text) + [EOS_ID]

    def decode(self, ids) -> str:
        """Text of `ids`, skipping pad/eos/unk and ids beyond the sentencepiece vocabulary (T5's extra ids)."""
        size = self.vocab_size
        return self.sp.DecodeIds([i for i in ids if i not in (PAD_ID, EOS_ID, UNK_ID) and 0 <= i < size])
