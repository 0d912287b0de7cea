"""Training survives what clusters do to it: non-finite losses to the end, preemption signals, two jobs on one
run directory. Tiny toy runs (tests/dist_utils.py); multi-rank ones through its torchrun-like launcher."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
from dist_utils import main, torchrun
from test_train_machinery import SCRIPT, args, assert_close, check, losses

from train.loop import NonFiniteLossError
from train.preemption import Preempted
from train.rundir import LOCK_NAME, LockHolder, RunDirLockedError, is_zombie, process_start

# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses with train.skip_nonfinite.


def test_a_skipped_last_step_still_leaves_the_final_checkpoint(tmp_path):
    run = tmp_path / "run"
    recs = main(args(run, 5, "--toy.nan_at_step=5", "--train.skip_nonfinite=true"))
    assert recs[-1]["step"] == 5 and recs[-1]["skipped"] is True
    assert sorted(os.listdir(run / "checkpoints")) == ["step-3", "step-5"]


def test_a_run_that_only_produces_nan_stops_naming_the_steps(tmp_path, capsys):
    skip = ("--toy.nan_from_step=2", "--train.skip_nonfinite=true", "--train.max_consecutive_skips=3")
    with pytest.raises(NonFiniteLossError, match="from 2 to 5"):
        main(args(tmp_path / "nan", 10, *skip))
    # Skips that end (a bad batch here and there) reset the count.
    recs = main(args(tmp_path / "bad_batches", 6, "--toy.nan_at_step=2", *skip[1:]))
    assert [r.get("skipped", False) for r in recs] == [False, True, False, False, False, False]
    with pytest.raises(SystemExit):
        main(args(tmp_path / "zero", 2, "--train.max_consecutive_skips=0"))
    assert "train.max_consecutive_skips: expected a value >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Preemption: a signal checkpoints the current step on every rank and exits cleanly; the rerun resumes exactly.


def test_sigterm_to_one_rank_checkpoints_every_rank_at_that_step_and_the_rerun_resumes_exactly(tmp_path):
    # Dropout and gradient accumulation: the resumed steps must see the same RNG streams and data positions.
    extra = ("--toy.dropout=0.2", "--train.grad_accum=2", "--checkpoint.interval=4")
    full, cut = tmp_path / "full", tmp_path / "cut"
    check(torchrun(SCRIPT, 2, args(full, 8, *extra)))
    assert not (full / LOCK_NAME).exists()  # released by exit_rank, which skips the interpreter's exit handlers
    preempted = torchrun(SCRIPT, 2, args(cut, 8, *extra, "--toy.signal_at_step=5", "--toy.signal_rank=1"))
    check(preempted)  # both ranks exit 0: rank 0 never got the signal but stopped with rank 1
    assert "preempted: stopped after step 5" in preempted.stderr
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-4", "step-5"]
    assert max(losses(cut)) == 5
    assert not (cut / LOCK_NAME).exists()  # released at the clean exit
    check(torchrun(SCRIPT, 2, args(cut, 8, *extra)))
    assert_close(losses(cut), losses(full), range(1, 9), 1e-6)


def test_the_early_warning_signal_preempts_and_others_are_left_alone(tmp_path):
    """SIGUSR1 (Slurm's --signal=USR1@120) is watched by default; the handlers are put back after the run."""
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        main(args(tmp_path / "usr1", 8, "--toy.signal_at_step=2", "--toy.signal_rank=0", "--toy.signal_name=SIGUSR1"))
    assert stopped.value.code == 0 and stopped.value.step == 2
    assert sorted(os.listdir(tmp_path / "usr1" / "checkpoints")) == ["step-2"]
    assert signal.getsignal(signal.SIGUSR1) == before
    resumed = main(args(tmp_path / "usr1", 8))
    assert [r["step"] for r in resumed] == [3, 4, 5, 6, 7, 8]
    # A signal left out of run.preempt_signals keeps its handler (a recording one here: the default kills pytest).
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(True))
    try:
        unwatched = ("--toy.signal_at_step=2", "--toy.signal_rank=0", "--toy.signal_name=SIGUSR1")
        recs = main(args(tmp_path / "term_only", 4, *unwatched, '--run.preempt_signals=["SIGTERM"]'))
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert got and [r["step"] for r in recs] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# Two jobs on one run directory: the second is refused, naming the first; a dead job's lock is taken over.


def write_lock(run_dir, host: str, pid: int, job: str = "") -> LockHolder:
    holder = LockHolder(host, pid, process_start(pid) or "", job, "2026-01-01 00:00:00 UTC")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(asdict(holder)))
    return holder


def test_a_live_holder_refuses_a_second_job_on_every_rank(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        holder = write_lock(run, socket.gethostname(), first.pid)
        t0 = time.monotonic()
        second = torchrun(SCRIPT, 2, args(run, 4, "--run.timeout_s=60"), timeout=120)
        check(second, ok=False)
        assert time.monotonic() - t0 < 50  # both ranks stopped at once: rank 1 did not wait in a collective
        assert second.stderr.count(f"in use by {holder.describe()}") >= 2, second.stderr[-3000:]
        assert f"rm {run / LOCK_NAME}" in second.stderr
        assert sorted(os.listdir(run)) == [LOCK_NAME]  # nothing of the first job's touched, nothing written
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    write_lock(run, "gpu-node-7", 4242, job="123")
    with pytest.raises(RunDirLockedError, match=rf"pid 4242 on host gpu-node-7 \(Slurm job 123\).*rm {run}"):
        main(args(run, 2))
    assert sorted(os.listdir(run)) == [LOCK_NAME]


def test_a_dead_holder_s_lock_is_taken_over_with_a_warning(tmp_path, caplog, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    write_lock(run, socket.gethostname(), gone.pid)
    with caplog.at_level(logging.WARNING, logger="train.rundir"):
        assert [r["step"] for r in main(args(run, 2))] == [1, 2]
    assert f"pid {gone.pid} on host {socket.gethostname()}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()  # ours until this process exits
    # A requeued Slurm job (same job id, maybe another first node) takes over its earlier run's lock.
    requeued = tmp_path / "requeued"
    write_lock(requeued, "gpu-node-7", 4242, job="123")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert [r["step"] for r in main(args(requeued, 2))] == [1, 2]


def test_a_killed_job_s_unreaped_rank_does_not_hold_the_lock(tmp_path, caplog):
    """SIGKILLed ranks stay zombies until their new parent reaps them (in a container, maybe never): the resumed
    job takes their lock over instead of reporting a live holder (seen in the killed-run resume test)."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        run = tmp_path / "run"
        write_lock(run, socket.gethostname(), rank.pid)
        rank.kill()
        deadline = time.monotonic() + 30
        while not is_zombie(rank.pid):  # exited, not yet reaped by us
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="train.rundir"):
            assert [r["step"] for r in main(args(run, 2))] == [1, 2]
        assert "zombie" in caplog.text
    finally:
        rank.kill()
        rank.wait()
