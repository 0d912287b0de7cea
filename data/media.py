"""Readers of media shards (image, audio, video + text) for encoder and adapter training.

`MediaSamples` indexes every sample of a split when it is built (the embedded data is small), then streams them in a
seeded permutation per epoch. One global position counter runs across epochs; rank r of W takes positions r, r+W,
..., so a state saved under one world size restores under another with no sample repeated or skipped.

Decoded samples are dicts:
    key          str, the webdataset key
    text         str, the `txt` member ("" when absent)
    meta         dict, the `json` member ({} when absent)
    image        float32 tensor [3, H, W] in [0, 1], RGB (or a PIL RGB image with image_format="pil")
    audio        float32 tensor [L], mono at `sample_rate` (16 kHz unless asked otherwise)
    sample_rate  int
    video        uint8 tensor [T, 3, H, W], RGB frames; `fps` float beside it
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.video import RGBFrames, duration_frames

KINDS = ("image", "audio", "video")
EXTENSIONS = {
    "image": ("png", "jpg", "jpeg", "webp"),
    "audio": ("flac", "wav", "mp3", "ogg"),
    "video": ("mp4", "webm", "mkv", "avi", "mov"),
}
# Where `python -m data.synthetic` puts each kind under its --out directory.
SUBDIRS = {"image": "images", "audio": "speech", "video": "video"}
# Corrupt samples in a row after which on_corrupt="skip" gives up. A shuffled stream meets that many only when
# most of the data is bad; a decode fails in milliseconds, so a hopeless stream stops within seconds.
MAX_CONSECUTIVE_CORRUPT = 1000


class CorruptSampleError(RuntimeError):
    """A sample or shard that cannot be read; the message names the shard and key (or the file)."""


class CorruptSampleWarning(UserWarning):
    """Issued once per shard when on_corrupt="skip" drops a sample."""


# --------------------------------------------------------------------------------------------------- decoders


def decode_image(data: bytes, name: str = "<bytes>", image_format: str = "tensor") -> torch.Tensor | Any:
    """Image bytes -> float tensor [3, H, W] in [0, 1] (or a PIL RGB image); ValueError naming `name`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")  # forces the full decode, so truncated files fail here
    except Exception as error:
        raise ValueError(f"cannot decode image {name}: {error}") from error
    if image_format == "pil":
        return image
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255.0)


def decode_audio(data: bytes, name: str = "<bytes>", sample_rate: int = 16000) -> torch.Tensor:
    """Audio bytes (wav, flac, ogg, ...) -> float32 mono waveform [L] at `sample_rate`; ValueError naming `name`."""
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as error:
        raise ValueError(f"cannot decode audio {name}: {error}") from error
    if wave.shape[0] == 0:
        raise ValueError(f"cannot decode audio {name}: no samples")
    audio = torch.from_numpy(wave.mean(axis=1))
    if rate != sample_rate:
        import torchaudio

        audio = torchaudio.functional.resample(audio, rate, sample_rate)
    return audio


def uniform_frame_picks(count: int, num_frames: int | None) -> list[int]:
    """The indices decode_video keeps of a clip of `count` frames: num_frames spread evenly, or all (None)."""
    if num_frames is None or num_frames >= count:
        return list(range(count))
    return np.linspace(0, count - 1, num_frames).round().astype(int).tolist()


