"""The video adapter: a temporal aggregator (perceiver resampler) and gated video cross-attention layers.

The paper (Section 7.3): up to 64 frames, each through the (frozen) image encoder; a temporal aggregator merges
each 32 consecutive frames into one, and extra video cross-attention layers sit before every fourth image
cross-attention layer. The image encoder and the image adapter are reused frozen; only these parameters train.

Pipeline: frames -> image encoder (frozen) -> the image adapter's projection to the LM width (frozen) -> the
temporal aggregator: per group of `frames_per_group` consecutive frames, `num_latents` learned latents read every
token of the group's frames (a learned embedding marks each frame's place in its group) through a few perceiver
layers -> the video cross-attention layers read all the latents of the clip. A clip of fewer frames than a group
is one group, its missing frames padded and masked; a group with no real frame (padding of a shorter clip in a
batch) is masked out of the cross-attention, so a padded batch equals its clips alone.

Motion tokens (our addition, `motion_grid`): the frozen image encoder sees one frame at a time, and the aggregator
did not learn the direction of motion end to end through the frozen LM in CPU-length runs, although it can
represent it (bench/RESULTS.md). So each group also gets one motion token per patch: the optical flow of the
encoder's patch features (brightness constancy in feature space, `feature_flow`), summed over the group's frames,
through a learned projection plus a learned place embedding. The video cross-attention reads them beside the
latents. This is the motion stream of two-stream video models, computed from the features already at hand.

Placement: the LM layers before which image cross-attention runs are the schedule s_0 < s_1 < ... < s_{n-1};
video cross-attention runs before image cross-attention k when (n - 1 - k) % every == 0, i.e. the schedule
counted from the top as the image one is (for 8 image layers before LM layers 3, 7, ..., 31: before image
layers 3 and 7, LM layers 15 and 31). A small LM with fewer than `every` image layers still gets one (before
its last image layer).

Masking: every text position of a sample that has a clip attends to all of that clip's latents; rows of samples
without a clip are zeroed (the gated branches then add nothing). The tanh gates start at 0, so fresh video layers
leave the LM's logits unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapters.vision import CrossAttentionBlock, MediaAttentionMask, VisionAdapter, VisionAdapterConfig
from encoders.video import encode_video
from encoders.vision import VisionEncoder

FRAMES_PER_GROUP = 32
VIDEO_EVERY = 4
# Init std of the time and place embeddings, against the unit-variance normalised frame features they join.
EMBEDDING_STD = 0.5


@dataclass
class VideoAdapterConfig:
    """Shape of the video adapter: an aggregator at the LM width, cross-attention blocks shaped as the image ones."""

    dim: int  # the LM width (the aggregator reads the image adapter's projected features)
    n_heads: int  # cross-attention blocks: the image blocks' shape
    n_kv_heads: int
    ffn_hidden_dim: int
    layers: tuple[int, ...] = ()  # LM layer indices a video block runs before (see video_layer_schedule)
    norm_eps: float = 1e-5
    frames_per_group: int = FRAMES_PER_GROUP
    num_latents: int = 64
    aggregator_layers: int = 2
    aggregator_heads: int = 8
    aggregator_ffn_mult: int = 4
    # Tokens per frame that get a learned place embedding (the image encoder's tokens per tile; 0 = none): the
    # perceiver's attention is blind to token order, and a frozen small ViT's outputs keep little of where a patch
    # was, yet the direction of motion is the change of that place from frame to frame.
    tokens_per_frame: int = 0
    # Patches per frame side (the image encoder's grid; a frame's last grid**2 tokens are its patches, row-major;
    # 0 = no motion tokens): each group gets grid**2 motion tokens beside its latents (see the module docstring).
    motion_grid: int = 0

    @property
    def tokens_per_group(self) -> int:
        """Tokens the video cross-attention reads per group of frames: latents, then motion tokens."""
        return self.num_latents + self.motion_grid**2

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if self.dim % self.aggregator_heads:
            raise ValueError(
                f"video adapter dim {self.dim} is not divisible by aggregator_heads={self.aggregator_heads}"
            )
        for key in ("tokens_per_frame", "motion_grid"):
            if getattr(self, key) < 0:
                raise ValueError(f"video adapter {key} must be >= 0, got {getattr(self, key)}")
        for key in ("frames_per_group", "num_latents", "aggregator_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"video adapter {key} must be at least 1, got {getattr(self, key)}")
        if not self.layers:
            raise ValueError("video adapter layers is empty: it needs at least one LM layer to run before")

    @classmethod
    def from_vision(cls, vision: VisionAdapterConfig, every: int = VIDEO_EVERY, **overrides) -> VideoAdapterConfig:
        """Blocks shaped as the image adapter's, one before every `every`-th image block (counted from the top)."""
        return cls(
            dim=vision.dim,
            n_heads=vision.n_heads,
            n_kv_heads=vision.n_kv_heads,
            ffn_hidden_dim=vision.ffn_hidden_dim,
            norm_eps=vision.norm_eps,
            layers=video_layer_schedule(vision.layers, every),
            **overrides,
        )

    def block_config(self) -> VisionAdapterConfig:
        """The config CrossAttentionBlock is built from (the image adapter's class, reused)."""
        return VisionAdapterConfig(
            vision_dim=self.dim,
            dim=self.dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_hidden_dim=self.ffn_hidden_dim,
            norm_eps=self.norm_eps,
            layers=self.layers,
        )

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VideoAdapterConfig:
        """Inverse of to_dict; an unknown key is an error naming it."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown video adapter config keys {sorted(unknown)}")
        return cls(**d)


def video_layer_schedule(image_layers: Sequence[int], every: int = VIDEO_EVERY) -> tuple[int, ...]:
    """LM layer indices that get a video cross-attention block: every `every`-th image one, counted from the top."""
    if every < 1:
        raise ValueError(f"video cross-attention every={every} must be at least 1")
    n = len(image_layers)
    return tuple(layer for k, layer in enumerate(sorted(image_layers)) if (n - 1 - k) % every == 0)


class PerceiverLayer(nn.Module):
    """Latents attend to [media tokens; latents] (Flamingo's perceiver resampler layer), then a GELU FFN."""

    def __init__(self, cfg: VideoAdapterConfig):
        super().__init__()
        self.heads = cfg.aggregator_heads
        self.media_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.latent_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn = nn.Sequential(
            nn.LayerNorm(cfg.dim, eps=cfg.norm_eps),
            nn.Linear(cfg.dim, cfg.aggregator_ffn_mult * cfg.dim, bias=False),
            nn.GELU(),
            nn.Linear(cfg.aggregator_ffn_mult * cfg.dim, cfg.dim, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor, media_valid: torch.Tensor) -> torch.Tensor:
        """media [N, M, dim], latents [N, L, dim], media_valid [N, M] bool -> latents [N, L, dim]."""
        n, m, d = media.shape
        num_latents = latents.shape[1]
        normed = self.latent_norm(latents)
        q = self.wq(normed).view(n, num_latents, self.heads, -1).transpose(1, 2)
        kv = self.wkv(torch.cat([self.media_norm(media), normed], dim=1))
        k, v = kv.view(n, m + num_latents, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Latents are always valid keys, so no softmax row is empty even for a group of padding alone.
        valid = torch.cat([media_valid, media_valid.new_ones(n, num_latents)], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        latents = latents + self.wo(out.transpose(1, 2).reshape(n, num_latents, d))
        return latents + self.ffn(latents)


def feature_flow(patches: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
    """Patch features [B, F, H, W, dim] of consecutive frames -> their optical flow [B, F, H, W, 2] (x right, y down).

    Features that move by (u, v) patches per frame obey dx/dt = -(u dx/dcol + v dx/drow) (brightness constancy);
    the flow's least-squares numerator, -sum over channels of dx/dt times the spatial gradient, is what is kept:
    it points where the features went, weighted by how much texture moved. The features are layer-normalised
    first, so the flow does not depend on their scale. Frame f's flow is from frame f - 1 (0 for the first frame,
    and where either frame is padding: frame_valid [B, F]).
    """
    x = F.layer_norm(patches.float(), patches.shape[-1:])
    now = x[:, 1:]
    dt = now - x[:, :-1]
    pair_valid = (frame_valid[:, 1:] & frame_valid[:, :-1])[:, :, None, None, None]
    # Central differences across columns and rows of the later frame, zero at the border.
    d_col = F.pad((now[:, :, :, 2:] - now[:, :, :, :-2]) / 2, (0, 0, 1, 1))
    d_row = F.pad((now[:, :, 2:] - now[:, :, :-2]) / 2, (0, 0, 0, 0, 1, 1))
    flow = -torch.stack([(dt * d_col).mean(-1), (dt * d_row).mean(-1)], dim=-1)
    flow = torch.where(pair_valid, flow, torch.zeros_like(flow))
    return F.pad(flow, (0, 0, 0, 0, 0, 0, 1, 0)).to(patches.dtype)


class MotionTokens(nn.Module):
    """Per group of frames, one token per patch: the patch's flow summed over the group (scaled so the largest
    component is 1) through a learned projection, plus a learned place embedding."""

    def __init__(self, cfg: VideoAdapterConfig):
        super().__init__()
        self.grid = cfg.motion_grid
        self.proj = nn.Linear(2, cfg.dim, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0)
        self.place_embedding = nn.Parameter(torch.randn(cfg.motion_grid**2, cfg.dim) * EMBEDDING_STD)

    def forward(self, frames: torch.Tensor, frame_valid: torch.Tensor, group: int) -> torch.Tensor:
        """frames [B, F, T, dim] (F a multiple of `group`), frame_valid [B, F] -> motion tokens [B, G, grid**2, dim]."""
        b, f, t, d = frames.shape
        g, patches = f // group, self.grid**2
        if t < patches:
            raise ValueError(f"frames have {t} tokens each, fewer than the motion grid's {self.grid}x{self.grid}")
        grouped = frames[:, :, t - patches :].reshape(b * g, group, self.grid, self.grid, d)
        flow = feature_flow(grouped, frame_valid.reshape(b * g, group)).sum(dim=1).reshape(b, g, patches, 2)
        flow = flow / (flow.abs().amax(dim=(2, 3), keepdim=True) + 1e-6)
        return self.proj(flow.to(self.proj.weight.dtype)) + self.place_embedding


class TemporalAggregator(nn.Module):
    """Per-frame tokens [B, F, T, dim] -> tokens [B, G, tokens_per_group, dim], G = ceil(F / frames_per_group):
    each group's latents, then its motion tokens (when motion_grid > 0)."""

    def __init__(self, cfg: VideoAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * cfg.dim**-0.5)
        # Features are normalised before the time (and place) embeddings are added, at a scale comparable to
        # theirs: added to raw projected features (norms of tens), the embeddings were drowned and the stage never
        # learnt the frame order (direction of motion at chance, bench/RESULTS.md).
        self.media_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.frame_embedding = nn.Parameter(torch.randn(cfg.frames_per_group, cfg.dim) * EMBEDDING_STD)
        self.place_embedding = (
            nn.Parameter(torch.randn(cfg.tokens_per_frame, cfg.dim) * EMBEDDING_STD) if cfg.tokens_per_frame else None
        )
        self.layers = nn.ModuleDict({str(i): PerceiverLayer(cfg) for i in range(cfg.aggregator_layers)})
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.motion = MotionTokens(cfg) if cfg.motion_grid else None

    def forward(self, frames: torch.Tensor, frame_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, F, T, dim] (frame f of clip b real when f < frame_counts[b]) -> (latents, group_valid [B, G])."""
        b, f, t, d = frames.shape
        group = self.cfg.frames_per_group
        pad = -f % group
        frames = F.pad(frames, (0, 0, 0, 0, 0, pad))
        g = frames.shape[1] // group
        frame_valid = torch.arange(f + pad, device=frames.device)[None, :] < frame_counts.to(frames.device)[:, None]
        motion = self.motion(frames, frame_valid, group) if self.motion is not None else None
        frames = self.media_norm(frames).view(b, g, group, t, d) + self.frame_embedding[:, None, :].to(frames.dtype)
        if self.place_embedding is not None:
            if t != self.cfg.tokens_per_frame:
                raise ValueError(
                    f"frames have {t} tokens each but the video adapter's tokens_per_frame is "
                    f"{self.cfg.tokens_per_frame} (the image encoder it was built for)"
                )
            frames = frames + self.place_embedding.to(frames.dtype)
        media = frames.reshape(b * g, group * t, d)
        media_valid = frame_valid.view(b * g, group, 1).expand(b * g, group, t).reshape(b * g, group * t)
        latents = self.latents.to(frames.dtype).expand(b * g, -1, -1)
        for layer in self.layers.values():
            latents = layer(media, latents, media_valid)
        group_valid = frame_valid.view(b, g, group).any(dim=-1)
        latents = self.norm(latents).view(b, g, self.cfg.num_latents, d)
        if motion is not None:
            latents = torch.cat([latents, motion.to(latents.dtype)], dim=2)
        return latents, group_valid


def video_attention_mask(group_valid: torch.Tensor, tokens_per_group: int) -> MediaAttentionMask:
    """Every text position of a clip's row sees all its real groups' tokens; rows without a clip are zeroed.

    One mask row broadcasts over every text position (and `rows_at` keeps it during generation).
    """
    key_valid = group_valid.repeat_interleave(tokens_per_group, dim=1)  # [B, G * tokens_per_group]
    sees_any = key_valid.any(dim=-1)[:, None, None, None]
    return MediaAttentionMask(allowed=key_valid[:, None, None, :] | ~sees_any, rows=sees_any.float())


class VideoAdapter(nn.Module):
    """Temporal aggregator and the gated video cross-attention blocks (the image adapter's block class)."""

    def __init__(self, cfg: VideoAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.aggregator = TemporalAggregator(cfg)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(cfg.block_config()) for _ in cfg.layers)
        for depth, block in zip(cfg.layers, self.cross_attention_layers, strict=True):
            block.init_weights(depth)

    def block_for_layer(self) -> dict[str, CrossAttentionBlock]:
        """LM layer name (`str(index)`) -> the video block that runs before it (and before its image block)."""
        return {str(i): block for i, block in zip(self.cfg.layers, self.cross_attention_layers, strict=True)}

    def forward(self, media: torch.Tensor, frame_counts: torch.Tensor) -> tuple[torch.Tensor, MediaAttentionMask]:
        """Projected frame tokens [B, F, N, dim] -> (tokens [B, G * tokens_per_group, dim], their mask)."""
        latents, group_valid = self.aggregator(media, frame_counts)
        return latents.flatten(1, 2), video_attention_mask(group_valid, self.cfg.tokens_per_group)

    def media_kv(self, latents: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per LM layer name, the keys and values of the video latents [B, K, dim] (the generation cache)."""
        return {name: block.media_kv(latents) for name, block in self.block_for_layer().items()}


def as_frame_list(video: torch.Tensor | Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """uint8 clips [B, F, 3, H, W] (data.media's layout) or a list of [F_i, 3, H, W] (None: no clip) -> a list."""
    clips = list(video) if isinstance(video, (list, tuple)) else list(video.unbind(0))
    for i, clip in enumerate(clips):
        if clip is not None and (clip.dim() != 4 or clip.shape[1] != 3 or clip.shape[0] < 1):
            raise ValueError(f"video clip {i} has shape {tuple(clip.shape)}; expected frames [F >= 1, 3, H, W]")
    return clips


def encode_frames(
    encoder: VisionEncoder, vision_adapter: VisionAdapter, video: torch.Tensor | Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of uint8 frames [F, 3, H, W] -> projected frame tokens [B, F_max, N, dim] and frame counts [B].

    Each frame goes through the frozen image encoder as one 1x1 tile, then the frozen image adapter's projection;
    a missing clip (None) has 0 frames. No gradient flows into either (they are reused frozen in the video stage).
    """
    clips = as_frame_list(video)
    counts = torch.tensor([0 if c is None else c.shape[0] for c in clips])
    if int(counts.max()) == 0:
        raise ValueError("video holds no clip with frames")
    dim = vision_adapter.cfg.dim
    with torch.no_grad():
        tokens = {
            i: vision_adapter.project(encode_video(encoder, clip.permute(0, 2, 3, 1))[None, :, None]).view(
                clip.shape[0], -1, dim
            )
            for i, clip in enumerate(clips)
            if clip is not None
        }
    first = next(iter(tokens.values()))
    out = first.new_zeros(len(clips), int(counts.max()), first.shape[1], dim)
    for i, frame_tokens in tokens.items():
        out[i, : frame_tokens.shape[0]] = frame_tokens
    return out, counts.to(out.device)
