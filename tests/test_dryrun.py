"""`train/lm.py --dry-run`: the plan's per-rank bytes are what a real run allocates, its activation formula is what
autograd keeps, and the paper's Table 4 layouts of the 405B fit in 80 GiB while a too-small one is reported.

Run as ``torchrun --nproc-per-node N tests/test_dryrun.py --config ... --run.dir DIR`` it is the real side: it builds
the model through ``train.parallel.llama.parallelize_llama``, takes one AdamW step and writes each rank's bytes
to RUN_DIR.
"""

from __future__ import annotations

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # As a torchrun script tests/ leads sys.path; the repository root must win so `train` is the package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import pytest  # noqa: E402
import torch  # noqa: E402

from train.config import load_config  # noqa: E402
from train.dryrun import GIB, Shape, activation_bytes_per_layer, format_report, plan  # noqa: E402
from train.lm import LMJobConfig, build_lm_config  # noqa: E402

# dp2 x pp2 on 4 ranks; an odd vocabulary makes FSDP pad the embedding's and the output's shards.
SMALL = [
    "--model.dim=64",
    "--model.vocab_size=1001",
    "--model.n_layers=4",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--data.seq_len=32",
    "--data.readers=2",
    "--train.batch_size=8",
    "--parallel.dp_shard=2",
    "--parallel.pp=2",
]
# The config's pipeline (Interleaved1F1B, 2 stages per rank, 16 micro-batches, lighter ends) with full checkpointing.
TABLE4 = ["--train.ac=full"]


