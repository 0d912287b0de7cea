"""The readers a training step's rows come from: a corpus's mixture, cut into a fixed number of packing loaders.

Configs are duck-typed (``train.lm``'s ``[data]`` section, or anything with the same fields): ``data/`` imports
nothing of ``train/``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from data.loader import PackedLoader, merge_states
from data.mixture import Mixture, parse_weights
from lm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class MixtureSpec(Protocol):
    """The fields of a ``[data]`` section :func:`build_mixture` reads."""

    dir: str
    mixture: str
    anneal_mixture: str
    anneal_fraction: float
    seed: int
    default_scale: float


class ReaderSpec(Protocol):
    """The fields of a ``[data]`` section :class:`ReaderGroup` reads."""

    seq_len: int
    num_workers: int
    seed: int
    on_corrupt: str


def build_mixture(data: MixtureSpec) -> Mixture:
    """The data mixture of a ``[data]`` section; builds the embedded default corpus when ``dir`` is empty."""
    # Lazily: the corpus builder pulls in data.prepare, which a run on prepared shards never needs.
    from data.default import ensure_default_corpus, load_default_mixture

    root = Path(data.dir)
    if data.mixture:
        mixture = Mixture.parse(
            data.mixture, root, anneal=data.anneal_mixture or None, anneal_fraction=max(0.0, data.anneal_fraction)
        )
    elif (root / "manifest.json").is_file():
        mixture = Mixture({root.name: root}, {root.name: 1.0})
    elif (root / "mixture.json").is_file():
        mixture = load_default_mixture(root)
    else:
        if root.exists() and any(root.iterdir()):
            raise FileNotFoundError(
                f"data.dir={root} holds neither a prepared source (manifest.json) nor a mixture (mixture.json); "
                "prepare it with `python -m data.prepare` or set data.mixture"
            )
        log.info("building the embedded default corpus in %s", root)
        # One rank builds, the others wait on its lock.
        mixture = ensure_default_corpus(root, seed=data.seed, scale=data.default_scale)
    if data.anneal_mixture and not data.mixture:
        mixture = dataclasses.replace(mixture, anneal_weights=parse_weights(data.anneal_mixture))
    if data.anneal_fraction >= 0:
        mixture = dataclasses.replace(mixture, anneal_fraction=data.anneal_fraction)
    return mixture


def check_readers(readers: int, dp_size: int, batch_size: int) -> None:
    """Each data-parallel rank holds whole readers, and each reader gives whole rows per step."""
    if readers % dp_size:
        raise ValueError(f"data.readers={readers} must be a multiple of the data-parallel degree {dp_size}")
    if batch_size % readers:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of data.readers={readers}")


class ReaderGroup:
    """This rank's share of a fixed number of data readers, cut into its micro-batches.

    Reader ``r`` is a ``PackedLoader`` with rank ``r`` of ``readers`` that yields ``batch_size / readers`` rows
    per optimizer step; data-parallel rank ``d`` of ``D`` holds readers ``d * readers / D ...`` and splits
    their rows into ``grad_accum`` micro-batches. Each optimizer step therefore sees the same rows under every
    layout whose data-parallel degree divides ``readers``, with or without accumulation. ``state_dict``
    gathers and merges every reader's state (a collective), so a checkpoint resumes onto any layout.
    """

    def __init__(
        self,
        mixture: Mixture,
        data: ReaderSpec,
        *,
        readers: int,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        grad_accum: int,
        steps: int,
        vocab_size: int | None = None,
    ) -> None:
        check_readers(readers, dp_size, batch_size)
        per_rank = readers // dp_size
        self.grad_accum = grad_accum
        self.loaders = [
            PackedLoader(
                mixture,
                seq_len=data.seq_len,
                batch_size=batch_size // readers,
                rank=dp_rank * per_rank + i,
                world_size=readers,
                num_workers=data.num_workers,
                seed=data.seed,
                # Shards tokenized with another vocabulary would index past the embedding table.
                tokenizer_sha256=Tokenizer().sha256,
                on_corrupt=data.on_corrupt,
                total_steps=steps,
                # An id past the model's vocabulary is an error naming its shard here, not a device assert later.
                vocab_size=vocab_size,
            )
            for i in range(per_rank)
        ]
        self._iters: list | None = None
        self._pending: list[dict[str, torch.Tensor]] = []

    def __iter__(self) -> ReaderGroup:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            if self._iters is None:
                self._iters = [iter(loader) for loader in self.loaders]
            batches = [next(it) for it in self._iters]
            tokens = torch.cat([b.tokens for b in batches]).chunk(self.grad_accum)
            documents = torch.cat([b.document_ids for b in batches]).chunk(self.grad_accum)
            self._pending = [{"tokens": t, "document_ids": d} for t, d in zip(tokens, documents, strict=True)]
        return self._pending.pop(0)

    def state_dict(self) -> dict:
        """Every reader's position across all ranks, merged into one state any layout restores (a collective)."""
        if self._pending:
            raise RuntimeError("data state taken in the middle of an optimizer step's micro-batches")

        states = [loader.state_dict() for loader in self.loaders]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            states = [s for rank_states in gathered for s in rank_states]
        return merge_states(states)

    def load_state_dict(self, state: dict) -> None:
        """Continue every reader of this rank from a merged state."""
        for loader in self.loaders:
            loader.load_state_dict(state)
        self._iters = None
        self._pending = []

    def stats(self) -> dict[str, Any]:
        """Metrics: the mixture phase and the realised source proportions of this rank's readers."""
        stats = [loader.stats() for loader in self.loaders]
        rows: dict[str, int] = {}
        for s in stats:
            for name, count in s["source_rows"].items():
                rows[name] = rows.get(name, 0) + count
        total = max(1, sum(rows.values()))
        out: dict[str, Any] = {"data/anneal": stats[0]["phase"] == "anneal"}
        out.update({f"data/{name}": count / total for name, count in rows.items()})
        out["data/corrupt_skipped"] = sum(s["corrupt_skipped"] for s in stats)
        return out
