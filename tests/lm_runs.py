"""Shared pieces of the `torchrun train/lm.py` tests: one small corpus, one init checkpoint, one command line.

Every layout starts from the same weights, read from the init checkpoint (`--model.init_from`) or drawn by the
trainer's own random init (`random_init=True`: the same bits, as the checkpoint is `init_weights(seed=0)`), and
reads the same global batches (`--data.readers 4`), so the losses of each step must agree across layouts up to
fp32 summation order. `setup` and the 1-rank `reference` are session fixtures (registered in conftest.py): the
LM, context-parallel, pipeline and multi-node test modules share one corpus and one reference run instead of
rebuilding them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.dist_utils import torchrun
from train.metrics import read_metrics

SCRIPT = "train/lm.py"
STEPS = 12
REL = 1e-5


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A small default corpus and a tiny Llama 3 (full 128K vocabulary) checkpoint in HF layout."""
    from data.default import ensure_default_corpus
    from lm import LMConfig, Transformer, save_pretrained

    root = tmp_path_factory.mktemp("lm_training")
    ensure_default_corpus(root / "text", scale=0.02)
    config = LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(config)
    model.init_weights(seed=0)  # what train/lm.py draws itself for run.seed 0 (debug.toml's) under any layout
    save_pretrained(model, root / "init", format="hf")
    return root


# The [model] keys that make the trainer's random init the model `setup` saves (the debug preset at dim 64).
RANDOM_INIT = ["--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2"]


def args(setup: Path, run_dir: Path, *extra: str, random_init: bool = False) -> list[str]:
    """The shared command line: same data, same start, annealing off so shorter runs share the LR schedule.

    ``random_init``: the trainer draws the start itself (run.seed 0) rather than reading the init checkpoint.
    """
    start = RANDOM_INIT if random_init else [f"--model.init_from={setup / 'init'}"]
    return [
        "--config",
        "configs/lm/debug.toml",
        f"--run.dir={run_dir}",
        f"--data.dir={setup / 'text'}",
        "--data.seq_len=32",
        "--data.readers=4",
        "--data.anneal_fraction=0",
        *start,
        "--model.dim=64",
        "--model.loss=plain",
        "--train.batch_size=8",
        f"--train.steps={STEPS}",
        f"--optim.schedule_steps={STEPS}",
        "--optim.warmup_steps=2",
        "--metrics.log_interval=1",
        "--metrics.tensorboard=false",
        "--checkpoint.enable=false",
        *extra,
    ]


def run(nproc: int, argv: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = torchrun(SCRIPT, nproc, argv, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir))}


def assert_same(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=REL), f"step {step}: {got[step]} vs {want[step]}"


@pytest.fixture(scope="session")
def reference(setup):
    """One rank, 12 steps: the losses every layout must reproduce."""
    run_dir = setup / "ref1"
    run(1, args(setup, run_dir))
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1]  # it learns
    return got
