"""MediaSamples: exact resume (also onto another world size), corrupt-sample policies and clear errors."""

from __future__ import annotations

import io
import tarfile
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data import synthetic
from data.media import (
    CorruptSampleError,
    CorruptSampleWarning,
    MediaSamples,
    batches,
    collate_samples,
    load_audio,
    load_image,
)

N = 30  # train samples in the fixture data set


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("media")
    # Two shards per split, so the index spans files.
    synthetic.generate("images", out, train=N, heldout=6, seed=2, workers=1, shard_size=20)
    synthetic.generate("video", out, train=4, heldout=2, seed=2, workers=1)
    synthetic.generate("speech", out, train=4, heldout=2, seed=2, workers=1)
    return out


def _keys(samples, n: int) -> list[str]:
    return [s["key"] for s in islice(iter(samples), n)]


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_decoded_sample_fields(data_dir: Path) -> None:
    image = next(iter(MediaSamples(data_dir, kind="image")))
    assert image["image"].shape == (3, 64, 64) and image["image"].dtype == torch.float32
    assert 0.0 <= image["image"].min() and image["image"].max() <= 1.0
    assert image["text"] == image["meta"]["caption"]
    pil = next(iter(MediaSamples(data_dir, kind="image", image_format="pil")))
    assert pil["image"].size == (64, 64) and pil["image"].mode == "RGB"
    audio = next(iter(MediaSamples(data_dir, kind="audio")))
    assert audio["audio"].ndim == 1 and audio["sample_rate"] == 16000 and audio["text"] == audio["meta"]["text"]
    resampled = next(iter(MediaSamples(data_dir, kind="audio", sample_rate=8000)))
    assert abs(len(resampled["audio"]) - len(audio["audio"]) / 2) <= 2
    video = next(iter(MediaSamples(data_dir, kind="video", video_frames=4)))
    assert video["video"].shape == (4, 3, 64, 64) and video["video"].dtype == torch.uint8 and video["fps"] == 8.0


def test_each_epoch_is_a_seeded_permutation(data_dir: Path) -> None:
    keys = _keys(MediaSamples(data_dir, kind="image", seed=7), 3 * N)
    epochs = [keys[i * N : (i + 1) * N] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == N for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert keys == _keys(MediaSamples(data_dir, kind="image", seed=7), 3 * N)
    assert keys != _keys(MediaSamples(data_dir, kind="image", seed=8), 3 * N)
    ordered = MediaSamples(data_dir, kind="image", shuffle=False, epochs=1)
    assert [s["key"] for s in ordered] == [f"train-{i:06d}" for i in range(N)]


def test_resume_continues_exactly(data_dir: Path) -> None:
    reference = list(islice(iter(MediaSamples(data_dir, kind="image", seed=3)), 65))
    first = MediaSamples(data_dir, kind="image", seed=3)
    head = list(islice(iter(first), 45))  # past the end of the first epoch
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 15}
    second = MediaSamples(data_dir, kind="image", seed=3)
    second.load_state_dict(state)
    tail = list(islice(iter(second), 20))
    assert [s["key"] for s in head + tail] == [s["key"] for s in reference]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, reference[45:], strict=True))


