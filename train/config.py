"""The training entries' run configs: the sections every entry shares, on the dataclass configs of common.config.

An entry script subclasses :class:`JobConfig` (adding its own ``model`` / ``data`` / ... sections) and calls
:func:`parse_cli`. Loading, overrides, type and range checks and writing the resolved config live in
``common.config``; this module re-exports them so that an entry imports its config machinery from one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from common.config import (
    ConfigError,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    apply_overrides,
    from_dict,
    load_config,
    parse_cli,
    save_config,
    to_dict,
    to_toml,
    tomllib,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "Fraction",
    "JobConfig",
    "MetricsConfig",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OptimConfig",
    "ParallelConfig",
    "PositiveFloat",
    "PositiveInt",
    "Range",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_cli",
    "save_config",
    "to_dict",
    "to_toml",
    "tomllib",
]


# ----------------------------------------------------------------------------------------------------------------
# The sections every entry shares.


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    dir: str = "runs/default"
    name: str = ""
    seed: int = 0
    # Seconds a collective may wait before the process group gives up: a dead peer must not hang the others.
    timeout_s: PositiveFloat = 600.0
    # Signals that preempt the run: every rank finishes the step, a checkpoint is saved there and the run exits
    # with code 0 (train/preemption.py). SIGUSR1 is the early warning train/slurm/*.sbatch ask Slurm for.
    preempt_signals: list[Literal["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"]
    )


@dataclass
class TrainConfig:
    """Loop bounds, batch sizes and failure policy."""

    steps: PositiveInt = 100
    # Global batch: samples (sequences) per optimizer step across all data-parallel ranks.
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    # Global gradient-norm clipping; 0 = no clipping (the norm is still measured and logged).
    max_grad_norm: NonNegativeFloat = 1.0
    # Skip an optimizer step whose loss or gradient norm is NaN/Inf instead of stopping the run.
    skip_nonfinite: bool = False
    # With skip_nonfinite: this many skipped steps in a row stop the run (diverged, not a bad batch).
    max_consecutive_skips: PositiveInt = 10
    # Evaluate every this many steps and at the last; 0 = at the last step only.
    eval_interval: NonNegativeInt = 0
    # Activation checkpointing of each block: none, selective (save matmul outputs, recompute the rest) or full.
    ac: Literal["none", "selective", "full"] = "none"
    # torch.compile each block; None = on for CUDA, off on CPU.
    compile: bool | None = None
    # Use deterministic algorithms (tests of exact equality).
    deterministic: bool = False


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: NonNegativeFloat = 3e-4
    weight_decay: NonNegativeFloat = 0.1
    beta1: Annotated[float, Range(min=0, max=1, max_exclusive=True)] = 0.9
    beta2: Annotated[float, Range(min=0, max=1, max_exclusive=True)] = 0.95
    # Positive: with eps = 0 a parameter whose gradients are all zero would step by 0 / 0.
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    # The LR floor as a fraction of the peak.
    min_lr_ratio: Fraction = 0.1
    # Steps the schedule spans; 0 = train.steps.
    schedule_steps: NonNegativeInt = 0
    # The fused AdamW kernel (CPU and CUDA); false = torch's foreach implementation.
    fused: bool = True
    # LR multipliers by parameter-name prefix, e.g. {vision_encoder = 0.1}: a pretrained part that trains on
    # beside fresh ones takes smaller steps than they do.
    lr_scale: dict[str, NonNegativeFloat] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """Degrees of the device mesh [dp_replicate, dp_shard, pp, cp, tp], outermost to innermost."""

    dp_replicate: PositiveInt = 1
    # -1 = what the world size leaves after the other degrees.
    dp_shard: Annotated[int, Range(min=1, also=(-1,))] = -1
    pp: PositiveInt = 1
    cp: PositiveInt = 1
    tp: PositiveInt = 1
    # Keep parameters gathered after forward (faster, more memory); False = reshard (ZeRO-3).
    reshard_after_forward: bool = True
    # The media stages (train/adapter.py): FSDP-shard the frozen parameters too (the LM, one unit per layer plus
    # its embeddings and output, resharded after forward) instead of replicating them on every rank. They stay out
    # of the checkpoints either way. Off by default: a replicated LM needs no all-gathers.
    shard_frozen: bool = False
    # FSDP mixed precision: parameter dtype in compute and gradient-reduction dtype (CUDA only; CPU stays fp32
    # unless mixed_precision_on_cpu).
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    # Apply param_dtype / reduce_dtype on CPU too: CPU tests on gloo exercise the CUDA recipe's numerics, and on CPUs
    # with bf16 dot products (AVX512-BF16, AMX) the debug LM trains 1.5 times as fast (the quickstart sets it there).
    # Off by default: CPU runs stay fp32, where every layout reproduces one rank's losses to 1e-5.
    mixed_precision_on_cpu: bool = False
    # Pipeline parallel (pp > 1): a torch.distributed.pipelining schedule (1F1B, GPipe, Interleaved1F1B,
    # InterleavedZeroBubble, ZBVZeroBubble); micro-batches per optimizer step (0 = pp), independent of the number
    # of stages; stages per rank (1 for 1F1B / GPipe, >= 2 for the interleaved ones, 2 for ZBV); first and last
    # stage one layer fewer (they also hold the embeddings / the output and loss).
    pp_schedule: str = "1F1B"
    pp_microbatches: NonNegativeInt = 0
    pp_virtual_stages: PositiveInt = 1
    pp_lighter_ends: bool = False


@dataclass
class CheckpointConfig:
    """DCP checkpoints under RUN_DIR/checkpoints."""

    enable: bool = True
    # Save every this many steps and at the last; 0 = at the last step only.
    interval: NonNegativeInt = 500
    # Complete checkpoints kept on disk, the newest; 0 = all.
    keep: NonNegativeInt = 3
    # A checkpoint directory to resume from; empty = the newest complete checkpoint in run.dir, if any.
    resume: str = ""
    # False: start fresh even when run.dir holds checkpoints.
    auto_resume: bool = True
    # Overlap checkpoint writes with training (CUDA only; CPU always saves synchronously).
    async_save: bool = False


@dataclass
class MetricsConfig:
    """metrics.jsonl, the progress line and TensorBoard."""

    log_interval: PositiveInt = 1
    tensorboard: bool = False
    # Peak FLOP/s of one device for MFU; 0 = look the device up in the built-in table.
    peak_tflops: NonNegativeFloat = 0.0


@dataclass
class JobConfig:
    """The root config every entry extends with its own sections (model, data, ...)."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
