"""One runner for the media training stages (train/encoder.py, train/adapter.py) over per-modality recipes.

A recipe builds a ``Stage`` (the model, the blocks FSDP shards, the batch transform, the loss, the eval and the
export of RUN_DIR/final); the runner does what every stage shares: the data-parallel-only check, the embedded
data, FSDP, the resumable sample stream (the indexed shards of ``data.dir``, or ``data.shards`` streamed through
DataLoader workers that decode and transform), optimizer and checkpoints, the training loop, and the export at the
end.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.nn as nn
from torch.distributed.tensor import DTensor

from train import dryrun
from train.checkpoint import Checkpointer
from train.config import JobConfig, parse_cli
from train.loop import EvalFn, LossFn, RunContext, compile_default, init_run, train
from train.media import MediaBatches, MediaStreamBatches, ensure_data, stream_batches, stream_shards, train_samples
from train.optim import build_optimizer, build_scheduler
from train.parallel.fsdp import parallelize, shard_frozen_units
from train.parallel.mesh import barrier, run_then_destroy

log = logging.getLogger("train.stage")

C = TypeVar("C", bound=JobConfig)


@dataclass
class Stage:
    """What a recipe builds for one run: the model and how it is batched, trained, evaluated and exported."""

    model: nn.Module
    # The repeated blocks FSDP shards (and activation checkpointing wraps) one by one.
    blocks: list[nn.Module]
    # A batch of samples (data.media.collate_samples) -> the model's micro-batch (a transform or a collator). With
    # data.shards it runs in the DataLoader workers (forked): it must build the batch on the host, not the device.
    transform: Callable[[dict], Any]
    loss_fn: LossFn
    eval_fn: EvalFn
    # Writes RUN_DIR/final from the trained model, given the logged records and the training seconds. Every rank
    # calls it (it may gather the sharded weights).
    export: Callable[[list[dict], float], None]
    # Parameters kept out of the checkpoints (the frozen LM), and out of FSDP (replicated on every rank) unless
    # parallel.shard_frozen; None: the whole model trains.
    frozen: set[nn.Parameter] | None = None
    # Under parallel.shard_frozen, the frozen modules FSDP shards one by one (each LM layer, its embeddings, the LM
    # itself for its output); the frozen parameters left outside them shard with the root.
    frozen_units: list[nn.Module] = field(default_factory=list)
    # Decoding options of the training stream (MediaSamples' and MediaStreamLoader's: image_format, ...).
    decode: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """How one modality trains: the builder of its Stage (model, blocks, batch transform, loss, eval, export)."""

    modality: str
    # What the stage is, for messages: "encoder pretraining", "adapter training".
    task: str
    build: Callable[[Any, RunContext], Stage]


def main(
    argv: list[str] | None,
    config_cls: type[C],
    recipes: Mapping[str, Recipe],
    planner: Callable[[C, str, int, argparse.Namespace], dict],
    prog: str,
    description: str,
) -> list[dict]:
    """An entry script's CLI: parse ``--modality`` and the config, set up the mesh, run the modality's recipe; with
    ``--dry-run``, ``planner(cfg, modality, world_size, args)`` plans it on a fake process group instead."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--modality", choices=tuple(recipes), required=True)
    dryrun.add_arguments(parser)
    cfg, args = parse_cli(config_cls, argv, parser)
    try:
        world = dryrun.planned_world_size(args)
        if args.dry_run:  # a plan on a fake process group: no data, no devices, no training
            planner(cfg, args.modality, world or int(os.environ.get("WORLD_SIZE", 1)), args)
            return []
    except (ValueError, OSError) as e:
        parser.error(str(e))
    ctx = init_run(cfg)
    return run_then_destroy(lambda: run(cfg, recipes[args.modality], ctx))


