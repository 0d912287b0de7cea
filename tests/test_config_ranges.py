"""Config values are range-checked as well as type-checked; Literal keys take only their listed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from train.config import (
    ConfigError,
    JobConfig,
    NonNegativeFloat,
    PositiveInt,
    Range,
    from_dict,
    load_config,
    to_dict,
)


@dataclass
class OtherSection:
    """A section like the entries' own ([model], [data]): the aliases inside | None, lists and tables."""

    dim: PositiveInt | None = None
    widths: list[PositiveInt] = field(default_factory=list)
    scales: dict[str, NonNegativeFloat] = field(default_factory=dict)
    fraction: Annotated[float, Range(min=-1, max=1, min_exclusive=True)] = 0.0
    dtype: Literal["bf16", "fp32"] | None = None
    bits: Literal[0, 1] = 0
    overrides: dict = field(default_factory=dict)


@dataclass
class Cfg(JobConfig):
    other: OtherSection = field(default_factory=OtherSection)


# Each: an override and the message it must raise (the key, the allowed range, the value).
OUT_OF_RANGE = [
    ("--train.steps=0", r"train\.steps: expected a value >= 1, got 0"),
    ("--train.steps=-5", r"train\.steps: expected a value >= 1, got -5"),
    ("--train.batch_size=0", r"train\.batch_size: expected a value >= 1, got 0"),
    ("--train.grad_accum=0", r"train\.grad_accum: expected a value >= 1, got 0"),
    ("--train.max_grad_norm=-1.0", r"train\.max_grad_norm: expected a finite value >= 0, got -1\.0"),
    ("--train.max_grad_norm=inf", r"train\.max_grad_norm: expected a finite value >= 0, got inf"),
    ("--train.eval_interval=-1", r"train\.eval_interval: expected a value >= 0, got -1"),
    ("--optim.lr=nan", r"optim\.lr: expected a finite value >= 0, got nan"),
    ("--optim.lr=-0.001", r"optim\.lr: expected a finite value >= 0, got -0\.001"),
    ("--optim.weight_decay=-0.1", r"optim\.weight_decay: expected a finite value >= 0, got -0\.1"),
    ("--optim.beta2=1.0", r"optim\.beta2: expected a finite value in \[0, 1\), got 1\.0"),
    ("--optim.eps=0", r"optim\.eps: expected a finite value > 0, got 0\.0"),
    ("--optim.warmup_steps=-1", r"optim\.warmup_steps: expected a value >= 0, got -1"),
    ("--optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio: expected a finite value in \[0, 1\], got 1\.5"),
    ("--optim.schedule_steps=-10", r"optim\.schedule_steps: expected a value >= 0, got -10"),
    ("--optim.lr_scale={vision = -inf}", r"optim\.lr_scale\.vision: expected a finite value >= 0, got -inf"),
    ("--run.timeout_s=0", r"run\.timeout_s: expected a finite value > 0, got 0\.0"),
    ("--parallel.tp=0", r"parallel\.tp: expected a value >= 1, got 0"),
    ("--parallel.pp=-1", r"parallel\.pp: expected a value >= 1, got -1"),
    ("--parallel.cp=0", r"parallel\.cp: expected a value >= 1, got 0"),
    ("--parallel.dp_replicate=0", r"parallel\.dp_replicate: expected a value >= 1, got 0"),
    ("--parallel.dp_shard=0", r"parallel\.dp_shard: expected a value >= 1 or -1, got 0"),
    ("--parallel.dp_shard=-2", r"parallel\.dp_shard: expected a value >= 1 or -1, got -2"),
    ("--parallel.pp_microbatches=-1", r"parallel\.pp_microbatches: expected a value >= 0, got -1"),
    ("--parallel.pp_virtual_stages=0", r"parallel\.pp_virtual_stages: expected a value >= 1, got 0"),
    ("--checkpoint.interval=-1", r"checkpoint\.interval: expected a value >= 0, got -1"),
    ("--checkpoint.keep=-1", r"checkpoint\.keep: expected a value >= 0, got -1"),
    ("--metrics.log_interval=0", r"metrics\.log_interval: expected a value >= 1, got 0"),
    ("--metrics.peak_tflops=-989.0", r"metrics\.peak_tflops: expected a finite value >= 0, got -989\.0"),
]


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=f"^command line: {message}$"):
        load_config(Cfg, None, [override])


def test_sentinels_and_bounds_stay_valid():
    """0 = off / auto and -1 = auto keep their meaning; inclusive bounds admit the bound itself."""
    cfg = load_config(
        Cfg,
        None,
        [
            "--parallel.dp_shard=-1",
            "--checkpoint.interval=0",
            "--checkpoint.keep=0",
            "--train.eval_interval=0",
            "--train.max_grad_norm=0",
            "--optim.schedule_steps=0",
            "--optim.lr=0",
            "--optim.min_lr_ratio=1",
            "--optim.beta1=0",
            "--parallel.pp_microbatches=0",
            "--metrics.peak_tflops=0",
            "--train.steps=1",
        ],
    )
    assert cfg.parallel.dp_shard == -1 and cfg.checkpoint.keep == 0 and cfg.optim.min_lr_ratio == 1.0
    assert from_dict(Cfg, to_dict(Cfg())) == Cfg()  # every default lies in its range


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = nan\n")
    with pytest.raises(ConfigError, match=r"c\.toml: optim\.lr: expected a finite value >= 0, got nan"):
        load_config(Cfg, path)


