"""train/slurm/train_lm.sbatch's preemption path, end to end on one machine: Slurm's B:USR1 warning reaches the batch
shell, which forwards it to srun; srun (a stand-in that execs its command, as the real one forwards signals to its
task) runs the real torchrun, which must forward SIGUSR1 to its workers; they checkpoint the step and exit, and the
shell requeues the job. The toy entry of tests/dist_utils.py stands in for train/lm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from dist_utils import PYTHON, ROOT, free_port
from test_train_machinery import args

from train.checkpoint import list_checkpoints
from train.metrics import read_metrics

FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done  # srun's own options
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "$2" >> "$REQUEUED" ;;
esac
"""


def fake_slurm(tmp_path) -> dict:
    """PATH with srun and scontrol stand-ins, and the job's Slurm environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node0",
        "GPUS_PER_NODE": "2",
        "PYTHON": PYTHON,
        "ENTRY": "tests/dist_utils.py",
        "RDZV_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "REQUEUED": str(tmp_path / "requeued"),
    }


def test_the_time_limit_warning_checkpoints_the_step_and_requeues_the_job(tmp_path):
    run_dir, config = tmp_path / "run", tmp_path / "toy.toml"
    config.write_text("")
    argv = args(run_dir, 100_000, "--checkpoint.interval=0")
    shell = subprocess.Popen(
        ["bash", "train/slurm/train_lm.sbatch", str(config), *argv],
        cwd=ROOT,
        env=fake_slurm(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(str(run_dir))) < 3:
            assert shell.poll() is None, shell.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no third step within 120 s"
            time.sleep(0.05)
        os.kill(shell.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does
        out, _ = shell.communicate(timeout=120)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert shell.returncode == 0, out[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["77"], out[-3000:]
    last = read_metrics(str(run_dir))[-1]["step"]
    assert [s for s, _ in list_checkpoints(str(run_dir / "checkpoints"))] == [last]
    assert 3 <= last < 100_000
    meta = json.loads((run_dir / "checkpoints" / f"step-{last}" / "meta.json").read_text())
    assert meta["step"] == last and meta["world_size"] == 2
