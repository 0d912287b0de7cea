"""Llama 3 pretraining: FSDP2 (HSDP) x tensor/sequence parallel, exact resume, MFU metrics.

    torchrun --nproc-per-node N train/lm.py --config configs/lm/debug.toml [--section.key=value ...]

The model is built on the meta device, sharded (TP plan, activation checkpointing, compile, FSDP), and only then
materialised: each rank allocates its own shards and initialises them, or receives them from rank 0 reading a
pretrained checkpoint (``--model.init_from DIR``, Meta or HF layout), so no rank ever holds a 70B/405B model.
Writes RUN_DIR/metrics.jsonl, RUN_DIR/lm_config.json (the model's shape, for ``python -m train.export``) and
DCP checkpoints under RUN_DIR/checkpoints.
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
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import loss_parallel  # noqa: E402

from lm.checkpoint import load_config, read_state_dict  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.model import Transformer  # noqa: E402
from train import dryrun  # noqa: E402
from train.config import JobConfig, parse_cli  # noqa: E402
from train.export import write_lm_config  # noqa: E402
from train.loop import RunContext, accumulate, compile_default, init_run, micro_batch_size, train  # noqa: E402
from train.parallel.cp import apply_cp, check_cp, shard_batch  # noqa: E402
from train.parallel.fsdp import apply_ac, apply_compile, apply_fsdp  # noqa: E402
from train.parallel.mesh import ParallelDims, destroy_distributed, submesh  # noqa: E402
from train.parallel.pp import (  # noqa: E402
    Pipeline,
    PipelinePlan,
    PipelineStages,
    plan_pipeline,
    rank_stages,
    split_stage,
)
from train.parallel.tp import apply_tp, check_tp  # noqa: E402

log = logging.getLogger("train.lm")


@dataclass
class LMModelConfig:
    """The model: a preset of ``lm.LMConfig`` with optional shape overrides, or a pretrained checkpoint."""

    preset: str = "debug"
    # Shape overrides; None keeps the preset's (or the init_from checkpoint's) value.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    ffn_dim_multiplier: float | None = None
    multiple_of: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
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
    anneal_fraction: float = -1.0
    seq_len: int = 256
    # Data readers the global batch is drawn from (0 = one per data-parallel rank). A fixed count gives the same
    # batches under every layout whose data-parallel degree divides it.
    readers: int = 0
    num_workers: int = 0
    on_corrupt: Literal["fail", "skip"] = "fail"
    seed: int = 0
    # Size of the embedded default corpus when it is built here (1.0 = about 2M tokens).
    default_scale: float = 1.0


@dataclass
class LMJobConfig(JobConfig):
    """Root config of ``train/lm.py``."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)


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


# ----------------------------------------------------------------------------------------------------------------
# Data.


def build_mixture(data: LMDataConfig):
    """The data mixture of the ``[data]`` section; builds the embedded default corpus when ``dir`` is empty."""
    from data.default import ensure_default_corpus, load_default_mixture
    from data.mixture import Mixture

    root = Path(data.dir)
    if data.mixture:
        mixture = Mixture.parse(
            data.mixture, root, anneal=data.anneal_mixture or None, anneal_fraction=max(0.0, data.anneal_fraction)
        )
    elif (root / "manifest.json").is_file():
        mixture = Mixture({root.name: root}, {root.name: 1.0})
    elif (root / "mixture.json").is_file():
        mixture = load_default_mixture(root)
    else:
        if root.exists() and any(root.iterdir()):
            raise FileNotFoundError(
                f"data.dir={root} holds neither a prepared source (manifest.json) nor a mixture (mixture.json); "
                "prepare it with `python -m data.prepare` or set data.mixture"
            )
        log.info("building the embedded default corpus in %s", root)
        # One rank builds, the others wait on its lock.
        mixture = ensure_default_corpus(root, seed=data.seed, scale=data.default_scale)
    if data.anneal_mixture and not data.mixture:
        from data.mixture import parse_weights

        mixture = dataclasses.replace(mixture, anneal_weights=parse_weights(data.anneal_mixture))
    if data.anneal_fraction >= 0:
        mixture = dataclasses.replace(mixture, anneal_fraction=data.anneal_fraction)
    return mixture


