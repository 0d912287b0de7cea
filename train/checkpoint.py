"""Distributed checkpoints (DCP) with atomic commit, pruning, auto-resume and resharding; safetensors export.

Layout of ``RUN_DIR/checkpoints``::

    step-300/            a complete checkpoint
        .metadata        DCP's index (global tensor shapes, so any layout can load it)
        __0_0.distcp ... the shards each rank wrote
        meta.json        step, LR schedule, data-loader state per rank (or one global state), RNG state per rank, layout
    step-400.tmp/        a save in progress (or one that crashed): never loaded

A save writes ``step-N.tmp``, waits for every rank, writes ``meta.json`` last and then renames the directory to
``step-N`` (an atomic rename on one filesystem), so a crash at any point leaves the previous checkpoint intact.
Resume and export read ``.metadata`` (a pickle) admitting only DCP's metadata classes, and take the newest
checkpoint that verifies (``verify_checkpoint``: metadata parses, every shard file holds the bytes it lists,
meta.json parses), warning about each newer one skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from common.atomic import OLD_MARK, atomic_write_text, commit_directory
from train.config import CheckpointConfig
from train.parallel.mesh import barrier as _barrier
from train.parallel.mesh import rank as _rank
from train.parallel.mesh import world_size as _world

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
META = "meta.json"
# Fault injection for tests: the rank-0 process exits between writing a checkpoint and committing it.
CRASH_BEFORE_COMMIT_ENV = "TRAIN_CRASH_BEFORE_COMMIT_STEP"
# Optimizer state keyed by parameter name, hyperparameters included ("param_groups.layers.3.attention.wq.weight.lr"):
# a pipeline stage holds only some parameters, and the unflattened form's per-group lists of names would differ
# from rank to rank, so only one rank's list would be saved and checkpoints could not move between layouts.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or unreadable."""


# ----------------------------------------------------------------------------------------------------------------
# DCP's .metadata is a pickle: it is read admitting only the classes a genuine one holds (found by unpickling real
# checkpoints), so a tampered checkpoint directory cannot run code on resume or export.

METADATA = ".metadata"
_DCP_METADATA_GLOBALS = frozenset(
    [
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
        *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    ]
)


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only DCP metadata classes, torch.Size, dtypes and layouts, and paths."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global `module.name`; anything else is refused, naming the file."""
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self.source}: refusing to load {module}.{name}: not a DCP metadata class")


