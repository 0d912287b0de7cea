"""The Llama 3 model of a pretraining job, parallelized: pipeline stages, TP/SP, CP, then AC -> compile -> FSDP.

Shared by ``train/lm.py``, its dry run (``train.dryrun``, on a fake process group) and the benchmarks. ``cfg`` is an
LM job config (``train.lm.LMJobConfig``: the shared ``[train]``/``[parallel]`` sections plus ``[model]`` and
``[data]``), passed in rather than imported so that nothing here depends on the entry script.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor.parallel import loss_parallel

from lm.checkpoint import read_state_dict
from lm.config import LMConfig
from lm.loss import fused_loss_output_fn, token_cross_entropy
from lm.model import Transformer
from train.config import JobConfig
from train.loop import ForwardBackward, LossFn, RunContext, accumulate, compile_default, micro_batch_size
from train.parallel.cp import apply_cp, shard_batch
from train.parallel.fsdp import parallelize
from train.parallel.init import init_sharded_weights
from train.parallel.mesh import ParallelDims, submesh
from train.parallel.pp import Pipeline, PipelinePlan, PipelineStages, plan_pipeline, rank_stages, split_stage
from train.parallel.tp import apply_tp

# (the checkpoint's config, its weights) -> the weights to load
StateAdapter = Callable[[LMConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def parallelize_llama(
    cfg: JobConfig, lm_config: LMConfig, ctx: RunContext, *, adapt_state: StateAdapter | None = None
) -> nn.Module:
    """Meta-device model -> TP plan -> CP -> activation checkpointing -> compile -> FSDP -> shards materialised.

    Under pipeline parallel each of this rank's stages is cut from the meta model and sharded on its own; the
    result is a ``PipelineStages`` view of them that carries the full model's parameter names. ``adapt_state``:
    see :func:`load_full_weights`.
    """
    model, stages = _meta_stages(cfg, lm_config, ctx)
    for stage in stages:
        if ctx.dims.tp > 1:
            apply_tp(stage, submesh(ctx.mesh, "tp"), loss_parallel=True)
        if ctx.dims.cp > 1:
            apply_cp(stage, submesh(ctx.mesh, "cp"))
        parallelize(
            stage,
            ctx.mesh,
            list(stage.layers.values()),
            ac=cfg.train.ac,
            compile=compile_default(cfg),
            param_dtype=cfg.parallel.param_dtype,
            reduce_dtype=cfg.parallel.reduce_dtype,
            # A pipeline stage runs the forwards of several micro-batches before their backwards: keep its
            # parameters gathered rather than all-gather them again for each (torchtitan does the same).
            reshard_after_forward=cfg.parallel.reshard_after_forward and ctx.dims.pp == 1,
            mixed_precision_on_cpu=cfg.parallel.mixed_precision_on_cpu,
        )
    model.to_empty(device=ctx.device)
    if cfg.model.init_from:
        load_full_weights(model, cfg.model.init_from, ctx.rank, partial=ctx.dims.pp > 1, adapt_state=adapt_state)
    else:
        init_sharded_weights(model, lm_config, cfg.run.seed)
    return model


def _meta_stages(cfg: JobConfig, lm_config: LMConfig, ctx: RunContext) -> tuple[nn.Module, list[nn.Module]]:
    """The meta-device model this rank holds and its parts to shard: the whole model, or its pipeline stages."""
    if ctx.dims.pp == 1:
        with torch.device("meta"):
            model = Transformer(lm_config)
        return model, [model]
    plan = pipeline_plan(cfg, lm_config, ctx.dims)
    stages = {}
    for index in rank_stages(submesh(ctx.mesh, "pp").get_local_rank(), plan.pp, plan.virtual_stages, plan.style):
        with torch.device("meta"):
            stages[index] = split_stage(Transformer(lm_config), index, plan)
    return PipelineStages(stages), list(stages.values())


def load_full_weights(
    model: nn.Module, path: str, rank: int, *, partial: bool = False, adapt_state: StateAdapter | None = None
) -> None:
    """Rank 0 reads the checkpoint (memory-mapped) and broadcasts; every rank keeps only its own shards.

    ``partial``: ``model`` holds only some of the model's tensors (pipeline stages), so the load cannot be strict;
    ``read_state_dict`` has already checked the checkpoint against the full model. ``adapt_state(config, state)``
    (rank 0, before the broadcast) returns the state to load from the checkpoint's config and checked weights:
    the reward model's fresh score head in place of an LM's output projection.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    error: list[str | None] = [None]
    if rank == 0:
        try:
            config, state = read_state_dict(path)
            if adapt_state is not None:
                state = adapt_state(config, state)
        except (OSError, KeyError, ValueError) as e:
            error[0] = f"model.init_from={path}: {e}"
    # Agree on failure first: a rank waiting in the weight broadcast would otherwise hang on rank 0's error.
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not partial)
    set_model_state_dict(model, state, options=options)


