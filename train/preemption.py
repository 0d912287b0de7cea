"""Preemption: a signal (SIGTERM, or a scheduler's early warning such as Slurm's ``--signal=USR1@120``) asks the run
to finish its step, checkpoint there and exit with code 0; the rerun (a requeued job) resumes exactly.

A signal may reach only some ranks, or reach them during different steps, so no rank acts on its own: each step
ends with one all-reduce (MAX) of every rank's "got a signal" flag, and all ranks stop after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised once the preemption checkpoint is committed: the process exits with code 0, skipping whatever the
    entry would do after a finished run (exports, final reports)."""

    def __init__(self, step: int) -> None:
        super().__init__(0)
        self.step = step


class PreemptionWatch:
    """While entered, ``signals`` (names such as ``"SIGTERM"``) only set a flag; :meth:`requested` agrees on it."""

    def __init__(self, signals: Iterable[str], device: torch.device) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.device = device
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        # Python delivers signals to the main thread only, and only it may install handlers.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: stopping after this step with a checkpoint", self.received.name)

    def requested(self) -> bool:
        """True on every rank if any rank has received one of the signals; a collective when the world has > 1."""
        if not self.signals:
            return False  # the same config on every rank: all of them skip the collective
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
