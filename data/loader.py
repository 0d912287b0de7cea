"""The packing loader for LM pretraining: token shards -> [B, seq_len + 1] rows with document ids.

Work is split in units: every source's shards are cut into contiguous document ranges ("units"), at least
`min_units` per source (a shard is cut into several ranges when the source has fewer shards than that), so
a small source still spreads over many ranks and workers. Unit i of a fixed seeded permutation belongs to
reader i mod (world_size * num_workers); each reader (one DataLoader worker of one rank) visits its units in
the order of a per-epoch seeded permutation, reads each unit's documents in order and packs them end to end
into rows, splitting documents across rows. A reader's epochs roll over on their own.

The resume state is kept per unit: (epoch, next document, token offset in it) not yet emitted. It does not
depend on the world size, so a state gathered from all ranks (`merge_states`) restores onto any number of
ranks or workers with no document repeated or skipped; with the same layout, the batches that follow are
exactly those an uninterrupted loader would have produced. A rank's `state_dict()` holds -1 for units it does
not own. The row -> source assignment and the annealing switch are functions of the global step and row
index (see data/mixture.py), so they resume exactly too.

With num_workers > 0 every batch carries the positions of the units it advanced, and the state is updated
only when the consumer receives that batch: it never counts what workers merely prefetched.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.mixture import Mixture
from data.shards import DataError, Shard, check_tokenizer, read_manifest

__all__ = ["Batch", "PackedLoader", "merge_states"]

STATE_VERSION = 1
DEFAULT_MIN_UNITS = 1024


@dataclass
class Batch:
    """One batch of packed rows: feed `tokens[:, :-1]` with `document_ids[:, :-1]`, predict `tokens[:, 1:]`."""

    tokens: torch.Tensor  # int64 [B, seq_len + 1]
    document_ids: torch.Tensor  # int32 [B, seq_len + 1]; changes at every document start within a row
    sources: list[str]  # source name of each row
    step: int  # global step (batch index) of this batch

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move the tensors to `device`."""
        return Batch(
            self.tokens.to(device, non_blocking=non_blocking),
            self.document_ids.to(device, non_blocking=non_blocking),
            self.sources,
            self.step,
        )


