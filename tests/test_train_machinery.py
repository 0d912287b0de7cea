"""The shared training machinery on a toy model: FSDP layouts agree, resume is exact, crashes leave good checkpoints.

Multi-rank runs go through torchrun (gloo, CPU); one-rank runs run in this process on a local store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from dist_utils import ROOT, ToyModel, free_port, main, torchrun

from train.checkpoint import CRASH_BEFORE_COMMIT_ENV, CheckpointError, is_complete, latest_checkpoint
from train.loop import NonFiniteLossError
from train.metrics import CONTRACT_KEYS, read_metrics
from train.optim import param_groups
from train.parallel.mesh import MeshError

SCRIPT = "tests/dist_utils.py"


def args(run_dir, steps: int = 8, *extra: str) -> list[str]:
    return [
        f"--run.dir={run_dir}",
        f"--train.steps={steps}",
        "--train.batch_size=8",
        "--optim.lr=0.01",
        "--optim.warmup_steps=2",
        "--checkpoint.interval=3",
        *extra,
    ]


def losses(run_dir) -> dict[int, tuple[float, float]]:
    recs = read_metrics(str(run_dir))
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in recs}


def assert_close(a: dict, b: dict, steps, rel: float) -> None:
    for s in steps:
        for x, y, what in zip(a[s], b[s], ("loss", "grad_norm"), strict=True):
            assert abs(x - y) <= rel * abs(y), f"step {s} {what}: {x} vs {y}"


def check(proc, ok: bool = True) -> None:
    if (proc.returncode == 0) != ok:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def test_fsdp_layouts_agree_and_a_crashed_save_resumes_on_another_layout(tmp_path):
    # 1 rank (in process) vs 2 FSDP ranks: same global batch, same losses and global gradient norms.
    one = main(args(tmp_path / "one", 8, "--checkpoint.enable=false"))
    assert len(one) == 8 and one[-1]["loss"] < one[0]["loss"]
    for key in CONTRACT_KEYS:
        assert key in one[0]
    check(torchrun(SCRIPT, 2, args(tmp_path / "two")))
    ref = losses(tmp_path / "one")
    two = losses(tmp_path / "two")
    assert_close(two, ref, range(1, 9), 1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["step-3", "step-6", "step-8"]

    # HSDP (2 replicas of 1 shard), and a save killed between writing step-6 and committing it: step-3 stays
    # the newest good checkpoint.
    crash = tmp_path / "crash"
    hsdp = ("--parallel.dp_replicate=2", "--parallel.dp_shard=1")
    check(torchrun(SCRIPT, 2, args(crash, 8, *hsdp), env={CRASH_BEFORE_COMMIT_ENV: "6"}), ok=False)
    assert_close(losses(crash), two, range(1, 6), 1e-5)
    ck = crash / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step-3", "step-6.tmp"]
    assert latest_checkpoint(ck) == str(ck / "step-3")
    with pytest.raises(CheckpointError, match=r"step-6\.tmp is incomplete"):
        main(args(crash, 8, f"--checkpoint.resume={ck / 'step-6.tmp'}"))
    # Auto-resume picks step-3 (saved by HSDP) and continues on ONE rank (resharding): the same losses.
    main(args(crash, 8))
    resumed = losses(crash)
    assert sorted(resumed) == list(range(1, 9))
    assert_close(resumed, two, range(1, 9), 1e-5)
    assert sorted(os.listdir(ck)) == ["step-3", "step-6", "step-8"]  # the stale .tmp was replaced


def test_killed_rank_stops_the_run_and_resume_is_exact(tmp_path):
    # Dropout and gradient accumulation: resume must restore RNG streams and data position, not just weights.
    extra = ("--toy.dropout=0.2", "--train.grad_accum=2", "--checkpoint.interval=4")
    full, cut = tmp_path / "full", tmp_path / "cut"
    check(torchrun(SCRIPT, 2, args(full, 8, *extra)))
    t0 = time.monotonic()
    proc = torchrun(SCRIPT, 2, args(cut, 8, *extra, "--toy.kill_at_step=7"), timeout=120)
    check(proc, ok=False)  # rank 1 died at step 7; rank 0 must not hang in its next collective
    assert time.monotonic() - t0 < 100
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-4"]
    check(torchrun(SCRIPT, 2, args(cut, 8, *extra)))
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 9))
    assert_close(b, a, range(1, 9), 1e-6)
    # Without the RNG restore dropout would differ: make sure dropout is live (the steps are not deterministic).
    assert a[5][0] != a[6][0]


def test_layout_that_does_not_fit_fails_before_any_work(tmp_path):
    with pytest.raises(MeshError, match=r"world size 1 is not divisible by dp_replicate\*pp\*cp\*tp = 2"):
        main(args(tmp_path / "bad", 2, "--parallel.tp=2"))
    assert not (tmp_path / "bad").exists()


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 3"):
        main(args(tmp_path / "nan", 5, "--toy.nan_at_step=3", "--checkpoint.enable=false"))
    recs = main(args(tmp_path / "skip", 5, "--toy.nan_at_step=3", "--train.skip_nonfinite=true"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[2].get("skipped") is True and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs[3:])


def test_activation_checkpointing_keeps_losses(tmp_path):
    ref = main(args(tmp_path / "none", 3, "--checkpoint.enable=false"))
    for mode in ("full", "selective"):
        got = main(args(tmp_path / mode, 3, "--checkpoint.enable=false", f"--train.ac={mode}"))
        for r, g in zip(ref, got, strict=True):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-6)
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    run = tmp_path / "run"
    main(args(run, 3, "--checkpoint.enable=true"))
    good = run / "checkpoints" / "step-3"
    assert is_complete(good)
    # Truncate the shard files: the loader must name the directory.
    for name in os.listdir(good):
        if name.endswith(".distcp"):
            with open(good / name, "r+b") as f:
                f.truncate(10)
    with pytest.raises(CheckpointError, match=str(good)):
        main(args(run, 4))
    # A step directory without meta.json (never committed) is skipped by auto-resume, with a warning, and so is
    # the truncated one: no checkpoint verifies.
    os.makedirs(run / "checkpoints" / "step-9")
    with pytest.warns(UserWarning, match="step-9"):
        assert latest_checkpoint(run / "checkpoints") is None
    json.loads((run / "config.json").read_text())  # the resolved config was saved


def test_async_checkpoints_commit_and_resume(tmp_path, monkeypatch):
    import functools

    import train.loop
    from train.checkpoint import Checkpointer

    sync = main(args(tmp_path / "sync", 8))
    monkeypatch.setattr(train.loop, "Checkpointer", functools.partial(Checkpointer, async_save=True))
    run = tmp_path / "async"
    main(args(run, 8))
    assert sorted(os.listdir(run / "checkpoints")) == ["step-3", "step-6", "step-8"]
    resumed = main(args(tmp_path / "resumed", 8, f"--checkpoint.resume={run / 'checkpoints' / 'step-6'}"))
    assert [r["step"] for r in resumed] == [7, 8]
    for r, s in zip(resumed, sync[6:], strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6)


def test_weight_decay_groups():
    model = ToyModel(8, 2, 0.0)
    model.tok_embeddings = nn.Embedding(10, 8)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert names == {"inp.weight", "out.weight", "layers.0.w1.weight", "layers.0.w2.weight"} | {
        "layers.1.w1.weight",
        "layers.1.w2.weight",
    }


def test_lr_scale_gives_a_part_its_own_learning_rate():
    """optim.lr_scale: parameters under a name prefix get the peak LR times its multiplier (the schedule scales
    every group alike); other parameters keep the peak LR; a prefix that names no parameter is refused."""
    from train.config import OptimConfig
    from train.optim import build_optimizer, build_scheduler

    model = ToyModel(8, 2, 0.0)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, lr_scale={"layers.1": 0.1})
    optimizer = build_optimizer(model, optim)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-3 if name.startswith("layers.1.") else 1e-2), name
    scheduler = build_scheduler(optimizer, optim, 10)
    optimizer.step()
    scheduler.step()
    ratios = {round(g["lr"] / g["initial_lr"], 6) for g in optimizer.param_groups}
    assert len(ratios) == 1  # one schedule for all parts
    with pytest.raises(ValueError, match="layers.9"):
        build_optimizer(model, OptimConfig(lr_scale={"layers.9": 0.1}))


def test_report_gives_start_end_loss_and_the_last_held_out_figures(tmp_path):
    """train.report: mean loss of the first and last logged steps, and the latest eval/* record's figures."""
    from train.report import summarize

    records = [{"step": s, "loss": 10.0 - s} for s in range(1, 11)]
    records[4]["eval/accuracy"], records[4]["eval/chance"] = 0.2, 0.1
    records[8]["eval/accuracy"], records[8]["eval/chance"] = 0.6, 0.1
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    line = summarize(str(tmp_path))
    assert "10 steps" in line and "loss 7.00 -> 2.00" in line
    assert "held-out at step 9: accuracy 0.6, chance 0.1" in line
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        summarize(str(tmp_path / "missing"))


# A one-rank save and load, in a process of two intra-op threads: the threads it has before, after the save and
# after the load. Each OpenMP team opened on one of gloo's threads is a thread more.
THREADS_AFTER_SAVE = """
import os, sys, torch, torch.distributed as dist
from train.checkpoint import Checkpointer
from train.config import CheckpointConfig
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(200)])
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 16)).sum().backward()
optimizer.step()
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
checkpointer = Checkpointer(CheckpointConfig(), sys.argv[2], model, optimizer)
path = checkpointer.save(1)
after_save = threads()
checkpointer.load(path)
print(before, after_save, threads())
"""


def test_a_one_rank_checkpoint_leaves_no_openmp_team_behind_and_resumes_on_two_ranks(tmp_path):
    """A one-rank save or load runs no collective: gloo would run it on its own threads, and a copy there opened an
    OpenMP team that made libgomp stop every worker spinning (each later 2-thread step up to half as fast). The
    checkpoint so written resumes on 2 FSDP ranks to the one-rank run's losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", THREADS_AFTER_SAVE, str(free_port()), str(tmp_path / "saved")]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after_save, after_load = map(int, proc.stdout.split()[-3:])
    assert after_save == before and after_load == before, (before, after_save, after_load)

    one = tmp_path / "one"
    check(torchrun(SCRIPT, 1, args(one, 8)))  # its own process: an in-process run keeps the run dir's lock
    ck = one / "checkpoints"
    for step in ("step-6", "step-8"):
        for name in os.listdir(ck / step):
            os.remove(ck / step / name)
        os.rmdir(ck / step)
    reference = losses(one)
    check(torchrun(SCRIPT, 2, args(one, 8)))
    resumed = losses(one)
    assert sorted(resumed) == list(range(1, 9))
    assert_close(resumed, reference, range(4, 9), 1e-5)
