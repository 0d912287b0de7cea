"""train.export: a real training checkpoint (DCP) becomes an HF / Meta checkpoint with the trained model's logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model
from transformers import LlamaForCausalLM

from lm import load_pretrained
from train.checkpoint import Checkpointer
from train.config import CheckpointConfig
from train.export import main, write_lm_config
from train.parallel.mesh import destroy_distributed, init_distributed

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _train_and_save(run_dir: Path, tied: bool) -> torch.Tensor:
    """One AdamW step on a tiny model, a Checkpointer save at step 1, lm_config.json; returns the logits."""
    model = tiny_model(seed=1, tie_word_embeddings=tied).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model(TOKENS[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    optimizer.step()
    started = not dist.is_initialized()
    init_distributed()
    try:
        Checkpointer(CheckpointConfig(), str(run_dir), model, optimizer).save(1)
    finally:
        if started:
            destroy_distributed()
    write_lm_config(model.config, run_dir)
    with torch.no_grad():
        return model.eval()(TOKENS)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, _train_and_save(run_dir, tied=False)


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_pretrained(path)(TOKENS)


def test_cli_hf_equals_trained_model_and_transformers(run, tmp_path):
    run_dir, trained = run
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "train.export", str(run_dir / "checkpoints" / "step-1"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout and "config.json" in result.stdout
    assert torch.equal(_logits(out), trained)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - trained).abs().max() <= 1e-4


def test_meta_format_from_run_dir(run, tmp_path):
    run_dir, trained = run
    assert main([str(run_dir), "--out", str(tmp_path / "meta"), "--format", "meta"]) == 0
    assert (tmp_path / "meta" / "params.json").exists()
    assert torch.equal(_logits(tmp_path / "meta"), trained)


def test_checkpoints_folder_and_flex_backend(run, tmp_path):
    """RUN_DIR/checkpoints names its newest checkpoint; the run's attention backend does not matter to export."""
    run_dir, trained = run
    config = json.loads((run_dir / "lm_config.json").read_text())
    (tmp_path / "flex.json").write_text(json.dumps({**config, "attn_backend": "flex"}))
    argv = [str(run_dir / "checkpoints"), "--out", str(tmp_path / "hf"), "--lm-config", str(tmp_path / "flex.json")]
    assert main(argv) == 0
    assert torch.equal(_logits(tmp_path / "hf"), trained)


def test_bf16_export_loads_as_bf16(run, tmp_path):
    run_dir, trained = run
    assert main([str(run_dir / "checkpoints" / "step-1"), "--out", str(tmp_path), "--dtype", "bfloat16"]) == 0
    model = load_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert (model(TOKENS).float() - trained).abs().max() < 0.2


def test_tied_embeddings(tmp_path):
    trained = _train_and_save(tmp_path / "run", tied=True)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    model = load_pretrained(tmp_path / "hf")
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(_logits(tmp_path / "hf"), trained)


def test_refuses_incomplete_checkpoint(run, tmp_path, capsys):
    run_dir, _ = run
    tmp_ckpt = tmp_path / "checkpoints" / "step-2.tmp"
    shutil.copytree(run_dir / "checkpoints" / "step-1", tmp_ckpt)
    shutil.copy(run_dir / "lm_config.json", tmp_path)
    assert main([str(tmp_ckpt), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_ckpt) in capsys.readouterr().err
    no_meta = tmp_path / "checkpoints" / "step-3"
    shutil.copytree(run_dir / "checkpoints" / "step-1", no_meta, ignore=shutil.ignore_patterns("meta.json"))
    assert main([str(no_meta), "--out", str(tmp_path / "out")]) == 2
    assert str(no_meta) in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):  # a run dir with no complete one
        assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    garbled = tmp_path / "checkpoints" / "step-4"
    shutil.copytree(run_dir / "checkpoints" / "step-1", garbled)
    (garbled / ".metadata").write_bytes(b"not a pickle")
    assert main([str(garbled), "--out", str(tmp_path / "out")]) == 2
    assert str(garbled) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_missing_or_invalid_lm_config(run, tmp_path, capsys):
    run_dir, _ = run
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")  # a run dir without lm_config.json
    assert main([str(tmp_path / "checkpoints" / "step-1"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "lm_config.json") in capsys.readouterr().err
    (tmp_path / "lm_config.json").write_text('{"dim": 64, "n_layerz": 2}')
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "lm_config.json") in err and "n_layerz" in err


def test_refuses_checkpoint_that_does_not_fit_config(run, tmp_path, capsys):
    run_dir, _ = run
    config = json.loads((run_dir / "lm_config.json").read_text())
    (tmp_path / "wide.json").write_text(json.dumps({**config, "multiple_of": 128}))
    assert main([str(run_dir), "--out", str(tmp_path / "out"), "--lm-config", str(tmp_path / "wide.json")]) == 2
    err = capsys.readouterr().err
    assert "layers.0.feed_forward.w1.weight" in err and "(192, 64)" in err and "(256, 64)" in err
    (tmp_path / "deep.json").write_text(json.dumps({**config, "n_layers": 3}))
    assert main([str(run_dir), "--out", str(tmp_path / "out"), "--lm-config", str(tmp_path / "deep.json")]) == 2
    assert "layers.2.attention.wq.weight" in capsys.readouterr().err


def test_refuses_non_empty_out(run, tmp_path, capsys):
    run_dir, _ = run
    (tmp_path / "keep.txt").write_text("x")
    assert main([str(run_dir), "--out", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main([str(run_dir), "--out", str(tmp_path), "--overwrite"]) == 0
