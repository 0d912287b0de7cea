"""`torchrun train/lm.py`: every layout trains like one rank, and a killed or resharded run resumes exactly.

All runs start from the same weights and read the same global batches (`--data.readers 4`), so the losses of each
step must agree across layouts up to fp32 summation order. The 1-rank reference reads them from a checkpoint
(`--model.init_from`); 2-rank FSDP and TP draw them with the trainer's own random init, which must give the same
bits on every layout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.dist_utils import PYTHON, ROOT, free_port
from tests.lm_runs import SCRIPT, STEPS, args, assert_same, losses, run
from train.checkpoint import CRASH_BEFORE_COMMIT_ENV, is_complete
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def fsdp2(setup):
    """Two-rank FSDP from random init, with checkpoints at steps 6 and 12."""
    run_dir = setup / "fsdp2"
    ckpt = ("--checkpoint.enable=true", "--checkpoint.interval=6", "--checkpoint.keep=2")
    run(2, args(setup, run_dir, *ckpt, random_init=True))
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints of the 128K-vocabulary LM: freed after the module


def test_fsdp_matches_one_rank(reference, fsdp2):
    assert_same(losses(fsdp2), reference, range(1, STEPS + 1))
    records = read_metrics(str(fsdp2))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "tflops"):
        assert key in records[-1]
    assert records[-1]["mfu"] is None  # no known peak on CPU
    assert records[-1]["tokens_per_s"] > 0
    assert (fsdp2 / "lm_config.json").is_file() and (fsdp2 / "config.toml").is_file()


@pytest.mark.parametrize(
    "nproc,layout,random_init",
    [
        (2, ["--parallel.tp=2"], True),
        (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--parallel.tp=2"], False),
        (2, ["--model.loss=fused"], False),
        (2, ["--train.grad_accum=2", "--train.ac=selective"], False),
    ],
    ids=["tp2", "hsdp2xtp2", "fsdp2-fused-loss", "fsdp2-accum2-selective-ac"],
)
def test_other_layouts_match_one_rank(setup, reference, nproc, layout, random_init, tmp_path):
    """Tensor (+ sequence, vocabulary) parallel from random init; HSDP x TP, the chunked loss on FSDP-gathered
    weights, gradient accumulation with selective activation checkpointing, from the loaded checkpoint."""
    run_dir = tmp_path / "run"
    run(nproc, args(setup, run_dir, "--train.steps=8", *layout, random_init=random_init))
    assert_same(losses(run_dir), reference, range(1, 9))


def test_resume_onto_another_layout(setup, reference, fsdp2, tmp_path):
    """Saved by 2-rank FSDP at step 6, resumed with 2-rank TP: steps 7-12 continue as if nothing happened."""
    run_dir = tmp_path / "resharded"
    ckpt = fsdp2 / "checkpoints" / "step-6"
    run(2, args(setup, run_dir, "--parallel.tp=2", f"--checkpoint.resume={ckpt}", "--checkpoint.enable=true"))
    got = losses(run_dir)
    assert sorted(got) == list(range(7, STEPS + 1))
    assert_same(got, reference, range(7, STEPS + 1))

    # Both runs end in the same weights, saved under different layouts (FSDP shards vs TP shards): exported,
    # they are the same model.
    from lm import load_pretrained
    from train.export import main as export

    assert export([str(fsdp2), "--out", str(tmp_path / "export_fsdp")]) == 0
    assert export([str(run_dir), "--out", str(tmp_path / "export_tp")]) == 0
    a, b = load_pretrained(tmp_path / "export_fsdp"), load_pretrained(tmp_path / "export_tp")
    init = load_pretrained(setup / "init")
    states = a.state_dict().items(), b.state_dict().values(), init.state_dict().values()
    for (name, wa), wb, w0 in zip(*states, strict=True):
        assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-6), name
        assert not torch.equal(wa, w0), f"{name} did not train"


def kill_processes_naming(path, timeout: float = 60.0) -> None:
    """SIGKILL every process whose command line names ``path`` and wait until none runs (zombies aside): killing
    torchrun's process group leaves its workers running, each in a session of its own, as on a real node."""
    from train.rundir import is_zombie

    def running() -> list[int]:
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        if str(path).encode() in f.read() and not is_zombie(int(entry.name)):
                            pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    deadline = time.monotonic() + timeout
    while pids := running():
        assert time.monotonic() < deadline, f"processes of {path} still running: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def test_killed_run_resumes_exactly(setup, fsdp2, tmp_path):
    """SIGKILL the whole job once step 6 is committed, run the same command again: the losses of an unbroken run."""
    run_dir = tmp_path / "killed"
    argv = args(setup, run_dir, "--checkpoint.enable=true", "--checkpoint.interval=6", "--checkpoint.keep=2")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), SCRIPT, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not is_complete(str(run_dir / "checkpoints" / "step-6")):
            assert job.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no step-6 checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)
        kill_processes_naming(run_dir)  # torchrun starts each worker in a session of its own
    finally:
        job.wait()
    assert max(losses(run_dir)) < STEPS
    run(2, argv)
    assert_same(losses(run_dir), losses(fsdp2), range(1, STEPS + 1))


