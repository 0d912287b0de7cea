"""Llama 3 pretraining: FSDP2 (HSDP) x tensor/sequence parallel, exact resume, MFU metrics.

    torchrun --nproc-per-node N train/lm.py --config configs/lm/debug.toml [--section.key=value ...]

The model is built on the meta device, sharded (``train.parallel.llama``: pipeline stages, TP plan, context
parallel, activation checkpointing, compile, FSDP), and only then materialised: each rank allocates its own shards
and initialises them, or receives them from rank 0 reading a pretrained checkpoint (``--model.init_from DIR``,
Meta or HF layout), so no rank ever holds a 70B/405B model. Writes RUN_DIR/metrics.jsonl, RUN_DIR/lm_config.json
(the model's shape, for ``python -m train.export``) and DCP checkpoints under RUN_DIR/checkpoints.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/lm.py` puts train/ first on sys.path, where this very file would shadow the `lm` package:
    # drop it and put the repository root first.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Annotated, Literal  # noqa: E402

from data.readers import ReaderGroup, build_mixture, check_readers  # noqa: E402
from evaluation.during_training import TaskEvalConfig, task_evaluator  # noqa: E402
from lm.checkpoint import load_config  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from train import dryrun  # noqa: E402
from train.config import JobConfig, NonNegativeInt, PositiveFloat, PositiveInt, Range, parse_cli  # noqa: E402
from train.export import write_lm_config  # noqa: E402
from train.loop import RunContext, init_run, micro_batch_size, train  # noqa: E402
from train.losses import make_loss, uses_fused_loss  # noqa: E402
from train.parallel.cp import check_cp  # noqa: E402
from train.parallel.llama import make_forward_backward, parallelize_llama, pipeline_plan  # noqa: E402
from train.parallel.mesh import ParallelDims, exit_rank, run_then_destroy, submesh  # noqa: E402
from train.parallel.tp import check_tp  # noqa: E402

log = logging.getLogger("train.lm")


@dataclass
class LMModelConfig:
    """The model: a preset of ``lm.LMConfig`` with optional shape overrides, or a pretrained checkpoint."""

    preset: str = "debug"
    # Shape overrides; None keeps the preset's (or the init_from checkpoint's) value.
    dim: PositiveInt | None = None
    n_layers: PositiveInt | None = None
    n_heads: PositiveInt | None = None
    n_kv_heads: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    ffn_dim_multiplier: PositiveFloat | None = None
    multiple_of: PositiveInt | None = None
    max_seq_len: PositiveInt | None = None
    rope_theta: PositiveFloat | None = None
    attn_backend: Literal["sdpa", "flex", "xformers"] = "sdpa"
    # A Meta or HF checkpoint directory to start from; its config replaces the preset.
    init_from: str = ""
    # fused: chunked linear + cross-entropy (the [tokens, vocab] logits never exist at once); plain: full logits.
    # Tensor parallel always uses the vocabulary-parallel cross-entropy.
    loss: Literal["fused", "plain"] = "fused"


@dataclass
class LMDataConfig:
    """Token shards packed into rows of ``seq_len + 1`` tokens with document ids."""

    # A prepared source (manifest.json), a mixture's root, or where the embedded default corpus is built.
    dir: str = "runs/data/text"
    # "name:weight,..." of subdirectories of dir; "" = dir's own mixture.json (the default corpus) or dir alone.
    mixture: str = ""
    # "name:weight,..." for the annealing phase; "" = the mixture's own (the default corpus has one).
    anneal_mixture: str = ""
    # Fraction of steps, at the end, drawn from the annealing mixture; -1 = the mixture's own, 0 = off.
    anneal_fraction: Annotated[float, Range(min=0, max=1, also=(-1,))] = -1.0
    seq_len: PositiveInt = 256
    # Data readers the global batch is drawn from (0 = one per data-parallel rank). A fixed count gives the same
    # batches under every layout whose data-parallel degree divides it.
    readers: NonNegativeInt = 0
    num_workers: NonNegativeInt = 0
    on_corrupt: Literal["fail", "skip"] = "fail"
    seed: NonNegativeInt = 0
    # Size of the embedded default corpus when it is built here (1.0 = about 2M tokens).
    default_scale: PositiveFloat = 1.0


@dataclass
class LMJobConfig(JobConfig):
    """Root config of ``train/lm.py``."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    # lm-eval tasks scored every train.eval_interval steps and at the end (evaluation.during_training).
    eval: TaskEvalConfig = field(default_factory=TaskEvalConfig)