def test_ranges_apply_inside_optional_lists_and_tables():
    """The mechanism other sections use: a Range alias inside | None, list items and table values."""
    assert load_config(Cfg, None, ["--other.dim=none"]).other.dim is None
    assert load_config(Cfg, None, ["--other.widths=[1, 2]"]).other.widths == [1, 2]
    with pytest.raises(ConfigError, match=r"^command line: other\.dim: expected a value >= 1, got 0$"):
        load_config(Cfg, None, ["--other.dim=0"])
    with pytest.raises(ConfigError, match=r"other\.dim: expected int, got 'big'"):
        load_config(Cfg, None, ["--other.dim=big"])
    with pytest.raises(ConfigError, match=r"other\.widths\[1\]: expected a value >= 1, got 0"):
        load_config(Cfg, None, ["--other.widths=[4, 0]"])
    with pytest.raises(ConfigError, match=r"other\.scales\.b: expected a finite value >= 0, got nan"):
        load_config(Cfg, None, ["--other.scales={a = 1, b = nan}"])
    with pytest.raises(ConfigError, match=r"other\.fraction: expected a finite value in \(-1, 1\], got -1\.0"):
        load_config(Cfg, None, ["--other.fraction=-1"])
    assert load_config(Cfg, None, ["--other.scales={a = 1}"]).other.scales == {"a": 1.0}  # ints widen


def test_literal_values_are_enforced():
    with pytest.raises(ConfigError, match=r"train\.ac: expected one of \['none', 'selective', 'full'\], got 'partial'"):
        load_config(Cfg, None, ["--train.ac=partial"])
    with pytest.raises(ConfigError, match=r"optim\.decay: expected one of \['cosine', 'linear', 'constant'\]"):
        load_config(Cfg, None, ["--optim.decay=exp"])
    # Inside | None the message still lists the allowed values.
    with pytest.raises(ConfigError, match=r"other\.dtype: expected one of \['bf16', 'fp32'\], got 'fp8'"):
        load_config(Cfg, None, ["--other.dtype=fp8"])
    # true == 1 in Python, but a bool is not one of the ints listed.
    with pytest.raises(ConfigError, match=r"other\.bits: expected one of \[0, 1\], got True"):
        from_dict(Cfg, {"other": {"bits": True}})
    assert load_config(Cfg, None, ["--other.dtype=bf16", "--other.bits=1"]).other.bits == 1


def test_untyped_tables_are_accepted():
    """A bare ``dict`` hint (the encoders' per-field override tables) takes any table."""
    cfg = from_dict(Cfg, {"other": {"overrides": {"dim": 8, "name": "x"}}})
    assert cfg.other.overrides == {"dim": 8, "name": "x"}


def test_range_describes_itself():
    assert Range(min=1, also=(-1,)).describe() == "a value >= 1 or -1"
    assert Range(max=2, max_exclusive=True).describe("a finite value") == "a finite value < 2"
    assert not Range().admits(float("nan")) and Range().admits(-3)
    with pytest.raises(ConfigError, match="a Range applies to numbers"):
        Range(min=0).check("x", "k")


@pytest.mark.parametrize(
    "entry, override, message",
    [
        ("train.encoder:EncoderJobConfig", "eval.group_size=1", "eval.group_size: expected a value >= 2, got 1"),
        ("train.encoder:EncoderJobConfig", "data.on_corrupt=ignore", "data.on_corrupt"),
        ("train.adapter:AdapterJobConfig", "eval.samples=0", "eval.samples: expected a value >= 1, got 0"),
        ("train.adapter:AdapterJobConfig", "data.train_count=-5", "data.train_count: expected a value >= 0, got -5"),
    ],
)
def test_entry_sections_are_range_checked(entry, override, message):
    """The encoder and adapter entries' own sections use the same ranges as the shared ones."""
    import importlib

    module, name = entry.split(":")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(getattr(importlib.import_module(module), name), overrides=[f"--{override}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_len=0", "data.seq_len: expected a value >= 1, got 0"),
        ("data.anneal_fraction=1.5", "data.anneal_fraction"),
        ("model.dim=-8", "model.dim: expected a value >= 1, got -8"),
    ],
)
def test_lm_sections_are_range_checked(override, message):
    """train/lm.py's [model] and [data] sections use the same ranges."""
    from train.lm import LMJobConfig

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(LMJobConfig, overrides=[f"--{override}"])
