"""Pipeline parallel (`--parallel.pp`): every schedule and composition trains like one rank, its checkpoints move
to other layouts, and impossible layouts fail before any work.

Runs start from the same 4-layer checkpoint (4 layers: 2 ranks x 2 virtual stages) and read the same global
batches, so the losses of each step must agree with the 1-rank run up to fp32 summation order.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.lm_runs import args, assert_same, losses, run
from train.parallel.pp import rank_stages, stage_layer_ids

STEPS = 8
PP2 = ["--parallel.pp=2", "--parallel.dp_shard=1"]


@pytest.fixture(scope="module")
def root(setup) -> Path:
    """The session's LM test directory (tests/lm_runs.py): the default corpus under text/ and its runs."""
    return setup


@pytest.fixture(scope="module")
def init4(root) -> Path:
    """The tiny Llama 3 of tests/lm_runs.py with 4 layers, in HF layout."""
    from lm import LMConfig, Transformer, save_pretrained

    config = LMConfig.from_preset("debug", dim=64, n_layers=4, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    save_pretrained(model, root / "init4", format="hf")
    return root / "init4"


def pp_args(root: Path, init4: Path, run_dir: Path, *extra: str) -> list[str]:
    return args(root, run_dir, f"--model.init_from={init4}", f"--train.steps={STEPS}", *extra)


@pytest.fixture(scope="module")
def reference(root, init4) -> dict[int, float]:
    """One rank, 8 steps: the losses every pipeline layout must reproduce."""
    run_dir = root / "pp_ref1"
    run(1, pp_args(root, init4, run_dir))
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1]
    return got


@pytest.fixture(scope="module")
def pp2(root, init4) -> Path:
    """pp=2 with 1F1B (2 micro-batches), checkpoints at steps 4 and 8."""
    run_dir = root / "pp2_1f1b"
    run(2, pp_args(root, init4, run_dir, *PP2, "--checkpoint.enable=true", "--checkpoint.interval=4"))
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints of the 128K-vocabulary LM: freed after the module


def test_pp2_1f1b_matches_one_rank(reference, pp2):
    assert_same(losses(pp2), reference, range(1, STEPS + 1))


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, [*PP2, "--parallel.pp_schedule=Interleaved1F1B", "--parallel.pp_virtual_stages=2", "--model.loss=fused"]),
        # 4 steps (the LR schedule spans 12 either way): 8 ranks on the 2 test cores cost the most per step.
        (8, ["--parallel.dp_shard=2", "--parallel.pp=2", "--parallel.tp=2", "--train.steps=4"]),
    ],
    ids=["pp2-interleaved1f1b-fused-loss", "dp2xpp2xtp2"],
)
def test_other_pipelines_match_one_rank(root, init4, reference, nproc, layout, tmp_path):
    """Interleaved 1F1B (2 stages per rank, the chunked loss on the last stage), and data x pipeline x tensor
    parallel on 8 ranks (sequence-sharded activations cross the stage boundary)."""
    run_dir = tmp_path / "run"
    run(nproc, pp_args(root, init4, run_dir, *layout))
    got = losses(run_dir)
    assert len(got) >= 4
    assert_same(got, reference, sorted(got))


def test_pp_checkpoint_resumes_under_fsdp(root, init4, reference, pp2, tmp_path):
    """Saved by pp=2 at step 4, resumed by 2-rank FSDP: steps 5-8 continue exactly, and both runs' last
    checkpoints export to the same model."""
    run_dir = tmp_path / "pp2_resumed_dp2"
    ckpt = pp2 / "checkpoints" / "step-4"
    run(2, pp_args(root, init4, run_dir, f"--checkpoint.resume={ckpt}", "--checkpoint.enable=true"))
    got = losses(run_dir)
    assert sorted(got) == list(range(5, STEPS + 1))
    assert_same(got, reference, range(5, STEPS + 1))

    from lm import load_pretrained
    from train.export import main as export

    assert export([str(pp2), "--out", str(tmp_path / "export_pp2")]) == 0
    assert export([str(run_dir), "--out", str(tmp_path / "export_dp2")]) == 0
    a, b = load_pretrained(tmp_path / "export_pp2"), load_pretrained(tmp_path / "export_dp2")
    init = load_pretrained(init4)
    states = a.state_dict().items(), b.state_dict().values(), init.state_dict().values()
    for (name, wa), wb, w0 in zip(*states, strict=True):
        assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-6), name
        assert not torch.equal(wa, w0), f"{name} did not train"


