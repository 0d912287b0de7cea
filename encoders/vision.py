"""The image encoder: open_clip's ViT-H/14 trunk plus the Llama 3.2 Vision extensions.

Trunk (CLIP-pretrained, 630M at ViT-H/14): patch conv, class token, positional embedding, ln_pre, open_clip
`ResidualAttentionBlock`s, ln_post and the CLIP projection. Its parameter names are open_clip's `visual.*` names,
so an open_clip ViT-H-14 state dict loads as is (`load_open_clip`).

Llama 3.2 extensions (ours alone, absent from a CLIP checkpoint, all gated by tanh(0) = 0 at init):
- tile embeddings per aspect ratio before the trunk (`pre_tile_embedding`, per tile) and after it
  (`post_tile_embedding`), and a per-aspect-ratio, per-tile, per-patch positional embedding mixed with the
  trunk's positional embedding as (1 - tanh g) * pos + tanh g * tile_pos (`tile_positional_embedding`);
- the token axis padded to a multiple of 8 and an attention mask that only stops padding from attending to
  padding (Meta's reference and HF Mllama do exactly this: real tokens do see padding tokens and tiles, so
  even with every gate at 0 the tiled path differs from the CLIP path `encode_pooled`);
- 8 global gated self-attention layers over all tiles of an image (`global_transformer`);
- multi-layer features: the final output concatenated with intermediate trunk states, 1280 x 6 = 7680 dims.

The multi-layer layout matches Meta's and HF's: cat([final, stack(intermediates, -1).flatten(-2)]), i.e. the
intermediate part is interleaved per channel (channel d of every kept layer, then channel d+1, ...).

Which trunk state "intermediate index i" means differs between peers: Meta's reference (llama_models) and
transformers 4.x take the *input* of layer i; transformers 5.x's MllamaVisionModel takes the *output* of
layer i. `intermediate_layer_input=True` (default) follows Meta, whose code trained the released weights;
set it False to reproduce transformers >= 5 bit for bit.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import atomic_write, atomic_write_text
from encoders.tiling import num_tiles_for_ids, supported_aspect_ratios


@dataclass
class VisionEncoderConfig:
    """Shape of the image encoder. `image_size` is the tile size; CLIP pretraining uses single tiles."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 1024  # CLIP projection output
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    intermediate_layer_input: bool = True  # Meta's semantics; False = transformers 5.x MllamaVisionModel
    global_layers: int = 8
    max_num_tiles: int = 4
    norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per tile: patches plus the class token."""
        return self.grid**2 + 1

    @property
    def num_aspect_ratios(self) -> int:
        """Number of supported tile grids (aspect_ratio_id runs 1..this; 0 means no image)."""
        return len(supported_aspect_ratios(self.max_num_tiles))

    @property
    def output_dim(self) -> int:
        """Per-token feature width: final output plus one width per intermediate layer."""
        return self.width * (1 + len(self.intermediate_layers))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VisionEncoderConfig:
        """Named shapes: 'vit-h-14' (paper, 448 tiles), 'llama3.2-vision' (released 11B/90B, 560 tiles), 'tiny'."""
        presets = {
            # The paper's ViT-H/14 (open_clip ViT-H-14 trunk) at the paper's 448 px tiles; 850M with extensions.
            "vit-h-14": cls(),
            # What the released Llama 3.2 11B/90B Vision checkpoints use: 560 px tiles (1601 tokens per tile).
            "llama3.2-vision": cls(image_size=560),
            # CPU tests and the embedded default: 64 px tiles of 8 px patches (65 tokens, padded to 72).
            "tiny": cls(
                image_size=64,
                patch_size=8,
                width=64,
                layers=4,
                heads=4,
                embed_dim=64,
                intermediate_layers=(1, 3),
                global_layers=2,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown vision preset {name!r}; choose from {sorted(presets)}")
        return replace(presets[name], **overrides)

    @classmethod
    def from_mllama(
        cls, hf_config: dict | Any, intermediate_layer_input: bool = True, embed_dim: int = 1024
    ) -> VisionEncoderConfig:
        """Config matching a transformers MllamaVisionConfig (object or dict)."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        width = get("hidden_size", 1280)
        max_tiles = get("max_num_tiles", 4)
        ratios = [tuple(r) for r in get("supported_aspect_ratios") or supported_aspect_ratios(max_tiles)]
        if tuple(ratios) != supported_aspect_ratios(max_tiles):
            raise ValueError(f"unsupported aspect ratio list {ratios}: expected {supported_aspect_ratios(max_tiles)}")
        if get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only exact GELU is supported, got {get('hidden_act')}")
        return cls(
            image_size=get("image_size", 448),
            patch_size=get("patch_size", 14),
            width=width,
            layers=get("num_hidden_layers", 32),
            heads=get("attention_heads", 16),
            mlp_ratio=get("intermediate_size", 4 * width) / width,
            embed_dim=embed_dim,
            intermediate_layers=tuple(get("intermediate_layers_indices") or (3, 7, 15, 23, 30)),
            intermediate_layer_input=intermediate_layer_input,
            global_layers=get("num_global_layers", 8),
            max_num_tiles=max_tiles,
            norm_eps=get("norm_eps", 1e-5),
        )

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        d = asdict(self)
        d["intermediate_layers"] = list(self.intermediate_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VisionEncoderConfig:
        """Inverse of to_dict."""
        d = dict(d)
        d["intermediate_layers"] = tuple(d.get("intermediate_layers", ()))
        return cls(**d)


@functools.cache
def _block_class() -> type[nn.Module]:
    """open_clip's ResidualAttentionBlock with a forward that takes a [B, 1, L, L] mask and optional tanh gates.

    Made on first use, so that importing encoders does not import open_clip. nn.MultiheadAttention wants a
    per-head mask ([B*heads, L, L]); computing attention from the block's own packed in_proj weights lets one
    mask broadcast over heads, which matters at 4 x 1032 tokens. Blocks are called as modules, so FSDP can wrap
    each one.
    """
    from open_clip.transformer import LayerNorm, ResidualAttentionBlock

    class EncoderBlock(ResidualAttentionBlock):
        def __init__(self, cfg: VisionEncoderConfig, gated: bool = False):
            norm = functools.partial(LayerNorm, eps=cfg.norm_eps)
            super().__init__(cfg.width, cfg.heads, cfg.mlp_ratio, act_layer=nn.GELU, norm_layer=norm)
            self.gated = gated
            if gated:  # global layers: both branches scaled by tanh(gate), gates at 0 so the layer starts as identity
                self.gate_attn = nn.Parameter(torch.zeros(1))
                self.gate_ffn = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            b, n, d = x.shape
            h = self.attn.num_heads
            qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = self.ls_1(self.attn.out_proj(y.transpose(1, 2).reshape(b, n, d)))
            x = x + (self.gate_attn.tanh() * y if self.gated else y)
            y = self.ls_2(self.mlp(self.ln_2(x)))
            return x + (self.gate_ffn.tanh() * y if self.gated else y)

    return EncoderBlock


class BlockStack(nn.Module):
    """Blocks under `resblocks`, so keys read `transformer.resblocks.N.*` as in open_clip and Meta's reference."""

    def __init__(self, cfg: VisionEncoderConfig, layers: int, gated: bool = False):
        super().__init__()
        block = _block_class()
        self.resblocks = nn.ModuleList(block(cfg, gated) for _ in range(layers))


class VisionEncoder(nn.Module):
    """ViT trunk (open_clip names) + Llama 3.2 tiles, gated global layers and multi-layer features."""

    # Parameters a CLIP checkpoint does not have (prefixes): they keep their init after `load_open_clip`.
    OURS_ONLY = (
        "pre_tile_embedding",
        "pre_tile_gate",
        "post_tile_embedding",
        "post_tile_gate",
        "tile_positional_embedding",
        "positional_gate",
        "global_transformer",
    )

    def __init__(self, cfg: VisionEncoderConfig, pretrained: str | Path | None = None):
        super().__init__()
        from open_clip.transformer import LayerNorm

        self.cfg = cfg
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"tile size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
        if max(cfg.intermediate_layers, default=0) >= cfg.layers:
            raise ValueError(f"intermediate layers {cfg.intermediate_layers} exceed {cfg.layers} layers")
        w, scale = cfg.width, cfg.width**-0.5
        n_ar = cfg.num_aspect_ratios + 1  # row 0: no image

        # Trunk, named as open_clip's VisionTransformer so `visual.*` keys load unchanged.
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_tokens, w))
        self.ln_pre = LayerNorm(w, eps=cfg.norm_eps)
        self.transformer = BlockStack(cfg, cfg.layers)
        self.ln_post = LayerNorm(w, eps=cfg.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

        # Llama 3.2 extensions; every one enters through a tanh gate at 0, so a CLIP trunk is unchanged at init.
        self.pre_tile_embedding = nn.Embedding(n_ar, cfg.max_num_tiles * w)
        self.post_tile_embedding = nn.Embedding(n_ar, cfg.max_num_tiles * w)
        self.tile_positional_embedding = nn.Embedding(n_ar, cfg.max_num_tiles * cfg.num_tokens * w)
        for emb in (self.pre_tile_embedding, self.post_tile_embedding, self.tile_positional_embedding):
            nn.init.normal_(emb.weight, std=scale)
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))
        self.post_tile_gate = nn.Parameter(torch.zeros(1))
        self.positional_gate = nn.Parameter(torch.zeros(1))
        self.global_transformer = BlockStack(cfg, cfg.global_layers, gated=True)

        if pretrained is not None:
            self.load_open_clip(pretrained)

    # ---- CLIP path: one square tile, class token -> ln_post -> proj (open_clip's encode_image) ----

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding of square images [B, 3, S, S] -> [B, embed_dim] (trunk only, unnormalised)."""
        return self.ln_post(self._trunk(images)[:, 0]) @ self.proj

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's tokens of square images [B, 3, S, S] after ``ln_post`` -> [B, 1 + patches, width]
        (class token first)."""
        return self.ln_post(self._trunk(images))

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        x = self._embed_patches(images)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return x

    def _embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [N, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1)

    # ---- Llama 3.2 path: tiles, aspect ratios, global layers, multi-layer features ----

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        tile_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tiles [B, T, 3, S, S], grid ids [B] (optional [B, T] real-tile mask) -> [B, T, tokens, output_dim]."""
        cfg = self.cfg
        b, t = pixel_values.shape[:2]
        if t > cfg.max_num_tiles:
            raise ValueError(f"{t} tiles given, the encoder takes at most {cfg.max_num_tiles}")
        if tile_mask is None:
            counts = num_tiles_for_ids(aspect_ratio_ids, cfg.max_num_tiles)
            if bool((counts > t).any()):
                raise ValueError(f"aspect_ratio_ids {aspect_ratio_ids.tolist()} need more than the {t} tiles given")
            tile_mask = torch.arange(t, device=pixel_values.device) < counts[:, None]
        w, n = cfg.width, cfg.num_tokens

        # Patch embedding, then the per-tile embedding on patches only (before the class token, as Meta does).
        x = self.conv1(pixel_values.flatten(0, 1).to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        x = x.view(b, t, n - 1, w) + self._tile_embed(self.pre_tile_embedding, self.pre_tile_gate, aspect_ratio_ids, t)
        cls = self.class_embedding.to(x.dtype).expand(b, t, 1, w)
        x = torch.cat([cls, x], dim=2)

        # Positional embedding: the trunk's, faded out as the per-aspect-ratio tile positions fade in.
        gate = self.positional_gate.tanh()
        tile_pos = self.tile_positional_embedding(aspect_ratio_ids).view(b, cfg.max_num_tiles, n, w)[:, :t]
        x = x + (1 - gate) * self.positional_embedding + gate * tile_pos
        x = self.ln_pre(x)

        # Pad each tile's tokens to a multiple of 8 (Meta's kernel-friendly layout; HF keeps it).
        npad = (-n) % 8
        x = F.pad(x, (0, 0, 0, npad))
        mask = self._padding_mask(tile_mask.bool(), n, n + npad)
        x = x.view(b, t * (n + npad), w)

        kept = []
        wanted = set(cfg.intermediate_layers)
        for i, block in enumerate(self.transformer.resblocks):
            if cfg.intermediate_layer_input and i in wanted:
                kept.append(x)
            x = block(x, mask)
            if not cfg.intermediate_layer_input and i in wanted:
                kept.append(x)
        x = self.ln_post(x)

        x = x.view(b, t, n + npad, w) + self._tile_embed(
            self.post_tile_embedding, self.post_tile_gate, aspect_ratio_ids, t
        )
        x = x.view(b, t * (n + npad), w)
        for block in self.global_transformer.resblocks:
            x = block(x, mask)

        inter = torch.stack(kept, dim=-1).view(b, t, n + npad, -1)[:, :, :n]
        return torch.cat([x.view(b, t, n + npad, w)[:, :, :n], inter], dim=-1)

    def _tile_embed(self, table: nn.Embedding, gate: torch.Tensor, ids: torch.Tensor, t: int) -> torch.Tensor:
        emb = table(ids).view(ids.shape[0], self.cfg.max_num_tiles, 1, self.cfg.width)[:, :t]
        return gate.tanh() * emb

    @staticmethod
    def _padding_mask(tile_mask: torch.Tensor, n: int, n_padded: int) -> torch.Tensor:
        """[B, 1, L, L] bool, True = may attend. Only padding->padding pairs are blocked (Meta's and HF's rule)."""
        real = tile_mask[:, :, None].expand(-1, -1, n_padded).clone()
        real[:, :, n:] = False
        pad = ~real.flatten(1)
        return ~(pad[:, :, None] & pad[:, None, :])[:, None]

    # ---- checkpoints ----

    def trunk_parameters(self) -> int:
        """Number of trunk (CLIP-pretrainable) parameters."""
        return sum(p.numel() for k, p in self.named_parameters() if not k.startswith(self.OURS_ONLY))

    def load_open_clip(self, source: str | Path | dict) -> list[str]:
        """Load an open_clip ViT state dict (file or dict, `visual.` prefix optional); returns our keys left at init.

        The positional embedding is resized (bilinear, align_corners, as Meta's loader) when the checkpoint's
        grid differs, e.g. a 224 px ViT-H-14 into 448 px tiles. Any trunk key missing or unexpected is an error.
        """
        sd = read_weight_file(source) if not isinstance(source, dict) else source
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        pos = sd.get("positional_embedding")
        if pos is not None and pos.shape[0] != self.cfg.num_tokens:
            sd = dict(sd, positional_embedding=resize_positional_embedding(pos, self.cfg.grid))
        missing, unexpected = self.load_state_dict(sd, strict=False)
        trunk_missing = [k for k in missing if not k.startswith(self.OURS_ONLY)]
        if trunk_missing or unexpected:
            raise ValueError(f"open_clip checkpoint does not fit: missing {trunk_missing}, unexpected {unexpected}")
        return missing

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (VisionEncoderConfig) and model.safetensors."""
        save_encoder(self, self.cfg.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VisionEncoder:
        """Load what save_pretrained wrote."""
        cfg, sd = load_encoder(directory)
        model = cls(VisionEncoderConfig.from_dict(cfg))
        model.load_state_dict(sd)
        return model

    @classmethod
    def from_mllama(
        cls,
        source: str | Path | dict,
        hf_vision_config: dict | Any | None = None,
        intermediate_layer_input: bool = True,
    ) -> VisionEncoder:
        """Build from a Llama 3.2 Vision checkpoint in HF layout: a directory (config.json + *.safetensors) or a
        state dict with its MllamaVisionConfig. See the module docstring for `intermediate_layer_input`."""
        if isinstance(source, dict):
            sd = source
        else:
            directory = Path(source)
            config = json.loads((directory / "config.json").read_text())
            hf_vision_config = hf_vision_config or config.get("vision_config", config)
            sd = _read_safetensors_prefix(directory, "patch_embedding.weight")
        if hf_vision_config is None:
            raise ValueError("a state dict needs its MllamaVisionConfig (hf_vision_config)")
        cfg = VisionEncoderConfig.from_mllama(hf_vision_config, intermediate_layer_input=intermediate_layer_input)
        model = cls(cfg)
        load_converted(model, mllama_vision_to_ours(sd, cfg))
        return model


def save_encoder(weights: nn.Module | dict[str, torch.Tensor], config: dict, directory: str | Path) -> None:
    """config.json + model.safetensors in directory (the layout of the vision and speech encoders), each file
    written to a temporary name and renamed, so a crash mid-save never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2))


def load_encoder(directory: str | Path) -> tuple[dict, dict]:
    """(config dict, state dict) from a directory written by save_encoder."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no encoder checkpoint (config.json) in {directory}")
    return json.loads((directory / "config.json").read_text()), load_file(str(directory / "model.safetensors"))


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, w] -> [1 + grid*grid, w]: keep the class row, interpolate the patch grid bilinearly."""
    old = int(math.isqrt(pos.shape[0] - 1))
    patches = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=True)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def read_weight_file(path: str | Path) -> dict:
    """Every tensor of a .safetensors file or a torch.save checkpoint (a {"state_dict": ...} wrapper unwrapped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


# ---- Llama 3.2 Vision checkpoints (HF Mllama layout, Meta layout) ----


def mllama_vision_to_ours(hf_state_dict: dict, cfg: VisionEncoderConfig) -> dict:
    """Convert a transformers MllamaVisionModel state dict (any `...vision_model.` prefix) to VisionEncoder keys.

    HF attention has no biases; open_clip's packed projection does, so they are set to zero. The CLIP `proj`
    has no HF counterpart and is not returned (it is unused by `forward`).
    """
    prefix = _common_prefix(hf_state_dict, "patch_embedding.weight")
    sd = {k[len(prefix) :]: v for k, v in hf_state_dict.items() if k.startswith(prefix)}
    w = cfg.width
    out = {
        "conv1.weight": sd["patch_embedding.weight"],
        "class_embedding": sd["class_embedding"],
        "positional_embedding": sd["gated_positional_embedding.embedding"],
        "positional_gate": sd["gated_positional_embedding.gate"],
        "tile_positional_embedding.weight": sd["gated_positional_embedding.tile_embedding.weight"],
        "pre_tile_embedding.weight": sd["pre_tile_positional_embedding.embedding.weight"],
        "pre_tile_gate": sd["pre_tile_positional_embedding.gate"],
        "post_tile_embedding.weight": sd["post_tile_positional_embedding.embedding.weight"],
        "post_tile_gate": sd["post_tile_positional_embedding.gate"],
    }
    for ours, theirs in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        out[f"{ours}.weight"], out[f"{ours}.bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
    for stack, n_layers, ours_fmt in (
        ("transformer", cfg.layers, "transformer.resblocks.{}."),
        ("global_transformer", cfg.global_layers, "global_transformer.resblocks.{}."),
    ):
        for i in range(n_layers):
            src, dst = f"{stack}.layers.{i}.", ours_fmt.format(i)
            qkv = [sd[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
            out[dst + "attn.in_proj_weight"] = torch.cat(qkv)
            out[dst + "attn.in_proj_bias"] = qkv[0].new_zeros(3 * w)
            out[dst + "attn.out_proj.weight"] = sd[f"{src}self_attn.o_proj.weight"]
            out[dst + "attn.out_proj.bias"] = qkv[0].new_zeros(w)
            for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
                out[f"{dst}{ours}.weight"], out[f"{dst}{ours}.bias"] = (
                    sd[f"{src}{theirs}.weight"],
                    sd[f"{src}{theirs}.bias"],
                )
            for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
                out[f"{dst}mlp.{ours}.weight"] = sd[f"{src}mlp.{theirs}.weight"]
                out[f"{dst}mlp.{ours}.bias"] = sd[f"{src}mlp.{theirs}.bias"]
            if stack == "global_transformer":
                out[f"{dst}gate_attn"] = sd[f"{src}gate_attn"]
                out[f"{dst}gate_ffn"] = sd[f"{src}gate_ffn"]
    return out


def meta_vision_to_ours(meta_state_dict: dict, cfg: VisionEncoderConfig) -> dict:
    """Convert Meta's reference layout (`vision_model.vision_encoder.*`, llama_models) to VisionEncoder keys.

    Meta stores tile embeddings per (tiles_high, tiles_wide) grid cell; we store them per aspect_ratio_id, as HF
    does: row id holds grid[:h, :w] flattened row-major, zeros for unused tile slots.
    """
    prefix = _common_prefix(meta_state_dict, "conv1._linear.weight")
    sd = {k[len(prefix) :]: v for k, v in meta_state_dict.items() if k.startswith(prefix)}
    w, n, t = cfg.width, cfg.num_tokens, cfg.max_num_tiles

    def per_aspect_ratio(grid_table: torch.Tensor) -> torch.Tensor:  # [t, t, tokens, w] -> [ids, t * tokens * w]
        rows = grid_table.new_zeros(cfg.num_aspect_ratios + 1, t, grid_table.shape[2], w)
        for idx, (h, wd) in enumerate(supported_aspect_ratios(t), start=1):
            rows[idx, : h * wd] = grid_table[:h, :wd].reshape(h * wd, grid_table.shape[2], w)
        return rows.flatten(1)

    out = {
        "conv1.weight": sd["conv1._linear.weight"].reshape(w, 3, cfg.patch_size, cfg.patch_size),
        "class_embedding": sd["class_embedding"],
        "positional_embedding": sd["positional_embedding"],
        "positional_gate": sd["gated_positional_embedding_gate"].reshape(1),
        "tile_positional_embedding.weight": per_aspect_ratio(sd["gated_positional_embedding"]),
        "pre_tile_embedding.weight": per_aspect_ratio(sd["pre_tile_pos_embed.embedding"]),
        "pre_tile_gate": sd["pre_tile_pos_embed.gate"].reshape(1),
        "post_tile_embedding.weight": per_aspect_ratio(sd["post_tile_pos_embed.embedding"]),
        "post_tile_gate": sd["post_tile_pos_embed.gate"].reshape(1),
    }
    assert out["tile_positional_embedding.weight"].shape[1] == t * n * w
    for name in ("ln_pre", "ln_post"):
        out[f"{name}.weight"], out[f"{name}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
    for stack, n_layers, ours_fmt in (
        ("transformer", cfg.layers, "transformer.resblocks.{}."),
        ("global_transformer", cfg.global_layers, "global_transformer.resblocks.{}."),
    ):
        for i in range(n_layers):
            src, dst = f"{stack}.resblocks.{i}.", ours_fmt.format(i)
            qkv = [sd[f"{src}attn.w{p}.weight"] for p in "qkv"]
            out[dst + "attn.in_proj_weight"] = torch.cat(qkv)
            out[dst + "attn.in_proj_bias"] = qkv[0].new_zeros(3 * w)
            out[dst + "attn.out_proj.weight"] = sd[f"{src}attn.wo.weight"]
            out[dst + "attn.out_proj.bias"] = qkv[0].new_zeros(w)
            for ln in ("ln_1", "ln_2"):
                out[f"{dst}{ln}.weight"], out[f"{dst}{ln}.bias"] = sd[f"{src}{ln}.weight"], sd[f"{src}{ln}.bias"]
            for lin in ("c_fc", "c_proj"):
                out[f"{dst}mlp.{lin}.weight"] = sd[f"{src}mlp.{lin}.weight"]
                out[f"{dst}mlp.{lin}.bias"] = sd[f"{src}mlp.{lin}.bias"]
            if stack == "global_transformer":
                out[f"{dst}gate_attn"] = sd[f"{src}gate_attn"].reshape(1)
                out[f"{dst}gate_ffn"] = sd[f"{src}gate_ffn"].reshape(1)
    return out


def load_converted(model: VisionEncoder, converted: dict) -> None:
    """Load a converted Llama 3.2 state dict; everything but the CLIP `proj` must be present."""
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if [k for k in missing if k != "proj"] or unexpected:
        raise ValueError(f"converted checkpoint does not fit: missing {missing}, unexpected {unexpected}")


def _read_safetensors_prefix(directory: Path, anchor: str) -> dict:
    """The tensors of a sharded safetensors checkpoint under the prefix of the key ending in anchor (no LM)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]
    prefix = _common_prefix({k: None for _, k in keys}, anchor)
    return {k: h.get_tensor(k) for h, k in keys if k.startswith(prefix)}


def _common_prefix(sd: dict, anchor: str) -> str:
    for k in sd:
        if k.endswith(anchor):
            return k[: -len(anchor)]
    raise KeyError(f"no key ending in {anchor!r}: not a checkpoint of this layout")