def run(cfg: JobConfig, recipe: Recipe, ctx: RunContext) -> list[dict]:
    """Build the recipe's stage, shard it, train it on the modality's shards and export it; returns the records."""
    if ctx.dims.tp > 1 or ctx.dims.pp > 1 or ctx.dims.cp > 1:
        raise ValueError(f"{recipe.task} is data parallel only: set parallel.tp = pp = cp = 1")
    ensure_data(cfg, recipe.modality, ctx.rank)
    # Checked before the model is built: a data.shards pattern that matches nothing fails in seconds.
    shards = stream_shards(cfg.data.shards) if cfg.data.shards else None
    ctx.micro_batch_size(cfg)  # a global batch that does not split over the ranks fails before the build too
    stage = recipe.build(cfg, ctx)
    # A model to be sharded whole stays where the recipe built it (the host): fully_shard moves each unit's shards
    # to the device, so a frozen 70B is never whole on a GPU.
    model = stage.model if shards_frozen(cfg, stage) else stage.model.to(ctx.device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if not n_train:
        raise ValueError(f"the {recipe.modality} stage has nothing to train")
    shard(cfg, ctx, stage)
    if ctx.rank == 0:
        # Read off the sharded model: frozen DTensors are what parallel.shard_frozen sharded.
        n_sharded = sum(p.numel() for p in model.parameters() if not p.requires_grad and isinstance(p, DTensor))
        log.info(
            "%s %s: %.2fM trainable, %.2fM frozen parameters (%.2fM of them FSDP-sharded), %d ranks",
            recipe.modality,
            recipe.task,
            n_train / 1e6,
            n_frozen / 1e6,
            n_sharded / 1e6,
            ctx.world_size,
        )

    data = media_batches(cfg, recipe.modality, ctx, stage, shards)

    def extra_metrics(step: int) -> dict:
        s = data.stats()  # not state_dict(): a streamed state is gathered from every rank
        return {"data/skipped": s["skipped"], "data/epoch": s["epoch"]}

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    # Checkpoints hold what trains: frozen parameters are read from their own files, never copied into each one.
    checkpointer = Checkpointer(
        cfg.checkpoint,
        cfg.run.dir,
        model,
        optimizer,
        scheduler,
        data,
        seed=cfg.run.seed,
        trainable_only=stage.frozen is not None,
    )
    t0 = time.perf_counter()
    try:
        records = train(
            cfg,
            model,
            stage.loss_fn,
            data,
            optimizer=optimizer,
            scheduler=scheduler,
            checkpointer=checkpointer,
            eval_fn=stage.eval_fn,
            extra_metrics=extra_metrics,
        )
    finally:
        data.close()  # DataLoader workers stop here, not at the interpreter's exit
    seconds = time.perf_counter() - t0
    if ctx.rank == 0:
        log.info("trained in %.1f s", seconds)
    stage.export(records, seconds)
    barrier()
    return records


def media_batches(
    cfg: JobConfig, modality: str, ctx: RunContext, stage: Stage, shards: list[str] | None
) -> MediaBatches | MediaStreamBatches:
    """The stage's micro-batches: ``shards`` (data.shards) streamed, else the indexed shards of ``data.dir``."""
    micro = ctx.micro_batch_size(cfg)
    if shards is not None:
        return stream_batches(cfg, modality, ctx, micro, stage.transform, stage.decode, shards)
    return MediaBatches(train_samples(cfg, modality, ctx, stage.decode), micro, stage.transform)


def shards_frozen(cfg: JobConfig, stage: Stage) -> bool:
    """Whether ``shard`` FSDP-shards the stage's frozen parameters (``parallel.shard_frozen``) too."""
    return cfg.parallel.shard_frozen and stage.frozen is not None


def shard(cfg: JobConfig, ctx: RunContext, stage: Stage) -> None:
    """FSDP over the stage's blocks; frozen parameters left out (replicated on every rank), or with
    ``parallel.shard_frozen`` sharded too, over their own units first."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    sharded_frozen = shards_frozen(cfg, stage)
    if sharded_frozen:
        shard_frozen_units(stage.frozen_units, ctx.mesh)
    parallelize(
        stage.model,
        ctx.mesh,
        stage.blocks,
        ac=cfg.train.ac,
        compile=compile_default(cfg),
        param_dtype=cfg.parallel.param_dtype,
        reduce_dtype=cfg.parallel.reduce_dtype,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        ignored_params=None if sharded_frozen else stage.frozen,
        mixed_precision_on_cpu=cfg.parallel.mixed_precision_on_cpu,
    )
    for block in [*stage.blocks, *(stage.frozen_units if sharded_frozen else [])]:
        if hasattr(block, "media_kv"):
            # Llama3MM computes each block's media keys/values once, outside its forward: gather for it too.
            register_fsdp_forward_method(block, "media_kv")
    if sharded_frozen:
        # fully_shard replaced the frozen parameters with their shards: the set must not keep the unsharded
        # originals alive (FSDP moved each to the device whole before sharding it).
        stage.frozen = {p for p in stage.model.parameters() if not p.requires_grad}
