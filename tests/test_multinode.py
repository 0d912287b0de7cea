"""Multi-node launching: two torchrun launchers (two "nodes" of one rank each) meet through the c10d rendezvous on
127.0.0.1 and train exactly like one launcher with two ranks.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.dist_utils import PYTHON, ROOT, free_port
from tests.lm_runs import SCRIPT, args, assert_same, losses, run

STEPS = 4


def launch_node(port: int, node: int, argv: list[str]) -> subprocess.Popen:
    """One launcher of a 2-node job: `torchrun --nnodes 2 --nproc-per-node 1` with the c10d rendezvous."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode-test"]
    # Both launchers share this host: the first to bind the endpoint hosts the store, the other joins it.
    cmd += ["--local-addr", "127.0.0.1", SCRIPT, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(argv_run_dir(argv), f"node{node}.log"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def argv_run_dir(argv: list[str]) -> str:
    """The --run.dir of a command line (created: the launchers' logs go there)."""
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--run.dir="))
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def test_two_launchers_match_one_launcher(setup):
    """FSDP over 2 ranks, started as 2 nodes x 1 rank through c10d, gives the 2-rank single launcher's losses."""
    one = setup / "one_launcher"
    run(2, args(setup, one, f"--train.steps={STEPS}"))

    two = setup / "two_launchers"
    argv = args(setup, two, f"--train.steps={STEPS}")
    port = free_port()
    nodes = [launch_node(port, node, argv) for node in range(2)]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    logs = [(two / f"node{n}.log").read_text() for n in range(2)]
    tails = "\n".join(log[-3000:] for log in logs)
    assert codes == [0, 0], tails
    # One job of two ranks (each alone would be dp_shard1). Read from the whole logs: the launcher that finishes last
    # may end its log with a long note that the store had already closed (exit 0 all the same).
    assert "dp_shard2" in "".join(logs), tails
    got = losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same(got, losses(one), range(1, STEPS + 1))


def test_slurm_script_launches_torchrun_per_node(tmp_path):
    """`sbatch train/slurm/llama3_405b.sbatch`, with srun and scontrol stubbed: one torchrun per node, 8 GPUs each,
    the c10d rendezvous on the first node of the allocation, the preemption signals forwarded, the 405B config and
    the overrides passed through."""
    for script in ("train_lm.sbatch", "llama3_405b.sbatch"):
        lint = subprocess.run(["bash", "-n", f"train/slurm/{script}"], cwd=ROOT, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stderr
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text('#!/bin/sh\nprintf "gpu-node-017\\ngpu-node-018\\n"\n')
    (stubs / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[017-018]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": ROOT,
    }
    script = Path(ROOT, "train/slurm/llama3_405b.sbatch")
    proc = subprocess.run(
        ["bash", str(script), "--train.steps=10"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    (launch,) = [line for line in proc.stdout.splitlines() if line.startswith("srun ")]
    assert launch.split() == [
        "srun",
        "--kill-on-bad-exit=1",
        ".venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "gpu-node-017:29500",
        "--rdzv-id",
        "4242",
        # Preemption: torchrun forwards the time-limit warning (SIGUSR1) to its workers, which checkpoint and exit
        # within the grace (tests/test_slurm_preemption.py runs that chain).
        "--signals-to-handle",
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout",
        "570",
        "train/lm.py",
        "--config",
        "configs/lm/llama3_405b.toml",
        "--train.steps=10",
    ]
