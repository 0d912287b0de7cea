"""Media data for the training stages (encoder pretraining, adapter training): which shards a modality reads,
making the embedded set when they are missing, and resumable micro-batches from them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from train.parallel.mesh import barrier

if TYPE_CHECKING:
    from data.media import MediaSamples
    from train.config import JobConfig
    from train.loop import RunContext

log = logging.getLogger("train.media")

# The media kind (data.media) each training modality reads.
MEDIA_KINDS = {"vision": "image", "video": "video", "speech": "audio"}


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
        """Corrupt / skipped sample counts of this rank's stream."""
        return self.samples.stats()
