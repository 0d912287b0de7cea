"""A plan for internet scale: ``train/lm.py --dry-run --world-size W`` sizes a run without its machines.

    python train/lm.py --config configs/lm/llama3_405b.toml --dry-run --world-size 16384 [--dry-run-rank R]

The real model is built on the meta device and parallelized by the real code
(``train.parallel.llama.parallelize_llama``: pipeline stage split, TP/SP plan, context parallel, activation
checkpointing, FSDP) on a fake process group of the given world size (``FakeStore`` + backend ``"fake"``:
collectives do nothing), with the mesh from ``train.parallel.mesh.build_mesh``. Parameter, gradient and optimizer
bytes are read off the sharded parameters of
that model; activations, pipeline bubble and communication come from the formulas below, which follow what this
code saves and sends (see :func:`activation_bytes_per_layer` and :func:`communication_bytes`). The estimate is for
a CUDA run in ``parallel.param_dtype`` compute (bf16) with fp32 sharded parameters, gradients and AdamW states.

Without ``--dry-run-rank`` one rank per pipeline rank is reported (data, context and tensor rank 0: FSDP's first
shards are the largest); pipeline ranks that hold stages of the same shape share one build. Nothing is read from
disk but the config: no tokenizer, no data, no checkpoint (an ``init_from`` checkpoint's ``lm_config`` only).

Left out (so a layout that fits by less than a few GiB is a risk, not a plan): the CUDA context and NCCL buffers
(~1-3 GiB), allocator fragmentation, torch.compile's workspaces, attention kernels' workspaces, the embedding and
loss-parallel bookkeeping tensors, the fp32 softmax statistics (logsumexp, RMSNorm's rstd), and checkpoint staging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from lm.config import LMConfig

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
# Sharded parameters, their gradients and AdamW's two moments stay fp32 (FSDP2 mixed precision casts the
# all-gathered copy only).
MASTER_BYTES = 4
ADAM_STATES = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dry-run`` flags of ``train/lm.py``."""
    group = parser.add_argument_group("dry run (plan a layout on a fake process group; no data, no devices)")
    group.add_argument("--dry-run", action="store_true", help="report per-rank memory, bubble and communication")
    group.add_argument("--world-size", type=int, default=None, help="ranks of the planned run (dry run only)")
    group.add_argument(
        "--dry-run-rank", type=int, default=None, help="report this rank only (default: one per PP rank)"
    )
    group.add_argument("--dry-run-out", default=None, help="also write the report as JSON to this file")
    group.add_argument("--dry-run-device-gb", type=float, default=80.0, help="device memory in GiB (default 80)")


# ----------------------------------------------------------------------------------------------------------------
# Bytes of a (real or fake) parallelized model and optimizer: the real run and the dry run count with these.


def shard_bytes(model: nn.Module, sharded_only: bool = False) -> dict[str, int]:
    """This rank's parameter shards: ``params`` (element count) and ``param_bytes`` (allocated, with FSDP padding).

    FSDP2 keeps each sharded parameter as a view of a padded buffer (every rank holds ``ceil(dim0 / shards)``
    rows), so the buffer's size is what the rank allocates; on the meta device the same sizes come out.
    ``sharded_only`` counts FSDP's parameters alone (not those it ignores, such as a frozen LM under adapters).
    """
    count = nbytes = 0
    for p in model.parameters():
        if sharded_only and not isinstance(p, DTensor):
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        count += local.numel()
        nbytes += local.untyped_storage().nbytes()
    return {"params": count, "param_bytes": nbytes}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter tensors on this rank (AdamW: ``exp_avg`` and ``exp_avg_sq``)."""
    total = 0
    for state in optimizer.state.values():
        for name, value in state.items():
            if name == "step" or not isinstance(value, torch.Tensor):
                continue  # AdamW's step count: one scalar per parameter
            local = value.to_local() if isinstance(value, DTensor) else value
            total += local.numel() * local.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Formulas.


@dataclass(frozen=True)
class Shape:
    """What the activation and communication formulas need of one micro-batch on one rank."""

    dim: int  # h
    kv_dim: int  # n_kv_heads * head_dim
    ffn_dim: int  # f
    vocab_size: int  # V
    micro_batch: int  # b, sequences per micro-batch
    seq_len: int  # s, the whole sequence (CP splits it)
    tp: int  # t
    cp: int
    act_bytes: int  # 2 for bf16 compute, 4 for fp32

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on this rank: ``b * s / cp``."""
        return self.micro_batch * self.seq_len // self.cp


