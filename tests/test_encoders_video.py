"""Video decoding (PyAV), uniform frame sampling, bad files, and per-frame encoding through the image encoder."""

import av
import numpy as np
import pytest
import torch

from encoders.video import VideoDecodeError, encode_video, load_video, sample_indices
from encoders.vision import VisionEncoder, VisionEncoderConfig

NUM_FRAMES, SIZE, SQUARE = 30, 64, 12


def _write_moving_square(path, num_frames: int = NUM_FRAMES) -> None:
    """A white square on black moving left to right, one frame per position, MPEG-4 in an mp4 container."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
            x = round(i * (SIZE - SQUARE) / (num_frames - 1))
            frame[26 : 26 + SQUARE, x : x + SQUARE] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _square_x(frame: torch.Tensor) -> float:
    bright = frame.float().mean(-1) > 128
    return bright.nonzero()[:, 1].float().mean().item()


def test_load_video_samples_uniformly_in_order(tmp_path):
    """8 of 30 frames come back as uint8 [8, 64, 64, 3], evenly spaced: the square's position grows linearly."""
    path = tmp_path / "square.mp4"
    _write_moving_square(path)
    frames = load_video(path, max_frames=8)
    assert frames.dtype == torch.uint8 and frames.shape == (8, SIZE, SIZE, 3)
    xs = [_square_x(f) for f in frames]
    step = (SIZE - SQUARE) / (NUM_FRAMES - 1)
    expected = [i * step + (SQUARE - 1) / 2 for i in sample_indices(NUM_FRAMES, 8)]
    assert np.allclose(xs, expected, atol=1.0), (xs, expected)
    assert sample_indices(NUM_FRAMES, 8) == [1, 5, 9, 13, 16, 20, 24, 28]
    # Fewer frames than the budget: all of them.
    assert load_video(path, max_frames=64).shape[0] == NUM_FRAMES


def test_bad_video_files_raise_errors_naming_them(tmp_path):
    """Corrupt and missing files raise errors that name the file."""
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        load_video(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        load_video(tmp_path / "nowhere.mp4")


def test_encode_video_gives_per_frame_features(tmp_path):
    """Each frame goes through the image path as one tile: [F, tokens, output_dim], equal to encoding alone."""
    path = tmp_path / "square.mp4"
    _write_moving_square(path, num_frames=12)
    frames = load_video(path, max_frames=6)
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        feats = encode_video(encoder, frames, batch_size=4)
        one = encode_video(encoder, frames[3:4])
    assert feats.shape == (6, encoder.cfg.num_tokens, encoder.cfg.output_dim)
    torch.testing.assert_close(feats[3], one[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[0], feats[-1])  # the square moved
