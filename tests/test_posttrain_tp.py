"""Post-training under tensor parallel: per-token log-probs with a vocabulary-sharded output weight equal a full
log_softmax (values and gradients), and `train/sft.py` / `train/dpo.py` under `--parallel.tp=2` give one rank's
losses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from data.instruct import HELDOUT_FILE
from lm.loss import fused_loss_output_fn, token_logprobs
from tests import test_dpo, test_sft
from tests.dist_utils import free_port
from tests.test_token_logprobs import _inputs, _reference
from train.dpo import REFERENCE_FILE

TP = 2


def _sharded_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # one thread per rank: two ranks share the 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    try:
        mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
        # 101 rows split 51 + 50; some targets on each rank, some ignored, a per-token upstream gradient.
        hidden, weight, targets, upstream = _inputs(shape=(3, 14), vocab=101)
        want, want_dh, want_dw = _reference(hidden, weight, targets, upstream)
        for sequence_sharded in (False, True):
            for chunk_size in (5, 1024):
                # As the model's output= function receives them: the hidden states sequence-sharded (sequence
                # parallel: this rank's half of each row), the weight vocabulary-sharded.
                mine = hidden.chunk(TP, dim=1)[rank] if sequence_sharded else hidden
                mine = mine.clone().requires_grad_()
                h = DTensor.from_local(mine, mesh, [Shard(1)]) if sequence_sharded else mine
                w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
                got = token_logprobs(h, w, targets, chunk_size=chunk_size)
                (got * upstream).sum().backward()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                want_mine = want_dh.chunk(TP, dim=1)[rank] if sequence_sharded else want_dh
                torch.testing.assert_close(mine.grad, want_mine, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(w.grad.full_tensor(), want_dw, rtol=1e-5, atol=1e-5)
        # SFT's loss under TP: the mean cross-entropy over the counted tokens.
        w = distribute_tensor(weight.clone(), mesh, [Shard(0)])
        loss = fused_loss_output_fn(targets)(distribute_tensor(hidden, mesh, [Shard(1)]), w)
        want_loss = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_token_logprobs_over_a_vocabulary_sharded_weight_equal_full_log_softmax():
    """Two gloo ranks, an uneven vocabulary split, hidden states whole or sequence-sharded: the log-probs and the
    gradients of hidden and weight equal one rank's full log_softmax (fp32, 1e-5)."""
    # Spawned, not forked: see tests/test_cp.py (autograd's threads may already run in this process).
    mp.start_processes(_sharded_worker, args=(free_port(),), nprocs=TP, start_method="spawn")


# ---------------------------------------------------------------- torchrun train/sft.py and train/dpo.py

# The runs of tests/test_sft.py and tests/test_dpo.py, shortened: the same tiny LM (full vocabulary), data and configs.
sft_setup, dpo_setup = test_sft.sft_setup, test_dpo.dpo_setup  # their fixtures, made here again (module scope)
_sft, _dpo, _losses = test_sft._sft, test_dpo._dpo, test_sft._losses
SHORT = ["--train.steps=3", "--optim.schedule_steps=8"]


def test_sft_under_tp_gives_one_rank_losses_and_grades_held_out_prompts(sft_setup):
    """TP 2 (sequence parallel, the vocabulary-sharded output): the chunked loss and the whole-logits loss
    (vocabulary-parallel cross-entropy) give one rank's losses; the final eval gathers the TP shards to grade."""
    want = _losses(_sft(sft_setup, sft_setup / "one", 1, *SHORT))
    heldout = sft_setup / "instruct" / HELDOUT_FILE
    evals = ["--eval.samples=2", "--eval.max_new_tokens=4", f"--eval.file={heldout}"]
    fused = _sft(sft_setup, sft_setup / "tp2", 2, "--parallel.tp=2", *SHORT, *evals)
    plain = _sft(sft_setup, sft_setup / "tp2_plain", 2, "--parallel.tp=2", "--model.loss=plain", *SHORT)
    for records in (fused, plain):
        got = _losses(records)
        assert sorted(got) == [1, 2, 3]
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert 0 <= fused[-1]["eval/accuracy"] <= 1 and fused[-1]["eval/chance"] > 0


def test_dpo_under_tp_gives_one_rank_losses_and_reference(dpo_setup):
    """FSDP 2 x TP 2 (4 ranks): the stored reference log-likelihoods (each data-parallel pair of TP ranks scores
    its share), the losses, the reward metrics and the held-out pairs' eval equal one rank's."""
    one = _dpo(dpo_setup, dpo_setup / "one", 1, *SHORT)
    tp = _dpo(dpo_setup, dpo_setup / "tp2", 4, "--parallel.tp=2", *SHORT)
    want, got = _losses(one), _losses(tp)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    for key in ("rewards/margin", "eval/reward_margin"):
        assert tp[-1][key] == pytest.approx(one[-1][key], rel=1e-4, abs=1e-6), key
    stored = [
        torch.load(d / REFERENCE_FILE, weights_only=True)["train"] for d in (dpo_setup / "one", dpo_setup / "tp2")
    ]
    # Only the pairs the 3 steps reach are scored (the rest NaN, in the same rows for both layouts).
    assert not stored[0].isnan().all()
    torch.testing.assert_close(stored[1], stored[0], rtol=1e-5, atol=1e-5, equal_nan=True)
