"""Model configuration: one dataclass, named presets, and readers for Meta and HF config files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

ATTENTION_BACKENDS = ("sdpa", "flex", "xformers")


@dataclass
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (stretches low frequencies for long context)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LMConfig:
    """Shape and numerics of a dense Llama 3 transformer."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    attn_backend: str = "sdpa"
    # 0: a language model (the output projects onto the vocabulary). N > 0: the output is a head of N scores read
    # at a sequence's last token (HF's LlamaForSequenceClassification); 1 is the paper's reward model.
    num_labels: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for rotary embeddings")
        if self.num_labels < 0:
            raise ValueError(f"num_labels={self.num_labels} must be >= 0 (0: a language model)")
        if self.num_labels and self.tie_word_embeddings:
            raise ValueError("a score head (num_labels > 0) cannot be tied to the embeddings")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r}; expected one of {ATTENTION_BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def output_dim(self) -> int:
        """Width of the output projection: the vocabulary, or the score head's labels."""
        return self.num_labels or self.vocab_size

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width, computed exactly as Meta's reference does (2/3 of 4*dim, scaled, rounded up)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    # ---- sizes and cost -------------------------------------------------------------------------

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count; tied embeddings counted once."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim
        embeddings = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.output_dim * self.dim
        total = self.n_layers * per_layer + self.dim + output
        return total if exclude_embeddings else total + embeddings

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        Matmul weights cost 6 FLOPs per parameter per token; the embedding lookup costs none.
        Causal attention scores and values cost 6 * n_layers * seq_len * dim per token
        (12 * L * S * D for the full square, halved by the causal mask), as in the PaLM/Llama MFU convention.
        """
        matmul_params = self.num_params(exclude_embeddings=True) - (2 * self.n_layers + 1) * self.dim
        if self.tie_word_embeddings:
            matmul_params += self.vocab_size * self.dim
        return 6 * matmul_params + 6 * self.n_layers * seq_len * self.dim

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LMConfig:
        """A named preset (llama3-8b, llama3-70b, llama3-405b, llama3.2-1b, llama3.2-3b, debug)."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_meta_params(cls, params: dict | str | os.PathLike) -> LMConfig:
        """Read Meta's params.json (a path or the parsed dict)."""
        if not isinstance(params, dict):
            with open(params) as f:
                params = json.load(f)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(
                factor=params.get("rope_scaling_factor") or _meta_default_rope_factor(params),
                low_freq_factor=params.get("rope_low_freq_factor", 1.0),
                high_freq_factor=params.get("rope_high_freq_factor") or 4.0,
                original_max_position_embeddings=params.get("rope_original_max_position_embeddings", 8192),
            )
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=params["vocab_size"],
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 500000.0),
            rope_scaling=scaling,
            max_seq_len=params.get("max_seq_len", 131072 if scaling else 8192),
            num_labels=params.get("num_labels", 0),
        )

    def to_meta_params(self) -> dict:
        """The params.json Meta's reference reads."""
        params = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None,
        }
        if self.rope_scaling is not None:
            params["rope_scaling_factor"] = self.rope_scaling.factor
            params["rope_high_freq_factor"] = self.rope_scaling.high_freq_factor
            # Meta's reference fixes these two at 1 and 8192 and ignores unknown keys; record them only when
            # they differ, so small test configs round-trip and real checkpoints look exactly like Meta's.
            if self.rope_scaling.low_freq_factor != 1.0:
                params["rope_low_freq_factor"] = self.rope_scaling.low_freq_factor
            if self.rope_scaling.original_max_position_embeddings != 8192:
                params["rope_original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        params["max_seq_len"] = self.max_seq_len
        if self.num_labels:  # not Meta's: its reference has no score head; recorded so the layout round-trips
            params["num_labels"] = self.num_labels
        return params

    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> LMConfig:
        """Read an HF LlamaConfig config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config['hidden_act']!r}: Llama 3 uses silu")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=rope["factor"],
                low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
        elif rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} in config.json is not Llama 3's ('llama3' or default)")
        dim, hidden = config["hidden_size"], config["intermediate_size"]
        head_dim = config.get("head_dim") or dim // config["num_attention_heads"]
        if head_dim * config["num_attention_heads"] != dim:
            raise ValueError(
                f"head_dim={head_dim} x num_attention_heads={config['num_attention_heads']} != hidden_size={dim}: "
                "Llama 3 ties the head size to the width"
            )
        multiplier, multiple_of = _ffn_shape_for(dim, hidden)
        return cls(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            vocab_size=config["vocab_size"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=config.get("max_position_embeddings", 8192),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            num_labels=_hf_num_labels(config),
        )

    def to_hf_config(self) -> dict:
        """An HF LlamaConfig dict that transformers 4.x and 5.x both read."""
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.num_labels:
            config.update(architectures=["LlamaForSequenceClassification"], num_labels=self.num_labels)
        if self.vocab_size >= 128256:  # the Llama 3 vocabulary: begin_of_text, end_of_text, eom, eot
            config.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
            config["rope_scaling"] = dict(rope)
        config["rope_parameters"] = rope
        if self.num_labels and self.vocab_size >= 128256:
            # HF scores a row at its last token before padding: <|finetune_right_pad_id|>, never in a dialog.
            config["pad_token_id"] = FINETUNE_PAD_ID
        return config


FINETUNE_PAD_ID = 128004  # <|finetune_right_pad_id|>


def _hf_num_labels(config: dict) -> int:
    """The score head's width of an HF ...ForSequenceClassification config.json, else 0 (a causal LM)."""
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return 0
    return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)


