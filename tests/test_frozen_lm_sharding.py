"""``parallel.shard_frozen``: the media stages FSDP-shard the frozen LM (one unit per layer, its token table, the LM
itself for its output) instead of replicating it, and nothing else changes.

A 2-rank gloo vision stage (tiny random LM, tiny trained ViT, fp32) gives the replicated run's losses, held-out
metrics, greedy generations and final weights with the option on; the checkpoints still hold only what trains, and
a run stopped and resumed with the option on equals the uninterrupted one. The dry run plans the sharded LM as
this rank's padded shards plus the largest frozen unit gathered, and the 70B vision stage's verdict is read from
the planner's own report.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import shutil
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import write_tiny_stage_models
from dist_utils import each_modality_on_two_ranks, torchrun
from torch.distributed.tensor import DTensor

from train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")  # the in-process checks plan on the meta device

SCRIPT = "train/adapter.py"
STEPS = 6
CUT = 3  # the checkpoint the resumed run starts from
GIB = 2**30
# Rank 0 generates with its unsharded copy, which the sharded LM must fill (the tiny and 70B configs generate batched on
# every rank instead: tests/test_sharded_generation_eval.py).
COPY = "--eval.generate_sharded=false"
COMMON = (
    f"--train.steps={STEPS}",
    "--train.batch_size=4",
    f"--train.eval_interval={STEPS}",
    f"--checkpoint.interval={CUT}",
    "--checkpoint.keep=0",
    "--metrics.log_interval=1",
    "--optim.warmup_steps=2",
    "--eval.samples=2",
    "--eval.max_new_tokens=3",
    "--eval.loss_samples=4",
    "--eval.batch_size=4",
    # Two cross-attention blocks on the 2-layer LM, and the ViT trains too: every kind of unit is sharded.
    "--model.vision_layers=2",
    "--model.train_encoder=true",
    COPY,
)
SHARDED = "--parallel.shard_frozen=true"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny scenes, a tiny random LM in HF layout (the Llama 3 vocabulary the processor needs), a tiny ViT."""
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("frozen_lm")
    generate("images", root / "media", train=32, heldout=8)
    write_tiny_stage_models(root)
    return root


def run(run_dir, assets, *extra: str) -> tuple[list[dict], str]:
    """The 2-rank vision stage; its records and its output (rank 0 logs the held-out generations)."""
    argv = ["--modality", "vision", "--config", "configs/adapter/vision_tiny.toml", f"--run.dir={run_dir}"]
    argv += [f"--data.dir={assets / 'media'}", f"--model.lm={assets / 'lm'}"]
    argv += [f"--model.vision_encoder={assets / 'vision_encoder'}"]
    proc = torchrun(SCRIPT, 2, [*argv, *COMMON, *extra], timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return read_metrics(str(run_dir)), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sharded_run(assets, tmp_path_factory):
    """The vision stage with the frozen LM sharded: its directory, records and output."""
    run_dir = tmp_path_factory.mktemp("sharded")
    return run_dir, *run(run_dir, assets, SHARDED)


def generations(output: str) -> list[str]:
    """Rank 0's logged greedy answers to the held-out images."""
    return [
        line.split("held-out generations: ", 1)[1] for line in output.splitlines() if "held-out generations" in line
    ]


def frozen_counts(output: str) -> tuple[float, float]:
    """The frozen parameters (millions) rank 0 reports, and how many of them the sharded model holds as DTensors."""
    found = re.search(r"([\d.]+)M frozen parameters \(([\d.]+)M of them FSDP-sharded\)", output)
    assert found, output[-3000:]
    return float(found[1]), float(found[2])


def final_state(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor of RUN_DIR/final's part files, keyed by file and name."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    return {
        f"{f.relative_to(final)}:{k}": v for f in sorted(final.rglob("*.safetensors")) for k, v in load_file(f).items()
    }


def checkpoint_keys(run_dir, step: int) -> list[str]:
    """The entries of the run's DCP checkpoint of ``step``."""
    import torch.distributed.checkpoint as dcp

    return list(dcp.FileSystemReader(str(run_dir / "checkpoints" / f"step-{step}")).read_metadata().state_dict_metadata)


def assert_same_losses(got: list[dict], want: list[dict], steps: range) -> None:
    """The training losses of ``steps`` alike (fp32: 1e-5)."""
    by_step = {r["step"]: r for r in got}
    for r in want:
        if r["step"] in steps:
            assert by_step[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), (r, by_step[r["step"]])


def assert_same_final(got_dir, want_dir) -> None:
    """RUN_DIR/final alike: the same files, the same tensors (1e-5), the same manifest and held-out metrics."""
    final, want_final = got_dir / "final", want_dir / "final"
    names = sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file())
    assert names == sorted(str(f.relative_to(want_final)) for f in want_final.rglob("*") if f.is_file())
    got, want = final_state(got_dir), final_state(want_dir)
    assert sorted(got) == sorted(want) and got
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    for name in names:
        if name.endswith(".json"):
            a, b = (json.loads((d / name).read_text()) for d in (final, want_final))
            a.pop("train_seconds", None), b.pop("train_seconds", None)
            for d, manifest in ((final, a), (want_final, b)):
                if "path" in manifest.get("lm", {}):  # the LM by path, relative to the run's own directory
                    manifest["lm"]["path"] = str((d / manifest["lm"]["path"]).resolve())
            assert a.keys() == b.keys(), name
            for k, v in b.items():
                assert a[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), (name, k)


