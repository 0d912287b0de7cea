"""Media data for the training stages (encoder pretraining, adapter training): which shards a modality reads,
making the embedded set when they are missing, and resumable micro-batches from them: indexed (``MediaBatches``
over ``data.media.MediaSamples``, the embedded default) or streamed (``MediaStreamBatches`` over
``data.media_stream.MediaStreamLoader``, when ``data.shards`` names shards)."""

from __future__ import annotations

import glob
import logging
import multiprocessing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from data.media_stream import DEFAULT_INTERLEAVE, DEFAULT_MAX_CORRUPT_PER_SHARD, DEFAULT_SHUFFLE_WINDOW
from train.config import NonNegativeInt, PositiveInt
from train.parallel.mesh import barrier

if TYPE_CHECKING:
    from data.media import MediaSamples
    from data.media_stream import MediaStreamLoader
    from train.config import JobConfig
    from train.loop import RunContext

log = logging.getLogger("train.media")

# The media kind (data.media) each training modality reads.
MEDIA_KINDS = {"vision": "image", "video": "video", "speech": "audio"}


@dataclass
class MediaDataConfig:
    """The ``[data]`` section of the media stages: the embedded (indexed) shards in ``dir``, or streamed shards."""

    dir: str = "runs/data/media"
    # Generate the embedded default data when ``dir`` lacks shards (rank 0 builds, the others wait).
    generate: bool = True
    # Sizes of the generated sets (train, held-out); 0 = data.synthetic's defaults.
    train_count: NonNegativeInt = 0
    heldout_count: NonNegativeInt = 0
    seed: NonNegativeInt = 0
    on_corrupt: Literal["skip", "fail"] = "skip"
    # Train from these webdataset shards instead, streamed with no index (data.media_stream; exact resume onto any
    # number of ranks and workers): a path, brace pattern or URL (`/data/cc3m/{00000..00331}.tar`, a local glob,
    # `pipe:curl -s -L URL`, webdataset's `a.tar::b.tar` lists), or a TOML list of them. Empty: the shards in `dir`,
    # indexed, as the quickstart trains. Held-out evaluation reads `dir` either way.
    shards: str | list[str] = ""
    # Streaming: DataLoader worker processes per rank that decode and transform samples into micro-batches (0: the
    # training process does it).
    num_workers: NonNegativeInt = 2
    # Streaming: samples are shuffled in windows of this many consecutive samples of a shard, and each worker reads
    # `interleave` of its shards round robin (data.media_stream).
    shuffle_window: PositiveInt = DEFAULT_SHUFFLE_WINDOW
    interleave: PositiveInt = DEFAULT_INTERLEAVE
    # Streaming: corrupt samples one pass over a shard may skip; one more stops the run naming the shard
    # (on_corrupt = "fail": none).
    max_corrupt_per_shard: NonNegativeInt = DEFAULT_MAX_CORRUPT_PER_SHARD


def ensure_data(cfg: JobConfig, modality: str, rank: int) -> None:
    """Make the embedded synthetic shards in ``data.dir`` when missing: rank 0 writes, every rank waits."""
    from data.media import SUBDIRS, find_shards
    from data.synthetic import GENERATING_MARKER

    kind = MEDIA_KINDS[modality]
    synth_kind = SUBDIRS[kind]

    try:
        shards = find_shards(cfg.data.dir, kind, "train")
        # Shards beside the marker are an interrupted data.synthetic run: generate() starts that kind afresh.
        present = not (shards[0].parent / GENERATING_MARKER).exists()
    except FileNotFoundError:
        present = False
    if not present and rank == 0:
        if not cfg.data.generate:
            raise FileNotFoundError(f"no {kind} shards in {cfg.data.dir} and data.generate is off")
        from data.synthetic import generate

        log.info("generating the embedded %s data in %s", synth_kind, cfg.data.dir)
        generate(
            synth_kind,
            cfg.data.dir,
            train=cfg.data.train_count or None,
            heldout=cfg.data.heldout_count or None,
            seed=cfg.data.seed,
        )
    barrier()


def train_samples(cfg: JobConfig, modality: str, ctx: RunContext, decode: Mapping[str, Any]) -> MediaSamples:
    """This data-parallel rank's shuffled, resumable stream of the modality's training samples."""
    from data.media import MediaSamples

    return MediaSamples(
        cfg.data.dir,
        kind=MEDIA_KINDS[modality],
        split="train",
        rank=ctx.dp_rank,
        world_size=ctx.dp_size,
        seed=cfg.data.seed,
        on_corrupt=cfg.data.on_corrupt,
        **decode,
    )