def activation_bytes_per_layer(shape: Shape, ac: str, attn_backend: str = "sdpa") -> int:
    """Bytes one transformer layer keeps for backward, per micro-batch, on one rank.

    With ``T = b * s / cp`` local tokens, ``t`` = TP (sequence parallel between blocks), elements per token:

    * ``none``: ``2h + (2n + 2)h/t + 2 kv cp / t + 4f/t``. Attention: the norm's ``n h/t`` (bf16 compute:
      ``lm.model.RMSNorm`` keeps its fp32 input copy and its normalized output, ``n = 3``; fp32: its input,
      ``n = 1``), the all-gathered normed input of wq/wk/wv ``h``, the rotated queries ``h/t``, keys and values
      ``2 kv cp / t`` (the whole sequence's under CP: they are all-gathered), the attention output ``h/t`` (also
      wo's input: on CUDA it is already laid out [B, S, H, D]). Feed-forward: the norm's ``n h/t``, the gathered
      normed input ``h``, w1's output, silu's output, w3's output and their product ``4f/t``. Not measured here
      (CPU runs decompose the sharded norm differently); the other two modes are (tests/test_dryrun.py).
    * ``selective`` (``train.parallel.fsdp``'s policy: keep matmul and SDPA outputs, recompute the rest):
      ``2h + 3h/t + 2 kv / t + 2f/t``: the block's input ``h/t``, wq/wk/wv ``h/t + 2kv/t``, the SDPA output
      ``h/t`` (flex attention is not on the keep list: recomputed, so ``2h/t`` then), w1 and w3 ``2f/t``, and
      the outputs of wo and w2, which under TP are the full sequence's partial sums before their reduce-scatter,
      ``2h``.
    * ``full``: the block's input ``h/t``.

    Times ``T * act_bytes``. The fp32 statistics (RMSNorm's rstd, attention's logsumexp) are left out.
    """
    h, kv, f, t, cp = shape.dim, shape.kv_dim, shape.ffn_dim, shape.tp, shape.cp
    if ac == "none":
        norm = 3 if shape.act_bytes == 2 else 1
        elements = 2 * h + ((2 * norm + 2) * h + 2 * kv * cp + 4 * f) / t
    elif ac == "selective":
        kept_attention = h if attn_backend == "sdpa" else 0
        elements = 2 * h + (2 * h + kept_attention + 2 * kv + 2 * f) / t
    elif ac == "full":
        elements = h / t
    else:
        raise ValueError(f"train.ac must be none, selective or full, got {ac!r}")
    return int(elements * shape.tokens * shape.act_bytes)


def output_activation_bytes(shape: Shape, vocab_parallel: bool) -> int:
    """Bytes the final norm, output projection and loss keep for backward, per micro-batch (last stage only).

    Vocabulary-parallel cross-entropy (TP): the norm's input ``h/t``, the gathered normed input ``h``, and per
    token the ``V/t`` logits in the compute dtype plus their fp32 copy and fp32 log-softmax (``8 V/t`` bytes).
    Fused chunked loss (no TP, ``lm.loss.linear_cross_entropy``): the gradients of the hidden states (fp32, ``h``)
    and of the ``[V, h]`` weight (fp32), both computed in forward.
    """
    h, v, t, tokens = shape.dim, shape.vocab_size, shape.tp, shape.tokens
    norm = tokens * (h / t + h) * shape.act_bytes
    if vocab_parallel:
        return int(norm + tokens * (v / t) * (shape.act_bytes + 8))
    return int(norm + tokens * h * 4 + v * h * 4)