def test_sharded_frozen_lm_gives_the_replicated_runs_losses_eval_and_final_weights(assets, sharded_run, tmp_path):
    """Option off and on: per-step losses (fp32, 1e-5), the held-out loss and accuracy, the greedy generations of
    rank 0's evaluation copy, and RUN_DIR/final alike; the checkpoints hold no LM weight either way."""
    sharded_dir, sharded, sharded_out = sharded_run
    replicated, replicated_out = run(tmp_path / "replicated", assets)
    frozen, sharded_count = frozen_counts(sharded_out)
    assert frozen > 8 and sharded_count == frozen  # the whole frozen LM (and the ViT's CLIP projection) sharded
    assert frozen_counts(replicated_out) == (frozen, 0.0)
    assert [r["step"] for r in sharded] == [r["step"] for r in replicated] == list(range(1, STEPS + 1))
    assert_same_losses(sharded, replicated, range(1, STEPS + 1))
    for key in ("eval/loss", "eval/accuracy", "eval/exact_match"):
        assert sharded[-1][key] == pytest.approx(replicated[-1][key], rel=1e-5), key
    # The copy rank 0 generates with holds the LM as loaded (sharded: a copy taken before sharding).
    assert generations(sharded_out) == generations(replicated_out) and generations(sharded_out)
    assert_same_final(sharded_dir, tmp_path / "replicated")
    keys = checkpoint_keys(sharded_dir, STEPS)
    assert keys == checkpoint_keys(tmp_path / "replicated", STEPS)
    assert not [k for k in keys if k.startswith("model.lm.") or "optim.state.lm." in k]
    assert any(k.startswith("model.vision_adapter.") for k in keys)


def test_sharded_run_resumed_equals_the_uninterrupted_one(assets, sharded_run, tmp_path):
    """A sharded run stopped after step 3 and resumed (the LM reloaded from its files) gives the same losses,
    held-out metrics and final weights as the one that never stopped."""
    full_dir, full, _ = sharded_run
    cut = tmp_path / "cut"
    shutil.copytree(full_dir / "checkpoints" / f"step-{CUT}", cut / "checkpoints" / f"step-{CUT}")
    lines = (full_dir / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:CUT]) + "\n")
    resumed, output = run(cut, assets, SHARDED)
    assert "resumed from" in output and f"step-{CUT} (step {CUT})" in output  # resumed, not restarted
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert_same_losses(resumed, full, range(CUT + 1, STEPS + 1))
    assert resumed[-1]["eval/loss"] == pytest.approx(full[-1]["eval/loss"], rel=1e-5)
    assert_same_final(cut, full_dir)