def test_crash_during_save_keeps_the_previous_checkpoint(setup, reference, tmp_path):
    """A crash while step 8 is being saved leaves step 4 loadable; the rerun resumes from it."""
    run_dir = tmp_path / "crashed_save"
    argv = args(setup, run_dir, "--checkpoint.enable=true", "--checkpoint.interval=4", "--train.steps=8")
    crashed = run(2, argv, env={CRASH_BEFORE_COMMIT_ENV: "8"}, check=False)
    assert crashed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert is_complete(str(ckpts / "step-4"))
    assert not (ckpts / "step-8").exists()
    rerun = run(2, argv)
    assert "resumed from" in rerun.stdout + rerun.stderr
    assert_same(losses(run_dir), reference, range(1, 9))


@pytest.mark.parametrize(
    "world,override,message",
    [
        ("2", ["--parallel.tp=4", "--parallel.dp_shard=1"], "multiply to 4, but the world size is 2"),
        ("4", ["--parallel.tp=4", "--model.n_kv_heads=2"], "parallel.tp=4 must divide n_kv_heads=2"),
        ("1", ["--model.dimm=3"], "unknown key 'dimm'"),
        ("1", ["--model.init_from=tests/data/none"], "tests/data/none"),
        ("1", ["--train.steps=ten"], "train.steps: expected int"),
        ("2", ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=3"], "must divide the 8"),
        ("2", ["--train.batch_size=3"], "train.batch_size=3 is not divisible"),
        ("2", ["--data.readers=3"], "data.readers=3 must be a multiple of the data-parallel degree 2"),
    ],
)
def test_bad_configs_fail_before_any_work(tmp_path, monkeypatch, capsys, world, override, message):
    from train.lm import main

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit):
        main(["--config", "configs/lm/debug.toml", f"--run.dir={tmp_path}", *override])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_debug_config_learns_on_two_ranks(tmp_path):
    """The README's command on a fresh data dir (built on first use), shrunk to seconds: the loss falls."""
    run_dir, data_dir = tmp_path / "run", tmp_path / "text"
    proc = run(
        2,
        [
            "--config",
            "configs/lm/debug.toml",
            f"--run.dir={run_dir}",
            f"--data.dir={data_dir}",
            "--data.seq_len=64",
            "--model.dim=64",
            "--model.n_layers=2",
            "--train.steps=20",
            "--optim.warmup_steps=5",
            "--metrics.log_interval=5",
            "--data.default_scale=0.02",
            "--checkpoint.enable=false",
        ],
    )
    records = read_metrics(str(run_dir))
    assert records[-1]["step"] == 20
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, proc.stdout[-2000:]
    assert (run_dir / "tb").is_dir()  # TensorBoard events
    assert (data_dir / "mixture.json").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
