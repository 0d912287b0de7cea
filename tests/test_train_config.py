"""Run configs: TOML + dotted overrides, validation errors that name the key and file, the saved resolved config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from train.config import ConfigError, JobConfig, load_config, parse_cli, save_config, tomllib
from train.optim import lr_factor
from train.parallel.mesh import MeshError, ParallelDims


@dataclass
class ModelSection:
    dim: int = 8
    name: str = "tiny"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    dropout: float | None = None


@dataclass
class Cfg(JobConfig):
    model: ModelSection = field(default_factory=ModelSection)


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, '[train]\nsteps = 5\nbatch_size = 4\n[model]\ndim = 16\nname = "small"\n')
    cfg = load_config(
        Cfg,
        path,
        ["--train.steps=7", "--optim.lr", "0.001", "--model.name=123", "--model.layers=[3, 4]", "--optim.lr=1"],
    )
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4
    assert cfg.model.dim == 16
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widens to float
    assert cfg.model.name == "123"  # a str key keeps the text verbatim
    assert cfg.model.layers == [3, 4]
    cfg = load_config(Cfg, path, ["--model.dropout", "0.5", "--train.compile=true", "--checkpoint.resume="])
    assert cfg.model.dropout == 0.5 and cfg.train.compile is True and cfg.checkpoint.resume == ""
    assert load_config(Cfg, path, ["--model.dropout=none"]).model.dropout is None


def test_unknown_keys_and_sections_are_named(tmp_path):
    path = write(tmp_path, "[train]\nstepz = 5\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*train.*unknown key 'stepz'"):
        load_config(Cfg, path)
    path = write(tmp_path, "[trian]\nsteps = 5\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*unknown section 'trian'"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"--optim\.lrr.*unknown key 'lrr'"):
        load_config(Cfg, None, ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'nope'"):
        load_config(Cfg, None, ["--nope.x=1"])


def test_wrong_types_are_named(tmp_path):
    path = write(tmp_path, '[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"c\.toml.*train\.steps: expected int, got 'many'"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 2\.5"):
        load_config(Cfg, None, ["--train.steps=2.5"])
    with pytest.raises(ConfigError, match=r"train\.ac: expected one of"):
        load_config(Cfg, None, ["--train.ac=partial"])
    with pytest.raises(ConfigError, match=r"train\.skip_nonfinite: expected bool"):
        load_config(Cfg, None, ["--train.skip_nonfinite=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.toml")


def test_cli_and_saved_config_round_trip(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 5\n")
    cfg, args = parse_cli(Cfg, ["--config", str(path), "--run.dir", str(tmp_path / "run"), "--model.dropout=0.1"])
    assert args.config == str(path) and cfg.run.dir == str(tmp_path / "run")
    save_config(cfg, cfg.run.dir)
    with open(tmp_path / "run" / "config.toml", "rb") as f:
        table = tomllib.load(f)
    from train.config import from_dict

    again = from_dict(Cfg, table)
    assert again == cfg
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 5
    with pytest.raises(SystemExit):
        parse_cli(Cfg, ["--train.steps=x"])


def test_mesh_layout_validation():
    from train.config import ParallelConfig

    dims = ParallelDims.from_config(ParallelConfig(dp_shard=-1, tp=2), 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (1, 4, 2, 4)
    assert ParallelDims.from_config(ParallelConfig(dp_replicate=2, dp_shard=2), 4).shape() == (2, 2, 1, 1, 1)
    with pytest.raises(MeshError, match=r"multiply to 4, but the world size is 2"):
        ParallelDims.from_config(ParallelConfig(dp_shard=2, tp=2), 2)
    with pytest.raises(MeshError, match=r"not divisible by dp_replicate\*pp\*cp\*tp = 3"):
        ParallelDims.from_config(ParallelConfig(tp=3), 4)
    with pytest.raises(MeshError, match="parallel.tp must be >= 1"):
        ParallelDims.from_config(ParallelConfig(tp=0), 4)


def test_lr_schedule_shape():
    f = [lr_factor(s, 10, 100, "cosine", 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[119] == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)


def test_a_table_fields_keys_are_overridden_one_by_one():
    """``--model.vision.image_size=64`` sets one key of a table field, keeping the file's other keys; a table's
    value type is checked as the file's values are."""
    from train.encoder import EncoderJobConfig

    path = "configs/encoder/vision_tiny.toml"
    shipped = load_config(EncoderJobConfig, path).model.vision
    cfg = load_config(EncoderJobConfig, path, ["--model.vision.patch_size=8", "--model.text.width=32"])
    assert cfg.model.vision == {**shipped, "patch_size": 8} and cfg.model.text == {"width": 32}
    cfg = load_config(JobConfig, None, ["--optim.lr_scale.output=10"])
    assert cfg.optim.lr_scale == {"output": 10.0} and isinstance(cfg.optim.lr_scale["output"], float)
    with pytest.raises(ConfigError, match=r"optim\.lr_scale\.output.*-1"):
        load_config(JobConfig, None, ["--optim.lr_scale.output=-1"])
    with pytest.raises(ConfigError, match=r"--optim\.lr_scale\.output\.x: 'optim\.lr_scale' is a table of single keys"):
        load_config(JobConfig, None, ["--optim.lr_scale.output.x=1"])