@dataclass
class _SourcePlan:
    """A source's shards and units; identical on every rank since it depends only on the manifest."""

    name: str
    directory: Path
    shards: list[dict]
    verify: bool
    unit_shard: np.ndarray  # int64 [U]
    unit_lo: np.ndarray  # int64 [U], first document (index within its shard)
    unit_hi: np.ndarray  # int64 [U], one past the last document
    assign: np.ndarray  # int64 [U], unit i belongs to reader assign_order_position(i) mod readers

    @property
    def num_units(self) -> int:
        return len(self.unit_shard)

    def fingerprint(self) -> list:
        """What a saved state must agree on to be loadable: shard files and their documents, unit count."""
        return [len(self.shards), self.num_units, sum(int(s["documents"]) for s in self.shards)]

    @classmethod
    def build(cls, name: str, directory: Path, seed: int, min_units: int, verify: bool, tokenizer_sha256):
        manifest = read_manifest(directory)
        check_tokenizer(manifest, directory, tokenizer_sha256)
        shards = manifest["shards"]
        # Ranges per shard: enough that the source has >= min_units units, never an empty range.
        per_shard = max(1, math.ceil(min_units / len(shards)))
        unit_shard, unit_lo, unit_hi = [], [], []
        for index, record in enumerate(shards):
            docs = int(record["documents"])
            pieces = min(per_shard, docs)
            bounds = [docs * p // pieces for p in range(pieces + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                unit_shard.append(index)
                unit_lo.append(lo)
                unit_hi.append(hi)
        units = len(unit_shard)
        position = np.empty(units, dtype=np.int64)
        position[np.random.default_rng([seed, 0x5EED, _name_key(name)]).permutation(units)] = np.arange(units)
        return cls(
            name,
            directory,
            shards,
            verify,
            np.asarray(unit_shard, dtype=np.int64),
            np.asarray(unit_lo, dtype=np.int64),
            np.asarray(unit_hi, dtype=np.int64),
            position,
        )

    def owned(self, reader: int, readers: int) -> np.ndarray:
        """Units of `reader` among `readers`, ascending."""
        return np.flatnonzero(self.assign % readers == reader)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Visiting rank of every unit in `epoch`: shard order reshuffled each epoch."""
        rank = np.empty(self.num_units, dtype=np.int64)
        rank[np.random.default_rng([seed, epoch, _name_key(self.name)]).permutation(self.num_units)] = np.arange(
            self.num_units
        )
        return rank


def _name_key(name: str) -> int:
    # A stable integer per source name (Python's hash() is salted per process).
    return int.from_bytes(name.encode()[:16].ljust(16, b"\0"), "little")


_SHARD_CACHE: OrderedDict[tuple, Shard] = OrderedDict()
_SHARD_CACHE_SIZE = 64
# Shard identities (the cache keys) whose sha256 this process has checked. Kept apart from the bounded cache: a
# reader that cycles through more shards than the cache holds would otherwise re-hash a whole shard per unit.
_VERIFIED: set[tuple] = set()


def _open_shard(plan: _SourcePlan, index: int) -> Shard:
    """Open (cached per process) shard `index` of `plan`; raises DataError naming it when missing or corrupt."""
    record = plan.shards[index]
    path = plan.directory / record["file"]
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, record.get("sha256"))
    except OSError:
        key = (str(path), None, None, None)
    shard = _SHARD_CACHE.get(key)
    if shard is None:
        verify = plan.verify and key not in _VERIFIED
        shard = Shard.open(path, record, verify=verify)
        if verify:
            _VERIFIED.add(key)
        _SHARD_CACHE[key] = shard
        if len(_SHARD_CACHE) > _SHARD_CACHE_SIZE:
            _SHARD_CACHE.popitem(last=False)
    else:
        _SHARD_CACHE.move_to_end(key)
    return shard


class _Stream:
    """One reader's token stream of one source: its units' documents end to end, epochs rolling over."""

    def __init__(
        self,
        plan: _SourcePlan,
        units: np.ndarray,
        position: np.ndarray,
        seed: int,
        on_corrupt: str,
        vocab_size: int | None = None,
    ):
        self.plan = plan
        self.units = units
        self.position = position  # int64 [U, 3]: epoch, next document offset in the unit, token offset; shared
        self.seed = seed
        self.on_corrupt = on_corrupt
        self.vocab_size = vocab_size
        self.queue: list[int] = []
        self.touched: set[int] = set()
        self.corrupt_skipped = 0
        self.bad_shards: set[int] = set()
        self._produced_since_refill = -1  # the first refill has no pass before it
        self._shard_index = -1
        self._shard: Shard | None = None

    def _refill(self) -> None:
        if len(self.units) == 0:
            raise DataError(f"source {self.plan.name!r}: this reader owns no units")
        # A whole pass over the units without a token would loop forever: all skipped as corrupt, or empty.
        if self._produced_since_refill == 0:
            raise DataError(
                f"source {self.plan.name!r} ({self.plan.directory}): no readable tokens in this reader's "
                f"{len(self.units)} units (all their shards corrupt or empty)"
            )
        self._produced_since_refill = 0
        epochs = self.position[self.units, 0]
        epoch = int(epochs.min())
        candidates = self.units[epochs == epoch]
        order = self.plan.epoch_order(self.seed, epoch)
        self.queue = candidates[np.argsort(order[candidates], kind="stable")].tolist()

    def _shard_for(self, unit: int) -> Shard | None:
        index = int(self.plan.unit_shard[unit])
        if index != self._shard_index:
            self._shard, self._shard_index = None, -1
            try:
                self._shard = _open_shard(self.plan, index)
            except DataError as e:
                if self.on_corrupt == "fail":
                    raise
                # Counted and reported once per reader and shard, however many of its units the reader owns.
                if index not in self.bad_shards:
                    warnings.warn(f"skipping corrupt shard: {e}", stacklevel=2)
                    self.corrupt_skipped += 1
                    self.bad_shards.add(index)
                return None
            self._shard_index = index
        return self._shard

    def _check_ids(self, chunk: np.ndarray, shard: Shard, document: int, offset: int) -> None:
        """Raise DataError naming the shard and document when `chunk` (tokens from `offset` on) holds an id
        outside the vocabulary."""
        # Under either on_corrupt policy: a shard that passed its checksum holds the id as written (another
        # tokenizer), and on a GPU the embedding lookup would fail as a device-side assert far from this cause.
        worst = int(chunk.argmax())
        if chunk[worst] >= self.vocab_size:
            raise DataError(
                f"shard {shard.path}: document {document} (key {shard.key(document)}) holds token id "
                f"{int(chunk[worst])} at token {offset + worst}, outside the vocabulary of {self.vocab_size} ids; "
                "were the shards tokenized with another tokenizer?"
            )

    def take(self, n: int, out: np.ndarray, starts: list[int]) -> None:
        """Fill `out[:n]` with the next n tokens; append the offsets where a document begins to `starts`."""
        filled = 0
        pos = self.position
        while filled < n:
            if not self.queue:
                self._refill()
            unit = self.queue[0]
            shard = self._shard_for(unit)
            lo, hi = int(self.plan.unit_lo[unit]), int(self.plan.unit_hi[unit])
            self.touched.add(unit)
            if shard is None:  # skipped as corrupt: the unit counts as read for this epoch
                pos[unit] = (pos[unit, 0] + 1, 0, 0)
                self.queue.pop(0)
                continue
            doc, tok = int(pos[unit, 1]), int(pos[unit, 2])
            before = filled
            while filled < n and doc < hi - lo:
                tokens = shard.document(lo + doc)
                if tok == 0:
                    starts.append(filled)
                k = min(len(tokens) - tok, n - filled)
                out[filled : filled + k] = tokens[tok : tok + k]
                if self.vocab_size is not None and k:
                    self._check_ids(out[filled : filled + k], shard, lo + doc, tok)
                filled += k
                tok += k
                if tok >= len(tokens):
                    doc, tok = doc + 1, 0
            self._produced_since_refill += filled - before
            if doc >= hi - lo:
                pos[unit] = (pos[unit, 0] + 1, 0, 0)
                self.queue.pop(0)
            else:
                pos[unit, 1], pos[unit, 2] = doc, tok


@dataclass
class _Config:
    """Everything a reader needs; pickled into DataLoader workers."""

    plans: list[_SourcePlan]
    mixture: Mixture
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    on_corrupt: str
    anneal_start: int | None
    vocab_size: int | None = None

    def annealing(self, step: int) -> bool:
        """True when the rows of `step` are drawn from the annealing mixture."""
        return self.anneal_start is not None and step >= self.anneal_start


class _Reader:
    """Produces the batches of one reader (rank, worker) from a starting state."""

    def __init__(self, cfg: _Config, reader: int, readers: int, positions: list[np.ndarray]):
        self.cfg = cfg
        self.streams = [
            _Stream(plan, plan.owned(reader, readers), positions[i].copy(), cfg.seed, cfg.on_corrupt, cfg.vocab_size)
            for i, plan in enumerate(cfg.plans)
        ]

    def batch(self, step: int, first_row: int) -> dict:
        """The rank's batch of `step`, whose first row has global row index `first_row`; with a state delta."""
        cfg = self.cfg
        sources = cfg.mixture.sample(np.arange(first_row, first_row + cfg.batch_size), cfg.annealing(step), cfg.seed)
        width = cfg.seq_len + 1
        tokens = np.empty((cfg.batch_size, width), dtype=np.int64)
        doc_ids = np.zeros((cfg.batch_size, width), dtype=np.int32)
        for row, source in enumerate(sources.tolist()):
            starts: list[int] = []
            self.streams[source].take(width, tokens[row], starts)
            doc_ids[row, [s for s in starts if s > 0]] = 1
        np.cumsum(doc_ids, axis=1, out=doc_ids)
        delta = []
        for stream in self.streams:
            units = np.fromiter(sorted(stream.touched), dtype=np.int64, count=len(stream.touched))
            delta.append((units, stream.position[units].copy()))
            stream.touched.clear()
        skipped = sum(s.corrupt_skipped for s in self.streams)
        for s in self.streams:
            s.corrupt_skipped = 0
        return {
            "step": step,
            # numpy, not tensors: pickled through the worker pipe instead of shared-memory file descriptors,
            # which are cheap at these sizes and leave nothing half-received when a worker dies.
            "tokens": tokens,
            "document_ids": doc_ids,
            "sources": sources,
            "delta": delta,
            "corrupt_skipped": skipped,
        }


class _WorkerDataset(IterableDataset):
    """The batch stream of one rank, split across DataLoader workers by step: worker w makes steps w, w+W, ... of it."""

    def __init__(self, cfg: _Config, positions: list[np.ndarray], step: int, rows: int):
        self.cfg, self.positions, self.step, self.rows = cfg, positions, step, rows

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.cfg
        # DataLoader fetches from worker 0 first, but step k always belongs to reader k mod workers, so a
        # resumed run (starting at any step) reads each step from the same units as an uninterrupted one.
        slot = (self.step + worker) % workers
        reader = _Reader(cfg, cfg.rank * workers + slot, cfg.world_size * workers, self.positions)
        global_batch = cfg.world_size * cfg.batch_size
        j = worker
        while True:
            yield reader.batch(self.step + j, self.rows + j * global_batch + cfg.rank * cfg.batch_size)
            j += workers


def _identity(x):
    return x


class PackedLoader:
    """Packs token shards into [B, seq_len + 1] rows with document ids; resumable, distributed, mixed."""

    def __init__(
        self,
        sources: Mixture | str | os.PathLike[str],
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_sha256: str | None = None,
        on_corrupt: str = "fail",
        total_steps: int | None = None,
        min_units: int = DEFAULT_MIN_UNITS,
        verify: bool = True,
        timeout: float = 600.0,
        multiprocessing_context: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """`batch_size` is per rank; `total_steps` places the annealing phase (a step is one batch).

        `vocab_size`: token ids must lie below it (a DataError names the shard and document of one that does not);
        None reads them unchecked.
        """
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if seq_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("seq_len and batch_size must be positive, num_workers non-negative")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive (or None: unchecked), got {vocab_size}")
        if not isinstance(sources, Mixture):
            path = Path(sources)
            sources = Mixture({path.name or "data": path}, {path.name or "data": 1.0})
        self.mixture = sources
        self.num_workers = num_workers
        self.timeout = timeout
        self.multiprocessing_context = multiprocessing_context
        plans = [
            _SourcePlan.build(name, sources.sources[name], seed, min_units, verify, tokenizer_sha256)
            for name in sources.names
        ]
        readers = world_size * max(1, num_workers)
        for plan in plans:
            if plan.num_units < readers:
                raise DataError(
                    f"source {plan.name!r} ({plan.directory}) splits into {plan.num_units} units (one per "
                    f"document at most), fewer than ranks x workers = {readers}; use fewer workers"
                )
        self._cfg = _Config(
            plans,
            sources,
            seq_len,
            batch_size,
            rank,
            world_size,
            seed,
            on_corrupt,
            sources.anneal_start(total_steps),
            vocab_size,
        )
        workers = max(1, num_workers)
        # A rank owns the units of its workers' readers, rank * workers ... (rank + 1) * workers - 1.
        self._owned = [np.flatnonzero(plan.assign % readers // workers == rank) for plan in plans]
        self._positions = [np.zeros((plan.num_units, 3), dtype=np.int64) for plan in plans]
        self._step = 0
        self._rows = 0
        self._source_rows = np.zeros(len(plans), dtype=np.int64)
        self._corrupt_skipped = 0
        self._iterator = None
        self._live: Iterator[Batch] | None = None

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current state on; a new iterator closes the previous one (one live at a time)."""
        if self._live is not None:
            self._live.close()
        self._live = self._batches()
        return self._live

    def _batches(self) -> Iterator[Batch]:
        cfg = self._cfg
        dataset = _WorkerDataset(cfg, [p.copy() for p in self._positions], self._step, self._rows)
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            self._iterator = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    timeout=self.timeout,
                    multiprocessing_context=self.multiprocessing_context,
                    prefetch_factor=2,
                )
            )
            source = self._iterator
        global_batch = cfg.world_size * cfg.batch_size
        try:
            for out in source:
                if out["step"] != self._step:
                    raise RuntimeError(f"loader out of order: got step {out['step']}, expected {self._step}")
                for positions, (units, values) in zip(self._positions, out["delta"], strict=True):
                    positions[np.asarray(units)] = np.asarray(values)
                rows = cfg.mixture.sample(
                    np.arange(self._rows, self._rows + global_batch), cfg.annealing(self._step), cfg.seed
                )
                self._source_rows += np.bincount(rows, minlength=len(cfg.plans))
                self._corrupt_skipped += int(out["corrupt_skipped"])
                self._step += 1
                self._rows += global_batch
                names = cfg.mixture.names
                yield Batch(
                    torch.from_numpy(out["tokens"]),
                    torch.from_numpy(out["document_ids"]),
                    [names[i] for i in np.asarray(out["sources"])],
                    out["step"],
                )
        except (ConnectionError, EOFError) as e:
            raise RuntimeError(f"a data loader worker died: {e!r}") from e
        except DataError as e:
            if self._iterator is None:
                raise
            # From a worker the message carries the worker's traceback; keep its last line, which names the file.
            last = str(e).strip().splitlines()[-1]
            raise DataError(last.split("DataError: ", 1)[-1]) from None
        finally:
            # Stop the workers now: left to the garbage collector, an errored DataLoader waits 5 s per worker.
            if self._iterator is not None:
                self._iterator._shutdown_workers()
            self._iterator = None

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Per-unit positions of this rank's units (-1 elsewhere), the global step and row count, counters."""
        sources = {}
        for plan, positions, owned in zip(self._cfg.plans, self._positions, self._owned, strict=True):
            mine = np.full_like(positions, -1)
            mine[owned] = positions[owned]
            sources[plan.name] = {"fingerprint": plan.fingerprint(), "position": mine.tolist()}
        return {
            "version": STATE_VERSION,
            "seed": self._cfg.seed,
            "step": self._step,
            "rows": self._rows,
            "source_rows": dict(zip(self._cfg.mixture.names, self._source_rows.tolist(), strict=True)),
            "corrupt_skipped": self._corrupt_skipped,
            "sources": sources,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from a global state (`merge_states`) or this rank's own; takes the part this rank owns now."""
        if self._live is not None:  # an iterator from before the restore would continue the old state
            self._live.close()
            self._live = None
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, this code reads {STATE_VERSION}")
        if state["seed"] != self._cfg.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self._cfg.seed}")
        for i, (plan, owned) in enumerate(zip(self._cfg.plans, self._owned, strict=True)):
            saved = state["sources"].get(plan.name)
            if saved is None:
                continue  # a source new to this run starts at its beginning
            if saved["fingerprint"] != plan.fingerprint():
                raise ValueError(
                    f"source {plan.name!r}: saved state is for {saved['fingerprint']} (shards, units, documents), "
                    f"the data now has {plan.fingerprint()}; was min_units or the data changed?"
                )
            position = np.asarray(saved["position"], dtype=np.int64).reshape(-1, 3)
            if (position[owned] < 0).any():
                raise ValueError(
                    f"source {plan.name!r}: the state lacks units this rank owns; gather every rank's "
                    "state_dict() and restore from merge_states(states)"
                )
            self._positions[i] = np.where(position < 0, 0, position)
        self._step = int(state["step"])
        self._rows = int(state["rows"])
        saved_rows = state.get("source_rows", {})
        self._source_rows = np.array([int(saved_rows.get(n, 0)) for n in self._cfg.mixture.names], dtype=np.int64)
        # Summed over ranks by merge_states; kept on rank 0 only so that a later sum stays right.
        self._corrupt_skipped = int(state.get("corrupt_skipped", 0)) if self._cfg.rank == 0 else 0

    def stats(self) -> dict:
        """Counters for the metrics log: step, realised source proportions (all ranks), corrupt shards skipped.

        `corrupt_skipped` counts, on this rank, each (reader, corrupt shard) pair met under on_corrupt="skip".
        """
        total = max(1, int(self._source_rows.sum()))
        names = self._cfg.mixture.names
        return {
            "step": self._step,
            "rows": self._rows,
            "phase": "anneal" if self._cfg.annealing(self._step) else "base",
            "source_rows": dict(zip(names, self._source_rows.tolist(), strict=True)),
            "proportions": {n: c / total for n, c in zip(names, self._source_rows.tolist(), strict=True)},
            "corrupt_skipped": self._corrupt_skipped,
            "epoch": {
                plan.name: int(pos[owned, 0].min()) if len(owned) else 0
                for plan, pos, owned in zip(self._cfg.plans, self._positions, self._owned, strict=True)
            },
        }


def merge_states(states: list[dict]) -> dict:
    """Combine every rank's `state_dict()` into one global state that any world size can restore from."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    for other in states[1:]:
        for key in ("version", "seed", "step", "rows"):
            if other[key] != first[key]:
                raise ValueError(f"ranks disagree on {key}: {first[key]} vs {other[key]}")
    merged_sources = {}
    for name, saved in first["sources"].items():
        merged = np.asarray(saved["position"], dtype=np.int64).reshape(-1, 3).copy()
        for other in states[1:]:
            theirs = np.asarray(other["sources"][name]["position"], dtype=np.int64).reshape(-1, 3)
            known = theirs[:, 0] >= 0
            clash = known & (merged[:, 0] >= 0) & (merged != theirs).any(axis=1)
            if clash.any():
                raise ValueError(f"source {name!r}: ranks report different positions for units {np.flatnonzero(clash)}")
            merged[known] = theirs[known]
        if (merged < 0).any():
            missing = np.flatnonzero((merged < 0).any(axis=1))
            raise ValueError(f"source {name!r}: no rank reports units {missing[:10].tolist()}; pass every rank's state")
        merged_sources[name] = {"fingerprint": saved["fingerprint"], "position": merged.tolist()}
    return {
        **first,
        "corrupt_skipped": sum(int(s.get("corrupt_skipped", 0)) for s in states),
        "sources": merged_sources,
    }