# ----------------------------------------------------------------------------------------------------------------
# Every stage's step, in process: the gradients with the frozen parts sharded equal an unsharded run's.


def sharded_step(modality: str, rank: int, mesh) -> dict:
    """tests/test_adapter_fsdp.py's step of ``modality`` (the unsharded reference over the whole batch, FSDP over
    this rank's row) with the frozen parts sharded as train/adapter.py shards them under the option."""
    from test_adapter_fsdp import CASES, loss_of, rows

    from train.adapter import AdapterJobConfig, frozen_units, fsdp_blocks
    from train.stage import shard

    torch.manual_seed(0)  # the same model and batch on every rank
    mm, batch = CASES[modality]()
    labels = torch.randint(0, 256, batch["tokens"].shape)
    reference = copy.deepcopy(mm)
    loss_of(reference, batch, labels).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    originals = [weakref.ref(p) for p in mm.parameters() if not p.requires_grad]
    frozen = {p for p in mm.parameters() if not p.requires_grad}
    stage = SimpleNamespace(model=mm, blocks=fsdp_blocks(mm), frozen=frozen, frozen_units=frozen_units(mm))
    del frozen
    cfg = AdapterJobConfig()
    cfg.parallel.shard_frozen = True
    shard(cfg, SimpleNamespace(mesh=mesh), stage)
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_of(mm, rows(batch, rank, rank + 1), labels[rank : rank + 1]).backward()
    mismatched = []
    for name, p in mm.named_parameters():
        if name in expected and expected[name] is not None:
            got = p.grad.full_tensor().reshape(expected[name].shape) if p.grad is not None else None
            if got is None or not torch.allclose(got, expected[name], rtol=1e-5, atol=1e-5):
                mismatched.append(name)
    named = list(mm.named_parameters())
    return {
        "compared": sum(g is not None for g in expected.values()),
        "mismatched": mismatched,
        "replicated_frozen": [n for n, p in named if not p.requires_grad and not isinstance(p, DTensor)],
        "frozen_with_grad": [n for n, p in named if not p.requires_grad and p.grad is not None],
        "views": [str(w.message) for w in caught if "returned a view tensor" in str(w.message)],
        # The unsharded frozen parameters are freed, not kept alive by the stage's set of them.
        "originals_alive": sum(ref() is not None for ref in originals),
        "frozen_set_sharded": all(isinstance(p, DTensor) for p in stage.frozen),
    }


def test_every_stage_gets_the_unsharded_gradients_with_its_frozen_parts_sharded(tmp_path):
    """Vision, video (its image encoder and adapter frozen too) and speech on 2 ranks, every frozen parameter a
    DTensor: the trained parameters' gradients equal the unsharded run's (fp32, 1e-5), frozen ones get none, and
    no unit returns a view (the frozen cross-attention blocks' ``media_kv`` is registered as the trained ones')."""
    for rank, results in enumerate(each_modality_on_two_ranks(sharded_step, tmp_path)):
        for modality, r in results.items():
            assert r["compared"] > 0 and not r["mismatched"], (rank, modality, r["mismatched"])
            assert not r["replicated_frozen"] and not r["frozen_with_grad"] and not r["views"], (rank, modality, r)
            assert r["originals_alive"] == 0 and r["frozen_set_sharded"], (rank, modality, r)


# ----------------------------------------------------------------------------------------------------------------
# The dry run.


def padded_bytes(p: torch.Tensor, ranks: int) -> int:
    """What a rank holds of ``p`` sharded by FSDP2: ceil(rows / ranks) rows."""
    return math.ceil(p.shape[0] / ranks) * math.prod(p.shape[1:]) * p.element_size()



def plan_70b(rank: int, *overrides: str) -> dict:
    """The dry-run report of configs/adapter/vision_llama3_70b.toml's vision stage for ``rank`` of 8."""
    from train.adapter import AdapterJobConfig, plan
    from train.config import load_config

    cfg = load_config(AdapterJobConfig, "configs/adapter/vision_llama3_70b.toml", [COPY, *overrides])
    return plan(cfg, "vision", 8, rank=rank)