class ReaderGroup:
    """This rank's share of a fixed number of data readers, cut into its micro-batches.

    Reader ``r`` is a ``PackedLoader`` with rank ``r`` of ``readers`` that yields ``batch_size / readers`` rows
    per optimizer step; data-parallel rank ``d`` of ``D`` holds readers ``d * readers / D ...`` and splits
    their rows into ``grad_accum`` micro-batches. Each optimizer step therefore sees the same rows under every
    layout whose data-parallel degree divides ``readers``, with or without accumulation. ``state_dict``
    gathers and merges every reader's state (a collective), so a checkpoint resumes onto any layout.
    """

    def __init__(
        self,
        mixture,
        data: LMDataConfig,
        *,
        readers: int,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        grad_accum: int,
        steps: int,
    ) -> None:
        from data.loader import PackedLoader
        from lm.tokenizer import Tokenizer

        check_readers(readers, dp_size, batch_size)
        per_rank = readers // dp_size
        self.grad_accum = grad_accum
        self.loaders = [
            PackedLoader(
                mixture,
                seq_len=data.seq_len,
                batch_size=batch_size // readers,
                rank=dp_rank * per_rank + i,
                world_size=readers,
                num_workers=data.num_workers,
                seed=data.seed,
                # Shards tokenized with another vocabulary would index past the embedding table.
                tokenizer_sha256=Tokenizer().sha256,
                on_corrupt=data.on_corrupt,
                total_steps=steps,
            )
            for i in range(per_rank)
        ]
        self._iters: list | None = None
        self._pending: list[dict[str, torch.Tensor]] = []

    def __iter__(self) -> ReaderGroup:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            if self._iters is None:
                self._iters = [iter(loader) for loader in self.loaders]
            batches = [next(it) for it in self._iters]
            tokens = torch.cat([b.tokens for b in batches]).chunk(self.grad_accum)
            documents = torch.cat([b.document_ids for b in batches]).chunk(self.grad_accum)
            self._pending = [{"tokens": t, "document_ids": d} for t, d in zip(tokens, documents, strict=True)]
        return self._pending.pop(0)

    def state_dict(self) -> dict:
        """Every reader's position across all ranks, merged into one state any layout restores (a collective)."""
        from data.loader import merge_states

        if self._pending:
            raise RuntimeError("data state taken in the middle of an optimizer step's micro-batches")

        states = [loader.state_dict() for loader in self.loaders]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            states = [s for rank_states in gathered for s in rank_states]
        return merge_states(states)

    def load_state_dict(self, state: dict) -> None:
        """Continue every reader of this rank from a merged state."""
        for loader in self.loaders:
            loader.load_state_dict(state)
        self._iters = None
        self._pending = []

    def stats(self) -> dict[str, Any]:
        """Metrics: the mixture phase and the realised source proportions of this rank's readers."""
        stats = [loader.stats() for loader in self.loaders]
        rows: dict[str, int] = {}
        for s in stats:
            for name, count in s["source_rows"].items():
                rows[name] = rows.get(name, 0) + count
        total = max(1, sum(rows.values()))
        out: dict[str, Any] = {"data/anneal": stats[0]["phase"] == "anneal"}
        out.update({f"data/{name}": count / total for name, count in rows.items()})
        out["data/corrupt_skipped"] = sum(s["corrupt_skipped"] for s in stats)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Model.


