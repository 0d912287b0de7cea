"""bench/mfu.py, the script a lent GPU session runs, works end to end (here on CPU, tiny) so it does not rot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mfu_bench_runs_the_trainer_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_mfu", ROOT / "bench" / "mfu.py")
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    out = tmp_path / "mfu.json"
    argv = ["--config", str(ROOT / "configs/lm/debug.toml"), "--preset", "debug", "--layers", "1", "--dim", "64"]
    argv += ["--seq", "32", "--batch", "2", "--steps", "3", "--no-compile", "--json", str(out)]
    result = mfu.main([*argv, "--run-dir", str(tmp_path / "run")])
    assert out.is_file()
    assert result["tokens_per_s"] > 0 and result["matmul_roof_tflops"] > 0
    assert 0 < result["fraction_of_matmul_roof"] < 2
    assert result["mfu"] is None  # no datasheet peak on CPU
    assert math.isfinite(result["last_loss"]) and result["last_loss"] > 0