def test_dry_run_plans_the_frozen_lm_sharded_and_reports_the_70b_verdict(tmp_path, capsys):
    """70B vision on 8 ranks: with the option the frozen bytes are the replicated ones / 8 (FSDP's padded rows)
    plus the largest frozen unit gathered (here the bf16 token table or output); nothing else but rank 0's
    evaluation copy (now with its own LM) changes; the verdict printed is the report's."""
    from train.adapter import AdapterJobConfig, main, planned_model
    from train.config import load_config

    replicated, sharded = plan_70b(1, "--parallel.shard_frozen=false"), plan_70b(1, SHARDED)
    cfg = load_config(AdapterJobConfig, "configs/adapter/vision_llama3_70b.toml", [])
    mm = planned_model(cfg, "vision")
    frozen = [p for p in mm.parameters() if not p.requires_grad]
    assert replicated["frozen"]["frozen_bytes"] == sum(p.numel() * p.element_size() for p in frozen)
    assert not replicated["frozen"]["frozen_sharded"] and replicated["frozen"]["gathered_bytes"] == 0
    assert sharded["frozen"]["frozen_sharded"]
    assert sharded["frozen"]["frozen_bytes"] == sum(padded_bytes(p, 8) for p in frozen)
    assert sharded["frozen"]["frozen_bytes"] == pytest.approx(replicated["frozen"]["frozen_bytes"] / 8, rel=1e-3)
    # The largest unit: one LM layer, the token table, or the LM's own norm and output; the root's frozen share
    # is the ViT's CLIP projection (gathered in fp32 for the whole step).
    lm = mm.lm
    units = [lm.tok_embeddings.weight.nbytes, lm.output.weight.nbytes + lm.norm.weight.nbytes]
    units.append(sum(p.nbytes for p in lm.layers["0"].parameters()))
    assert sharded["frozen"]["gathered_bytes"] == max(units) + 8 * padded_bytes(mm.vision_encoder.proj, 8)
    assert max(units) == lm.output.weight.nbytes + lm.norm.weight.nbytes  # 2 GiB of bf16 vocabulary rows
    rest = {k: v for k, v in sharded.items() if k not in ("frozen", "total_bytes", "fits", "worst_total_gb")}
    assert rest == {k: v for k, v in replicated.items() if k in rest}
    frozen_delta = sum(sharded["frozen"][k] - replicated["frozen"][k] for k in ("frozen_bytes", "gathered_bytes"))
    assert sharded["total_bytes"] == replicated["total_bytes"] + frozen_delta

    # Rank 0 also holds the unsharded copy it generates with, now with an LM of its own.
    rank0 = plan_70b(0, SHARDED)
    assert rank0["eval_copy_bytes"] == sum(p.numel() * p.element_size() for p in mm.parameters())
    # (Ranks' shards differ by FSDP's padding alone, bytes.)
    assert rank0["total_bytes"] == pytest.approx(sharded["total_bytes"] + rank0["eval_copy_bytes"], abs=2**20)

    # The command's verdict for each rank is the report's: fits or not, and by how much.
    for rank, report in ((0, rank0), (1, sharded)):
        out = tmp_path / f"rank{rank}.json"
        argv = ["--modality", "vision", "--config", "configs/adapter/vision_llama3_70b.toml", "--dry-run"]
        main([*argv, "--world-size=8", COPY, SHARDED, f"--dry-run-rank={rank}", f"--dry-run-out={out}"])
        printed, got = capsys.readouterr().out, json.loads(out.read_text())
        assert got["total_bytes"] == report["total_bytes"]
        assert got["fits"] == (got["total_bytes"] <= 80 * GIB)
        need = got["worst_total_gb"]
        if got["fits"]:
            assert f"FITS: the fullest rank ({rank}) needs {need:.2f} of 80 GiB" in printed
        else:
            assert f"DOES NOT FIT: rank {rank} needs {need:.2f} GiB, {need - 80:.2f} GiB more" in printed
        assert "frozen parameters, sharded over 8" in printed