def build_model(cfg: LMJobConfig, lm_config: LMConfig, ctx: RunContext) -> nn.Module:
    """Meta-device model -> TP plan -> activation checkpointing -> compile -> FSDP -> shards materialised.

    Under pipeline parallel each of this rank's stages is cut from the meta model and sharded on its own; the
    result is a ``PipelineStages`` view of them that carries the full model's parameter names.
    """
    if ctx.dims.pp > 1:
        plan = pipeline_plan(cfg, lm_config, ctx.dims)
        stages = {}
        for index in rank_stages(submesh(ctx.mesh, "pp").get_local_rank(), plan.pp, plan.virtual_stages, plan.style):
            with torch.device("meta"):
                stages[index] = split_stage(Transformer(lm_config), index, plan)
        model: nn.Module = PipelineStages(stages)
    else:
        with torch.device("meta"):
            model = Transformer(lm_config)
        stages = {0: model}
    for stage in stages.values():
        if ctx.dims.tp > 1:
            apply_tp(stage, submesh(ctx.mesh, "tp"), loss_parallel=True)
        if ctx.dims.cp > 1:
            apply_cp(stage, submesh(ctx.mesh, "cp"))
        blocks = list(stage.layers.values())
        apply_ac(blocks, cfg.train.ac)
        if compile_default(cfg):
            apply_compile(blocks)
        apply_fsdp(
            stage,
            ctx.mesh,
            blocks,
            param_dtype=cfg.parallel.param_dtype,
            reduce_dtype=cfg.parallel.reduce_dtype,
            # A pipeline stage runs the forwards of several micro-batches before their backwards: keep its
            # parameters gathered rather than all-gather them again for each (torchtitan does the same).
            reshard_after_forward=cfg.parallel.reshard_after_forward and ctx.dims.pp == 1,
        )
    model.to_empty(device=ctx.device)
    if cfg.model.init_from:
        load_full_weights(model, cfg.model.init_from, ctx.rank, partial=ctx.dims.pp > 1)
    else:
        with torch.no_grad(), warnings.catch_warnings():
            # On CPU, DTensor draws each shard's random values on its own (so a random init depends on the
            # layout; equal-layout tests start from init_from) and warns about it once per rank.
            warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
            model.init_weights()
    return model


def load_full_weights(model: nn.Module, path: str, rank: int, *, partial: bool = False) -> None:
    """Rank 0 reads the checkpoint (memory-mapped) and broadcasts; every rank keeps only its own shards.

    ``partial``: ``model`` holds only some of the model's tensors (pipeline stages), so the load cannot be strict;
    ``read_state_dict`` has already checked the checkpoint against the full model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    error: list[str | None] = [None]
    if rank == 0:
        try:
            _, state = read_state_dict(path)
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
    cfg: LMJobConfig, ctx: RunContext, tokens: torch.Tensor, documents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(inputs, targets, model keyword arguments)`` of packed rows of ``seq_len + 1`` tokens and document ids."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model_kwargs: dict = {"document_ids": documents[:, :-1]}
    if ctx.dims.cp > 1:  # this rank's chunks of every row; the loss is the mean over its own tokens
        inputs, targets, model_kwargs = shard_batch(
            inputs, targets, documents[:, :-1], submesh(ctx.mesh, "cp"), cfg.model.attn_backend
        )
    return inputs, targets, model_kwargs


def uses_fused_loss(cfg: LMJobConfig, ctx: RunContext) -> bool:
    """The chunked loss as configured, except under tensor parallel (the vocabulary-parallel cross-entropy)."""
    return cfg.model.loss == "fused" and ctx.dims.tp == 1


def fused_loss_output_fn(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's ``output_fn`` for the chunked loss: linear + cross-entropy without whole logits."""
    from lm.loss import linear_cross_entropy

    flat_targets = targets.flatten()
    return lambda hidden, weight: linear_cross_entropy(hidden.flatten(0, 1), weight, flat_targets)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [B, S, V] (vocabulary-sharded under TP) and ``targets`` [B, S]."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if isinstance(loss, DTensor):  # vocabulary-parallel: a replicated scalar, made plain (differentiably)
        loss = loss.full_tensor()
    return loss


