"""The Llama 3 transformer: GQA attention, RoPE (with Llama 3.1 scaling), SwiGLU, pre-RMSNorm.

Parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...) so its
checkpoints load as they are. The model knows nothing of parallelism: `train/parallel/` shards it from
outside, which is why head counts are read from tensor shapes (`view(..., -1, head_dim)`) rather than
from the config, and why layers live in a ModuleDict keyed by index (pipeline stages delete some).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lm.attention import AttentionInputs, AttentionMask, attend, attention_inputs, check_backend
from lm.config import LMConfig, RopeScaling

# What Transformer.forward can return besides a function of the final hidden states (its `output`).
OUTPUTS = ("logits", "last", "hidden")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with Llama 3.1's long-context scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return inv_freq
    # Wavelengths longer than the original context are stretched by `factor`; short ones are kept;
    # the band between is interpolated smoothly (Meta's apply_scaling, vectorized).
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Turns token positions into the (cos, sin) tables that `apply_rotary` uses."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.head_dim, self.theta, self.scaling = config.head_dim, config.rope_theta, config.rope_scaling
        # Not a buffer: derived from the config, absent from checkpoints, and kept in fp32 even when
        # the model is cast to bf16. Computed per device on first use (the model may be built on meta).
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations e^(i * position * freq), [..., head_dim / 2], in fp32 whatever the model dtype."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling).to(positions.device)
            self._inv_freq[positions.device] = inv_freq
        angles = positions.float()[..., None] * inv_freq
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, H, S, D] as complex numbers (Meta's layout)."""
    if rotation.dim() == 3:  # per-row positions [B, S, D/2] broadcast over heads
        rotation = rotation[:, None]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and scaled by a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused call
        # Low precision: normalize in fp32, round, then scale, in Meta's (and HF's) order.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class KVCache(nn.Module):
    """Preallocated keys and values of one layer for incremental decoding."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at [start, start + S) and return everything up to there."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None
        # The attention core, swappable from outside (context parallel gathers K and V before attending).
        self.attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask], torch.Tensor] = attend

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: AttentionMask,
        start_pos: int | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if start_pos is not None:
            if self.cache is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_cache(batch, max_len) first")
            k, v = self.cache.update(start_pos, k, v)
        out = self.attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, layer_id: int, config: LMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask, start_pos: int | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ---- initialisation ------------------------------------------------------------------------------
# One table says how every parameter starts, and one function draws it; `Transformer.init_weights` and the sharded
# trainer (`train.parallel.init`) both go through `init_values`, so a random init is the same model on any layout.

# Rows per generator block: ~16 MB of fp32 whatever the width. A shard draws only the blocks its rows fall in, so
# the 405B embedding (128256 x 16384, 8.4 GB) never exists whole: a rank holds its shard plus one 256-row block.
# A column shard (TP's row-parallel wo / w2) draws whole rows and keeps its columns: more drawing, no more memory.
INIT_BLOCK_ELEMENTS = 1 << 22

_LAYER_WEIGHT = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts: `normal`, `trunc_normal` (cut at [a, b], absolute values) or `ones`."""

    kind: Literal["normal", "trunc_normal", "ones"]
    std: float = 1.0
    a: float = -2.0
    b: float = 2.0

    def draw_(self, out: torch.Tensor, generator: torch.Generator) -> None:
        """Fill `out` in place with this distribution, drawing from `generator`."""
        if self.kind == "ones":
            nn.init.ones_(out)
        elif self.kind == "normal":
            nn.init.normal_(out, std=self.std, generator=generator)
        else:
            nn.init.trunc_normal_(out, std=self.std, a=self.a, b=self.b, generator=generator)


def param_init(name: str, config: LMConfig) -> ParamInit:
    """How parameter `name` (its name in the full Transformer, as pipeline stages keep it) starts."""
    if name == "tok_embeddings.weight":
        return ParamInit("normal", 0.02 if config.tie_word_embeddings else 1.0)
    if name == "output.weight":
        std = config.dim**-0.5
        return ParamInit("trunc_normal", std, -3 * std, 3 * std)
    if name == "norm.weight" or re.fullmatch(r"layers\.\d+\.(attention|ffn)_norm\.weight", name):
        return ParamInit("ones")
    layer = _LAYER_WEIGHT.fullmatch(name)
    if layer is None:
        raise KeyError(f"no initialisation rule for parameter {name!r}")
    if layer.group(2) in ("attention.wo", "feed_forward.w2", "feed_forward.w3"):
        # Outputs of each residual branch scaled down with depth.
        return ParamInit("trunc_normal", 0.02 / (2 * (int(layer.group(1)) + 1)) ** 0.5)
    return ParamInit("trunc_normal", 0.02)