def model_inputs(
    cfg: JobConfig, ctx: RunContext, tokens: torch.Tensor, documents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(inputs, targets, model keyword arguments)`` of packed rows of ``seq_len + 1`` tokens and document ids."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model_kwargs: dict = {"document_ids": documents[:, :-1]}
    if ctx.dims.cp > 1:  # this rank's chunks of every row; the loss is the mean over its own tokens
        inputs, targets, model_kwargs = shard_batch(
            inputs, targets, documents[:, :-1], submesh(ctx.mesh, "cp"), cfg.model.attn_backend
        )
    return inputs, targets, model_kwargs


def pipeline_plan(cfg: JobConfig, lm_config: LMConfig, dims: ParallelDims) -> PipelinePlan:
    """The checked pipeline layout of this config (``[parallel]`` pp keys against the model and the batch)."""
    rows_per_rank = micro_batch_size(cfg.train.batch_size, dims.dp, 1)
    return plan_pipeline(
        cfg.parallel,
        lm_config.n_layers,
        rows_per_rank,
        tie_word_embeddings=lm_config.tie_word_embeddings,
        compile=compile_default(cfg),
    )


def make_pipeline_step(
    cfg: JobConfig, lm_config: LMConfig, ctx: RunContext, model: PipelineStages, *, fused_loss: bool
) -> ForwardBackward:
    """The loop's ``forward_backward`` under pipeline parallel: this rank's rows of the step, re-split into the
    plan's micro-batches (``parallel.pp_microbatches``, whatever ``train.grad_accum`` is), run by the schedule.

    ``fused_loss``: the last stage returns the chunked loss itself (``train.losses.uses_fused_loss``).
    """
    plan = pipeline_plan(cfg, lm_config, ctx.dims)
    # Fused: the last stage's forward already returns the loss (output=), which the schedule takes as it is.
    loss_fn = (lambda loss, targets: loss) if fused_loss else token_cross_entropy
    pipeline = Pipeline(plan, model.stages, submesh(ctx.mesh, "pp").get_group(), ctx.device, loss_fn)

    def forward_backward(model: nn.Module, batches: list) -> tuple[torch.Tensor, dict]:
        tokens = torch.cat([b["tokens"] for b in batches]).to(ctx.device, non_blocking=True)
        documents = torch.cat([b["document_ids"] for b in batches]).to(ctx.device, non_blocking=True)
        inputs, targets, kwargs = [], [], []
        for rows, docs in zip(tokens.chunk(plan.microbatches), documents.chunk(plan.microbatches), strict=True):
            # Every stage builds its own mask and RoPE positions from the document ids. All ranks of a pipeline
            # share a data-parallel rank and so read the same rows: each passes its own copy to its stages as a
            # keyword argument, rather than sending the ids along with the activations.
            x, y, model_kwargs = model_inputs(cfg, ctx, rows, docs)
            if fused_loss:
                model_kwargs["output"] = fused_loss_output_fn(y)
            inputs.append(x)
            targets.append(y)
            kwargs.append(model_kwargs)
        # The vocabulary-parallel cross-entropy needs its backward inside the same context.
        with loss_parallel() if ctx.dims.tp > 1 else contextlib.nullcontext():
            mean = pipeline.step(inputs, kwargs, targets)
        return mean * len(batches), {}

    return forward_backward


def make_forward_backward(
    cfg: JobConfig, lm_config: LMConfig, ctx: RunContext, model: nn.Module, loss_fn: LossFn, *, fused_loss: bool
) -> ForwardBackward | None:
    """The loop's ``forward_backward`` for this layout: the pipeline schedule, the micro-step loop inside the
    vocabulary-parallel loss's context under TP, or None (the loop's own :func:`train.loop.accumulate`)."""
    if ctx.dims.pp > 1:
        return make_pipeline_step(cfg, lm_config, ctx, model, fused_loss=fused_loss)
    if ctx.dims.tp == 1:
        return None

    def forward_backward(model: nn.Module, batches: list) -> tuple[torch.Tensor, dict]:
        # The vocabulary-parallel cross-entropy needs its backward inside the same context.
        with loss_parallel():
            return accumulate(model, loss_fn, batches, ctx.device)

    return forward_backward
