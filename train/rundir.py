"""One job per run directory: rank 0 holds ``RUN_DIR/run.lock`` (host, pid, Slurm job) from before the run writes
anything until its process exits (at interpreter exit, or in ``train.parallel.mesh.exit_rank``, which skips it).

A second job on the same directory would delete the first one's in-progress checkpoint (``step-N.tmp``) and
interleave ``metrics.jsonl``; it is refused instead, naming the holder, on every rank. A lock whose process is gone
(killed: no exit handler ran) is taken over with a warning when that can be checked: its pid is not running on
this host (or is another process now), or it was left on another host by an earlier run of this same Slurm job (a
requeued job starts only after the old one ended).
A lock from another host cannot be checked from here, so it is refused with the command that removes it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_held: list[tuple[Path, LockHolder]] = []  # the locks this process took, released at exit (release_held)


class RunDirLockedError(RuntimeError):
    """Another job holds the run directory, or its lock cannot be checked from this host."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory: where, which process (and when it started, against pid reuse), which job."""

    host: str
    pid: int
    process_start: str
    slurm_job_id: str
    since: str

    @classmethod
    def this_process(cls) -> LockHolder:
        """The holder this process would be."""
        pid = os.getpid()
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        return cls(socket.gethostname(), pid, process_start(pid) or "", os.environ.get("SLURM_JOB_ID", ""), since)

    def describe(self) -> str:
        """``pid 123 on host gpu-7 (Slurm job 42) since ...``."""
        job = f" (Slurm job {self.slurm_job_id})" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host}{job} since {self.since}"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces), or None where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None where it cannot be read."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat


def is_zombie(pid: int) -> bool:
    """Whether the process has exited and waits only to be reaped (state Z or X): a killed job's ranks stay so
    until their new parent reaps them, which in a container may be never."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def why_stale(holder: LockHolder, me: LockHolder) -> str | None:
    """Why ``holder``'s lock can be taken over by ``me``, or None while it may still be in use."""
    if holder.host != me.host:
        if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
            return f"it was left by an earlier run of this Slurm job ({holder.describe()})"
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"{holder.describe()} is no longer running"
    except PermissionError:
        pass  # alive, another user's
    if is_zombie(holder.pid):
        return f"{holder.describe()} has exited (a zombie, not yet reaped)"
    start = process_start(holder.pid)
    if holder.process_start and start is not None and start != holder.process_start:
        return f"pid {holder.pid} on host {holder.host} is another process now (the holder ended)"
    return None


def _refusal(path: Path, holder: LockHolder | None, me: LockHolder) -> str:
    if holder is None:
        return f"{path.parent} is locked by {path}, which cannot be read; if no job is using the directory: rm {path}"
    where = "a live process" if holder.host == me.host else "another host, where this one cannot check it"
    return (
        f"{path.parent} is in use by {holder.describe()} ({where}); two jobs on one run directory would corrupt "
        f"each other's checkpoints and metrics. Use another run.dir, or, if that job is gone: rm {path}"
    )


def _read(path: Path) -> LockHolder | None:
    """The lock's holder, or None if the file is not a lock (FileNotFoundError if it is gone)."""
    text = path.read_text()
    try:
        return LockHolder(**json.loads(text))
    except (ValueError, TypeError):
        return None


def acquire(run_dir: str | os.PathLike) -> Path:
    """Take ``run_dir``'s lock for this process (released at exit); raises RunDirLockedError naming the holder."""
    path = Path(run_dir, LOCK_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockHolder.this_process()
    tmp = path.with_name(f".{LOCK_NAME}.{me.host}.{me.pid}")
    tmp.write_text(json.dumps(asdict(me)))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, fails if the lock exists, and never exposes a half-written lock
                _held.append((path, me))
                return path
            except FileExistsError:
                pass
            try:
                holder = _read(path)
            except FileNotFoundError:
                continue  # released meanwhile
            if holder is not None and (holder.host, holder.pid) == (me.host, me.pid):
                return path  # this process holds it already (a second run in one process, e.g. tests)
            reason = why_stale(holder, me) if holder is not None else None
            if reason is None:
                raise RunDirLockedError(_refusal(path, holder, me))
            # Two jobs taking over one stale lock at the same instant could both succeed; rare enough to accept.
            log.warning("taking over the stale lock %s: %s", path, reason)
            path.unlink(missing_ok=True)
        raise RunDirLockedError(f"{path}: could not take the lock (other jobs keep taking it)")
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path, me: LockHolder) -> None:
    """Remove the lock if this process still holds it."""
    try:
        if _read(path) == me:
            path.unlink()
    except FileNotFoundError:
        pass


def release_held() -> None:
    """Release every lock this process took: at interpreter exit, and from ``exit_rank``, which skips it."""
    while _held:
        release(*_held.pop())


atexit.register(release_held)


def claim(run_dir: str | os.PathLike, rank: int) -> None:
    """Rank 0 takes the run directory's lock; every rank raises RunDirLockedError if it could not (a collective)."""
    refusal = None
    if rank == 0:
        try:
            acquire(run_dir)
        except RunDirLockedError as e:
            refusal = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunDirLockedError(refusal)