def real_rank_bytes(argv: list[str]) -> None:
    """The real side (under torchrun): build, one optimizer step, write this rank's shard and AdamW bytes."""
    from train.config import parse_cli
    from train.dryrun import optimizer_state_bytes, shard_bytes
    from train.lm import validate
    from train.loop import init_run
    from train.optim import build_optimizer
    from train.parallel.llama import parallelize_llama
    from train.parallel.mesh import destroy_distributed

    cfg, _ = parse_cli(LMJobConfig, argv)
    lm_config = validate(cfg)
    ctx = init_run(cfg)
    try:
        model = parallelize_llama(cfg, lm_config, ctx)
        optimizer = build_optimizer(model, cfg.optim)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # AdamW allocates its moments on the first step
        out = {**shard_bytes(model), "optimizer_bytes": optimizer_state_bytes(optimizer)}
        with open(os.path.join(cfg.run.dir, f"bytes-{ctx.rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        destroy_distributed()


def test_plan_bytes_equal_a_real_4_rank_run(tmp_path):
    """dp2 x pp2 on 4 CPU ranks: every rank's parameter shards (count and padded bytes) and AdamW moments."""
    from tests.dist_utils import torchrun

    argv = ["--config", "configs/lm/debug.toml", f"--run.dir={tmp_path}", *SMALL]
    proc = torchrun("tests/test_dryrun.py", 4, argv, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    cfg = load_config(LMJobConfig, "configs/lm/debug.toml", SMALL)
    lm_config = build_lm_config(cfg.model)
    for rank in range(4):
        with open(tmp_path / f"bytes-{rank}.json") as f:
            real = json.load(f)
        planned = plan(cfg, lm_config, 4, rank=rank)["ranks"][0]
        assert planned["rank"] == rank
        assert (planned["params"], planned["param_bytes"]) == (real["params"], real["param_bytes"]), rank
        assert planned["optimizer_bytes"] == real["optimizer_bytes"], rank
    # The halves of the pipeline differ (embeddings vs output), so the comparison covers both kinds of stage.
    first, last = plan(cfg, lm_config, 4)["ranks"]
    assert first["first"] and last["last"] and first["params"] != last["params"]


@pytest.mark.parametrize("ac", ["selective", "full"])
def test_activation_formula_is_what_autograd_keeps(ac):
    """One TP=2 layer (sequence parallel) on a fake process group: the bytes its forward leaves allocated equal the
    formula, including selective checkpointing's full-sequence partial sums of wo and w2."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lm import LMConfig, Transformer
    from lm.attention import build_mask
    from train.parallel.fsdp import apply_ac
    from train.parallel.tp import apply_tp

    tp, batch, seq = 2, 2, 512
    config = LMConfig.from_preset("debug", dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        model = Transformer(config)
        apply_tp(model, init_device_mesh("cpu", (tp,)), loss_parallel=True)
        apply_ac(list(model.layers.values()), ac)
        # The layer's input is this rank's sequence shard (sequence parallel); it stays alive for backward.
        x = torch.randn(batch, seq // tp, config.dim, requires_grad=True)
        rope = model.rope(torch.arange(seq))
        mask = build_mask("sdpa", batch=batch, q_len=seq, kv_len=seq, device=x.device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model.layers["0"](x, rope, mask)
        allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages())
        kept = allocated - out.untyped_storage().nbytes() + x.untyped_storage().nbytes()
    finally:
        dist.destroy_process_group()

    shape = Shape(config.dim, config.n_kv_heads * config.head_dim, config.ffn_hidden_dim, 256, batch, seq, tp, 1, 4)
    want = activation_bytes_per_layer(shape, ac)
    # Left out by the formula: fp32 RMSNorm rstd and attention logsumexp (~1% here).
    assert kept == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize(
    "world,overrides",
    [
        (8192, ["--parallel.pp_microbatches=32"]),
        (16384, ["--parallel.pp_microbatches=16"]),
        (
            16384,
            ["--parallel.cp=16", "--data.seq_len=131072", "--train.batch_size=128", "--parallel.pp_microbatches=16"],
        ),
    ],
    ids=["8k-gpus-tp8-pp16-dp64", "16k-gpus-tp8-pp16-dp128", "16k-gpus-tp8-cp16-pp16-dp8-seq128k"],
)
def test_table4_layouts_of_405b_fit(world, overrides):
    """The paper's Table 4 (16M tokens per step) on its fullest rank: pipeline rank 1 (most layers in flight)."""
    cfg = load_config(LMJobConfig, "configs/lm/llama3_405b.toml", [*TABLE4, *overrides])
    lm_config = build_lm_config(cfg.model)
    rank = cfg.parallel.cp * cfg.parallel.tp  # pipeline rank 1, data / context / tensor rank 0
    report = plan(cfg, lm_config, world, rank=rank)
    (row,) = report["ranks"]
    assert report["tokens_per_step"] == 2048 * 8192
    assert row["pp_rank"] == 1 and row["layers"] == 8
    # 405.9B parameters / (tp 8 x pp 16) over FSDP's dp_shard x cp ranks, fp32.
    fsdp = world // (8 * 16)
    assert row["params"] == pytest.approx(lm_config.num_params() / (8 * 16 * fsdp), rel=0.1)
    assert report["fits"] and 10 * GIB < row["total_bytes"] < 80 * GIB
    assert 0 < report["bubble_fraction"] < 0.5


def test_too_small_layout_is_reported_not_failed(tmp_path, capsys):
    """405B on 8 GPUs with FSDP alone: `train/lm.py --dry-run` says DOES NOT FIT with the excess, and returns."""
    from lm.config import LMConfig
    from train.lm import main

    out = tmp_path / "plan.json"
    argv = ["--config", "configs/lm/llama3_405b.toml", "--dry-run", "--world-size=8", f"--dry-run-out={out}"]
    argv += ["--parallel.pp=1", "--parallel.tp=1", "--train.batch_size=8", "--data.readers=8", "--train.ac=full"]
    assert main(argv) == []
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert not report["fits"]
    excess = report["worst_total_gb"] - 80
    assert f"DOES NOT FIT: rank 0 needs {report['worst_total_gb']:.2f} GiB, {excess:.2f} GiB more" in printed
    # fp32 shards, gradients and AdamW moments alone: 16 bytes x 405.9B / 8 ranks.
    assert report["ranks"][0]["total_bytes"] > 16 * LMConfig.from_preset("llama3-405b").num_params() / 8
    assert format_report(report) in printed


if __name__ == "__main__":
    real_rank_bytes(sys.argv[1:])
