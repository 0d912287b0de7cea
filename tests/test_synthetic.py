"""The embedded default media: deterministic, and its captions, motion and speech agree with the pixels and sound."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data import synthetic
from data.media import decode_video
from data.scenes import RGB, Scene, SceneObject, caption, motion_caption, relation


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def _image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("media")
    synthetic.generate("images", out, train=60, heldout=12, seed=1, workers=1)
    synthetic.generate("video", out, train=16, heldout=4, seed=1, workers=1)
    synthetic.generate("speech", out, train=16, heldout=4, seed=1, workers=1)
    return out


def test_layout_and_manifest(media: Path) -> None:
    for kind, media_ext in (("images", "png"), ("video", "mp4"), ("speech", "flac")):
        manifest = json.loads((media / kind / "manifest.json").read_text())
        assert manifest["splits"]["heldout"]["shards"] == ["heldout-000000.tar"]
        samples = _samples(media / kind / "train-000000.tar")
        assert len(samples) == manifest["splits"]["train"]["count"]
        assert all(set(s) == {media_ext, "txt", "json"} for s in samples.values())


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path) -> None:
    # 64+ samples: enough for the thread pool to be used with workers=2.
    for kind in ("images", "speech"):
        synthetic.generate(kind, tmp_path / "a", train=64, heldout=2, seed=5, workers=1)
        synthetic.generate(kind, tmp_path / "b", train=64, heldout=2, seed=5, workers=2)
        a, b = (tmp_path / d / kind / "train-000000.tar" for d in "ab")
        assert a.read_bytes() == b.read_bytes(), kind
    synthetic.generate("images", tmp_path / "c", train=64, heldout=2, seed=6, workers=2)
    other_seed = (tmp_path / "c" / "images" / "train-000000.tar").read_bytes()
    assert other_seed != (tmp_path / "a" / "images" / "train-000000.tar").read_bytes()


def test_video_and_speech_are_reproducible(tmp_path: Path, media: Path) -> None:
    """Speech shards are byte-identical; so are the clips' captions and json, and their mp4s decode to identical
    frames. x264 (one thread) now and then codes a clip's first frame differently to the same pixels: measured
    2026-12-06 under CPU load, one clip of 20 differed in 201 bytes of its first IDR slice in 4 of about 40 runs."""
    synthetic.generate("video", tmp_path, train=16, heldout=4, seed=1, workers=1)
    synthetic.generate("speech", tmp_path, train=16, heldout=4, seed=1, workers=1)
    for shard in ("train-000000.tar", "heldout-000000.tar"):
        assert (tmp_path / "speech" / shard).read_bytes() == (media / "speech" / shard).read_bytes(), shard
        again, first = _samples(tmp_path / "video" / shard), _samples(media / "video" / shard)
        assert again.keys() == first.keys()
        for key, sample in first.items():
            assert again[key]["txt"] == sample["txt"] and again[key]["json"] == sample["json"], key
            frames, fps = decode_video(sample["mp4"])
            frames_again, fps_again = decode_video(again[key]["mp4"])
            assert fps_again == fps and torch.equal(frames_again, frames), key


def test_caption_colours_are_the_pixels_at_the_shapes(media: Path) -> None:
    for split in ("train", "heldout"):
        for sample in _samples(media / "images" / f"{split}-000000.tar").values():
            meta = json.loads(sample["json"])
            pixels = _image(sample["png"])
            assert pixels.shape == (64, 64, 3)
            objects = tuple(SceneObject(**{k: v for k, v in o.items() if k != "radius"}) for o in meta["objects"])
            assert sample["txt"].decode() == caption(Scene(objects, meta["background"]))
            for obj in objects:
                assert obj.phrase() in sample["txt"].decode()
                centre = pixels[int(obj.y * 64), int(obj.x * 64)]
                assert np.abs(centre - RGB[obj.colour]).max() <= 2, (meta, centre)
            # The background is the commonest colour.
            colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == RGB[meta["background"]]


def test_relation_words_agree_with_pixel_positions(media: Path) -> None:
    checked = 0
    for sample in _samples(media / "images" / "train-000000.tar").values():
        meta = json.loads(sample["json"])
        objs = meta["objects"]
        colours = [o["colour"] for o in objs]
        # Find each of the first two objects by its colour alone: only where no other object shares it.
        if len(objs) < 2 or colours.count(colours[0]) > 1 or colours.count(colours[1]) > 1:
            continue
        pixels = _image(sample["png"])
        centroids = []
        for obj in objs[:2]:
            ys, xs = np.nonzero(np.abs(pixels - RGB[obj["colour"]]).max(axis=2) <= 2)
            centroids.append(((xs.mean() + 0.5) / 64, (ys.mean() + 0.5) / 64))
            assert abs(centroids[-1][0] - obj["x"]) < 2 / 64 and abs(centroids[-1][1] - obj["y"]) < 2 / 64
        dx, dy = centroids[0][0] - centroids[1][0], centroids[0][1] - centroids[1][1]
        if abs(abs(dx) - abs(dy)) < 3 / 64:
            continue  # diagonal neighbours: the larger offset is within pixel error, either word is fair
        first, second = (SceneObject("circle", "red", "small", x, y) for x, y in centroids)
        words = sample["txt"].decode()
        assert f" {relation(first, second)} " in words, (words, centroids)
        checked += 1
    assert checked >= 5


def test_heldout_scenes_with_several_objects_have_unseen_captions() -> None:
    heldout = synthetic.image_jobs("heldout", 300, 0, 300, 64)
    train = synthetic.image_jobs("train", 3000, 0, 300, 64)
    reserved = {caption(s) for s, _ in heldout if len(s.objects) > 1}
    assert len(reserved) > 150
    assert not reserved & {caption(s) for s, _ in train}
    assert {caption(s) for s, _ in train[:300]} != {caption(s) for s, _ in heldout}


def _centroid(frame, background: tuple[int, int, int]) -> np.ndarray:
    """(x, y) pixel centroid of whatever differs clearly from the background in a [3, H, W] frame."""
    mask = np.abs(frame.permute(1, 2, 0).numpy().astype(int) - np.array(background)).max(axis=2) > 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_clip_motion_is_visible_in_frames(media: Path) -> None:
    for split in ("train", "heldout"):
        for sample in _samples(media / "video" / f"{split}-000000.tar").values():
            meta = json.loads(sample["json"])
            obj = SceneObject(**{k: v for k, v in meta["object"].items() if k != "radius"})
            assert sample["txt"].decode() == motion_caption(obj, meta["direction"])
            frames, fps = decode_video(sample["mp4"])
            assert frames.shape == (16, 3, 64, 64) and fps == 8
            background = RGB[meta["background"]]
            shift = _centroid(frames[-1], background) - _centroid(frames[0], background)
            dx, dy = synthetic.MOTION[meta["direction"]]
            along = shift @ np.array([dx, dy])
            across = abs(shift @ np.array([dy, dx]))
            assert along > 0.8 * synthetic.TRAVEL * 64 and across < 1.5, (meta, shift)


def test_speech_is_16khz_mono_spoken_text(media: Path) -> None:
    vocabulary = {t for texts in synthetic.speech_texts().values() for t in texts}
    samples = _samples(media / "speech" / "train-000000.tar")
    durations = {}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        wave, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        text = sample["txt"].decode()
        assert rate == 16000 and wave.ndim == 1
        assert text in vocabulary and text == meta["text"]
        seconds = len(wave) / rate
        assert 0.3 < seconds < 4.0 and abs(seconds - meta["duration"]) < 1e-3
        assert np.sqrt(np.mean(wave**2)) > 0.02, "silent"
        assert 0.2 < np.abs(wave).max() <= 1.0
        durations.setdefault(len(text.split()), []).append(seconds / meta["speed"] * 160)
    # Speed-normalized, three words take longer than one.
    assert np.mean(durations[3]) > np.mean(durations[1])
    voices = {json.loads(s["json"])["voice"] for s in samples.values()}
    assert len(voices) >= 3


def test_speech_splits_never_repeat_a_rendering() -> None:
    heldout = synthetic.speech_jobs("heldout", 200, 0, 200)
    train = synthetic.speech_jobs("train", 2000, 0, 200)
    ids = [synthetic._utterance_id(u) for u in heldout + train]
    assert len(set(ids)) == len(ids)


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="install the Debian package espeak-ng"):
        synthetic.generate("speech", tmp_path, train=2, heldout=1)
    assert not (tmp_path / "speech").exists()


def test_rerun_skips_a_matching_kind_and_redoes_a_changed_one(tmp_path: Path, capsys) -> None:
    synthetic.main(["images", "--out", str(tmp_path), "--train", "6", "--heldout", "2", "--workers", "1"])
    shard = tmp_path / "images" / "train-000000.tar"
    first = shard.stat().st_mtime_ns
    again = synthetic.generate("images", tmp_path, train=6, heldout=2, workers=1)
    assert again["skipped"] and shard.stat().st_mtime_ns == first
    changed = synthetic.generate("images", tmp_path, train=9, heldout=2, workers=1)
    assert "skipped" not in changed and len(_samples(shard)) == 9
    # An interrupted run leaves no manifest: the kind is made again, stale shards removed.
    (tmp_path / "images" / "manifest.json").unlink()
    (tmp_path / "images" / "train-000007.tar.tmp").write_bytes(b"partial")
    synthetic.generate("images", tmp_path, train=9, heldout=2, workers=1, shard_size=5)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "heldout-000000.tar",
        "manifest.json",
        "tags.txt",
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert "images: train 6, heldout 2 (written)" in capsys.readouterr().out


def test_image_tags_are_the_scene_objects_and_their_vocabulary_is_written(media: Path) -> None:
    from data.scenes import TAGS, scene_tags

    vocabulary = (media / "images" / synthetic.TAGS_FILE).read_text().splitlines()
    assert vocabulary == list(TAGS) and len(set(vocabulary)) == 4 + 6 + 2 + 24
    for shard in sorted((media / "images").glob("*.tar")):
        for sample in _samples(shard).values():
            meta = json.loads(sample["json"])
            objects = [SceneObject(**{k: o[k] for k in ("shape", "colour", "size", "x", "y")}) for o in meta["objects"]]
            assert meta["tags"] == scene_tags(Scene(objects=tuple(objects)))
            for obj in objects:  # each object's shape, colour, size and its colour bound to its shape
                assert {obj.shape, obj.colour, obj.size, f"{obj.colour} {obj.shape}"} <= set(meta["tags"])
    two = Scene(
        objects=(SceneObject("star", "red", "small", 0.2, 0.2), SceneObject("circle", "blue", "large", 0.8, 0.8))
    )
    assert scene_tags(two) == ["circle", "star", "red", "blue", "small", "large", "red star", "blue circle"]