# Overridable [model] keys; the first group fixes tensor shapes, so with init_from it must match the checkpoint.
_WEIGHT_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier", "multiple_of")
_SHAPE_KEYS = (*_WEIGHT_SHAPE_KEYS, "max_seq_len", "rope_theta")


def build_lm_config(model: LMModelConfig) -> LMConfig:
    """The LMConfig of the ``[model]`` section: the init_from checkpoint's or the preset's, then the overrides."""
    base = load_config(model.init_from) if model.init_from else LMConfig.from_preset(model.preset)
    overrides = {k: getattr(model, k) for k in _SHAPE_KEYS if getattr(model, k) is not None}
    if model.init_from:
        clash = [
            f"model.{k}={v} (the checkpoint has {getattr(base, k)})"
            for k, v in overrides.items()
            if k in _WEIGHT_SHAPE_KEYS and v != getattr(base, k)
        ]
        if clash:
            raise ValueError(f"model.init_from={model.init_from}: the weights fix the shape; drop {', '.join(clash)}")
    try:
        return dataclasses.replace(base, attn_backend=model.attn_backend, **overrides)
    except ValueError as e:
        raise ValueError(f"[model] section: {e}") from None


def validate(cfg: LMJobConfig, world_size: int | None = None) -> LMConfig:
    """Everything that can be checked before any process group or data work; returns the model's config."""
    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    dims = ParallelDims.from_config(cfg.parallel, world)
    lm_config = build_lm_config(cfg.model)
    check_tp(lm_config, dims.tp)
    check_cp(cfg.data.seq_len, dims.cp)
    if cfg.data.seq_len > lm_config.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={lm_config.max_seq_len}")
    micro_batch_size(cfg.train.batch_size, dims.dp, cfg.train.grad_accum)
    check_readers(cfg.data.readers or dims.dp, dims.dp, cfg.train.batch_size)
    if dims.pp > 1:
        pipeline_plan(cfg, lm_config, dims)
        if cfg.eval.tasks:
            raise ValueError("eval.tasks needs every layer on each rank: not under parallel.pp > 1")
    return lm_config


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and validate, set up the mesh, build model and data, train."""
    parser = argparse.ArgumentParser(prog="train/lm.py", description=__doc__.split("\n\n")[0])
    dryrun.add_arguments(parser)
    cfg, args = parse_cli(LMJobConfig, argv, parser)
    try:
        lm_config = validate(cfg, dryrun.planned_world_size(args))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.dry_run:  # a plan on a fake process group: no data, no devices, no training
        dryrun.main(cfg, lm_config, args)
        return []
    ctx = init_run(cfg)
    return run_then_destroy(lambda: _run(cfg, lm_config, ctx))


def _run(cfg: LMJobConfig, lm_config: LMConfig, ctx: RunContext) -> list[dict]:
    mixture = build_mixture(cfg.data)
    data = ReaderGroup(
        mixture,
        cfg.data,
        readers=cfg.data.readers or ctx.dp_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp_size,
        batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        steps=cfg.train.steps,
        vocab_size=lm_config.vocab_size,
    )
    model = parallelize_llama(cfg, lm_config, ctx)
    evaluator = task_evaluator(cfg.eval, lm_config, ctx.device)
    if ctx.rank == 0:
        write_lm_config(lm_config, cfg.run.dir)
        log.info(
            "Llama 3 pretraining: %.1fM parameters, %s, seq %d, global batch %d, layout %s",
            lm_config.num_params() / 1e6,
            cfg.model.init_from or f"preset {cfg.model.preset}",
            cfg.data.seq_len,
            cfg.train.batch_size,
            "x".join(f"{d}{getattr(ctx.dims, d)}" for d in ("dp_replicate", "dp_shard", "pp", "cp", "tp")),
        )

    loss_fn = make_loss(cfg, ctx)
    forward_backward = make_forward_backward(cfg, lm_config, ctx, model, loss_fn, fused_loss=uses_fused_loss(cfg, ctx))
    seq = cfg.data.seq_len
    return train(
        cfg,
        model,
        loss_fn,
        data,
        tokens_per_sample=seq,
        flops_per_sample=lm_config.flops_per_token(seq) * seq,
        eval_fn=evaluator,
        extra_metrics=lambda step: data.stats(),
        forward_backward=forward_backward,
        pp_group=submesh(ctx.mesh, "pp").get_group() if ctx.dims.pp > 1 else None,
    )


if __name__ == "__main__":
    main()
    exit_rank()