def layers_in_flight(schedule: str, pp: int, pp_rank: int, microbatches: int, virtual_stages: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, in units of all its layers.

    GPipe: every micro-batch (all forwards run first). 1F1B: ``min(m, pp - r)`` on rank ``r`` (torch's warm-up,
    then backward before each new forward). Interleaved1F1B / InterleavedZeroBubble: torch's warm-up of
    ``(v - 1) R + k (pp - 1 - r)`` stage-forwards (``R = m / max(1, m // pp)`` micro-batches per round, ``k`` = 2
    and 1) plus the one of the first steady-state step, at most ``m v``, each stage holding ``1/v`` of the rank's
    layers. ZBVZeroBubble: like 1F1B's first rank on every rank (the V placement balances memory). No pipeline:
    one micro-batch at a time.
    """
    m, v, r = microbatches, virtual_stages, pp_rank
    if pp == 1:
        return 1.0
    if schedule == "GPipe":
        return float(m)
    if schedule == "1F1B":
        return float(min(m, pp - r))
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        per_round = m // max(1, m // pp)
        hop = 2 if schedule == "Interleaved1F1B" else 1
        return min(m * v, (v - 1) * per_round + hop * (pp - 1 - r) + 1) / v
    if schedule == "ZBVZeroBubble":
        return float(min(m, pp))
    raise ValueError(f"parallel.pp_schedule={schedule!r}: no activation model for this schedule")


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> float:
    """Idle time over useful time of a pipeline step: ``(pp - 1) / (m v)`` interleaved, ``(pp - 1) / m`` otherwise.

    The zero-bubble schedules fill part of it with weight-gradient work; the interleaved figure is their bound.
    """
    if pp == 1:
        return 0.0
    interleaved = schedule in ("Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
    return (pp - 1) / (microbatches * (virtual_stages if interleaved else 1))


@dataclass(frozen=True)
class Layout:
    """The parallel degrees and step structure the communication formulas need."""

    tp: int
    cp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    microbatches: int  # per optimizer step on one rank (pipeline micro-batches, or gradient accumulation)
    ac: str
    param_bytes: int  # all-gathered parameter dtype
    reduce_bytes: int  # gradient reduction dtype
    reshard_after_forward: bool


def _ring(size: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather / reduce-scatter whose gathered tensor is ``size`` bytes."""
    return size * (n - 1) / n


def communication_bytes(
    shape: Shape, layout: Layout, *, layers: int, first: bool, last: bool, sends: int, receives: int, params: float
) -> dict[str, float]:
    """Bytes this rank sends per optimizer step, by dimension (ring collectives: ``size * (n - 1) / n``).

    * ``tp``: sequence parallel turns each block's two all-reduces into all-gather + reduce-scatter pairs of the
      ``[T, h]`` activations: 4 collectives per layer in forward, 4 in backward and, with activation
      checkpointing, the forward's 4 again in recompute; plus the embedding's reduce-scatter and the output's
      all-gather (and their backwards) on the first / last stage. ``m * (layers * (8 + 4 ac) + 2 first + 2 last)
      * ring(T h a, t)``.
    * ``cp``: K and V all-gathered per layer (``b s kv / t`` elements each), their gradients reduce-scattered in
      backward, gathered again in recompute: ``m * layers * (2 + 2 + 2 ac) * ring(b s kv a / t, cp)``.
    * ``pp``: each stage-to-stage edge carries the ``[T, h/t]`` (sequence-sharded) hidden states forward and their
      gradient back: ``m * (sends + receives) * T h a / t`` (sends: this rank's stages that feed another stage;
      receives: those fed by one, which send the gradient back).
    * ``dp``: FSDP all-gathers this rank's (TP-local) parameters ``P`` in the compute dtype and reduce-scatters
      their gradients in the reduction dtype over ``F = dp_shard x cp`` ranks: gathers per step ``1`` under
      pipeline parallel (parameters stay gathered for all micro-batches), else ``2m`` (forward and backward)
      with ``reshard_after_forward`` or ``m``; reduce-scatters per step ``1`` under pipeline parallel, else ``m``.
      HSDP adds an all-reduce of the gradient shard over ``dp_replicate`` ranks (``2 ring(P r / F, R)`` each).
    """
    t, cp, m, a = layout.tp, layout.cp, layout.microbatches, shape.act_bytes
    recompute = layout.ac != "none"
    out = {"tp": 0.0, "cp": 0.0, "pp": 0.0, "dp": 0.0}
    if t > 1:
        collectives = layers * (8 + 4 * recompute) + 2 * first + 2 * last
        out["tp"] = m * collectives * _ring(shape.tokens * shape.dim * a, t)
    if cp > 1:
        kv = shape.micro_batch * shape.seq_len * shape.kv_dim / t * a
        out["cp"] = m * layers * (4 + 2 * recompute) * _ring(kv, cp)
    if layout.pp > 1:
        out["pp"] = m * (sends + receives) * shape.tokens * shape.dim / t * a
    fsdp = layout.dp_shard * cp
    if fsdp > 1 or layout.dp_replicate > 1:
        if layout.pp > 1:
            gathers, reduces = 1, 1
        else:
            gathers, reduces = (2 * m if layout.reshard_after_forward else m), m
        dp = 0.0
        if fsdp > 1:
            dp += gathers * _ring(params * layout.param_bytes, fsdp)
            dp += reduces * _ring(params * layout.reduce_bytes, fsdp)
        if layout.dp_replicate > 1:
            dp += reduces * 2 * _ring(params / fsdp * layout.reduce_bytes, layout.dp_replicate)
        out["dp"] = dp
    return out


# ----------------------------------------------------------------------------------------------------------------
# Building ranks on a fake process group.


@dataclass
class RankReport:
    """One rank's plan: where it sits, what it holds, what it keeps and sends per optimizer step."""

    rank: int
    pp_rank: int
    stages: list[int]
    layers: int
    first: bool
    last: bool
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    buffer_bytes: int
    total_bytes: int
    device_bytes: int
    comm_bytes: dict[str, float] = field(default_factory=dict)
    same_as: list[int] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the estimate stays within the device's memory."""
        return self.total_bytes <= self.device_bytes


def _pipeline(cfg, lm_config: LMConfig, dims) -> tuple[str, int, int, list[list[int]], Any]:
    """(schedule, micro-batches per step, virtual stages, layers of each stage, plan or None) of the layout."""
    rows = cfg.train.batch_size // dims.dp
    if dims.pp == 1:
        return "none", cfg.train.grad_accum, 1, [list(range(lm_config.n_layers))], None
    from train.parallel.pp import plan_pipeline

    plan = plan_pipeline(cfg.parallel, lm_config.n_layers, rows, tie_word_embeddings=lm_config.tie_word_embeddings)
    return plan.schedule, plan.microbatches, plan.virtual_stages, plan.stage_layers, plan


def _rank_stages(plan, pp_rank: int) -> list[int]:
    if plan is None:
        return [0]
    from train.parallel.pp import rank_stages

    return rank_stages(pp_rank, plan.pp, plan.virtual_stages, plan.style)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Join ``rank`` of a fake process group of ``world_size`` (collectives do nothing); the caller destroys it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs its own (fake) process group; one is already initialized")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def build_fake_rank(cfg, lm_config: LMConfig, dims, rank: int) -> nn.Module:
    """``parallelize_llama`` for ``rank`` of ``dims.world_size`` on the meta device and a fake process group.

    Returns the parallelized (meta) model; the caller destroys the process group when done.
    """
    from train.loop import RunContext
    from train.parallel.llama import parallelize_llama
    from train.parallel.mesh import build_mesh, dp_rank_and_size

    init_fake_process_group(rank, dims.world_size)
    mesh = build_mesh(dims, "cpu")
    dp_rank, dp_size = dp_rank_and_size(mesh)
    ctx = RunContext(dims, mesh, rank, dims.world_size, dp_rank, dp_size, torch.device("meta"))
    # The dry run reads no weights: the model's shape is already in lm_config.
    planned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=""))
    return parallelize_llama(planned, lm_config, ctx)


