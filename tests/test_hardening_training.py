"""Training survives what clusters do to it: non-finite losses to the end, preemption signals, two jobs on one
run directory. Tiny toy runs (tests/dist_utils.py); multi-rank ones through its torchrun-like launcher."""

from __future__ import annotations

import os

import pytest
from dist_utils import main
from test_train_machinery import args

from train.loop import NonFiniteLossError

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
