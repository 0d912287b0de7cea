"""Llama 3.2 image tiling: pick a tile grid, resize without distortion, pad, split into tiles, CLIP-normalise.

The canvas choice follows Meta's reference (llama_models' VariableSizeImageTransform) and transformers'
MllamaImageProcessor, which our tests use as the peer: among all grids of at most `max_num_tiles` tiles,
take the smallest upscale that fits the image, or failing that the largest downscale; ties go to the smaller
canvas. The image keeps its aspect ratio, is padded with black on the right and bottom, and is cut into square
tiles in row-major order. Unused tile slots are zeros (after normalisation) and flagged by the tile mask.

torchvision is imported inside the functions that use it: every `encoders` import (the speech path included)
passes through this module, and torchvision costs about 2 s of start-up per process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from PIL import Image

# OpenAI CLIP statistics: the ones the ViT-H/14 and the released Llama 3.2 Vision preprocessors use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (tiles_high, tiles_wide) grids with at most max_num_tiles tiles; aspect_ratio_id = index + 1 (0 = none)."""
    return tuple(
        (h, w) for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1) if h * w <= max_num_tiles
    )


def aspect_ratio_id(grid: tuple[int, int], max_num_tiles: int) -> int:
    """The id Llama 3.2 uses for a (tiles_high, tiles_wide) grid: its 1-based index among the supported grids."""
    return supported_aspect_ratios(max_num_tiles).index(tuple(grid)) + 1


def num_tiles_for_ids(aspect_ratio_ids: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """Number of real tiles for each aspect_ratio_id (id 0, no image, counts as 1 tile like HF's mask does)."""
    counts = [1] + [h * w for h, w in supported_aspect_ratios(max_num_tiles)]
    return torch.tensor(counts, device=aspect_ratio_ids.device)[aspect_ratio_ids]


@lru_cache(maxsize=1024)
def best_canvas(height: int, width: int, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """Canvas (height, width) in pixels: the least upscale that fits, else the least downscale; ties -> less area."""
    options = []
    for th, tw in supported_aspect_ratios(max_num_tiles):
        ch, cw = th * tile_size, tw * tile_size
        options.append((min(ch / height, cw / width), ch * cw, ch, cw))
    ups = [o for o in options if o[0] >= 1]
    if ups:
        scale = min(o[0] for o in ups)
    else:
        scale = max(o[0] for o in options)
    _, _, ch, cw = min(o for o in options if o[0] == scale)  # smallest area among equal scales
    return ch, cw


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """Size that keeps the aspect ratio inside the canvas, never below one tile unless the image is smaller."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass
class TiledImage:
    """One image as tiles: pixels [max_num_tiles, 3, tile, tile], its grid id and how many tiles are real."""

    pixel_values: torch.Tensor
    aspect_ratio_id: int
    num_tiles: int

    @property
    def tile_mask(self) -> torch.Tensor:
        """[max_num_tiles] long: 1 for real tiles, 0 for padding tiles."""
        mask = torch.zeros(self.pixel_values.shape[0], dtype=torch.long)
        mask[: self.num_tiles] = 1
        return mask


def to_uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image (any mode) or a uint8 [3,H,W] tensor as an RGB uint8 [3,H,W] tensor."""
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a PIL image or a uint8 [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    return image


def tile_image(
    image: Image.Image | torch.Tensor,
    tile_size: int = 448,
    max_num_tiles: int = 4,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> TiledImage:
    """Resize (bilinear, antialiased, on uint8 like MllamaImageProcessor), pad, split and normalise one image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    pixels = to_uint8_chw(image)
    height, width = pixels.shape[-2:]
    canvas_h, canvas_w = best_canvas(height, width, max_num_tiles, tile_size)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile_size)
    pixels = TF.resize(pixels, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    # Black padding before normalisation, as Meta's and HF's processors do.
    pixels = TF.pad(pixels, [0, 0, canvas_w - new_w, canvas_h - new_h], fill=0)
    grid_h, grid_w = canvas_h // tile_size, canvas_w // tile_size
    tiles = (
        pixels.reshape(3, grid_h, tile_size, grid_w, tile_size)
        .permute(1, 3, 0, 2, 4)
        .reshape(-1, 3, tile_size, tile_size)
    )
    tiles = TF.normalize(tiles.float() / 255.0, list(mean), list(std))
    out = torch.zeros(max_num_tiles, 3, tile_size, tile_size)
    out[: tiles.shape[0]] = tiles
    return TiledImage(out, aspect_ratio_id((grid_h, grid_w), max_num_tiles), grid_h * grid_w)


def tile_images(
    images: list[Image.Image | torch.Tensor], tile_size: int = 448, max_num_tiles: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of images -> (pixel_values [B, T, 3, S, S], aspect_ratio_ids [B], tile_mask [B, T])."""
    tiled = [tile_image(im, tile_size, max_num_tiles) for im in images]
    return (
        torch.stack([t.pixel_values for t in tiled]),
        torch.tensor([t.aspect_ratio_id for t in tiled]),
        torch.stack([t.tile_mask for t in tiled]),
    )


def square_transform(
    image_size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Callable[[Any], torch.Tensor]:
    """The single-tile CLIP pretraining transform: resize the short side, centre crop, normalise (torchvision)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB") if isinstance(im, Image.Image) else im),
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
