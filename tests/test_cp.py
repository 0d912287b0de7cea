"""Context parallel: the all-gather attention equals one rank's, and `torchrun train/lm.py --parallel.cp` trains
like one rank, alone and composed with data and tensor parallel."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lm.attention import attend, build_mask
from tests.dist_utils import free_port
from tests.lm_runs import args, assert_same, losses, run
from train.parallel.cp import ContextParallelAttend, context_parallel_mask, shard_sequence, unshard_sequence

# One packed batch of 2 rows, 32 tokens each, cut into 4 chunks of 8: documents start mid-chunk and run across
# chunk (and so rank) boundaries; the second row is one document.
SEQ, CP, N_HEADS, N_KV, HEAD_DIM = 32, 2, 4, 2, 16
DOCUMENT_LENGTHS = [[5, 14, 3, 10], [32]]


def _packed_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, N_HEADS, SEQ, HEAD_DIM, generator=g)
    k, v = (torch.randn(2, N_KV, SEQ, HEAD_DIM, generator=g) for _ in range(2))
    out_weight = torch.randn(2, N_HEADS, SEQ, HEAD_DIM, generator=g)  # makes every output element matter
    documents = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in DOCUMENT_LENGTHS]
    )
    return q, k, v, out_weight, documents


def _attention_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # one thread per rank: two ranks share the 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=CP)
    try:
        q, k, v, out_weight, documents = _packed_inputs()
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = attend(
            *full, build_mask("sdpa", batch=2, q_len=SEQ, kv_len=SEQ, device=q.device, document_ids=documents)
        )
        (want * out_weight).sum().backward()

        local = [shard_sequence(t, rank, CP, dim=2).detach().requires_grad_() for t in (q, k, v)]
        attend_cp = ContextParallelAttend(dist.group.WORLD, CP)
        mask = context_parallel_mask("sdpa", documents, seq_len=SEQ, cp_rank=rank, cp=CP, device=q.device)
        got = attend_cp(*local, mask)
        (got * shard_sequence(out_weight, rank, CP, dim=2)).sum().backward()

        torch.testing.assert_close(got, shard_sequence(want, rank, CP, dim=2), rtol=1e-5, atol=1e-6)
        # K and V gradients come from every rank's queries: the all-gather's backward must sum them back.
        for name, mine, ref in zip("qkv", local, full, strict=True):
            torch.testing.assert_close(mine.grad, shard_sequence(ref.grad, rank, CP, dim=2), msg=f"d{name}")

        # flex_attention's block mask with the queries' global positions (CUDA's path; forward only on CPU).
        flex_mask = context_parallel_mask("flex", documents, seq_len=SEQ, cp_rank=rank, cp=CP, device=q.device)
        with torch.no_grad():
            got_flex = attend_cp(*(t.detach() for t in local), flex_mask)
        torch.testing.assert_close(got_flex, got, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_cp_attention_and_gradients_equal_one_rank():
    """Two gloo ranks, documents crossing chunk boundaries: outputs and dq, dk, dv equal full-sequence attention."""
    # Spawned, not forked (a spawned worker re-imports torch, ~3 s): a test before this one in the same pytest process
    # may have run a backward that started autograd's threads, which a forked child cannot use.
    mp.start_processes(_attention_worker, args=(free_port(),), nprocs=CP, start_method="spawn")


def test_shard_sequence_balances_and_round_trips():
    row = torch.arange(16)[None]
    shards = [shard_sequence(row, r, 4) for r in range(4)]
    assert shards[0].tolist() == [[0, 1, 14, 15]]  # chunks 0 and 7: every rank gets one early and one late chunk
    assert shards[3].tolist() == [[6, 7, 8, 9]]
    assert torch.equal(unshard_sequence(torch.stack(shards), 4, dim=1), row)


def test_cp_trains_like_one_rank(setup, reference):
    """cp=2 on packed rows with document masks, through the fused loss: the losses of one rank (plain loss)."""
    run_dir = setup / "cp2"
    run(2, args(setup, run_dir, "--train.steps=8", "--parallel.cp=2", "--parallel.dp_shard=1", "--model.loss=fused"))
    assert_same(losses(run_dir), reference, range(1, 9))


def test_dp2_cp2_tp2_trains_like_one_rank(setup, reference):
    """The composed layout on 8 ranks: FSDP over dp_shard x cp, sequence chunks, and TP heads inside attention."""
    run_dir = setup / "dp2cp2tp2"
    # 4 steps (the shared LR schedule spans 12): 8 ranks on the 2 test cores cost the suite the most per step.
    run(8, args(setup, run_dir, "--train.steps=4", "--parallel.cp=2", "--parallel.tp=2", "--parallel.dp_shard=2"))
    assert_same(losses(run_dir), reference, range(1, 5))


def test_seq_len_not_divisible_by_two_cp_fails_first(tmp_path, monkeypatch, capsys):
    from train.lm import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--config", "configs/lm/debug.toml", f"--run.dir={tmp_path}", "--parallel.cp=2", "--data.seq_len=30"])
    assert "data.seq_len=30 must be divisible by 2 * parallel.cp = 4" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
