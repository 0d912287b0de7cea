"""The post-training cluster configs parse and validate for the world size they are written for, and carry the
paper's recipe (arXiv 2407.21783, Sections 4.1.3 and 4.1.4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import parse_cli
from train.dpo import DPOJobConfig
from train.parallel.mesh import ParallelDims
from train.sft import SFTJobConfig, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "posttrain"
# Each config's GPUs, as its header says.
CLUSTERS = {"8b": 8, "70b": 64, "405b": 512}


def _load(stage: str, size: str) -> SFTJobConfig | DPOJobConfig:
    schema = SFTJobConfig if stage == "sft" else DPOJobConfig
    cfg, _ = parse_cli(schema, ["--config", str(CONFIGS / f"{stage}_llama3_{size}.toml")])
    return cfg


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("size", sorted(CLUSTERS))
def test_cluster_config_validates_for_its_world_and_keeps_the_paper_recipe(stage, size):
    cfg = _load(stage, size)
    assert cfg.data.files and f"llama3_{size}" in cfg.model.init_from  # trains from this size's previous stage
    cfg.model.init_from = ""  # the preset stands in for the (absent) checkpoint, so the shape checks run on it
    world = CLUSTERS[size]
    lm_config = validate(cfg, world)  # layout, TP against the heads, batch over dp x accumulation, seq_len, vocab
    assert cfg.model.preset == f"llama3-{size}" and lm_config.vocab_size == 128256
    dims = ParallelDims.from_config(cfg.parallel, world)
    assert dims.tp in (1, 8) and dims.tp * dims.dp == world  # TP inside a node, data parallel over the rest
    assert (cfg.parallel.param_dtype, cfg.parallel.reduce_dtype) == ("bfloat16", "float32")
    assert cfg.optim.lr == 1e-5  # paper: SFT and DPO alike
    if stage == "sft":
        assert 8500 <= cfg.train.steps <= 9000
    else:
        assert (cfg.dpo.beta, cfg.dpo.nll_weight) == (0.1, 0.2)


def test_every_llama3_posttrain_config_is_checked():
    names = {p.name for p in CONFIGS.glob("*_llama3_*.toml")}
    here = {f"{stage}_llama3_{size}.toml" for stage in ("sft", "dpo") for size in CLUSTERS}
    # The reward model's are validated in test_reward.py, rejection sampling's in test_rejection.py.
    elsewhere = {f"reward_llama3_{size}.toml" for size in CLUSTERS} | {"rejection_llama3_8b.toml"}
    assert names == here | elsewhere
