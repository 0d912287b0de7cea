"""Atomic file and directory commits: readers see the old content or the new, never a partial write.

A file is written under a temporary name in its own directory (a rename is atomic only within one filesystem),
flushed to disk, renamed over its final name, and the directory is flushed so the rename itself survives a crash.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (renames into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give a finished temporary file its final name: fsync it, rename it over `path`, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Write `path` through `write(tmp)` (tmp: a temporary path beside it), then commit it with `commit_file`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write` for a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


# A directory that `commit_directory` moved aside is named `.NAME` + OLD_MARK + pid.
OLD_MARK = ".old-"


def commit_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a fully written directory `staging` to `target`, replacing any directory there.

    The old `target` moves aside to `.NAME.old-PID` beside it first and is deleted only once the new one is in
    place, so a complete directory exists under one of the two names at every instant. The aside name is hidden
    and this process's own: a user's `NAME.old` is never touched.
    """
    target = os.fspath(target)
    parent, name = os.path.split(os.path.abspath(target))
    old = os.path.join(parent, f".{name}{OLD_MARK}{os.getpid()}")
    if os.path.exists(target):
        shutil.rmtree(old, ignore_errors=True)  # left by a crashed process of the same id: this function's own
        os.replace(target, old)
    os.replace(staging, target)
    fsync_directory(os.path.dirname(os.path.abspath(target)))
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["OLD_MARK", "atomic_write", "atomic_write_text", "commit_directory", "commit_file", "fsync_directory"]