def init_values(
    name: str, shape: Sequence[int], config: LMConfig, seed: int, region: Sequence[slice] | None = None
) -> torch.Tensor:
    """Parameter `name`'s initial values (fp32, CPU) in `region` of its full `shape` (one slice per dim, default
    all of it): the same bits whatever the region, so each shard of any layout draws its own part of one model.

    Rows come in fixed blocks of `INIT_BLOCK_ELEMENTS`, each from a generator seeded by (seed, name, block).
    """
    region = tuple(region) if region is not None else tuple(slice(0, n) for n in shape)
    # Explicitly on the CPU (where the generators are), also under a `with torch.device("cuda")` block.
    out = torch.empty([s.stop - s.start for s in region], device="cpu")
    rule = param_init(name, config)
    if out.numel() == 0:  # an empty shard (more ranks than rows)
        return out
    rows, rest = region[0], (slice(None), *region[1:])
    block_rows = max(1, INIT_BLOCK_ELEMENTS // math.prod(shape[1:]))
    for block in range(rows.start // block_rows, -(-rows.stop // block_rows)):
        start, stop = block * block_rows, min((block + 1) * block_rows, shape[0])
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.empty(stop - start, *shape[1:], device="cpu")
        rule.draw_(values, generator)
        lo, hi = max(rows.start, start), min(rows.stop, stop)
        out[lo - rows.start : hi - rows.start] = values[lo - start : hi - start][rest]
    return out


def _block_seed(seed: int, name: str, block: int) -> int:
    """A generator seed for one block of one parameter: stable across processes (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Transformer(nn.Module):
    """Llama 3 decoder: tokens [B, S] -> logits [B, S, vocab]."""

    def __init__(self, config: LMConfig):
        super().__init__()
        check_backend(config.attn_backend)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.output_dim, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(config)

    def init_weights(self, seed: int | None = None) -> None:
        """Initialize every parameter (after `to_empty` when built on the meta device) from `seed`.

        Each parameter draws from its own generators (:func:`init_values`), so a given `seed` gives the same bits
        as `train/lm.py --run.seed=SEED` under any layout. Without `seed`, one is drawn from torch's global
        generator: `torch.manual_seed` still decides, and two models built in a row still differ.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(init_values(name, param.shape, self.config, seed))

    # ---- inference cache --------------------------------------------------------------------------

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate a KV cache of `max_len` positions for `batch` sequences in every layer."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={self.config.max_seq_len}")
        weight = next(iter(self.layers.values())).attention.wk.weight
        n_kv_heads = weight.shape[0] // self.config.head_dim
        for layer in self.layers.values():
            layer.attention.cache = KVCache(
                batch, max_len, n_kv_heads, self.config.head_dim, dtype or weight.dtype, device or weight.device
            )

    def clear_cache(self) -> None:
        """Free the KV caches."""
        for layer in self.layers.values():
            layer.attention.cache = None

    # ---- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        document_ids: torch.Tensor | None = None,
        start_pos: int | None = None,
        key_valid: torch.Tensor | None = None,
        attention: AttentionInputs | None = None,
        output: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "logits",
        embeddings: torch.Tensor | None = None,
        layer_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` [B, S] (or hidden states [B, S, dim] on a pipeline stage without embeddings).

        document_ids, start_pos, key_valid: what `lm.attention.attention_inputs` builds this forward's positions and
            mask from (packed documents, KV-cache decoding, left padding).
        attention: prebuilt positions and mask used as they are (left-padded decoding with explicit positions;
            context parallel: local queries against the keys of the whole row), instead of the three above.
        output: "logits" [B, S, vocab]; "last": the last position's logits [B, 1, vocab] (generation prefill);
            "hidden": the final-normed hidden states [B, S, dim] (the caller projects them); or a function
            `output(hidden, self.output.weight)`, e.g. a chunked loss over the vocabulary, called inside forward
            where a sharding wrapper has the full weight gathered.
        embeddings [B, S, dim]: input embeddings used instead of looking up `tokens` (adapters that add tokens).
        layer_hook: `h = layer_hook(name, h)` before each layer (adapters' cross-attention blocks); the frozen
            layers themselves run unchanged.
        """
        if not callable(output) and output not in OUTPUTS:
            raise ValueError(f"output={output!r}: expected one of {OUTPUTS} or a function (hidden, weight)")
        if embeddings is not None:
            h = embeddings
        else:
            h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if attention is None:
            # From the input, not h: under sequence parallel the embedding's output holds a slice of the sequence,
            # and a later pipeline stage's input is that slice; the document ids of packed rows span the sequence.
            batch, seq = (document_ids if document_ids is not None else tokens).shape[:2]
            attention = attention_inputs(
                self.config, batch, seq, h.device, document_ids=document_ids, start_pos=start_pos, key_valid=key_valid
            )
        elif document_ids is not None or start_pos is not None or key_valid is not None:
            raise ValueError("pass either attention= or document_ids / start_pos / key_valid, not both")
        rope = self.rope(attention.positions)
        for name, layer in self.layers.items():
            if layer_hook is not None:
                h = layer_hook(name, h)
            h = layer(h, rope, attention.mask, attention.start_pos)
        if self.norm is None:
            return h
        if output == "last":
            h = h[:, -1:]
        h = self.norm(h)
        if self.output is None or output == "hidden":
            return h
        return output(h, self.output.weight) if callable(output) else self.output(h)


__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "ParamInit",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "TransformerBlock",
    "init_values",
    "param_init",
]
