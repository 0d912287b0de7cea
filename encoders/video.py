"""Video: decode a clip with PyAV, sample up to 64 frames uniformly, encode every frame with the image encoder.

torchvision 0.29 no longer reads video; PyAV carries FFmpeg inside its wheel, so decoding needs no system
package. Frames are taken at the centres of equal segments of the clip (one per segment), which spreads them
evenly and never repeats a frame when the clip is long enough. Each frame is one 1x1 tile (resized without
distortion and padded, like an image with max_num_tiles = 1) and goes through VisionEncoder.forward; the
temporal aggregator of the adapter merges the per-frame features.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.video import RGBFrames, duration_frames
from encoders.tiling import tile_image
from encoders.vision import VisionEncoder


class VideoDecodeError(ValueError):
    """A video file that could not be decoded; the message names the file."""


def sample_indices(num_frames: int, max_frames: int) -> list[int]:
    """Indices of up to max_frames frames: the centre frame of each of max_frames equal segments."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / max_frames) for i in range(max_frames)]


def load_video(path: str | Path, max_frames: int = 64) -> torch.Tensor:
    """Decode a video file into uint8 frames [F, H, W, 3] (RGB), F <= max_frames sampled uniformly."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            declared = stream.frames  # 0 when the container does not say
            # Keep only the wanted frames while decoding, so long clips never sit in memory whole. With no declared
            # count, the duration gives a guess that a second decode corrects when it is wrong (no guess: this
            # pass only counts).
            count = declared if declared > 0 else (duration_frames(container, stream) or 0)
            frames, seen = _keep_frames(container.decode(stream), set(sample_indices(count, max_frames)))
        if declared <= 0 and seen != count:
            with av.open(str(path)) as container:
                wanted = set(sample_indices(seen, max_frames))
                frames, _ = _keep_frames(container.decode(container.streams.video[0]), wanted)
    except VideoDecodeError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends: all mean "this file cannot be read"
        raise VideoDecodeError(f"cannot decode video file {path}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"no frames could be decoded from {path}")
    if len(frames) > max_frames:  # the declared count undercounted: resample what was kept
        frames = [frames[i] for i in sample_indices(len(frames), max_frames)]
    return torch.from_numpy(np.stack(frames))


def _keep_frames(decoded: Iterator[Any], wanted: set[int]) -> tuple[list[np.ndarray], int]:
    """(the RGB frames whose index is in `wanted`, in order; how many frames were decoded): the rest are dropped."""
    kept, seen, to_rgb = [], 0, RGBFrames()
    for index, frame in enumerate(decoded):
        seen = index + 1
        if index in wanted:
            kept.append(to_rgb(frame))
    return kept, seen


def frames_to_tiles(frames: torch.Tensor, tile_size: int) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> normalised single tiles [F, 1, 3, tile, tile]."""
    return torch.stack([tile_image(f.permute(2, 0, 1), tile_size, max_num_tiles=1).pixel_values for f in frames])


def encode_video(encoder: VisionEncoder, frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> per-frame features [F, tokens, output_dim] through the image encoder."""
    param = next(encoder.parameters())
    tiles = frames_to_tiles(frames, encoder.cfg.image_size).to(param.device, param.dtype)
    ids = torch.ones(tiles.shape[0], dtype=torch.long, device=param.device)  # aspect ratio id 1: a 1x1 grid
    out = [encoder(tiles[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, tiles.shape[0], batch_size)]
    return torch.cat(out)[:, 0]
