"""The one place that starts the process group and builds the device mesh.

Mesh dimensions, outermost to innermost: ``[dp_replicate, dp_shard, pp, cp, tp]``. TP is innermost so its ranks
are contiguous (inside one node); data parallel is outermost. Derived (flattened) dimensions:

* ``dp``: ``dp_replicate x dp_shard``: ranks that read different data.
* ``dp_shard_cp``: ``dp_shard x cp``: ranks FSDP shards parameters over (CP ranks hold the same weights).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ParallelConfig
from train.rundir import release_held

log = logging.getLogger(__name__)
T = TypeVar("T")

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "cp", "tp")


class MeshError(ValueError):
    """A parallel layout that does not fit the world."""


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees; ``dp_shard = -1`` in the config takes the rest of the world."""

    dp_replicate: int
    dp_shard: int
    pp: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve ``parallel`` (a ParallelConfig) against ``world_size``; a layout that cannot fit raises."""
        degrees = {d: int(getattr(parallel, d)) for d in MESH_DIMS}
        for name, deg in degrees.items():
            if deg < 1 and not (name == "dp_shard" and deg == -1):
                raise MeshError(f"parallel.{name} must be >= 1 (dp_shard may be -1), got {deg}")
        others = degrees["dp_replicate"] * degrees["pp"] * degrees["cp"] * degrees["tp"]
        if degrees["dp_shard"] == -1:
            if world_size % others:
                raise MeshError(
                    f"world size {world_size} is not divisible by dp_replicate*pp*cp*tp = {others} "
                    f"({_layout(degrees)}), so dp_shard=-1 cannot take the rest"
                )
            degrees["dp_shard"] = world_size // others
        product = others * degrees["dp_shard"]
        if product != world_size:
            raise MeshError(
                f"parallel degrees {_layout(degrees)} multiply to {product}, but the world size is {world_size}"
            )
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks parameters are sharded over."""
        return self.dp_shard * self.cp

    def shape(self) -> tuple[int, ...]:
        """Mesh shape in MESH_DIMS order."""
        return tuple(getattr(self, d) for d in MESH_DIMS)


def _layout(degrees: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in degrees.items())


def device_type() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float = 600.0) -> None:
    """Start the default process group: gloo on CPU, NCCL (+ gloo for CPU tensors) on CUDA.

    Under torchrun the env vars say where the peers are. A plain ``python`` launch gets a one-rank group on a
    local store, so the same code path (DTensor, DCP) runs everywhere. The timeout bounds every collective, so a
    peer that died makes the survivors raise instead of hanging (torchrun also tears the group down).
    """
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; a no-op alone."""
    if world_size() > 1:
        dist.barrier()


def destroy_distributed(*, together: bool = False) -> None:
    """Tear the process group down (safe to call when none is up); ``together``: after a barrier, on the path where
    every rank finished, so that no rank closes its gloo pairs while a peer still reads its last message (seen as
    "terminate called without an active exception" at exit). Never after a failure: the peers may not be there."""
    if dist.is_initialized():
        if together and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def run_then_destroy(work: Callable[[], T]) -> T:
    """``work()``, then the process group torn down: together after it finished, at once after a failure."""
    try:
        result = work()
    except BaseException:
        destroy_distributed()
        raise
    destroy_distributed(together=True)
    return result


def exit_rank(code: int = 0) -> NoReturn:
    """End this rank's process now, its output flushed, skipping the interpreter's finalization.

    Called by entry scripts once ``main`` has returned (the process group already destroyed). Gloo's C++ threads
    and the tensors they hold can outlive ``destroy_process_group`` until finalization, where freeing them races
    the interpreter's own teardown and, now and then, aborts the rank ("terminate called without an active
    exception") with its work done and saved. Nothing is left to run at that point but the release of the run
    directory's lock, so release it and skip finalization.
    """
    release_held()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def build_mesh(dims: ParallelDims, device: str | None = None) -> DeviceMesh:
    """Build the 5-D mesh (size-1 dims included, so every name exists) and its flattened dp dims."""
    if dist.get_world_size() != dims.world_size:
        raise MeshError(f"process group has {dist.get_world_size()} ranks, layout expects {dims.world_size}")
    mesh = init_device_mesh(device or device_type(), dims.shape(), mesh_dim_names=MESH_DIMS)
    # Flattened views: the data-parallel group (different data) and the FSDP shard group (dp_shard x cp). Newer
    # torch wants flattened meshes kept by the caller rather than sliced back out of the root: keep them here.
    _FLAT.clear()
    _FLAT["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    _FLAT["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh


_FLAT: dict[str, DeviceMesh] = {}


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """A 1-D mesh by name: one of MESH_DIMS, or a flattened ``dp`` / ``dp_shard_cp``."""
    if name in _FLAT:
        return _FLAT[name]
    return mesh[name]


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among data-parallel ranks and their number (for data sharding and global losses)."""
    dp = submesh(mesh, "dp")
    return dp.get_local_rank(), dp.size()


def setup(parallel: ParallelConfig, timeout_s: float = 600.0) -> tuple[ParallelDims, DeviceMesh]:
    """Validate the layout against the world size first, then start the group and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    dims = ParallelDims.from_config(parallel, world)  # fails before any process group work
    init_distributed(timeout_s)
    return dims, build_mesh(dims)