def _coords_rank(dims, pp_rank: int) -> int:
    """Global rank of (dp 0, pp_rank, cp 0, tp 0) in the [dp_replicate, dp_shard, pp, cp, tp] mesh."""
    return pp_rank * dims.cp * dims.tp


def _pp_rank_of(dims, rank: int) -> int:
    return (rank // (dims.cp * dims.tp)) % dims.pp


@dataclass(frozen=True)
class _PipelineLayout:
    """What :func:`_pipeline` reads off the config: the schedule and which layers each stage holds."""

    schedule: str
    microbatches: int
    virtual_stages: int
    stage_layers: list[list[int]]
    plan: Any  # train.parallel.pp.PipelinePlan, or None without pipeline parallel

    def stages(self, pp_rank: int) -> list[int]:
        """The stages ``pp_rank`` runs."""
        return _rank_stages(self.plan, pp_rank)

    def signature(self, pp_rank: int) -> tuple:
        """Equal for pipeline ranks whose stages have the same shapes (they share one fake build)."""
        last = len(self.stage_layers) - 1
        return tuple((len(self.stage_layers[s]), s == 0, s == last) for s in self.stages(pp_rank))


def plan(cfg, lm_config: LMConfig, world_size: int, *, rank: int | None = None, device_gb: float = 80.0) -> dict:
    """The dry-run report (a JSON-able dict) of ``cfg`` on ``world_size`` ranks: every PP rank, or ``rank`` alone."""
    from train.parallel.mesh import MeshError, ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if rank is not None and not 0 <= rank < world_size:
        raise MeshError(f"--dry-run-rank={rank} is outside the world of {world_size} ranks")
    pipeline = _PipelineLayout(*_pipeline(cfg, lm_config, dims))
    shape, layout = _shape_and_layout(cfg, lm_config, dims, pipeline.microbatches)
    pp_ranks = [_pp_rank_of(dims, rank)] if rank is not None else list(range(dims.pp))
    built: dict[tuple, tuple[int, dict[str, int]]] = {}
    reports: list[RankReport] = []
    for pp_rank in pp_ranks:
        this_rank = rank if rank is not None else _coords_rank(dims, pp_rank)
        sig = pipeline.signature(pp_rank)
        if sig not in built:
            built[sig] = (this_rank, _fake_rank_sizes(cfg, lm_config, dims, this_rank))
        source_rank, sizes = built[sig]
        report = _rank_report(cfg, lm_config, dims, shape, layout, pipeline, this_rank, pp_rank, sizes, device_gb)
        if source_rank != this_rank:
            report.same_as = [source_rank]
        reports.append(report)
    return _summary(cfg, lm_config, dims, shape, pipeline, reports, world_size, device_gb)


def _shape_and_layout(cfg, lm_config: LMConfig, dims, microbatches: int) -> tuple[Shape, Layout]:
    """The formulas' view of one micro-batch on one rank, and of the layout's degrees and dtypes."""
    compute_bytes = DTYPE_BYTES[cfg.parallel.param_dtype]
    shape = Shape(
        dim=lm_config.dim,
        kv_dim=lm_config.n_kv_heads * lm_config.head_dim,
        ffn_dim=lm_config.ffn_hidden_dim,
        vocab_size=lm_config.vocab_size,
        micro_batch=cfg.train.batch_size // dims.dp // microbatches,
        seq_len=cfg.data.seq_len,
        tp=dims.tp,
        cp=dims.cp,
        act_bytes=compute_bytes,
    )
    layout = Layout(
        tp=dims.tp,
        cp=dims.cp,
        pp=dims.pp,
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        microbatches=microbatches,
        ac=cfg.train.ac,
        param_bytes=compute_bytes,
        reduce_bytes=DTYPE_BYTES[cfg.parallel.reduce_dtype],
        reshard_after_forward=cfg.parallel.reshard_after_forward,
    )
    return shape, layout


def _fake_rank_sizes(cfg, lm_config: LMConfig, dims, rank: int) -> dict[str, int]:
    """Build ``rank`` on a fake process group and read off its shard bytes, unsharded and largest-unit sizes."""
    try:
        model = build_fake_rank(cfg, lm_config, dims, rank)
        sizes = shard_bytes(model)
        sizes["unsharded"] = unsharded_params(model, dims.dp_shard * dims.cp)
        sizes["largest_group"] = _largest_fsdp_group(model, dims.dp_shard * dims.cp)
        del model
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return sizes


def _rank_report(
    cfg,
    lm_config: LMConfig,
    dims,
    shape: Shape,
    layout: Layout,
    pipeline: _PipelineLayout,
    rank: int,
    pp_rank: int,
    sizes: dict[str, int],
    device_gb: float,
) -> RankReport:
    """``rank``'s memory and communication, from its pipeline rank's stages and its (fake-built) sizes."""
    stages = pipeline.stages(pp_rank)
    num_stages = len(pipeline.stage_layers)
    layers = sum(len(pipeline.stage_layers[s]) for s in stages)
    first, last = 0 in stages, num_stages - 1 in stages
    in_flight = layers_in_flight(pipeline.schedule, dims.pp, pp_rank, pipeline.microbatches, pipeline.virtual_stages)
    activations = int(in_flight * layers * activation_bytes_per_layer(shape, cfg.train.ac, lm_config.attn_backend))
    if cfg.train.ac != "none":  # backward recomputes one layer's full set at a time
        activations += activation_bytes_per_layer(shape, "none")
    if last:
        activations += output_activation_bytes(shape, vocab_parallel=dims.tp > 1)
    buffers = fsdp_buffer_bytes(sizes, dims.pp, layout.param_bytes, layout.reduce_bytes)
    param_bytes = sizes["param_bytes"]
    optimizer = ADAM_STATES * MASTER_BYTES * sizes["params"]
    comm = communication_bytes(
        shape,
        layout,
        layers=layers,
        first=first,
        last=last,
        sends=sum(1 for s in stages if s < num_stages - 1),
        receives=sum(1 for s in stages if s > 0),
        params=sizes["unsharded"],
    )
    return RankReport(
        rank=rank,
        pp_rank=pp_rank,
        stages=stages,
        layers=layers,
        first=first,
        last=last,
        params=sizes["params"],
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        optimizer_bytes=optimizer,
        activation_bytes=activations,
        buffer_bytes=buffers,
        total_bytes=param_bytes * 2 + optimizer + activations + buffers,
        device_bytes=int(device_gb * GIB),
        comm_bytes=comm,
    )


def _summary(
    cfg,
    lm_config: LMConfig,
    dims,
    shape: Shape,
    pipeline: _PipelineLayout,
    reports: list[RankReport],
    world_size: int,
    device_gb: float,
) -> dict:
    """The JSON-able report: the layout, the step's shape, the verdict and every reported rank."""
    worst = max(reports, key=lambda r: r.total_bytes)
    return {
        "world_size": world_size,
        "layout": {
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "pp": dims.pp,
            "cp": dims.cp,
            "tp": dims.tp,
        },
        "model": {"params": lm_config.num_params(), "n_layers": lm_config.n_layers, "dim": lm_config.dim},
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.train.batch_size,
        "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        "micro_batch": shape.micro_batch,
        "microbatches": pipeline.microbatches,
        "schedule": pipeline.schedule,
        "virtual_stages": pipeline.virtual_stages,
        "ac": cfg.train.ac,
        "attn_backend": lm_config.attn_backend,
        "bubble_fraction": bubble_fraction(pipeline.schedule, dims.pp, pipeline.microbatches, pipeline.virtual_stages),
        "device_gb": device_gb,
        "fits": all(r.fits for r in reports),
        "worst_rank": worst.rank,
        "worst_total_gb": worst.total_bytes / GIB,
        "ranks": [dataclasses.asdict(r) | {"fits": r.fits} for r in reports],
    }


def unsharded_params(model: nn.Module, fsdp: int) -> float:
    """Elements of this rank's FSDP parameters before sharding (TP-local, FSDP padding included)."""
    return float(shard_bytes(model, sharded_only=True)["param_bytes"] // MASTER_BYTES * fsdp)


def largest_fsdp_unit(model: nn.Module, blocks: list[nn.Module], fsdp: int) -> float:
    """Unsharded elements of the largest FSDP unit: one of ``blocks``, or the rest of the model (the root's)."""
    per_block = [unsharded_params(block, fsdp) for block in blocks]
    return max([*per_block, unsharded_params(model, fsdp) - sum(per_block)])


def _largest_fsdp_group(model: nn.Module, fsdp: int) -> float:
    """The largest FSDP unit of an LM: one layer, or the rest of the model (embeddings, output)."""
    from lm.model import TransformerBlock

    return largest_fsdp_unit(model, [m for m in model.modules() if isinstance(m, TransformerBlock)], fsdp)


def fsdp_buffer_bytes(sizes: dict[str, float], pp: int, compute_bytes: int, reduce_bytes: int) -> int:
    """Unsharded parameters and gradients FSDP holds beside the shards.

    Under pipeline parallel the stage's parameters stay all-gathered for the whole step (compute dtype) and
    their gradients accumulate unsharded until the one reduce-scatter (reduction dtype). Otherwise two FSDP units
    are gathered at a time (the running one and the prefetched one), with their unsharded gradients.
    """
    per_param = compute_bytes + reduce_bytes
    if pp > 1:
        return int(sizes["unsharded"] * per_param)
    return int(2 * sizes["largest_group"] * per_param)


# ----------------------------------------------------------------------------------------------------------------
# Report.


def in_gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GIB:.2f}"


def format_report(report: dict) -> str:
    """The report as a table: one row per reported rank, then the verdict."""
    lay = report["layout"]
    lines = [
        f"dry run: {report['model']['params'] / 1e9:.1f}B parameters on {report['world_size']} ranks, "
        f"dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x pp {lay['pp']} x cp {lay['cp']} x "
        f"tp {lay['tp']}",
        f"seq {report['seq_len']}, global batch {report['batch_size']} ({report['tokens_per_step'] / 2**20:.1f}M "
        f"tokens), micro-batch {report['micro_batch']} x {report['microbatches']} per step, schedule "
        f"{report['schedule']} (v={report['virtual_stages']}), ac {report['ac']}, bubble "
        f"{report['bubble_fraction']:.3f}",
        "memory in GiB, communication in GiB sent per rank per optimizer step",
    ]
    header = (
        f"{'rank':>6} {'pp':>3} {'layers':>6} {'params':>13} {'param':>7} {'grad':>7} {'optim':>7} {'activ':>7} "
        f"{'buffers':>7} {'total':>7}  {'tp':>8} {'cp':>8} {'pp':>8} {'dp':>8}  fits"
    )
    lines.append(header)
    for r in report["ranks"]:
        c = r["comm_bytes"]
        ends = ("E" if r["first"] else "") + ("O" if r["last"] else "")
        lines.append(
            f"{r['rank']:>6} {r['pp_rank']:>3} {r['layers']:>4}{ends:<2} {r['params']:>13,} "
            f"{in_gib(r['param_bytes']):>7} {in_gib(r['grad_bytes']):>7} {in_gib(r['optimizer_bytes']):>7} "
            f"{in_gib(r['activation_bytes']):>7} "
            f"{in_gib(r['buffer_bytes']):>7} {in_gib(r['total_bytes']):>7}  {in_gib(c['tp']):>8} {in_gib(c['cp']):>8} "
            f"{in_gib(c['pp']):>8} {in_gib(c['dp']):>8}  {'yes' if r['fits'] else 'NO'}"
        )
    lines.append("(E: holds the embeddings, O: the output and loss)")
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """The report's last line: FITS with the fullest rank's need, or DOES NOT FIT with the excess."""
    device = report["device_gb"]
    worst = report["worst_total_gb"]
    if report["fits"]:
        return f"FITS: the fullest rank ({report['worst_rank']}) needs {worst:.2f} of {device:.0f} GiB"
    return (
        f"DOES NOT FIT: rank {report['worst_rank']} needs {worst:.2f} GiB, {worst - device:.2f} GiB more than "
        f"the device's {device:.0f} GiB"
    )


def main(cfg, lm_config: LMConfig, args: argparse.Namespace) -> dict:
    """``train/lm.py --dry-run``: print the report, write it as JSON when asked; returns it."""
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    report = plan(cfg, lm_config, world, rank=args.dry_run_rank, device_gb=args.dry_run_device_gb)
    print(format_report(report), flush=True)
    if args.dry_run_out:
        from common.atomic import atomic_write_text

        atomic_write_text(Path(args.dry_run_out), json.dumps(report, indent=2) + "\n")
    return report


def planned_world_size(args: argparse.Namespace) -> int | None:
    """The world size to validate a dry run against (None for a real run); dry-run flags alone are an error."""
    if args.dry_run:
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        return args.world_size
    given = [flag for flag in ("world_size", "dry_run_rank", "dry_run_out") if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies with --dry-run")
    return None
