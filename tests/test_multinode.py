"""Multi-node launching: two torchrun launchers (two "nodes" of one rank each) meet through the c10d rendezvous on
127.0.0.1 and train exactly like one launcher with two ranks.
"""

from __future__ import annotations

import os
import subprocess

from tests.dist_utils import PYTHON, ROOT, free_port
from tests.test_lm_training import SCRIPT, args, assert_same, losses, run, setup  # noqa: F401 (setup: a fixture)

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


def test_two_launchers_match_one_launcher(setup):  # noqa: F811
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
    logs = "\n".join((two / f"node{n}.log").read_text()[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    assert "dp_shard2" in logs  # one job of two ranks (each alone would be dp_shard1)
    got = losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same(got, losses(one), range(1, STEPS + 1))
