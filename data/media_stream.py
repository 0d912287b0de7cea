"""Streaming media shards with exact resume: webdataset tars as people have them, read shard by shard.

What it reads. Shards are tar files in the webdataset layout (members `KEY.EXT`, grouped by key), named by local
paths, `file:` URLs, brace patterns (`shards/train-{000000..000999}.tar`, webdataset's `::` lists), `pipe:` commands
(`pipe:curl -s -L https://host/train-000000.tar`, `pipe:aws s3 cp s3://b/x.tar -`) and the remote schemes
webdataset's `gopen` knows; the reading goes through webdataset (`gopen`, `tar_file_iterator`, `group_by_keys`).
The layouts of the common data sets all read: img2dataset output (`jpg`/`png`/`webp` + `txt` + `json`), video-text
(`mp4`/`webm` + `txt`) and audio-text (`flac`/`wav`/`mp3` + `txt` or `json`). A sample decodes to the dicts of
`data.media` (key, text, meta and image / audio + sample_rate / video + fps) with that module's decoders (PIL,
soundfile with torchaudio's resampler, PyAV); `text` is the `txt` member, else the json's "caption" or "text".

No index. Nothing is opened when the reader is built: it expands the URLs and draws two seeded permutations of the
shard list, so start-up time and memory grow with the number of shards only (bench/media_reader.py: 10,000 shards),
never with the number of samples, and a shard is opened when its first sample is wanted.

Who reads what. There are C = world_size x max(1, num_workers) consumers (one per DataLoader worker of each rank;
the rank itself when num_workers=0). A fixed seeded permutation of the shards gives every shard a position p, and
the shard belongs to consumer p mod C, in every epoch. A consumer visits its shards in the order of the epoch's
seeded permutation, `interleave` shards at a time: it reads the group's shards round robin (always the one with the
fewest samples read, ties to the earlier), each shard from start to end. Within a shard, samples are shuffled in
windows of `shuffle_window` consecutive samples, by a permutation seeded with (seed, epoch, shard, window). So the
order is a deterministic function of (seed, epoch, shard list, C) and the position; every sample of every shard
is read exactly once per epoch whatever C is. Shuffling therefore mixes the epoch's shard order, the window within a
shard, and the `interleave` shards of a consumer and the consumers a batch is drawn from (a rank's DataLoader takes
its workers' samples in turn); it holds at most interleave x shuffle_window undecoded samples per consumer. A
consumer's epochs roll over on their own (it reads its next epoch while another consumer finishes this one).

The state. Per shard: (epoch, samples read in that epoch, corrupt samples met in that pass). That is all a
window-shuffled position needs to be restored (the window is re-read and re-permuted, the samples before it skipped
undecoded), and it names no consumer. `state_dict()` holds this rank's shards (-1 for other ranks' shards);
`merge_stream_states` joins every rank's into one global state. Restored onto another number of ranks or workers,
each shard goes to its consumer under the new C with its (epoch, offset): shards finished in an epoch are not read
again in it, a shard half read continues at its next sample, the rest are read whole, so no sample is repeated or
skipped. Restored onto the same layout, the continuation is the very sequence the uninterrupted loader would have
produced (the state also records whose turn it was among the workers); onto another layout it is another order of
the same remaining samples. DataLoader workers decode ahead (prefetch); each sample carries the positions it
advanced and the loader applies them only when it hands the sample on, so `state_dict()` between batches counts
exactly what was delivered. Resuming re-reads (undecoded) the part of a half-read shard before its window: cheap
for a local file, a re-download of that prefix for a remote one.

Decoding, and the caller's `transform` (resizing, tiling, frame sampling, resampling: any picklable function of a
sample dict), run in the DataLoader workers; the training process only collates (`collate_in_workers=True` moves
that into the workers too, each batch then made of one worker's samples: less to send and copy, bench/RESULTS.md).
A sample that does not decode (or whose json does not parse) is skipped and counted against its shard; so is a
shard that cannot be opened, or whose tar breaks off (counted once; the rest of the shard is lost for that epoch,
and so is the sample being grouped at the break, whole or not: a tar stream cannot tell). More than
`max_corrupt_per_shard` in one pass over a shard raises `data.media.CorruptSampleError` naming the shard. Samples
without a member of the kind (a `jpg` in an audio set) are counted as `without_media`, not as corrupt. `stats()`
reports samples delivered, skips per shard and where the epoch stands.

How a trainer uses it (`train.media.MediaStreamBatches` does this for the encoder and adapter stages when
`data.shards` is set):

    loader = MediaStreamLoader("shards/train-{000000..009999}.tar", kind="image", batch_size=per_rank_batch,
                               rank=dp_rank, world_size=dp_size, num_workers=4, seed=cfg.data.seed,
                               transform=tile_for_the_model, collate=collate_for_the_model)
    if resuming:
        loader.load_state_dict(checkpoint["data"])        # a merged state, saved under any layout
    batches = iter(loader)
    ...                                                   # next(batches) every micro-batch
    states = [None] * dp_size                             # at a checkpoint, on every rank (a collective):
    torch.distributed.all_gather_object(states, loader.state_dict(), group=dp_group)
    checkpoint["data"] = merge_stream_states(states)

Each rank's state holds only its own shards' positions: hence the gather, in `MediaStreamBatches.state_dict`.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.media import (
    EXTENSIONS,
    KINDS,
    CorruptSampleError,
    CorruptSampleWarning,
    collate_samples,
    decode_audio,
    decode_image,
    decode_video,
)

__all__ = ["MediaStream", "MediaStreamLoader", "StreamConfig", "decode_sample", "merge_stream_states", "shard_urls"]

STATE_VERSION = 1
DEFAULT_SHUFFLE_WINDOW = 64
DEFAULT_INTERLEAVE = 4
DEFAULT_MAX_CORRUPT_PER_SHARD = 8
# What reading a damaged, truncated or missing shard raises (through webdataset's gopen and tarfile's stream mode).
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)
# Fixed key of the ownership permutation, apart from the per-epoch visiting orders keyed by the epoch.
OWNERSHIP_KEY = 0x5EED


def shard_urls(urls: str | Path | Iterable[str | Path]) -> list[str]:
    """Expand brace patterns (and webdataset's `::` lists) into shard URLs, opening none of them."""
    from webdataset.shardlists import expand_urls

    patterns = [str(urls)] if isinstance(urls, (str, Path)) else [str(url) for url in urls]
    # Only what holds a pattern goes through the expander: a list of 10,000 plain URLs is taken as it is.
    expanded = [url for p in patterns for url in (expand_urls(p) if "{" in p or "::" in p or "$" in p else [p])]
    if not expanded:
        raise ValueError("no shards given (an empty list)")
    return expanded


# --------------------------------------------------------------------------------------------------- reading


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """One shard's raw samples in tar order ({"__key__", "__url__", ext: bytes}), read by webdataset."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = gopen(url)
    finished = False
    try:
        yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(stream))
        finished = True
    finally:
        try:
            stream.close()  # a pipe's command is waited for here: its failure after the last byte is an error
        except OSError:
            if finished:
                raise
            # Left early: a pipe's command killed by the closed pipe is no error of the shard.


def window_shuffled(
    raw: Iterator[dict[str, Any]], start: int, window: int, key: list[int] | None
) -> Iterator[dict[str, Any]]:
    """Samples from position `start` of the window-shuffled order; `key` seeds each window (None: tar order)."""
    try:
        first_window = start // window
        for _ in islice(raw, first_window * window):  # before the window of `start`: read past, not decoded
            pass
        skip, index = start - first_window * window, first_window
        while True:
            buffer: list[dict[str, Any] | None] = []
            damage = None
            try:
                buffer.extend(islice(raw, window))
            except SHARD_ERRORS as error:  # a tar that breaks off: its window so far is still handed on, then this
                damage = error
            if not buffer and damage is None:
                return
            order = np.random.default_rng([*key, index]).permutation(len(buffer)) if key else range(len(buffer))
            for j in list(order)[skip:]:
                sample, buffer[j] = buffer[j], None  # drop each sample once handed on: memory stays one window
                yield sample
            if damage is not None:
                raise damage
            skip, index = 0, index + 1
    finally:
        close = getattr(raw, "close", None)
        if close is not None:  # the shard's stream (a pipe's process) closes now, not when collected
            close()


def decode_sample(
    raw: dict[str, Any],
    kind: str,
    image_format: str = "tensor",
    sample_rate: int = 16000,
    video_frames: int | None = None,
) -> dict[str, Any] | None:
    """A raw webdataset sample as data.media's sample dict; None without a `kind` member; ValueError if corrupt."""
    import json

    ext = next((e for e in EXTENSIONS[kind] if e in raw), None)
    if ext is None:
        return None
    name = f"{raw['__key__']} in {raw.get('__url__', '<bytes>')}"
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot parse json of {name}: {error}") from error
    if "txt" in raw:
        text = raw["txt"].decode("utf-8", errors="replace").strip()
    else:  # audio-text and some image sets keep the transcript or caption in the json only
        text = str(meta.get("caption") or meta.get("text") or "") if isinstance(meta, dict) else ""
    sample: dict[str, Any] = {"key": raw["__key__"], "text": text, "meta": meta}
    if kind == "image":
        sample["image"] = decode_image(raw[ext], name, image_format)
    elif kind == "audio":
        sample["audio"], sample["sample_rate"] = decode_audio(raw[ext], name, sample_rate), sample_rate
    else:
        sample["video"], sample["fps"] = decode_video(raw[ext], name, video_frames)
    return sample


# --------------------------------------------------------------------------------------------------- planning


@dataclass
class StreamConfig:
    """Everything a consumer needs, pickled into DataLoader workers; identical on every rank."""

    urls: list[str]
    kind: str
    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW
    interleave: int = DEFAULT_INTERLEAVE
    max_corrupt_per_shard: int = DEFAULT_MAX_CORRUPT_PER_SHARD
    image_format: str = "tensor"
    sample_rate: int = 16000
    video_frames: int | None = None
    transform: Callable[[dict], Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; have {KINDS}")
        if self.shuffle_window < 1 or self.interleave < 1:
            raise ValueError(
                f"shuffle_window and interleave must be >= 1, not {self.shuffle_window}, {self.interleave}"
            )
        if self.max_corrupt_per_shard < 0:
            raise ValueError(f"max_corrupt_per_shard must be >= 0, not {self.max_corrupt_per_shard}")
        if self.image_format not in ("tensor", "pil"):
            raise ValueError(f"image_format must be 'tensor' or 'pil', not {self.image_format!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or None: forever), not {self.epochs}")
        n = len(self.urls)
        self.assign = self.ranks([self.seed, OWNERSHIP_KEY]) if self.shuffle else np.arange(n)
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def ranks(self, key: list[int]) -> np.ndarray:
        """Each shard's place in the permutation seeded by `key`."""
        places = np.empty(len(self.urls), dtype=np.int64)
        places[np.random.default_rng(key).permutation(len(self.urls))] = np.arange(len(self.urls))
        return places

    def owned(self, consumer: int, consumers: int) -> np.ndarray:
        """The shards of `consumer` among `consumers`, ascending."""
        return np.flatnonzero(self.assign % consumers == consumer)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Each shard's place in `epoch`'s visiting order."""
        if self._epoch_order[0] != epoch:
            order = self.ranks([self.seed, epoch]) if self.shuffle else np.arange(len(self.urls))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def window_key(self, epoch: int, shard: int) -> list[int] | None:
        """What seeds the window permutations of `shard` in `epoch` (None: no shuffle)."""
        return [self.seed, epoch, shard] if self.shuffle else None

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must agree on: the shard list and everything that orders a shard's samples."""
        digest = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()
        return {
            "shards": len(self.urls),
            "urls_sha256": digest,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
        }


# --------------------------------------------------------------------------------------------------- consumers


class Consumer:
    """One consumer's sample stream: its shards, epoch after epoch, from a starting position array."""

    def __init__(self, cfg: StreamConfig, consumer: int, consumers: int, position: np.ndarray, slot: int) -> None:
        self.cfg, self.slot = cfg, slot
        self.owned = cfg.owned(consumer, consumers)
        self.position = position  # int64 [shards, 3]: epoch, samples read in it, corrupt met in this pass
        self.changed: set[int] = set()  # shards whose position moved since the last item
        self.skipped: dict[int, int] = {}
        self.without_media = 0
        self.warned: set[int] = set()

    def items(self) -> Iterator[dict[str, Any]]:
        """Items {"slot", "sample" (None: positions only), "count", "updates", "skipped", "without_media"}."""
        pos, cfg = self.position, self.cfg
        while len(self.owned):
            epoch = int(pos[self.owned, 0].min())
            if cfg.epochs is not None and epoch >= cfg.epochs:
                break
            fresh = not pos[self.owned[pos[self.owned, 0] == epoch], 1].any()
            delivered = 0
            order = self.owned[np.argsort(cfg.epoch_order(epoch)[self.owned], kind="stable")]
            for g in range(0, len(order), cfg.interleave):
                members = [int(s) for s in order[g : g + cfg.interleave] if pos[s, 0] == epoch]
                for item in self.read_group(members, epoch):
                    delivered += 1
                    yield item
            if fresh and not delivered:
                raise CorruptSampleError(
                    f"no {cfg.kind} sample decoded in a whole pass over {len(self.owned)} shard(s) of this reader, "
                    f"such as {cfg.urls[int(self.owned[0])]} ({sum(self.skipped.values())} corrupt or unreadable, "
                    f"{self.without_media} samples had no {cfg.kind} member)"
                )
        if self.changed or self.skipped or self.without_media:
            yield self.item(None)

    def read_group(self, members: list[int], epoch: int) -> Iterator[dict[str, Any]]:
        """The group's samples round robin (the shard with the fewest read first), each shard to its end."""
        pos, cfg = self.position, self.cfg
        cursors: dict[int, Iterator[dict[str, Any]]] = {}
        try:
            while members:
                shard = min(members, key=lambda s: pos[s, 1])  # min keeps the earliest of equals
                if shard not in cursors:  # opened only now: a shard is never touched before it is read
                    key = cfg.window_key(epoch, shard)
                    cursors[shard] = window_shuffled(
                        read_shard(cfg.urls[shard]), int(pos[shard, 1]), cfg.shuffle_window, key
                    )
                try:
                    raw = next(cursors[shard], None)
                except SHARD_ERRORS as error:
                    self.corrupt(shard, f"the shard cannot be read further: {error}")
                    raw = None
                if raw is None:  # the shard's end (or its damage): done for this epoch
                    pos[shard] = (epoch + 1, 0, 0)
                    self.changed.add(shard)
                    members.remove(shard)
                    cursors.pop(shard).close()
                    continue
                pos[shard, 1] += 1
                self.changed.add(shard)
                sample = self.decode(shard, raw)
                if sample is not None:
                    yield self.item(cfg.transform(sample) if cfg.transform is not None else sample)
        finally:
            for cursor in cursors.values():
                cursor.close()

    def decode(self, shard: int, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The decoded sample, or None when it is skipped (corrupt: counted against the shard) or has no media."""
        cfg = self.cfg
        try:
            sample = decode_sample(raw, cfg.kind, cfg.image_format, cfg.sample_rate, cfg.video_frames)
        except ValueError as error:
            self.corrupt(shard, str(error))
            return None
        if sample is None:
            self.without_media += 1
        return sample

    def corrupt(self, shard: int, reason: str) -> None:
        """Count a corrupt sample (or a broken shard) against the shard's budget; raise past it."""
        self.position[shard, 2] += 1
        self.changed.add(shard)
        self.skipped[shard] = self.skipped.get(shard, 0) + 1
        url, budget = self.cfg.urls[shard], self.cfg.max_corrupt_per_shard
        if self.position[shard, 2] > budget:
            raise CorruptSampleError(
                f"shard {url}: {self.position[shard, 2]} corrupt samples in one pass, over the budget of {budget} "
                f"(max_corrupt_per_shard); the last: {reason}"
            )
        if shard not in self.warned:
            self.warned.add(shard)
            warnings.warn(
                f"skipping in shard {url}: {reason} (further ones are only counted)", CorruptSampleWarning, stacklevel=2
            )

    def item(self, sample: Any) -> dict[str, Any]:
        """`sample` with the positions it advanced (since the previous item) and the counts met on the way."""
        updates = [(s, *(int(v) for v in self.position[s])) for s in sorted(self.changed)]
        item = {
            "slot": self.slot,
            "sample": sample,
            "count": int(sample is not None),
            "updates": updates,
            "skipped": self.skipped,
            "without_media": self.without_media,
        }
        self.changed, self.skipped, self.without_media = set(), {}, 0
        return item


class MediaStream(IterableDataset):
    """One rank's consumers as an IterableDataset: worker w of W plays consumer slot (turn + w) mod W.

    Its items carry their position updates; MediaStreamLoader applies them as it delivers samples (use that).
    With `batch` = (batch_size, collate, drop_last) each item is a batch of one consumer's samples, collated there.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        rank: int,
        world_size: int,
        workers: int,
        position: np.ndarray,
        turn: int = 0,
        batch: tuple[int, Callable[[list], Any], bool] | None = None,
    ) -> None:
        self.cfg, self.rank, self.world_size, self.workers = cfg, rank, world_size, workers
        self.position, self.turn, self.batch = position, turn, batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader starts with worker 0; rotating the slots makes a resumed run take its consumers' samples in
        # the turn order the uninterrupted run was in.
        slot = (self.turn + worker) % self.workers
        consumer = Consumer(
            self.cfg, self.rank * self.workers + slot, self.world_size * self.workers, self.position.copy(), slot
        )
        return consumer.items() if self.batch is None else batched_items(consumer.items(), slot, *self.batch)


def batched_items(
    items: Iterator[dict[str, Any]], slot: int, batch_size: int, collate: Callable[[list], Any], drop_last: bool
) -> Iterator[dict[str, Any]]:
    """Items of `batch_size` samples collated here, each with every position its samples advanced, in order."""
    group: list[Any] = []
    merged: dict[str, Any] = {"updates": [], "skipped": {}, "without_media": 0}
    for item in items:
        merged["updates"] += item["updates"]  # applied in order, so a shard's last update wins
        for shard, count in item["skipped"].items():
            merged["skipped"][shard] = merged["skipped"].get(shard, 0) + count
        merged["without_media"] += item["without_media"]
        if item["sample"] is not None:
            group.append(item["sample"])
        if len(group) == batch_size:
            yield {"slot": slot, "sample": collate(group), "count": len(group), **merged}
            group, merged = [], {"updates": [], "skipped": {}, "without_media": 0}
    if group and not drop_last:
        yield {"slot": slot, "sample": collate(group), "count": len(group), **merged}
    elif group or merged["updates"] or merged["skipped"] or merged["without_media"]:
        yield {"slot": slot, "sample": None, "count": 0, **merged}  # a dropped tail still counts as read


# --------------------------------------------------------------------------------------------------- loader


def _identity(x: Any) -> Any:
    return x


class MediaStreamLoader:
    """Decoded (and transformed) media samples of one rank, batched, with exact, layout-free resume.

    Args:
        urls: shard URLs or brace patterns (see the module docstring); nothing is opened here.
        kind: "image", "audio" or "video".
        batch_size: samples per batch, collated by `collate` in this process (None: samples one by one).
        rank, world_size: this data-parallel rank.
        num_workers: DataLoader workers decoding ahead (0: decode in this process).
        seed, shuffle: the shard orders and window permutations (shuffle=False: list order, tar order).
        epochs: stop after this many passes (None: forever).
        shuffle_window, interleave: see the module docstring.
        max_corrupt_per_shard: corrupt samples one pass over a shard may skip; one more is an error naming it.
        transform: applied to each decoded sample in the worker (resize, tile, pick frames, resample).
        collate, drop_last: how batches are made (drop_last: a short last batch of a finite run is dropped).
        collate_in_workers: collate in the workers instead, each batch from one worker's samples (as torch's
            DataLoader batches an IterableDataset): less to send and copy here, less mixing within a batch.
        prefetch_factor, timeout, multiprocessing_context: passed to the DataLoader.
        image_format, sample_rate, video_frames: decoding, as data.media.
    """

    def __init__(
        self,
        urls: str | Path | Iterable[str | Path],
        *,
        kind: str,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        interleave: int = DEFAULT_INTERLEAVE,
        max_corrupt_per_shard: int = DEFAULT_MAX_CORRUPT_PER_SHARD,
        transform: Callable[[dict], Any] | None = None,
        collate: Callable[[list], Any] = collate_samples,
        drop_last: bool = False,
        prefetch_factor: int = 2,
        timeout: float = 600.0,
        multiprocessing_context: str | None = None,
        image_format: str = "tensor",
        sample_rate: int = 16000,
        video_frames: int | None = None,
        collate_in_workers: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if num_workers < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"num_workers must be >= 0 and batch_size >= 1, not {num_workers}, {batch_size}")
        if collate_in_workers and batch_size is None:
            raise ValueError("collate_in_workers needs a batch_size")
        self.cfg = StreamConfig(
            shard_urls(urls),
            kind,
            seed=seed,
            shuffle=shuffle,
            epochs=epochs,
            shuffle_window=shuffle_window,
            interleave=interleave,
            max_corrupt_per_shard=max_corrupt_per_shard,
            image_format=image_format,
            sample_rate=sample_rate,
            video_frames=video_frames,
            transform=transform,
        )
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.batch_size, self.collate, self.drop_last = batch_size, collate, drop_last
        self.collate_in_workers = collate_in_workers
        self.loader_options = {
            "prefetch_factor": prefetch_factor,
            "timeout": timeout,
            "multiprocessing_context": multiprocessing_context,
        }
        consumers = world_size * self.workers
        if len(self.cfg.urls) < consumers:
            warnings.warn(
                f"{len(self.cfg.urls)} shards for {consumers} consumers (ranks x workers): "
                f"{consumers - len(self.cfg.urls)} of them read nothing",
                stacklevel=2,
            )
        self.mine = np.flatnonzero(self.cfg.assign % consumers // self.workers == rank)
        self.position = np.zeros((len(self.cfg.urls), 3), dtype=np.int64)
        self.turn = 0
        self.counts = {"samples": 0, "without_media": 0}
        self.skipped: dict[str, int] = {}
        self._live: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        """Batches (or samples) from the current state on; a new iterator closes the previous one."""
        if self._live is not None:
            self._live.close()
        self._live = self._batches()
        return self._live

    def _items(self) -> Iterator[dict[str, Any]]:
        batch = (self.batch_size, self.collate, self.drop_last) if self.collate_in_workers else None
        dataset = MediaStream(
            self.cfg, self.rank, self.world_size, self.workers, self.position.copy(), self.turn, batch
        )
        if self.num_workers == 0:
            yield from iter(dataset)
            return
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, **self.loader_options
        )
        iterator, parent = iter(loader), os.getpid()
        try:
            yield from iterator
        except CorruptSampleError as error:
            # From a worker the message carries the worker's traceback; its last line names the shard.
            last = str(error).strip().splitlines()[-1]
            raise CorruptSampleError(last.split("CorruptSampleError: ", 1)[-1]) from None
        finally:
            # Stop the workers now: left to the garbage collector, a DataLoader waits for each worker. Not from a
            # process forked while this iterator was alive (another DataLoader's worker): they are not its children.
            if os.getpid() == parent:
                iterator._shutdown_workers()

    def _batches(self) -> Iterator[Any]:
        group: list[Any] = []
        for item in self._items():
            self._apply(item)
            if item["sample"] is None:
                continue
            if self.batch_size is None or self.collate_in_workers:
                yield item["sample"]
                continue
            group.append(item["sample"])
            if len(group) == self.batch_size:
                yield self.collate(group)
                group = []
        if group and not self.drop_last:
            yield self.collate(group)

    def _apply(self, item: dict[str, Any]) -> None:
        """Count a received item as delivered: its positions, skips and the next worker's turn."""
        for shard, epoch, offset, corrupt in item["updates"]:
            self.position[shard] = (epoch, offset, corrupt)
        for shard, count in item["skipped"].items():
            url = self.cfg.urls[shard]
            self.skipped[url] = self.skipped.get(url, 0) + count
        self.counts["without_media"] += item["without_media"]
        self.counts["samples"] += item["count"]
        self.turn = (item["slot"] + 1) % self.workers

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards' positions (-1 for other ranks'), the layout and whose turn is next; JSON-able."""
        mine = np.full_like(self.position, -1)
        mine[self.mine] = self.position[self.mine]
        turns = [-1] * self.world_size
        turns[self.rank] = self.turn
        return {
            "version": STATE_VERSION,
            "fingerprint": self.cfg.fingerprint(),
            "layout": [self.world_size, self.workers],
            "turns": turns,
            "position": mine.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a merged state (any layout) or, under the same layout, this rank's own."""
        if self._live is not None:  # an iterator from before the restore would continue the old state
            self._live.close()
            self._live = None
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"media stream state version {state.get('version')}, this code reads {STATE_VERSION}")
        if state["fingerprint"] != self.cfg.fingerprint():
            raise ValueError(
                f"the state was saved for {state['fingerprint']}, this loader has {self.cfg.fingerprint()}: another "
                "shard list, seed, shuffle or shuffle_window orders the samples differently"
            )
        position = np.asarray(state["position"], dtype=np.int64).reshape(-1, 3)
        if (position[self.mine] < 0).any():
            raise ValueError(
                "the state lacks shards this rank reads now; gather every rank's state_dict() and restore from "
                "merge_stream_states(states)"
            )
        self.position = np.where(position < 0, 0, position)
        same_layout = list(state["layout"]) == [self.world_size, self.workers]
        self.turn = max(0, state["turns"][self.rank]) if same_layout else 0

    def stats(self) -> dict[str, Any]:
        """Samples delivered and skips per shard (since built), and where this rank's shards stand."""
        position = self.position[self.mine]
        epoch = int(position[:, 0].min()) if len(position) else 0
        return {
            "samples": self.counts["samples"],
            "skipped": dict(self.skipped),
            "without_media": self.counts["without_media"],
            "epoch": epoch,
            "shards": len(self.mine),
            "shards_done_in_epoch": int((position[:, 0] > epoch).sum()),
            "shards_started_in_epoch": int(((position[:, 0] == epoch) & (position[:, 1] > 0)).sum()),
        }


def merge_stream_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's `state_dict()` joined into one state that any number of ranks and workers restores."""
    if not states:
        raise ValueError("merge_stream_states needs at least one state")
    first = states[0]
    for other in states[1:]:
        for key in ("version", "fingerprint", "layout"):
            if other[key] != first[key]:
                raise ValueError(f"ranks disagree on {key}: {first[key]} vs {other[key]}")
    merged = np.asarray(first["position"], dtype=np.int64).reshape(-1, 3).copy()
    turns = list(first["turns"])
    for other in states[1:]:
        theirs = np.asarray(other["position"], dtype=np.int64).reshape(-1, 3)
        known = theirs[:, 0] >= 0
        clash = known & (merged[:, 0] >= 0) & (merged != theirs).any(axis=1)
        if clash.any():
            raise ValueError(f"ranks report different positions for shards {np.flatnonzero(clash)[:10].tolist()}")
        merged[known] = theirs[known]
        turns = [max(a, b) for a, b in zip(turns, other["turns"], strict=True)]
    if (merged < 0).any():
        missing = np.flatnonzero((merged < 0).any(axis=1))
        raise ValueError(f"no rank reports shards {missing[:10].tolist()}; pass every rank's state")
    return {**first, "turns": turns, "position": merged.tolist()}
