"""data.media_stream: webdataset shards streamed with exact resume onto any number of ranks and workers, decoding in
DataLoader workers, a per-shard budget of corrupt samples, URLs as webdataset takes them (pipe:, braces)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset
from PIL import Image

import data.media_stream as media_stream
from data.media import CorruptSampleError, CorruptSampleWarning
from data.media_stream import MediaStreamLoader, merge_stream_states, shard_urls
from data.synthetic import encode_mp4

SHARDS, PER_SHARD = 6, 5
CORRUPT_SHARD, CORRUPT_INDEX = 2, 3
IMAGE_FORMATS = ("jpg", "png", "webp")
# The fixture holds a corrupt sample: most tests read past it (the test of the budget checks the warning).
pytestmark = [
    pytest.mark.filterwarnings("ignore::data.media.CorruptSampleWarning"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes"),  # 3 workers on 2 cores
]


def colour(shard: int, index: int) -> tuple[int, int, int]:
    """A colour per sample, so a decoded image can be told from another."""
    return (40 * shard + 20, 40 * index + 10, 200)


def encode_image(rgb: tuple[int, int, int], fmt: str) -> bytes:
    """An 8x8 image of one colour in `fmt` (lossless webp, so every format decodes to nearly that colour)."""
    buf = io.BytesIO()
    options = {"lossless": True} if fmt == "webp" else {"quality": 95} if fmt == "jpg" else {}
    Image.new("RGB", (8, 8), rgb).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **options)
    return buf.getvalue()


def encode_audio(seconds: float, rate: int, fmt: str) -> bytes:
    """A sine of `seconds` at `rate` Hz in `fmt` (FLAC, WAV or MP3)."""
    buf = io.BytesIO()
    wave = 0.3 * np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 440 / rate).astype(np.float32)
    soundfile.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar written by webdataset's own TarWriter."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> tuple[list[str], set[str]]:
    """img2dataset-like shards (image + txt + json), one sample of them corrupt; returns (urls, good keys)."""
    out = tmp_path_factory.mktemp("stream")
    urls, good = [], set()
    for s in range(SHARDS):
        samples = []
        for i in range(PER_SHARD):
            key, fmt = f"s{s}-{i}", IMAGE_FORMATS[(s + i) % 3]
            image = b"not an image" if (s, i) == (CORRUPT_SHARD, CORRUPT_INDEX) else encode_image(colour(s, i), fmt)
            samples.append({"__key__": key, fmt: image, "txt": f"caption {key}", "json": {"key": key}})
            good |= set() if (s, i) == (CORRUPT_SHARD, CORRUPT_INDEX) else {key}
        urls.append(str(write_shard(out / f"img-{s:06d}.tar", samples)))
    return urls, good


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def read_all(loader: MediaStreamLoader) -> list[str]:
    return keys_of(loader)


def test_decodes_the_layouts_people_have(tmp_path: Path) -> None:
    images = write_shard(
        tmp_path / "images.tar",
        [
            {"__key__": f"i{n}", fmt: encode_image((250, 10, 10), fmt), "txt": f"red {fmt}", "json": {"n": n}}
            for n, fmt in enumerate(IMAGE_FORMATS)
        ],
    )
    audio = write_shard(
        tmp_path / "audio.tar",
        [
            {"__key__": "a0", "flac": encode_audio(0.5, 16000, "FLAC"), "json": {"text": "a flac"}},
            {"__key__": "a1", "wav": encode_audio(0.5, 8000, "WAV"), "txt": "a wav"},
            {"__key__": "a2", "mp3": encode_audio(0.5, 16000, "MP3"), "txt": "an mp3"},
        ],
    )
    frames = [Image.new("RGB", (32, 32), (20 * t, 0, 0)) for t in range(6)]
    video = write_shard(tmp_path / "video.tar", [{"__key__": "v0", "mp4": encode_mp4(frames, fps=6), "txt": "clip"}])

    got = {s["key"]: s for s in MediaStreamLoader(str(images), kind="image", shuffle=False, epochs=1)}
    assert sorted(got) == ["i0", "i1", "i2"] and got["i1"]["text"] == "red png" and got["i2"]["meta"] == {"n": 2}
    for sample in got.values():
        assert sample["image"].shape == (3, 8, 8) and abs(float(sample["image"][0].mean()) - 250 / 255) < 0.03
    pil = next(iter(MediaStreamLoader(str(images), kind="image", image_format="pil")))
    assert pil["image"].size == (8, 8) and pil["image"].mode == "RGB"

    sounds = {s["key"]: s for s in MediaStreamLoader(str(audio), kind="audio", shuffle=False, epochs=1)}
    assert [sounds[k]["text"] for k in ("a0", "a1", "a2")] == ["a flac", "a wav", "an mp3"]
    assert len(sounds["a0"]["audio"]) == 8000 and len(sounds["a1"]["audio"]) == 8000  # the wav resampled to 16 kHz
    assert abs(len(sounds["a2"]["audio"]) - 8000) < 2000 and sounds["a2"]["sample_rate"] == 16000

    clip = next(iter(MediaStreamLoader(str(video), kind="video", video_frames=3)))
    assert clip["video"].shape == (3, 3, 32, 32) and clip["video"].dtype == torch.uint8 and clip["fps"] == 6.0
    # Samples of another kind are counted, not decoded and not corrupt.
    with pytest.raises(
        CorruptSampleError,
        match=r"no audio sample decoded .* \(0 corrupt or unreadable, 3 samples had no audio member\)",
    ):
        list(MediaStreamLoader(str(images), kind="audio", epochs=1))


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(image_shards) -> None:
    urls, good = image_shards
    keys, skipped = [], Counter()
    for rank in range(2):
        loader = MediaStreamLoader(urls, kind="image", batch_size=2, rank=rank, world_size=2, num_workers=2, epochs=2)
        got = read_all(loader)
        keys += got
        skipped.update(loader.stats()["skipped"])
        assert loader.stats()["samples"] == len(got)
    assert Counter(keys) == {key: 2 for key in good}  # each good sample once in each of the 2 epochs
    assert skipped == {urls[CORRUPT_SHARD]: 2}  # the corrupt one skipped and counted, in each epoch


@pytest.mark.parametrize("collate_in_workers", [False, True])
def test_stopped_midway_restores_onto_1_rank_x_3_workers(image_shards, collate_in_workers: bool) -> None:
    urls, good = image_shards
    first, states = [], []
    options = dict(
        kind="image", batch_size=2, epochs=1, shuffle_window=2, interleave=2, collate_in_workers=collate_in_workers
    )
    for rank in range(2):
        loader = MediaStreamLoader(urls, rank=rank, world_size=2, num_workers=2, **options)
        first += keys_of(islice(iter(loader), 3))  # 6 samples a rank, workers still prefetching
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert len(first) == 12
    restored = MediaStreamLoader(urls, num_workers=3, **options)
    with pytest.raises(ValueError, match="merge_stream_states"):
        restored.load_state_dict(states[0])  # one rank's state cannot say where the other rank's shards stand
    restored.load_state_dict(merge_stream_states(states))
    rest = read_all(restored)
    assert sorted(first + rest) == sorted(good)  # nothing read twice, nothing left out


@pytest.mark.parametrize("workers", [0, 2])
def test_same_layout_resume_continues_the_same_sequence(image_shards, workers: int) -> None:
    urls, _ = image_shards
    options = dict(kind="image", num_workers=workers, seed=3, epochs=2, shuffle_window=3, interleave=2)
    whole = [s["key"] for s in MediaStreamLoader(urls, **options)]
    loader = MediaStreamLoader(urls, **options)
    head = [s["key"] for s in islice(loader, 37)]  # into the second epoch
    resumed = MediaStreamLoader(urls, **options)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert head + [s["key"] for s in resumed] == whole
    # The order is the seed's: another seed reorders shards and windows, the same seed repeats it.
    assert whole != [s["key"] for s in MediaStreamLoader(urls, **{**options, "seed": 4})]
    assert whole[:29] != whole[29:]  # the two epochs are different permutations


def test_shuffling_stays_within_a_bounded_window(image_shards) -> None:
    urls, _ = image_shards
    orders = {
        tuple(s["key"] for s in MediaStreamLoader(urls[0], kind="image", seed=seed, epochs=1, shuffle_window=2))
        for seed in range(6)
    }
    assert len(orders) > 1  # the seed reorders a shard's samples ...
    for order in orders:  # ... but only within each window of 2 consecutive samples
        assert [set(order[i : i + 2]) for i in range(0, PER_SHARD, 2)] == [
            {f"s0-{j}" for j in range(i, min(i + 2, PER_SHARD))} for i in range(0, PER_SHARD, 2)
        ]


def test_start_up_opens_no_shard_it_does_not_read(image_shards, tmp_path: Path, monkeypatch) -> None:
    urls, _ = image_shards
    missing = [str(tmp_path / f"absent-{n:06d}.tar") for n in range(997)]
    opened = []
    real = media_stream.read_shard
    monkeypatch.setattr(media_stream, "read_shard", lambda url: opened.append(url) or real(url))
    loader = MediaStreamLoader(urls[:3] + missing, kind="image", shuffle=False, interleave=3)
    assert opened == [] and loader.stats()["shards"] == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing shard touched would warn
        keys = [s["key"] for s in islice(iter(loader), 6)]
    assert keys == ["s0-0", "s1-0", "s2-0", "s0-1", "s1-1", "s2-1"]  # round robin over the first group
    assert opened == urls[:3]
    assert loader.stats()["shards_started_in_epoch"] == 3


def test_corrupt_samples_are_skipped_counted_and_bounded(image_shards, tmp_path: Path) -> None:
    urls, good = image_shards
    corrupt = urls[CORRUPT_SHARD]
    loader = MediaStreamLoader(corrupt, kind="image", epochs=1, shuffle=False)
    with pytest.warns(CorruptSampleWarning, match="not an image|cannot decode image"):
        keys = [s["key"] for s in loader]
    assert keys == [f"s{CORRUPT_SHARD}-{i}" for i in range(PER_SHARD) if i != CORRUPT_INDEX]
    assert loader.stats()["skipped"] == {corrupt: 1}
    # Over the budget: an error naming the shard, from this process and from a worker alike.
    for workers in (0, 1):
        strict = MediaStreamLoader(urls, kind="image", num_workers=workers, max_corrupt_per_shard=0)
        with pytest.raises(CorruptSampleError, match=f"shard {corrupt}: 1 corrupt samples in one pass"):
            list(islice(iter(strict), 100))
    # A tar that breaks off keeps what came before the damage and counts the break once; a missing shard counts one.
    with tarfile.open(urls[0]) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("s0-3.")).offset_data + 2
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(urls[0]).read_bytes()[:cut])  # cut inside the fourth sample's first member
    absent = str(tmp_path / "absent.tar")
    loader = MediaStreamLoader([str(broken), absent], kind="image", epochs=1, shuffle=False)
    with pytest.warns(CorruptSampleWarning):
        keys = [s["key"] for s in loader]
    assert keys and set(keys) <= {f"s0-{i}" for i in range(PER_SHARD)} and len(keys) < PER_SHARD
    assert loader.stats()["skipped"] == {str(broken): 1, absent: 1}
    with pytest.raises(CorruptSampleError, match=f"shard {absent}"):
        list(MediaStreamLoader([absent], kind="image", max_corrupt_per_shard=0))


def test_pipe_urls_and_brace_patterns(image_shards) -> None:
    urls, good = image_shards
    pattern = str(Path(urls[0]).parent / "img-{000000..000005}.tar")
    assert shard_urls(pattern) == urls
    assert sorted(read_all(MediaStreamLoader(pattern, kind="image", batch_size=4, epochs=1))) == sorted(good)
    piped = [f"pipe:cat {url}" for url in urls[:2]]
    local = sorted(read_all(MediaStreamLoader(urls[:2], kind="image", batch_size=3, epochs=1, seed=5)))
    assert sorted(read_all(MediaStreamLoader(piped, kind="image", batch_size=3, epochs=1, seed=5))) == local
    assert len(local) == 2 * PER_SHARD
    # A pipe stopped midway (its command killed by the closed pipe) is no error.
    assert len(list(islice(iter(MediaStreamLoader(piped, kind="image", interleave=1)), 2))) == 2


def test_decoding_and_the_transform_run_in_the_workers(image_shards) -> None:
    urls, _ = image_shards

    def tag(sample: dict) -> dict:
        return {**sample, "pid": os.getpid(), "pixels": sample["image"].shape}

    loader = MediaStreamLoader(urls, kind="image", num_workers=2, epochs=1, transform=tag, collate=list, batch_size=4)
    samples = [s for batch in loader for s in batch]
    assert {s["pixels"] for s in samples} == {(3, 8, 8)}
    pids = {s["pid"] for s in samples}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_state_for_other_shards_is_refused(image_shards) -> None:
    urls, _ = image_shards
    state = MediaStreamLoader(urls, kind="image").state_dict()
    for other in (MediaStreamLoader(urls[:-1], kind="image"), MediaStreamLoader(urls, kind="image", seed=1)):
        with pytest.raises(ValueError, match="orders the samples differently"):
            other.load_state_dict(state)
