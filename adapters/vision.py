"""The image adapter: a projection of encoder features to the LM width and gated cross-attention blocks.

Llama 3.2 Vision's design (paper Section 7.3; Meta's llama_models `CrossAttentionTransformerBlock`): before some
of the frozen LM's self-attention layers (every 4th: for 32 layers before 3, 7, ..., 31) a block runs
    h = h + tanh(gate_attn) * CrossAttention(attention_norm(h), image tokens)
    h = h + tanh(gate_ffwd) * FeedForward(ffn_norm(h))
with grouped-query heads, per-head RMSNorm on queries and keys and no rotary positions. Gates start at 0, so a
fresh adapter leaves the LM exactly as it was.

Parameter names are Meta's (`cross_attention_layers.N.attention.wq`, `gate_attn`, `feed_forward.w1`,
`vision_projection`), so its checkpoints map by prefix; `mllama_adapter_to_ours` converts HF Mllama's.

Masks (Meta's `create_vision_mask`, HF's `get_cross_attention_token_mask`): each `<|image|>` token opens its image
to itself and the text after it, until the next `<|image|>`; consecutive image tokens all stay open for the text
that follows the group. A text row that sees no image (text before the first image) gets a zero cross-attention
output and a zero feed-forward branch, so it is exactly the frozen LM's. This is Meta's rule; HF Mllama instead
lets such rows attend uniformly to every image token (it only zeroes their feed-forward), so HF and Meta differ
on the text before the first image (transformers issue #39379; identical when the prompt starts with <|image|>).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import LMConfig
from lm.model import FeedForward, RMSNorm


def fusion_schedule(n_layers: int, num_cross_attention_layers: int) -> tuple[int, ...]:
    """LM layer indices that get a cross-attention block before them, spread evenly and ending at the last layer.

    Meta's `_init_fusion_schedule`: 32 layers, 8 blocks -> (3, 7, 11, 15, 19, 23, 27, 31).
    """
    if not 1 <= num_cross_attention_layers <= n_layers:
        raise ValueError(f"num_cross_attention_layers={num_cross_attention_layers} must be in [1, {n_layers}]")
    stride = math.ceil(n_layers / num_cross_attention_layers)
    return tuple(list(range(n_layers))[::-1][::stride][:num_cross_attention_layers][::-1])


@dataclass
class VisionAdapterConfig:
    """Shape of the image adapter; `from_lm` derives everything but the encoder width from the LM."""

    vision_dim: int  # encoder feature width: 7680 for ViT-H/14 (1280 x (1 final + 5 intermediate layers))
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    layers: tuple[int, ...] = ()  # LM layer indices a block runs before

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not divide")
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            raise ValueError(f"cross-attention layers {self.layers} must be increasing and distinct")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (the LM's)."""
        return self.dim // self.n_heads

    @classmethod
    def from_lm(
        cls, lm_config: LMConfig, vision_dim: int, num_layers: int | None = None, every: int = 4
    ) -> VisionAdapterConfig:
        """Blocks shaped like the LM's layers; `num_layers` blocks (default one per `every` LM layers)."""
        num_layers = num_layers or max(1, lm_config.n_layers // every)
        return cls(
            vision_dim=vision_dim,
            dim=lm_config.dim,
            n_heads=lm_config.n_heads,
            n_kv_heads=lm_config.n_kv_heads,
            ffn_hidden_dim=lm_config.ffn_hidden_dim,
            norm_eps=lm_config.norm_eps,
            layers=fusion_schedule(lm_config.n_layers, num_layers),
        )

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VisionAdapterConfig:
        """Inverse of to_dict."""
        return cls(**d)


# ---- masks ------------------------------------------------------------------------------------------------


def image_spans(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text each image (in order) is visible to; Meta's create_vision_mask rule."""
    locations = [i for i, t in enumerate(tokens) if t == image_token_id]
    spans = [[loc, nxt] for loc, nxt in zip(locations, locations[1:] + [len(tokens)], strict=True)]
    # A run of consecutive image tokens: every image of the run stays open for the text after the run.
    last_end = len(tokens)
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(start, end) for start, end in spans]


def cross_attention_mask(tokens: torch.Tensor, image_token_id: int, tile_mask: torch.Tensor) -> torch.Tensor:
    """Which image tiles each text position may attend to: tokens [B, S], tile_mask [B, I, T] -> bool [B, S, I, T].

    The k-th `<|image|>` of a row refers to that row's image k; a row may hold fewer images than I.
    """
    batch, seq = tokens.shape
    num_images = tile_mask.shape[1]
    out = torch.zeros(batch, seq, num_images, tile_mask.shape[2], dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        spans = image_spans(row, image_token_id)
        if len(spans) > num_images:
            raise ValueError(f"row {b} has {len(spans)} <|image|> tokens (id {image_token_id}) but {num_images} images")
        for k, (start, end) in enumerate(spans):
            out[b, start:end, k] = tile_mask[b, k].bool().cpu()
    return out.to(tokens.device)


@dataclass
class MediaAttentionMask:
    """A cross-attention mask over flattened media tokens, in the form the blocks use."""

    allowed: torch.Tensor  # bool [B, 1, S, K]; rows that see nothing are all True (no NaN), then zeroed by `rows`
    rows: torch.Tensor  # [B, 1, S, 1] 1.0 where the text row sees some media, else 0.0

    @classmethod
    def from_tiles(cls, mask: torch.Tensor, tokens_per_tile: int) -> MediaAttentionMask:
        """From a per-tile mask [B, S, I, T] (see `cross_attention_mask`) with `tokens_per_tile` keys per tile."""
        allowed = mask.flatten(2).repeat_interleave(tokens_per_tile, dim=2)[:, None]
        sees_any = allowed.any(dim=-1, keepdim=True)
        return cls(allowed=allowed | ~sees_any, rows=sees_any.float())

    def rows_at(self, start: int, length: int) -> MediaAttentionMask:
        """The mask of positions [start, start + length); positions past the end repeat the last row (generation)."""
        seq = self.allowed.shape[2]
        index = torch.arange(start, start + length, device=self.allowed.device).clamp(max=seq - 1)
        return MediaAttentionMask(self.allowed.index_select(2, index), self.rows.index_select(2, index))


# ---- modules ----------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Text queries against media keys/values: GQA, per-head RMSNorm on q and k, no rotary positions."""

    def __init__(self, cfg: VisionAdapterConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, n_kv_heads, K, head_dim] of media tokens [B, K, dim]: computed once per media."""
        batch, length, _ = media.shape
        # FSDP runs this method as a forward (train/stage.py registers it) and warns about returned views, since an
        # in-place op on one would skip its pre-backward all-gather: return fresh tensors. Keys: the transpose goes
        # before the per-head norm, which writes a new tensor. Values: a copy (`.contiguous()` would hand back the
        # view itself whenever it is already contiguous, e.g. with one KV head).
        k = self.k_norm(self.wk(media).view(batch, length, -1, self.head_dim).transpose(1, 2))
        v = self.wv(media).view(batch, length, -1, self.head_dim).transpose(1, 2)
        return k, v.clone(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: MediaAttentionMask) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_norm(self.wq(x).view(batch, seq, -1, self.head_dim)).transpose(1, 2)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, enable_gqa=k.shape[1] != q.shape[1])
        out = out * mask.rows.to(out.dtype)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class CrossAttentionBlock(nn.Module):
    """Gated cross-attention then gated SwiGLU, both zeroed for rows that see no media."""

    def __init__(self, cfg: VisionAdapterConfig):
        super().__init__()
        self.attention = CrossAttention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of projected media tokens [B, K, dim]."""
        return self.attention.media_kv(media)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: MediaAttentionMask) -> torch.Tensor:
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, mask)
        ffn = self.feed_forward(self.ffn_norm(h)) * mask.rows[:, 0].to(h.dtype)
        return h + self.gate_ffwd.tanh() * ffn

    def init_weights(self, depth: int) -> None:
        """Truncated-normal projections (outputs scaled down with depth, as the LM's), unit norms, gates at 0."""
        out_std = 0.02 / (2 * (depth + 1)) ** 0.5
        for linear in (self.attention.wq, self.attention.wk, self.attention.wv, self.feed_forward.w1):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        for linear in (self.attention.wo, self.feed_forward.w2, self.feed_forward.w3):
            nn.init.trunc_normal_(linear.weight, std=out_std)
        for norm in (self.attention.q_norm, self.attention.k_norm, self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        nn.init.zeros_(self.gate_attn)
        nn.init.zeros_(self.gate_ffwd)


class VisionAdapter(nn.Module):
    """Projection of encoder features to the LM width, and the cross-attention blocks on `cfg.layers`."""

    def __init__(self, cfg: VisionAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_projection = nn.Linear(cfg.vision_dim, cfg.dim, bias=True)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(cfg) for _ in cfg.layers)
        self.init_weights()

    def init_weights(self) -> None:
        """Fresh adapter: random projections, every gate at 0 (the LM's output is unchanged)."""
        for depth, block in zip(self.cfg.layers, self.cross_attention_layers, strict=True):
            block.init_weights(depth)
        self.vision_projection.reset_parameters()

    def block_for_layer(self) -> dict[str, CrossAttentionBlock]:
        """LM layer name (`str(index)`, the key of `Transformer.layers`) -> the block that runs before it."""
        return {str(i): block for i, block in zip(self.cfg.layers, self.cross_attention_layers, strict=True)}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [B, I, T, N, vision_dim] -> media tokens [B, I * T * N, dim]."""
        out = self.vision_projection(features.to(self.vision_projection.weight.dtype))
        return out.flatten(1, 3)

    def media_kv(self, media: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per LM layer name, the keys and values of media tokens [B, K, dim] (the generation cache)."""
        return {name: block.media_kv(media) for name, block in self.block_for_layer().items()}


# ---- checkpoint converters --------------------------------------------------------------------------------

# Ours (per block, after `cross_attention_layers.N.`) <- HF Mllama (after `language_model.layers.M.`).
_BLOCK_FROM_MLLAMA = {
    "attention.wq.weight": "cross_attn.q_proj.weight",
    "attention.wk.weight": "cross_attn.k_proj.weight",
    "attention.wv.weight": "cross_attn.v_proj.weight",
    "attention.wo.weight": "cross_attn.o_proj.weight",
    "attention.q_norm.weight": "cross_attn.q_norm.weight",
    "attention.k_norm.weight": "cross_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "gate_attn": "cross_attn_attn_gate",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "gate_ffwd": "cross_attn_mlp_gate",
}


def mllama_cross_attention_layers(hf_cross_attention_layers: Sequence[int]) -> tuple[int, ...]:
    """HF Mllama numbers cross-attention layers among all decoder layers (3, 8, 13, ...); ours index the
    self-attention layer each one precedes (3, 7, 11, ...)."""
    return tuple(int(hf) - k for k, hf in enumerate(sorted(hf_cross_attention_layers)))


def mllama_adapter_to_ours(hf_state_dict: dict, hf_cross_attention_layers: Sequence[int]) -> dict:
    """HF MllamaForConditionalGeneration tensors -> VisionAdapter keys (blocks and `vision_projection`).

    HF's cross-attention is plain (no rotary), so q/k rows need no permutation.
    """
    text_prefix = _prefix_of(hf_state_dict, "embed_tokens.weight")
    proj_prefix = _prefix_of(hf_state_dict, "multi_modal_projector.weight")
    out = {
        "vision_projection.weight": hf_state_dict[proj_prefix + "multi_modal_projector.weight"],
        "vision_projection.bias": hf_state_dict[proj_prefix + "multi_modal_projector.bias"],
    }
    for n, hf_layer in enumerate(sorted(hf_cross_attention_layers)):
        for ours, theirs in _BLOCK_FROM_MLLAMA.items():
            key = f"{text_prefix}layers.{hf_layer}.{theirs}"
            if key not in hf_state_dict:
                raise KeyError(f"Mllama checkpoint lacks {key} (cross-attention layer {hf_layer})")
            out[f"cross_attention_layers.{n}.{ours}"] = hf_state_dict[key]
    return out


def meta_adapter_to_ours(meta_state_dict: dict) -> dict:
    """Meta's llama_models layout (`text_model.cross_attention_layers.*`, `vision_model.vision_projection.*`)
    -> VisionAdapter keys: the names are already ours, only the prefixes go."""
    out = {}
    for key, value in meta_state_dict.items():
        if key.startswith("text_model.cross_attention_layers."):
            out[key[len("text_model.") :]] = value.reshape(1) if key.endswith(("gate_attn", "gate_ffwd")) else value
        elif key.startswith("vision_model.vision_projection."):
            out[key[len("vision_model.") :]] = value
    if "vision_projection.weight" not in out:
        raise KeyError("not a Llama 3.2 Vision checkpoint in Meta's layout: no vision_model.vision_projection.weight")
    return out


def _prefix_of(state_dict: dict, suffix: str) -> str:
    for key in state_dict:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"no key ending in {suffix!r}: not an HF Mllama checkpoint")


__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "MediaAttentionMask",
    "VisionAdapter",
    "VisionAdapterConfig",
    "cross_attention_mask",
    "fusion_schedule",
    "image_spans",
    "meta_adapter_to_ours",
    "mllama_adapter_to_ours",
    "mllama_cross_attention_layers",
]