def _unpickle_metadata(stream: Any, source: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(stream, source).load()
    except Exception as e:  # a truncated or foreign pickle raises anything from EOFError to TypeError
        raise CheckpointError(f"{source} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def read_dcp_metadata(checkpoint: str | os.PathLike) -> Metadata:
    """The DCP metadata of checkpoint directory `checkpoint`, read with the restricted unpickler."""
    source = os.path.join(checkpoint, METADATA)
    try:
        with open(source, "rb") as f:
            return _unpickle_metadata(f, source)
    except OSError as e:
        raise CheckpointError(f"{source} cannot be read: {e.strerror or e}") from None


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, its `.metadata` read with the restricted unpickler: pass it as storage_reader."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's Metadata, as FileSystemReader returns it, admitting only DCP metadata classes."""
        source = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(source, "rb") as stream:
            metadata = _unpickle_metadata(stream, str(source))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a non-tensor value must unpickle with torch's weights_only loader
    (DCP itself loads them with weights_only=False: a tampered shard file could run code)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Load one non-tensor value (optimizer hyperparameters) once torch.load(weights_only=True) admits it."""
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"refusing to load {read_item.dest_index.fqn}: {type(e).__name__}: {e}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


# ----------------------------------------------------------------------------------------------------------------
# RNG state (per rank: dropout, masking and sampling draw from each rank's own generators).


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch CPU (and CUDA) generator states, JSON-able."""
    state: dict[str, Any] = {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": base64.b64encode(_np_state_bytes()).decode(),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _np_state_bytes() -> bytes:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]).encode()


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states written by :func:`rng_state`."""
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = json.loads(base64.b64decode(state["numpy"]))
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Finding checkpoints.


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a committed checkpoint: not a ``.tmp`` save, DCP metadata and meta.json present."""
    if os.path.basename(os.path.normpath(path)).endswith(".tmp"):
        return False
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, META))


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Committed-looking ``step-N`` directories in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise a CheckpointError naming the fault unless ``path`` is a committed checkpoint whose files all load:
    .metadata parses, every storage file it references holds the bytes it needs, meta.json parses."""
    if os.path.basename(os.path.normpath(path)).endswith(".tmp"):
        raise CheckpointError(f"{path} is a save that never committed")
    metadata = read_dcp_metadata(path)
    needed: dict[str, int] = {}
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for info in storage.values():
        name, offset, length = (getattr(info, key, None) for key in ("relative_path", "offset", "length"))
        if not (isinstance(name, str) and isinstance(offset, int) and isinstance(length, int)):
            raise CheckpointError(f"{path}/{METADATA}: malformed storage entry {info!r}")
        if os.path.basename(name) != name:
            raise CheckpointError(f"{path}/{METADATA} names a storage file outside the checkpoint: {name!r}")
        needed[name] = max(needed.get(name, 0), offset + length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (named by {METADATA})")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{file} is truncated: {os.path.getsize(file)} bytes, {METADATA} needs {size}")
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, META)} cannot be read: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{os.path.join(path, META)} has no integer 'step'")


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint in ``ckpt_dir`` that verifies; newer damaged ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            # A requeued job must not crash-loop on a damaged newest save: the one before it resumes instead.
            warnings.warn(f"skipping incomplete checkpoint {path}: {e}", stacklevel=2)
            log.warning("skipping incomplete checkpoint %s: %s", path, e)
            continue
        return path
    return None


def _gather(obj: Any) -> list[Any]:
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The checkpointer the training loop drives.


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data-loader state, RNG and step with DCP.

    ``data`` is anything with ``state_dict()`` / ``load_state_dict()`` returning JSON-able dicts (the loader).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        data: Any = None,
        *,
        seed: int = 0,
        async_save: bool | None = None,
        trainable_only: bool = False,
    ) -> None:
        self.cfg = cfg
        # trainable_only: frozen parameters (a frozen LM under adapters) are left out of saves and loads; the
        # entry rebuilds them from their own checkpoint, so each save holds only what trains.
        self._options = (
            dataclasses.replace(_OPTIONS, ignore_frozen_params=True, strict=False) if trainable_only else _OPTIONS
        )
        self.dir = os.path.join(run_dir, "checkpoints")
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.seed = seed
        # Async writes overlap GPU training; on CPU the "background" thread would compete for the same cores, so
        # checkpoint.async_save applies on CUDA only. An explicit ``async_save=True`` forces it (tests on CPU).
        self.async_save = bool(async_save) if async_save is not None else cfg.async_save and torch.cuda.is_available()
        self._pending: tuple[Any, str, str, int, dict] | None = None
        # Background DCP collectives need their own (gloo) group so they never interleave with the main thread's.
        self._async_pg = dist.new_group(backend="gloo") if self.async_save and dist.is_initialized() else None

    # -- saving ---------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options)
        return {"model": model_sd, "optim": optim_sd}

    def _meta(self, step: int) -> dict[str, Any]:
        data_state = self.data.state_dict() if self.data is not None and hasattr(self.data, "state_dict") else None
        # A loader whose state_dict() is already global, the same on every rank (train.media.MediaStreamBatches
        # gathers and merges its ranks'), is saved once: rank 0's copy, not one per rank.
        shared = getattr(self.data, "global_state", False)
        per_rank = _gather({"data": None if shared else data_state, "rng": rng_state()})
        return {
            "step": step,
            "world_size": _world(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "data": [data_state] if shared else [r["data"] for r in per_rank],
            "rng": [r["rng"] for r in per_rank],
        }

    def should_save(self, step: int, last: bool) -> bool:
        """True at every ``checkpoint.interval`` steps and at the last step."""
        if not self.cfg.enable:
            return False
        return last or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def save(self, step: int) -> str:
        """Write ``step-N.tmp`` on all ranks, then commit it to ``step-N``; returns the final path."""
        self.wait()  # one save in flight at a time
        final = os.path.join(self.dir, f"step-{step}")
        tmp = final + ".tmp"
        if _rank() == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.exists(tmp):  # left by a crash: never trusted
                shutil.rmtree(tmp)
        _barrier()
        state = self._state()
        meta = self._meta(step)
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_pg)
            self._pending = (fut, tmp, final, step, meta)
        else:
            # One rank needs no collectives, and they cost: gloo runs them on its own threads, where copying the
            # save plans opens an OpenMP team; libgomp, then managing more threads than cores, stops the workers
            # of every team spinning, and each later step on 2 threads ran up to half as fast (bench/RESULTS.md).
            dcp.save(state, checkpoint_id=tmp, no_dist=_world() == 1)
            self._commit(tmp, final, step, meta)
        return final

    def wait(self) -> None:
        """Finish an async save in flight (then commit it)."""
        if self._pending is None:
            return
        fut, tmp, final, step, meta = self._pending
        self._pending = None
        fut.result()
        self._commit(tmp, final, step, meta)

    def _commit(self, tmp: str, final: str, step: int, meta: dict) -> None:
        _barrier()  # every rank's shards are written
        if _rank() == 0:
            atomic_write_text(Path(tmp, META), json.dumps(meta))
            if os.environ.get(CRASH_BEFORE_COMMIT_ENV) == str(step):
                log.error("fault injection: exiting before committing %s", tmp)
                os._exit(17)
            # Re-saving a step (after resuming from an older checkpoint) keeps the old copy until the new one is in.
            commit_directory(tmp, final)
            self._prune()
            log.info("checkpoint saved: %s", final)
        _barrier()  # nobody runs ahead of the commit

    def _prune(self) -> None:
        """Keep the newest ``checkpoint.keep`` complete checkpoints; drop saves that crashed before committing."""
        complete = [(s, p) for s, p in list_checkpoints(self.dir) if is_complete(p)]
        if self.cfg.keep > 0:
            for _, path in complete[: -self.cfg.keep]:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.dir):
            crashed_save = name.startswith("step-") and name.endswith((".tmp", ".old"))
            if crashed_save or (name.startswith(".step-") and OLD_MARK in name):
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    # -- loading --------------------------------------------------------------------------------------------

    def resume_path(self) -> str | None:
        """The checkpoint to resume from: ``checkpoint.resume`` (must be complete) or the newest in the run dir."""
        if self.cfg.resume:
            path = self.cfg.resume
            if not os.path.isdir(path):
                raise CheckpointError(f"checkpoint.resume: {path} does not exist")
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint.resume: {path} is incomplete or corrupt: {e}") from None
            return path
        if not self.cfg.auto_resume:
            return None
        path = latest_checkpoint(self.dir)
        damaged = [p for _, p in list_checkpoints(self.dir)]
        if path is None and damaged:
            # Starting over would let pruning delete checkpoints that may still be repairable.
            raise CheckpointError(
                f"no checkpoint in {self.dir} verifies ({', '.join(damaged)}): refusing to start over beside them; "
                "move them away, or set checkpoint.auto_resume=false or checkpoint.resume"
            )
        return path

    def load(self, path: str) -> int:
        """Restore every piece of state from ``path`` (any parallel layout); returns the step it was saved at."""
        try:
            with open(os.path.join(path, META)) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path}: cannot read {META}: {e}") from e
        state = self._state()
        try:
            dcp.load(state, checkpoint_id=path, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                     no_dist=_world() == 1)  # as in save
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from e
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._options,
        )
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        rank, same_layout = _rank(), meta.get("world_size") == _world()
        if self.data is not None and hasattr(self.data, "load_state_dict") and meta.get("data"):
            # Loader states are global-compatible: a new layout takes rank 0's and re-derives its own share; a
            # global state saved once serves every rank.
            states = meta["data"]
            self.data.load_state_dict(states[rank if same_layout and len(states) > 1 else 0])
        if same_layout:
            set_rng_state(meta["rng"][rank])
        else:
            # The per-rank generators of another layout have no counterpart here: reseed deterministically.
            seed_everything(self.seed + 1_000_003 * meta["step"] + rank)
        return int(meta["step"])

    def maybe_resume(self) -> int:
        """Load the resume checkpoint if there is one; returns the step to continue after (0 = fresh)."""
        path = self.resume_path()
        if path is None:
            return 0
        step = self.load(path)
        if _rank() == 0:
            log.info("resumed from %s (step %d)", path, step)
        return step

    def close(self) -> None:
        """Finish pending work."""
        self.wait()


# ----------------------------------------------------------------------------------------------------------------
# Export of full (unsharded) weights.


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU, on rank 0 (empty elsewhere); a collective: call on every rank."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
