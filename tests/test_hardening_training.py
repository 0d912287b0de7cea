"""Training survives what clusters do to it: non-finite losses to the end, preemption signals, two jobs on one
run directory. Tiny toy runs (tests/dist_utils.py); multi-rank ones through its torchrun-like launcher."""

from __future__ import annotations

import os
import signal

import pytest
from dist_utils import main, torchrun
from test_train_machinery import SCRIPT, args, assert_close, check, losses

from train.loop import NonFiniteLossError
from train.preemption import Preempted

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
    preempted = torchrun(SCRIPT, 2, args(cut, 8, *extra, "--toy.signal_at_step=5", "--toy.signal_rank=1"))
    check(preempted)  # both ranks exit 0: rank 0 never got the signal but stopped with rank 1
    assert "preempted: stopped after step 5" in preempted.stderr
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-4", "step-5"]
    assert max(losses(cut)) == 5
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