def test_resume_onto_another_world_size_neither_repeats_nor_skips(data_dir: Path) -> None:
    reference = _keys(MediaSamples(data_dir, kind="image", seed=4), 14 + 15 + 8)
    ranks = [MediaSamples(data_dir, kind="image", seed=4, rank=r, world_size=2) for r in range(2)]
    got = [_keys(r, 7) for r in ranks]  # lockstep: 7 rounds of 2
    states = [r.state_dict() for r in ranks]
    assert states[0] == states[1] == {"epoch": 0, "position": 14}
    seen = [got[i % 2][i // 2] for i in range(14)]  # global order: round by round, rank by rank
    new = [MediaSamples(data_dir, kind="image", seed=4, rank=r, world_size=3) for r in range(3)]
    for r in new:
        r.load_state_dict(states[0])
    got = [_keys(r, 5) for r in new]  # 5 rounds of 3, across the epoch boundary at 30
    seen += [got[i % 3][i // 3] for i in range(15)]
    assert new[0].state_dict() == {"epoch": 0, "position": 29}
    single = MediaSamples(data_dir, kind="image", seed=4)
    single.load_state_dict(new[2].state_dict())
    seen += _keys(single, 8)
    assert seen == reference


def test_batches_read_no_sample_ahead(data_dir: Path) -> None:
    samples = MediaSamples(data_dir, kind="image", seed=1)
    stream = batches(samples, 4)
    first, second = next(stream), next(stream)
    assert first["image"].shape == (4, 3, 64, 64) and len(second["text"]) == 4
    assert samples.state_dict() == {"epoch": 0, "position": 8}
    audio = collate_samples(list(islice(iter(MediaSamples(data_dir, kind="audio")), 3)))
    lengths = audio["audio_lengths"]
    assert audio["audio"].shape == (3, int(lengths.max())) and lengths.min() < lengths.max()
    shortest = int(lengths.argmin())
    assert torch.all(audio["audio"][shortest, lengths[shortest] :] == 0)
    finite = batches(MediaSamples(data_dir, kind="image", epochs=1), 8, drop_last=False)
    assert [len(b["key"]) for b in finite] == [8, 8, 8, 6]


def test_finite_epochs_split_ranks_without_overlap(data_dir: Path) -> None:
    parts = [[s["key"] for s in MediaSamples(data_dir, kind="image", rank=r, world_size=4, epochs=1)] for r in range(4)]
    everything = [k for p in parts for k in p]
    assert len(everything) == N and len(set(everything)) == N
    held = MediaSamples(data_dir, kind="image", split="heldout", epochs=1)
    assert held.num_samples == 6 and all(s["key"].startswith("heldout-") for s in held)


def test_corrupt_samples_skip_warns_once_per_shard_and_counts(tmp_path: Path) -> None:
    good = {"png": _png(), "txt": b"a red square"}
    _write_tar(
        tmp_path / "train-000000.tar",
        [
            ("a", good),
            ("b", {"png": b"this is not a png", "txt": b"broken"}),
            ("c", {"png": _png()[:40], "txt": b"cut short"}),
            ("d", good),
            ("e", {"txt": b"no image at all"}),
        ],
    )
    samples = MediaSamples(tmp_path, kind="image", shuffle=False, epochs=1)
    with pytest.warns(CorruptSampleWarning) as caught:
        keys = [s["key"] for s in samples]
    assert keys == ["a", "d"]
    assert len(caught) == 1 and "train-000000.tar" in str(caught[0].message) and "key b" in str(caught[0].message)
    assert samples.stats() == {"skipped": 2, "corrupt_shards": 0, "without_media": 1, "yielded": 2}
    failing = MediaSamples(tmp_path, kind="image", shuffle=False, on_corrupt="fail")
    with pytest.raises(CorruptSampleError, match=r"train-000000\.tar, key b"):
        list(failing)


@pytest.mark.parametrize("kind,ext", [("audio", "flac"), ("audio", "wav"), ("video", "mp4")])
def test_corrupt_audio_and_video_are_skipped(tmp_path: Path, kind: str, ext: str, data_dir: Path) -> None:
    if kind == "audio":
        buf = io.BytesIO()
        soundfile.write(buf, np.sin(np.arange(1600) / 5.0) * 0.5, 16000, format=ext.upper())
        good = buf.getvalue()
    else:
        with tarfile.open(data_dir / "video" / "train-000000.tar") as tar:
            good = tar.extractfile("train-000000.mp4").read()
    _write_tar(tmp_path / "train-000000.tar", [("x", {ext: good}), ("y", {ext: good[len(good) // 2 :]})])
    _write_tar(tmp_path / "train-000001.tar", [("z", {ext: b"\x00garbage" * 50})])
    samples = MediaSamples(tmp_path, kind=kind, shuffle=False, epochs=1)
    with pytest.warns(CorruptSampleWarning):
        keys = [s["key"] for s in samples]
    assert keys == ["x"] and samples.stats()["skipped"] == 2
    with pytest.raises(CorruptSampleError, match="key y"):
        list(MediaSamples(tmp_path, kind=kind, shuffle=False, on_corrupt="fail"))


def test_truncated_and_unreadable_shards(tmp_path: Path, data_dir: Path) -> None:
    whole = (data_dir / "images" / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(whole[: int(len(whole) * 0.6)])
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar file" * 100)
    with pytest.warns(CorruptSampleWarning) as caught:
        samples = MediaSamples(tmp_path, kind="image", shuffle=False, epochs=1)
    assert len(caught) == 2
    keys = [s["key"] for s in samples]
    assert 5 < len(keys) < 20 and keys == [f"train-{i:06d}" for i in range(len(keys))]
    assert samples.stats()["corrupt_shards"] == 2
    with pytest.raises(CorruptSampleError, match=r"train-00000[01]\.tar"):
        MediaSamples(tmp_path, kind="image", on_corrupt="fail")
    # Cut exactly between samples: the missing end-of-archive marker still tells it apart from a whole shard.
    with tarfile.open(data_dir / "images" / "train-000000.tar") as tar:
        members = tar.getmembers()
    cut = members[3 * 3 - 1].offset_data + members[3 * 3 - 1].size
    cut += -cut % 512
    (tmp_path / "train-000001.tar").unlink()
    (tmp_path / "train-000000.tar").write_bytes(whole[:cut])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cut_samples = MediaSamples(tmp_path, kind="image", shuffle=False, epochs=1)
    assert [s["key"] for s in cut_samples] == ["train-000000", "train-000001"]


def test_missing_or_empty_dataset_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MediaSamples(missing, kind="image")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*python -m data.synthetic images"):
        MediaSamples(tmp_path, kind="image")
    with pytest.raises(FileNotFoundError, match="train-000009.tar"):
        MediaSamples([str(tmp_path / "train-000009.tar")], kind="image")
    _write_tar(tmp_path / "train-000000.tar", [("a", {"txt": b"text only"})])
    with pytest.raises(FileNotFoundError, match="no image samples"):
        MediaSamples(tmp_path, kind="image")


def test_brace_patterns_and_lists(data_dir: Path) -> None:
    pattern = str(data_dir / "images" / "train-{000000..000001}.tar")
    assert MediaSamples(pattern, kind="image").num_samples == N
    listed = [str(p) for p in sorted((data_dir / "images").glob("train-*.tar"))]
    assert MediaSamples(listed, kind="image").num_samples == N


def test_user_files_that_cannot_be_decoded_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="holiday.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="speech.wav"):
        load_audio(tmp_path / "speech.wav")
    (tmp_path / "speech.wav").write_bytes(b"RIFF....")
    with pytest.raises(ValueError, match="speech.wav"):
        load_audio(tmp_path / "speech.wav")