class MediaBatches:
    """Micro-batches for one rank from a resumable ``MediaSamples`` stream, transformed for the model.

    The state is the sample stream's (global position, valid under any world size); batching reads no sample
    ahead, so the state between batches is exact.
    """

    def __init__(self, samples: MediaSamples, batch_size: int, transform: Callable[[dict], Any]) -> None:
        self.samples, self.batch_size, self.transform = samples, batch_size, transform
        self._it = None

    def __iter__(self) -> MediaBatches:
        return self

    def __next__(self) -> Any:
        from data.media import batches

        if self._it is None:
            self._it = batches(iter(self.samples), self.batch_size)
        return self.transform(next(self._it))

    def state_dict(self) -> dict:
        """The sample stream's position (plus its counters, for the metrics)."""
        return dict(self.samples.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (taken under any world size)."""
        self.samples.load_state_dict({"epoch": state["epoch"], "position": state["position"]})
        self._it = None

    def stats(self) -> dict:
        """Corrupt / skipped sample counts of this rank's stream, and its epoch."""
        return {**self.samples.stats(), "epoch": self.samples.state_dict()["epoch"]}

    def close(self) -> None:
        """Nothing to stop: the indexed stream reads in this process."""


# ----------------------------------------------------------------------------------------------------------------
# Streamed shards (data.shards).


def stream_shards(patterns: str | list[str]) -> list[str]:
    """``data.shards`` as shard URLs: braces expanded, local globs matched. A local pattern naming a file that does
    not exist (or a glob matching none) is an error naming it; remote URLs and ``pipe:`` commands are left to the
    reader, which counts a shard it cannot open against that shard's corrupt budget."""
    from data.media_stream import shard_urls

    urls: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        expanded = shard_urls(pattern)
        if pattern.startswith("pipe:") or ("://" in pattern and not pattern.startswith("file:")):
            urls += expanded
            continue
        local = [url.removeprefix("file://").removeprefix("file:") for url in expanded]
        found = [path for url in local for path in (sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])]
        missing = [path for path in found if not Path(path).is_file()]
        if len(missing) == len(found):
            raise FileNotFoundError(f"data.shards: {pattern!r} matches no file")
        if missing:
            raise FileNotFoundError(
                f"data.shards: {len(missing)} of the {len(found)} files of {pattern!r} do not exist, such as "
                f"{missing[0]}"
            )
        urls += found
    if not urls:
        raise ValueError("data.shards names no shards")
    return urls


@dataclass
class KeyedTransform:
    """collate in a DataLoader worker: samples -> (their keys, the stage's micro-batch of them)."""

    transform: Callable[[dict], Any]

    def __call__(self, samples: list[dict]) -> tuple[list[str], Any]:
        from data.media import collate_samples

        return [s["key"] for s in samples], self.transform(collate_samples(samples))


def stream_batches(
    cfg: JobConfig,
    modality: str,
    ctx: RunContext,
    micro: int,
    transform: Callable[[dict], Any],
    decode: Mapping[str, Any],
    shards: list[str] | None = None,
) -> MediaStreamBatches:
    """This rank's micro-batches streamed from ``shards`` (default: ``data.shards`` resolved), decoded, collated
    and transformed in DataLoader workers."""
    from data.media_stream import MediaStreamLoader

    d = cfg.data
    loader = MediaStreamLoader(
        shards if shards is not None else stream_shards(d.shards),
        kind=MEDIA_KINDS[modality],
        batch_size=micro,
        rank=ctx.dp_rank,
        world_size=ctx.dp_size,
        num_workers=d.num_workers,
        seed=d.seed,
        shuffle_window=d.shuffle_window,
        interleave=d.interleave,
        max_corrupt_per_shard=0 if d.on_corrupt == "fail" else d.max_corrupt_per_shard,
        # The whole transform runs in the worker (an adapter's builds prompt rows and tiles images there), so each
        # micro-batch is one worker's samples; the training process only receives it.
        collate=KeyedTransform(transform),
        collate_in_workers=True,
        # Forked workers share the stage's transform as it is (an adapter's holds the model's processor, the model
        # with it): spawned or forkserver workers would have to pickle it. Fork is DataLoader's default on Linux up
        # to Python 3.13, named here so that 3.14's forkserver default does not change it.
        multiprocessing_context="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
        **decode,
    )
    return MediaStreamBatches(loader, ctx.dp_size)


class MediaStreamBatches:
    """Micro-batches for one rank from a ``MediaStreamLoader``, with ``MediaBatches``' interface.

    The state is global: ``state_dict()`` (a collective: every rank calls it, as the checkpointer does) gathers
    every data-parallel rank's shard positions and merges them, so one copy restores onto any number of ranks and
    workers (``global_state``: the checkpointer saves it once). ``last_keys`` names the samples of the micro-batch
    last handed out.
    """

    # Every rank's state_dict() is the same merged state: train.checkpoint saves one copy, not one per rank.
    global_state = True

    def __init__(self, loader: MediaStreamLoader, dp_size: int) -> None:
        self.loader, self.dp_size = loader, dp_size
        self.last_keys: list[str] = []
        self._it = None

    def __iter__(self) -> MediaStreamBatches:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self.loader)
        self.last_keys, batch = next(self._it)
        return batch

    def state_dict(self) -> dict:
        """Every rank's shard positions merged into one state (a collective over the data-parallel ranks)."""
        import torch.distributed as dist

        from data.media_stream import merge_stream_states

        state = self.loader.state_dict()
        if self.dp_size == 1:
            return state
        # Media stages are data parallel only (train.stage.run checks): the default group is the dp group.
        states: list[Any] = [None] * self.dp_size
        dist.all_gather_object(states, state)
        return merge_stream_states(states)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a merged state taken under any number of ranks and workers."""
        self.close()
        self.loader.load_state_dict(state)

    def stats(self) -> dict:
        """Samples delivered, skipped ones (in all and per shard), and the epoch of this rank's shards."""
        s = self.loader.stats()
        return {**s, "skipped": sum(s["skipped"].values()), "skipped_by_shard": s["skipped"]}

    def close(self) -> None:
        """Stop the DataLoader workers (a later ``next`` starts them again from the current state)."""
        if self._it is not None:
            self._it.close()
            self._it = None
