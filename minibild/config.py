"""T5Config: the hyper-parameters of a T5 checkpoint, with Hugging Face's field names and defaults."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# The feed-forward activations minibild implements; Hugging Face's ACT2FN names.
ACTIVATIONS = ("relu", "gelu_new", "gelu", "silu")


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head; num_heads * d_kv need not equal d_model
    d_ff: int = 2048  # width of the feed-forward hidden layer
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    feed_forward_proj: str = "relu"  # "relu" (t5 v1.0) or "gated-gelu" (v1.1, flan-t5, mT5), "ACT" or "gated-ACT"
    tie_word_embeddings: bool = True  # v1.0: LM head = input embedding; v1.1/flan/mT5: separate lm_head
    # Multiply the decoder output by d_model**-0.5 before the LM head. None: only when tied, as in the
    # original T5 code; transformers >= 5 always ties and writes this flag instead (False for v1.1 configs).
    scale_decoder_outputs: bool | None = None
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1  # used only in training
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int | None = None  # None: pad_token_id, as every T5 checkpoint does

    def __post_init__(self):
        # A frozen dataclass fills its derived defaults through object.__setattr__.
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.decoder_start_token_id is None:
            object.__setattr__(self, "decoder_start_token_id", self.pad_token_id)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be at least 4 "
                             f"(half exact, half logarithmic, both directions), got {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            # The decoder's buckets are exact below num_buckets // 2 and logarithmic in distance / max_distance
            # above it: a max_distance not beyond the exact range makes that logarithm's base <= 1, and the
            # bucket of a long enough distance negative. (The encoder's exact range is half as long.)
            raise ValueError("T5Config.relative_attention_max_distance must exceed relative_attention_num_buckets // 2 "
                             f"(the distances bucketed exactly), got relative_attention_max_distance="
                             f"{self.relative_attention_max_distance} with relative_attention_num_buckets="
                             f"{self.relative_attention_num_buckets}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"T5Config.{name} must be a token id in [0, {self.vocab_size}), got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported: "
                             f"expected 'ACT' or 'gated-ACT' with ACT one of {', '.join(ACTIVATIONS)}, or 'gated-gelu'")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        # Hugging Face maps "gated-gelu" to the tanh-approximated GELU ("gelu_new"), as in the original T5 v1.1.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "T5Config":
        """Build from a Hugging Face config.json dict: known fields are read, the rest ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            # UMT5 gives every layer its own relative bias; other types are not T5 at all.
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; minibild implements "
                             "'t5' and 'mt5' (t5 v1.0/v1.1, flan-t5, mT5), not umt5 or other architectures")
        if d.get("is_encoder_decoder", True) is False:
            raise ValueError(f"{source}: is_encoder_decoder is false; minibild needs an encoder-decoder T5")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path) -> "T5Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a JSON config: {e}") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
