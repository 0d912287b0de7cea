"""Multi-process test helpers: a toy entry script driving the shared training machinery, and a torchrun launcher.

Run as ``torchrun --nproc-per-node N tests/dist_utils.py --run.dir DIR [--section.key=value ...]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
if __name__ == "__main__":
    # As a torchrun script tests/ leads sys.path; the repo root must win so `train` is the package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, ROOT)

from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from train.config import JobConfig  # noqa: E402

# The interpreter running the tests, so torchrun children see the same environment wherever it lives.
PYTHON = sys.executable


# ----------------------------------------------------------------------------------------------------------------
# The toy problem.


@dataclass
class ToySection:
    """Toy model and fault injection knobs."""

    dim: int = 16
    n_blocks: int = 3
    dropout: float = 0.0
    # Return a NaN loss at this step (0 = never), or at every step from this one on (0 = never).
    nan_at_step: int = 0
    nan_from_step: int = 0
    # This rank exits abruptly at the start of this step (0 = never).
    kill_at_step: int = 0
    kill_rank: int = 1
    # This rank sends itself this signal during this step (0 = never), as a preempting cluster would.
    signal_at_step: int = 0
    signal_rank: int = 1
    signal_name: str = "SIGTERM"


@dataclass
class ToyConfig(JobConfig):
    """Root config of the toy entry."""

    toy: ToySection = field(default_factory=ToySection)


class Block(nn.Module):
    """Pre-norm residual MLP."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.w2(torch.nn.functional.gelu(self.w1(self.norm(x)))))


class ToyModel(nn.Module):
    """An embedding-free regression MLP with its blocks in a ModuleDict keyed by index (like the LM)."""

    def __init__(self, dim: int, n_blocks: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, dropout) for i in range(n_blocks)})
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers.values():
            h = block(h)
        return self.out(self.norm(h))  # [B, 1]: a fresh tensor (FSDP warns about returned views)


class ToyData:
    """Deterministic samples by global index; each rank takes its slice of every micro-batch.

    State is the number of samples consumed globally, so it is valid under any data-parallel layout.
    """

    def __init__(self, dim: int, global_batch: int, grad_accum: int, dp_rank: int, dp_size: int) -> None:
        self.dim, self.global_batch, self.accum = dim, global_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro = global_batch // grad_accum
        self.local = self.micro // dp_size
        self.consumed = 0  # global samples
        g = torch.Generator().manual_seed(1234)
        self.target = torch.randn(dim, generator=g)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + index)
        x = torch.randn(self.dim, generator=g)
        return x, torch.tanh(x @ self.target) + 0.1 * x[0] ** 2

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.consumed + self.dp_rank * self.local
        xs, ys = zip(*(self.sample(start + i) for i in range(self.local)), strict=True)
        self.consumed += self.micro
        return torch.stack(xs), torch.stack(ys)[:, None]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


def main(argv: list[str] | None = None) -> list[dict]:
    """The toy entry: the same steps an entry script takes (config, mesh, model, parallelize, data, train)."""
    from train.config import parse_cli
    from train.loop import compile_default, init_run, train
    from train.parallel.fsdp import parallelize
    from train.parallel.mesh import run_then_destroy

    cfg, _ = parse_cli(ToyConfig, argv)
    ctx = init_run(cfg)

    def run() -> list[dict]:
        model = ToyModel(cfg.toy.dim, cfg.toy.n_blocks, cfg.toy.dropout)
        parallelize(model, ctx.mesh, ac=cfg.train.ac, compile=compile_default(cfg))
        data = ToyData(cfg.toy.dim, cfg.train.batch_size, cfg.train.grad_accum, ctx.dp_rank, ctx.dp_size)

        def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
            x, y = batch
            pred = model(x)
            loss = torch.nn.functional.mse_loss(pred, y)
            step = -(-data.consumed // cfg.train.batch_size)  # the step this micro-batch belongs to
            if step == cfg.toy.nan_at_step or 0 < cfg.toy.nan_from_step <= step:
                loss = loss * float("nan")
            return loss, {"abs_err": (pred - y).abs().mean()}

        def extra_metrics(step: int) -> dict:
            if cfg.toy.kill_at_step and step + 1 == cfg.toy.kill_at_step and ctx.rank == cfg.toy.kill_rank:
                os._exit(9)  # dies without a word, like an OOM kill, after finishing step-1's record
            if step == cfg.toy.signal_at_step and ctx.rank == cfg.toy.signal_rank:
                os.kill(os.getpid(), signal.Signals[cfg.toy.signal_name])
            return {}

        return train(cfg, model, loss_fn, data, extra_metrics=extra_metrics)

    return run_then_destroy(run)


# ----------------------------------------------------------------------------------------------------------------
# Launching.


def torchrun(
    script: str, nproc: int, args: list[str], *, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` CPU ranks as torchrun starts them; returns the finished job (output captured).

    Each rank is ``python -u script args`` with torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), and, as torchrun's agent does, the first rank to fail
    ends the others and the job exits 1. Only torchrun's own process is left out: it imports torch before
    starting any rank (about 4 s a launch here, over some fifty launches in the suite). Real torchrun launches
    are tested by test_multinode.py, test_lm_training.py's killed run and `make quickstart`.
    """
    import tempfile
    import time

    port = free_port()
    base_env = dict(os.environ)
    base_env.update({"OMP_NUM_THREADS": str(threads_per_process(nproc)), "PYTHONUNBUFFERED": "1"})
    base_env.update(env or {})
    base_env.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc)}
        | {"LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"}
    )
    cmd = [PYTHON, "-u", script, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ranks = [
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=err, env={**base_env, "RANK": str(r), "LOCAL_RANK": str(r)}
            )
            for r in range(nproc)
        ]
        deadline, returncode = time.monotonic() + timeout, 0
        try:
            while any(p.poll() is None for p in ranks):
                if any(p.poll() not in (None, 0) for p in ranks):
                    returncode = 1
                    break
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                time.sleep(0.05)
        finally:
            for p in ranks:
                if p.poll() is None:
                    p.terminate()
            for p in ranks:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if any(p.returncode != 0 for p in ranks):
            returncode = 1
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())


def threads_per_process(nproc: int = 1) -> int:
    """Intra-op threads for each of ``nproc`` processes of one test: the machine's cores split among them and among
    pytest-xdist's workers, since OpenMP threads on a core another process holds spin rather than wait (a one-rank
    run alone gets every core; under ``make test``'s two workers, one)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // (nproc * workers))


def free_port() -> int:
    """An unused TCP port on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _modalities_worker(rank: int, fn, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from train.config import ParallelConfig
    from train.parallel.mesh import ParallelDims, build_mesh

    torch.set_num_threads(1)  # one thread per rank: two ranks share the 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = build_mesh(ParallelDims.from_config(ParallelConfig(), 2), "cpu")
        results = {modality: fn(modality, rank, mesh) for modality in ("vision", "video", "speech")}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def each_modality_on_two_ranks(fn, out_dir: str | os.PathLike) -> list[dict]:
    """``fn(modality, rank, mesh)`` for vision, video and speech on 2 spawned gloo ranks of one 2-way data-parallel
    mesh (``fn`` a module-level function returning JSON); each rank's results by modality."""
    import json

    import torch.multiprocessing as mp

    # Spawned, not forked: see tests/test_cp.py (autograd's threads may already run in this process).
    mp.start_processes(_modalities_worker, args=(fn, free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    results = []
    for rank in range(2):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


if __name__ == "__main__":
    from train.parallel.mesh import exit_rank

    main()
    exit_rank()
