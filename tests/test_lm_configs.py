"""The shipped LM configs parse against train/lm.py's schema, and the presets they name are the paper's Table 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm import LMConfig
from train.config import load_config
from train.lm import LMJobConfig
from train.parallel.mesh import ParallelDims

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "lm").glob("*.toml"))

# arXiv 2407.21783, Table 3: layers, model dim, FFN dim, attention heads, KV heads, peak learning rate.
TABLE_3 = {
    "llama3-8b": (32, 4096, 14336, 32, 8, 3e-4),
    "llama3-70b": (80, 8192, 28672, 64, 8, 1.5e-4),
    "llama3-405b": (126, 16384, 53248, 128, 8, 8e-5),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg = load_config(LMJobConfig, path)
    LMConfig.from_preset(cfg.model.preset)  # the preset exists


def test_paper_configs_exist():
    assert {"llama3_8b.toml", "llama3_70b.toml", "llama3_405b.toml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("preset", sorted(TABLE_3))
def test_presets_are_table_3(preset):
    layers, dim, ffn, heads, kv_heads, _ = TABLE_3[preset]
    cfg = LMConfig.from_preset(preset)
    assert (cfg.n_layers, cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads, cfg.n_kv_heads) == (
        layers,
        dim,
        ffn,
        heads,
        kv_heads,
    )
    assert cfg.vocab_size == 128256 and cfg.rope_theta == 500000.0


@pytest.mark.parametrize("preset", sorted(TABLE_3))
def test_paper_config_recipe(preset):
    path = next(p for p in CONFIGS if p.stem == preset.replace("-", "_"))
    cfg = load_config(LMJobConfig, path)
    assert cfg.model.preset == preset
    assert cfg.optim.lr == TABLE_3[preset][5]
    assert cfg.optim.min_lr_ratio == 0.01 and cfg.optim.decay == "cosine"
    assert cfg.data.seq_len == 8192
    assert (cfg.parallel.param_dtype, cfg.parallel.reduce_dtype) == ("bfloat16", "float32")


def test_405b_is_table_4():
    """The 8,192-GPU row: TP 8, CP 1, PP 16, DP 64, 32 sequences of 8192 per DP rank (16M tokens per batch)."""
    cfg = load_config(LMJobConfig, next(p for p in CONFIGS if p.name == "llama3_405b.toml"))
    p = cfg.parallel
    assert (p.tp, p.cp, p.pp) == (8, 1, 16)
    assert cfg.train.batch_size == 32 * 64 and cfg.train.batch_size * cfg.data.seq_len == 16 * 2**20
    assert cfg.train.steps == 1_200_000 and cfg.optim.warmup_steps == 8000


@pytest.mark.parametrize(("name", "world"), [("llama3_8b", 64), ("llama3_70b", 512), ("llama3_405b", 8192)])
def test_layout_fits_its_cluster(name, world):
    """The header's GPU count resolves the mesh, and the global batch splits evenly over the data readers."""
    cfg = load_config(LMJobConfig, next(p for p in CONFIGS if p.stem == name))
    dims = ParallelDims.from_config(cfg.parallel, world)
    assert cfg.train.batch_size % (dims.dp * cfg.train.grad_accum) == 0
    assert cfg.data.readers % dims.dp == 0 and cfg.train.batch_size % cfg.data.readers == 0