def decode_video(data: bytes, name: str = "<bytes>", num_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Video bytes -> (uint8 frames [T, 3, H, W], fps), num_frames picked uniformly; ValueError naming `name`.

    The frames are uniform_frame_picks(frames decoded, num_frames), and only those are ever held, so a clip of
    minutes costs num_frames frames of memory, not its length. The picks are computed from the frame count the
    container declares (or its duration times its rate) and checked against the frames decoded; when the container
    is silent or wrong, a second decode, knowing the count, keeps the right ones.
    """
    import av

    if num_frames is not None and num_frames < 1:
        raise ValueError(f"cannot decode video {name}: num_frames must be at least 1, got {num_frames}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            guess = None if num_frames is None else _frame_count_guess(container, stream)
            # With no guess the picks are empty: this pass only counts (each frame is freed as it is decoded).
            picks = None if num_frames is None else uniform_frame_picks(guess or 0, num_frames)
            frames, seen = _decode_picks(container, stream, picks)
        if num_frames is not None and seen and seen != guess:
            with av.open(io.BytesIO(data), mode="r") as container:
                picks = uniform_frame_picks(seen, num_frames)
                frames, again = _decode_picks(container, container.streams.video[0], picks)
            if again != seen:
                raise ValueError(f"decoded {seen} frames, then {again}")
    except Exception as error:
        raise ValueError(f"cannot decode video {name}: {error}") from error
    if frames is None:
        raise ValueError(f"cannot decode video {name}: no frames")
    return torch.from_numpy(frames), fps


def _frame_count_guess(container: Any, stream: Any) -> int | None:
    """The clip's frame count as its container declares it, else its duration times its frame rate (None: neither).

    MP4 declares its count; Matroska / WebM declare none but give a duration, right for a constant rate."""
    return stream.frames if stream.frames > 0 else duration_frames(container, stream)


def _decode_picks(container: Any, stream: Any, picks: list[int] | None) -> tuple[np.ndarray | None, int]:
    """(the frames at `picks` in their order, uint8 [T, 3, H, W] or None when none; how many frames were decoded).

    picks None keeps every frame. A picked frame is copied into one preallocated array as soon as it is decoded,
    so PyAV's frame buffers are released at once and at most len(picks) frames are ever held.
    """
    to_rgb = RGBFrames()
    if picks is None:
        kept = [to_rgb(frame) for frame in container.decode(stream)]
        return (np.ascontiguousarray(np.stack(kept).transpose(0, 3, 1, 2)) if kept else None), len(kept)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(picks):
        slots.setdefault(index, []).append(slot)
    out, seen = None, 0
    for index, frame in enumerate(container.decode(stream)):
        seen = index + 1
        if index in slots:
            rgb = to_rgb(frame).transpose(2, 0, 1)
            if out is None:
                out = np.empty((len(picks), *rgb.shape), dtype=np.uint8)
            out[slots[index]] = rgb
    return out, seen


def load_image(path: str | Path, image_format: str = "tensor") -> torch.Tensor | Any:
    """A user's image file, decoded as by decode_image; the error names the file."""
    return decode_image(_read_user_file(path), str(path), image_format)


def load_audio(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """A user's audio file as a mono waveform at `sample_rate`; the error names the file."""
    return decode_audio(_read_user_file(path), str(path), sample_rate)


def load_video(path: str | Path, num_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """A user's video file as (uint8 frames [T, 3, H, W], fps); the error names the file."""
    return decode_video(_read_user_file(path), str(path), num_frames)


def _read_user_file(path: str | Path) -> bytes:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return Path(path).read_bytes()


# ---------------------------------------------------------------------------------------------------- shards


def find_shards(urls_or_dir: str | Path | Iterable[str | Path], kind: str, split: str = "train") -> list[Path]:
    """The tar shards of a split: from a directory (its `<split>-*.tar`, or those of its <kind> subdirectory as
    data.synthetic writes them), a glob or brace pattern (`train-{000000..000003}.tar`), or a list of paths."""
    if isinstance(urls_or_dir, (str, Path)):
        source = Path(urls_or_dir)
        if source.is_dir():
            for directory in (source, source / SUBDIRS[kind]):
                shards = sorted(directory.glob(f"{split}-*.tar"))
                if shards:
                    return shards
            raise FileNotFoundError(
                f"no {split}-*.tar shards in {source} (nor in {source / SUBDIRS[kind]}); "
                f"make them with `python -m data.synthetic {SUBDIRS[kind]} --out {source}`"
            )
        patterns = [str(urls_or_dir)]
    else:
        patterns = [str(u) for u in urls_or_dir]
    if not patterns:
        raise FileNotFoundError("no shards given (an empty list)")
    from braceexpand import braceexpand

    shards: list[Path] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches or not all(Path(m).is_file() for m in matches):
                kind_of = "dataset directory or shard" if not Path(expanded).parent.is_dir() else "shard"
                raise FileNotFoundError(f"no such {kind_of}: {expanded}")
            shards.extend(Path(m) for m in matches)
    return shards


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (offset of the data in the tar, size)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def index_shard(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], str | None]:
    """(key, {ext: (offset, size)}) of each complete sample in a tar, and why it is damaged (None when whole).

    A truncated tar keeps the samples before the damage; the sample at the damage is dropped, since its members
    may be missing.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    file_size = path.stat().st_size
    problem = None
    end = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                end = info.offset_data + info.size
                if end > file_size:
                    problem = f"truncated inside {info.name}"
                    break
                key, ext = _split_name(info.name)
                samples.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except tarfile.ReadError as error:
        problem = f"not a readable tar ({error})" if not samples else f"truncated ({error})"
    if problem is None and samples:
        # A whole archive ends with two zero blocks after the last member; without them it was cut short.
        padded_end = end + (-end % tarfile.BLOCKSIZE)
        if file_size < padded_end + 2 * tarfile.BLOCKSIZE:
            problem = "truncated (no end-of-archive marker)"
    items = list(samples.items())
    if problem is not None and items:
        items.pop()  # the sample being written when the file was cut may lack members
    return items, problem


# --------------------------------------------------------------------------------------------------- samples


class MediaSamples:
    """A deterministic, exactly resumable stream of decoded media samples from webdataset tar shards.

    Args:
        urls_or_dir: a directory (its `<split>-*.tar`, or its images/speech/video subdirectory's), a glob or brace
            pattern, or a list of shard paths. Local files only.
        kind: "image", "audio" or "video": samples without such a member are left out of the index.
        split: shard name prefix when a directory is given.
        rank, world_size: this process takes global positions rank, rank + world_size, ...
        seed: seeds the permutation of each epoch (numpy PCG64 of [seed, epoch]).
        shuffle: False keeps shard order (for evaluation).
        epochs: stop after this many passes (None: forever, as training wants).
        on_corrupt: "skip" warns once per shard and counts, "fail" raises CorruptSampleError naming shard and key.
        max_consecutive_corrupt: with "skip", this many corrupt samples in a row, or every sample of the index
            failing since the last one that decoded, raise CorruptSampleError naming their shards: a stream where
            nothing decodes must not spin forever.
        image_format: "tensor" (float [3, H, W] in [0, 1]) or "pil".
        sample_rate: audio is resampled to this rate.
        video_frames: keep this many frames per clip, picked uniformly (None: all).

    Iterate it to get sample dicts (see the module docstring). `state_dict()` after n samples, loaded into a fresh
    instance (any world size), continues with the sample that would have come next. Ranks that advance in
    lockstep report the same state, so saving rank 0's is enough (a rank that skipped a corrupt sample is one
    round ahead). Iterate it in the training process itself: DataLoader workers would each hold a copy of the
    position, and their read-ahead would make state_dict() inexact.
    """

    def __init__(
        self,
        urls_or_dir: str | Path | Iterable[str | Path],
        *,
        kind: str,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        on_corrupt: str = "skip",
        max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT,
        image_format: str = "tensor",
        sample_rate: int = 16000,
        video_frames: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; have {KINDS}")
        if on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt must be 'skip' or 'fail', not {on_corrupt!r}")
        if max_consecutive_corrupt < 1:
            raise ValueError(f"max_consecutive_corrupt must be at least 1, not {max_consecutive_corrupt}")
        if image_format not in ("tensor", "pil"):
            raise ValueError(f"image_format must be 'tensor' or 'pil', not {image_format!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.kind, self.split, self.rank, self.world_size = kind, split, rank, world_size
        self.seed, self.shuffle, self.epochs, self.on_corrupt = seed, shuffle, epochs, on_corrupt
        self.max_consecutive_corrupt = max_consecutive_corrupt
        self.image_format, self.sample_rate, self.video_frames = image_format, sample_rate, video_frames
        self.shards = find_shards(urls_or_dir, kind, split)
        self._stats = {"skipped": 0, "corrupt_shards": 0, "without_media": 0, "yielded": 0}
        self._warned: set[int] = set()
        self._entries = self._index()
        self._global = 0  # next global position (across epochs) not yet consumed by any rank
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _index(self) -> list[_Entry]:
        entries = []
        for shard_id, path in enumerate(self.shards):
            items, problem = index_shard(path)
            if problem is not None:
                self._stats["corrupt_shards"] += 1
                self._stats["skipped"] += 1
                self._corrupt(shard_id, "(end of shard)", problem)
            for key, members in items:
                if any(ext in members for ext in EXTENSIONS[self.kind]):
                    entries.append(_Entry(shard_id, key, members))
                else:
                    self._stats["without_media"] += 1
        if not entries:
            raise FileNotFoundError(
                f"no {self.kind} samples ({'/'.join(EXTENSIONS[self.kind])} members) in the {len(self.shards)} "
                f"shard(s) of {self.shards[0].parent}"
            )
        return entries

    @property
    def num_samples(self) -> int:
        """Samples in one epoch over all ranks."""
        return len(self._entries)

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position"}: where the next round of world_size samples starts."""
        epoch, position = divmod(self._global, len(self._entries))
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict() taken under any world size."""
        if not 0 <= state["position"] < len(self._entries):
            raise ValueError(f"position {state['position']} outside this data set of {len(self._entries)} samples")
        self._global = state["epoch"] * len(self._entries) + state["position"]

    def stats(self) -> dict[str, int]:
        """Counts: skipped (corrupt samples and damaged shards), corrupt_shards, without_media, yielded."""
        return dict(self._stats)

    def __iter__(self) -> Iterator[dict]:
        n = len(self._entries)
        failed: set[int] = set()  # entries that failed since the last sample decoded
        consecutive = 0
        while True:
            position = self._global + self.rank
            epoch, offset = divmod(position, n)
            if self.epochs is not None and epoch >= self.epochs:
                return
            index = int(self._order(epoch)[offset])
            entry = self._entries[index]
            # Advance before decoding, so a sample that raises (on_corrupt="fail") is not retried forever.
            self._global += self.world_size
            try:
                sample = self._decode(entry)
            except ValueError as error:
                self._stats["skipped"] += 1
                self._corrupt(entry.shard, entry.key, str(error))
                failed.add(index)
                consecutive += 1
                self._check_progress(failed, consecutive, str(error))
                continue
            failed.clear()
            consecutive = 0
            self._stats["yielded"] += 1
            yield sample

    def _check_progress(self, failed: set[int], consecutive: int, last_error: str) -> None:
        """Raise CorruptSampleError naming the shards when skipping can no longer be expected to find a sample."""
        if len(failed) < len(self._entries) and consecutive < self.max_consecutive_corrupt:
            return
        if len(failed) == len(self._entries):
            what = f"none of the {len(failed)} {self.kind} samples decodes"
        else:
            what = f"{consecutive} {self.kind} samples in a row failed to decode (max_consecutive_corrupt)"
        shards = sorted({self._entries[i].shard for i in failed})
        named = ", ".join(str(self.shards[s]) for s in shards[:5])
        more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
        raise CorruptSampleError(f"{what}, in shard(s) {named}{more}; the last: {last_error}")

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self._entries)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def _corrupt(self, shard_id: int, key: str, reason: str) -> None:
        where = f"shard {self.shards[shard_id]}, key {key}"
        if self.on_corrupt == "fail":
            raise CorruptSampleError(f"corrupt sample in {where}: {reason}")
        if shard_id not in self._warned:
            self._warned.add(shard_id)
            warnings.warn(
                f"skipping corrupt sample in {where}: {reason} (further ones in this shard are only counted)",
                CorruptSampleWarning,
                stacklevel=3,
            )

    def _decode(self, entry: _Entry) -> dict:
        sample: dict[str, Any] = {"key": entry.key, "text": "", "meta": {}}
        name = f"{entry.key} in {os.path.basename(self.shards[entry.shard])}"
        ext = next(e for e in EXTENSIONS[self.kind] if e in entry.members)
        # One open per sample, not one per member: this runs for every sample of every step.
        with open(self.shards[entry.shard], "rb") as f:
            raw = {e: _read_member(f, e, *entry.members[e]) for e in ("txt", "json", ext) if e in entry.members}
        if "txt" in raw:
            sample["text"] = raw["txt"].decode("utf-8", errors="replace").strip()
        if "json" in raw:
            try:
                sample["meta"] = json.loads(raw["json"])
            except json.JSONDecodeError as error:
                raise ValueError(f"cannot parse json of {name}: {error}") from error
        data = raw[ext]
        if self.kind == "image":
            sample["image"] = decode_image(data, name, self.image_format)
        elif self.kind == "audio":
            sample["audio"] = decode_audio(data, name, self.sample_rate)
            sample["sample_rate"] = self.sample_rate
        else:
            sample["video"], sample["fps"] = decode_video(data, name, self.video_frames)
        return sample


def _read_member(f: io.BufferedReader, ext: str, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{ext} member cut short")
    return data


# --------------------------------------------------------------------------------------------------- batching


def collate_samples(samples: list[dict]) -> dict[str, Any]:
    """Default collate: keys and texts as lists; images/videos stacked when their shapes agree (else lists);
    audio right-padded with zeros to [B, L_max] beside `audio_lengths` [B]."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "text": [s["text"] for s in samples]}
    batch["meta"] = [s["meta"] for s in samples]
    for field in ("image", "video"):
        if field in samples[0]:
            items = [s[field] for s in samples]
            same = all(isinstance(x, torch.Tensor) and x.shape == items[0].shape for x in items)
            batch[field] = torch.stack(items) if same else items
    if "fps" in samples[0]:
        batch["fps"] = [s["fps"] for s in samples]
    if "audio" in samples[0]:
        lengths = torch.tensor([len(s["audio"]) for s in samples])
        audio = torch.zeros(len(samples), int(lengths.max()))
        for i, s in enumerate(samples):
            audio[i, : len(s["audio"])] = s["audio"]
        batch.update(audio=audio, audio_lengths=lengths, sample_rate=samples[0]["sample_rate"])
    return batch


def batches(
    samples: Iterable[dict],
    batch_size: int,
    collate: Callable[[list[dict]], Any] = collate_samples,
    drop_last: bool = True,
) -> Iterator[Any]:
    """Group a sample stream into collated batches. It reads no sample ahead of the batch it yields, so the
    stream's state_dict() taken between batches is exact."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    group: list[dict] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group and not drop_last:
        yield collate(group)
