"""Separately pretrained encoders: image (open_clip ViT-H/14 + Llama 3.2 tiles), video frames, speech (Conformer).

Never imports lm/, train/ or data/. open_clip, torchaudio and PyAV are imported where they are used.
"""

from encoders.objectives import BEST_RQ_PRESETS, BestRQ, BestRQOutput, CLIPModel, TextTowerConfig, clip_loss
from encoders.speech import (
    AudioDecodeError,
    SpeechEncoder,
    SpeechEncoderConfig,
    audio_to_features,
    load_audio,
    log_mel,
)
from encoders.tiling import TiledImage, supported_aspect_ratios, tile_image, tile_images
from encoders.video import VideoDecodeError, encode_video, load_video
from encoders.vision import (
    VisionEncoder,
    VisionEncoderConfig,
    load_converted,
    meta_vision_to_ours,
    mllama_vision_to_ours,
)

__all__ = [
    "AudioDecodeError",
    "BEST_RQ_PRESETS",
    "BestRQ",
    "BestRQOutput",
    "CLIPModel",
    "SpeechEncoder",
    "SpeechEncoderConfig",
    "TextTowerConfig",
    "TiledImage",
    "VideoDecodeError",
    "VisionEncoder",
    "VisionEncoderConfig",
    "audio_to_features",
    "clip_loss",
    "encode_video",
    "load_audio",
    "load_converted",
    "load_video",
    "log_mel",
    "meta_vision_to_ours",
    "mllama_vision_to_ours",
    "supported_aspect_ratios",
    "tile_image",
    "tile_images",
]