def make_loss(cfg: LMJobConfig, ctx: RunContext):
    """``loss_fn(model, batch) -> (mean next-token cross-entropy, metrics)`` for the configured loss and layout."""
    fused = uses_fused_loss(cfg, ctx)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"].to(ctx.device, non_blocking=True)
        documents = batch["document_ids"].to(ctx.device, non_blocking=True)
        inputs, targets, model_kwargs = model_inputs(cfg, ctx, tokens, documents)
        if fused:
            # Inside forward, where FSDP has the output weight gathered: its gradient reaches the reduce-scatter.
            loss = model(inputs, **model_kwargs, output_fn=fused_loss_output_fn(targets))
        else:
            loss = token_cross_entropy(model(inputs, **model_kwargs), targets)
        return loss, {}

    return loss_fn


def pipeline_plan(cfg: LMJobConfig, lm_config: LMConfig, dims: ParallelDims) -> PipelinePlan:
    """The checked pipeline layout of this config (``[parallel]`` pp keys against the model and the batch)."""
    rows_per_rank = micro_batch_size(cfg.train.batch_size, dims.dp, 1)
    return plan_pipeline(
        cfg.parallel,
        lm_config.n_layers,
        rows_per_rank,
        tie_word_embeddings=lm_config.tie_word_embeddings,
        compile=compile_default(cfg),
    )


def make_pipeline_step(cfg: LMJobConfig, lm_config: LMConfig, ctx: RunContext, model: PipelineStages):
    """The loop's ``forward_backward`` under pipeline parallel: this rank's rows of the step, re-split into the
    plan's micro-batches (``parallel.pp_microbatches``, whatever ``train.grad_accum`` is), run by the schedule."""
    plan = pipeline_plan(cfg, lm_config, ctx.dims)
    fused = uses_fused_loss(cfg, ctx)
    # Fused: the last stage's forward already returns the loss (output_fn), which the schedule takes as it is.
    loss_fn = (lambda loss, targets: loss) if fused else token_cross_entropy
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
            if fused:
                model_kwargs["output_fn"] = fused_loss_output_fn(y)
            inputs.append(x)
            targets.append(y)
            kwargs.append(model_kwargs)
        # The vocabulary-parallel cross-entropy needs its backward inside the same context.
        with loss_parallel() if ctx.dims.tp > 1 else contextlib.nullcontext():
            mean = pipeline.step(inputs, kwargs, targets)
        return mean * len(batches), {}

    return forward_backward


# ----------------------------------------------------------------------------------------------------------------
# Entry.


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
    return lm_config


def check_readers(readers: int, dp_size: int, batch_size: int) -> None:
    """Each data-parallel rank holds whole readers, and each reader gives whole rows per step."""
    if readers % dp_size:
        raise ValueError(f"data.readers={readers} must be a multiple of the data-parallel degree {dp_size}")
    if batch_size % readers:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of data.readers={readers}")


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
    try:
        return _run(cfg, lm_config, ctx)
    finally:
        destroy_distributed()


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
    )
    model = build_model(cfg, lm_config, ctx)
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
    forward_backward = None
    if ctx.dims.pp > 1:
        forward_backward = make_pipeline_step(cfg, lm_config, ctx, model)
    elif ctx.dims.tp > 1:

        def forward_backward(model: nn.Module, batches: list) -> tuple[torch.Tensor, dict]:
            # The vocabulary-parallel cross-entropy needs its backward inside the same context.
            with loss_parallel():
                return accumulate(model, loss_fn, batches, ctx.device)

    seq = cfg.data.seq_len
    return train(
        cfg,
        model,
        loss_fn,
        data,
        tokens_per_sample=seq,
        flops_per_sample=lm_config.flops_per_token(seq) * seq,
        extra_metrics=lambda step: data.stats(),
        forward_backward=forward_backward,
        pp_group=submesh(ctx.mesh, "pp").get_group() if ctx.dims.pp > 1 else None,
    )


if __name__ == "__main__":
    main()