def _meta_default_rope_factor(params: dict) -> float:
    """The RoPE scaling factor of a Meta params.json that does not state one.

    Meta's llama3 reference hard-codes 8, right for 3.1 and 3.3, but the Llama 3.2 1B and 3B were trained
    with 32 (their HF configs say so; meta-llama/llama-models#166 and #241): recognize those shapes.
    """
    for name in ("llama3.2-1b", "llama3.2-3b"):
        preset = PRESETS[name]
        if (params["dim"], params["n_layers"], params["n_heads"]) == (preset.dim, preset.n_layers, preset.n_heads):
            return preset.rope_scaling.factor
    return 8.0


def _ffn_shape_for(dim: int, hidden: int) -> tuple[float | None, int]:
    """Find (ffn_dim_multiplier, multiple_of) that reproduce an explicit FFN width.

    HF configs store the width; Meta's store the recipe. Prefer the recipes of the released models,
    and fall back to an exact multiplier with multiple_of=1 for arbitrary widths.
    """
    for multiple_of in (4096, 1024, 256):
        for multiplier in (1.3, 1.2, 1.5, 1.0, None):
            base = int(2 * (4 * dim) / 3)
            if multiplier is not None:
                base = int(multiplier * base)
            if multiple_of * math.ceil(base / multiple_of) == hidden:
                return multiplier, multiple_of
    base = int(2 * (4 * dim) / 3)
    multiplier = hidden / base
    # int() truncates, so nudge up until the product lands exactly on the width.
    while int(multiplier * base) < hidden:
        multiplier = math.nextafter(multiplier, math.inf)
    return multiplier, 1


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)

# The paper's Table 3 (with the Llama 3.1 context extension) and the Llama 3.2 text models.
PRESETS: dict[str, LMConfig] = {
    "llama3-8b": LMConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3-70b": LMConfig(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3-405b": LMConfig(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        multiple_of=4096,
        ffn_dim_multiplier=1.2,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3.2-1b": LMConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": LMConfig(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    # Tiny, for CPU tests and the embedded default; keeps GQA (4 query heads per KV head) and the 128K vocab.
    "debug": LMConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        multiple_of=64,
        ffn_dim_multiplier=None,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=2048,
    ),
}

__all__ = ["ATTENTION_BACKENDS", "LMConfig", "PRESETS", "RopeScaling"]