def test_stage_layer_ids():
    assert stage_layer_ids(4, 2) == [[0, 1], [2, 3]]
    assert stage_layer_ids(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layer_ids(4, 4) == [[0], [1], [2], [3]]
    # The paper's 405B: 126 layers on 16 stages, the first and last one layer lighter.
    sizes = [len(s) for s in stage_layer_ids(126, 16, lighter_ends=True)]
    assert sizes == [7] + [8] * 14 + [7]
    # The remainder goes to the middle stages, so the ends stay lighter.
    assert [len(s) for s in stage_layer_ids(11, 4, lighter_ends=True)] == [2, 4, 3, 2]
    for n, stages, lighter in [(126, 16, True), (7, 3, False), (9, 4, True)]:
        assert sum(stage_layer_ids(n, stages, lighter_ends=lighter), []) == list(range(n))
    with pytest.raises(ValueError, match="4 layers cannot fill 4 pipeline stages with pipeline lighter_ends"):
        stage_layer_ids(4, 4, lighter_ends=True)
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        stage_layer_ids(3, 4)


def test_rank_stages():
    assert [rank_stages(r, 4, 1, "loop") for r in range(4)] == [[0], [1], [2], [3]]
    assert [rank_stages(r, 2, 3, "loop") for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [rank_stages(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        rank_stages(0, 2, 3, "v")
    with pytest.raises(ValueError, match="pipeline rank 2 is outside 0..1"):
        rank_stages(2, 2, 1, "loop")


@pytest.mark.parametrize("world", [8192, 16384])
def test_405b_pipeline_is_the_papers(world):
    """Both Table 4 rows: 16 ranks x 2 interleaved stages, 3 layers on the first and last stage, 4 elsewhere."""
    from train.config import load_config
    from train.lm import LMJobConfig, build_lm_config
    from train.parallel.llama import pipeline_plan
    from train.parallel.mesh import ParallelDims

    cfg = load_config(LMJobConfig, "configs/lm/llama3_405b.toml")
    plan = pipeline_plan(cfg, build_lm_config(cfg.model), ParallelDims.from_config(cfg.parallel, world))
    assert (plan.schedule, plan.pp, plan.virtual_stages) == ("Interleaved1F1B", 16, 2)
    assert [len(layers) for layers in plan.stage_layers] == [3] + [4] * 30 + [3]


@pytest.mark.parametrize(
    "world,override,message",
    [
        (
            "2",
            [*PP2, "--model.n_layers=3", "--parallel.pp_schedule=Interleaved1F1B", "--parallel.pp_virtual_stages=2"],
            "3 layers cannot fill 4 pipeline stages",
        ),
        (
            "4",
            ["--parallel.pp=4", "--parallel.dp_shard=1", "--parallel.pp_lighter_ends=true"],
            "4 layers cannot fill 4 pipeline stages with pipeline lighter_ends",
        ),
        ("2", [*PP2, "--parallel.pp_microbatches=3"], "parallel.pp_microbatches=3 must divide the 8 sequences"),
        (
            "4",
            ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.pp_microbatches=8"],
            "parallel.pp_microbatches=8 must divide the 4 sequences",
        ),
        (
            "4",
            ["--parallel.pp=4", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"],
            "1F1B needs parallel.pp_microbatches >= pp=4",
        ),
        ("2", [*PP2, "--parallel.pp_schedule=Interleaved1F1B"], "set parallel.pp_virtual_stages >= 2 (got 1)"),
        ("2", [*PP2, "--parallel.pp_virtual_stages=2"], "1F1B runs one stage per rank"),
        ("2", [*PP2, "--parallel.pp_schedule=ZBVZeroBubble"], "holds exactly 2 stages per rank"),
        ("2", [*PP2, "--parallel.pp_schedule=Bubbly"], "'Bubbly': torch.distributed.pipelining has no such schedule"),
        ("2", [*PP2, "--parallel.pp_schedule=DualPipeV"], "'DualPipeV' is not supported here"),
        ("2", [*PP2, "--model.preset=llama3.2-1b"], "tied input/output embeddings"),
        (
            "2",
            [
                *PP2,
                "--parallel.pp_schedule=interleavedzerobubble",
                "--parallel.pp_virtual_stages=2",
                "--train.compile=true",
            ],
            "InterleavedZeroBubble splits each backward into input and weight parts",
        ),
    ],
    ids=[
        "layers<stages",
        "lighter-ends-empty",
        "microbatches-split-batch",
        "microbatches-split-dp-share",
        "1f1b-too-few-microbatches",
        "interleaved-one-stage",
        "1f1b-two-stages",
        "zbv-one-stage",
        "unknown-schedule",
        "unsupported-schedule",
        "tied-embeddings",
        "zero-bubble-compiled",
    ],
)
def test_impossible_pipelines_fail_before_any_work(tmp_path, monkeypatch, capsys, world, override, message):
    from train.lm import main

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit):
        main(["--config", "configs/lm/debug.toml", f"--run.dir={tmp_path}", *override])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
