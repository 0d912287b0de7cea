"""Pipeline parallel: the model's layers split into stages, several virtual stages per rank, torch's schedules.

Stage ``s`` of ``S`` holds a contiguous run of layers (:func:`stage_layer_ids`); the first stage also holds the
token embeddings, the last the final norm and the output projection (and computes the loss). A rank holds
``virtual_stages`` stages (:func:`rank_stages`): one for 1F1B / GPipe, several for the interleaved schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from train.config import ParallelConfig

RANK_STAGE_STYLES = ("loop", "v")


def stage_layer_ids(n_layers: int, num_stages: int, *, lighter_ends: bool = False) -> list[list[int]]:
    """Contiguous layer ids of each stage, in order; ``lighter_ends``: first and last stage one layer fewer.

    The layers split as evenly as possible (the first stages take the remainder). With ``lighter_ends`` the split
    is that of ``n_layers + 2`` layers with the first and last stage then giving one back, since they also hold
    the embeddings / the output and loss (the paper's 405B: 126 layers on 16 stages = 7, 8 x 14, 7); the
    remainder then goes to the middle stages first.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}")
    lighten = lighter_ends and num_stages > 1
    total = n_layers + 2 if lighten else n_layers
    base, extra = divmod(total, num_stages)
    sizes = [base] * num_stages
    # Which stages take the remainder: the middle ones first when the ends are meant to stay light.
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1] if lighten else list(range(num_stages))
    for stage in order[:extra]:
        sizes[stage] += 1
    if lighten:
        sizes[0] -= 1
        sizes[-1] -= 1
    if min(sizes) < 1:
        ends = " with pipeline lighter_ends (first and last stage one layer fewer)" if lighten else ""
        raise ValueError(
            f"{n_layers} layers cannot fill {num_stages} pipeline stages{ends}: a stage would hold no layer "
            f"(sizes {sizes}); use fewer stages (pp x pp_virtual_stages) or more layers"
        )
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def rank_stages(pp_rank: int, pp: int, virtual_stages: int, style: str) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` of ``pp`` holds, in execution order.

    ``loop``: ``pp_rank, pp_rank + pp, ...`` (1F1B / GPipe with one stage, the interleaved schedules);
    ``v``: ``pp_rank`` and ``2 * pp - 1 - pp_rank`` (V-shaped zero-bubble: the first rank holds the first and the
    last stage, so the loss sits beside the embeddings).
    """
    if pp < 1:
        raise ValueError(f"parallel.pp must be >= 1, got {pp}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} is outside 0..{pp - 1}")
    if virtual_stages < 1:
        raise ValueError(f"parallel.pp_virtual_stages must be >= 1, got {virtual_stages}")
    if style == "loop":
        return [pp_rank + v * pp for v in range(virtual_stages)]
    if style == "v":
        if virtual_stages != 2:
            raise ValueError(
                f"a V-shaped schedule holds exactly 2 stages per rank, got pp_virtual_stages={virtual_stages}"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"stage style must be one of {RANK_STAGE_STYLES}, got {style!r}")


# ----------------------------------------------------------------------------------------------------------------
# The plan: a schedule, its micro-batches and this layout's stages, checked before any process group work.

# Schedule name -> how many stages a rank holds ("one", "several" or "two") and where they sit (rank_stages style).
SCHEDULES: dict[str, tuple[str, str]] = {
    "1F1B": ("one", "loop"),
    "GPipe": ("one", "loop"),
    "Interleaved1F1B": ("several", "loop"),
    "InterleavedZeroBubble": ("several", "loop"),
    "ZBVZeroBubble": ("two", "v"),
}


@dataclass(frozen=True)
class PipelinePlan:
    """A resolved pipeline layout: schedule, micro-batches per step, stages and their layers."""

    schedule: str
    pp: int
    virtual_stages: int
    microbatches: int
    style: str
    stage_layers: list[list[int]]

    @property
    def num_stages(self) -> int:
        """Stages in the whole pipeline: pp x virtual stages."""
        return self.pp * self.virtual_stages

    @property
    def multi(self) -> bool:
        """True when a rank holds several stages (torch's PipelineScheduleMulti family)."""
        return SCHEDULES[self.schedule][0] != "one"

    def last_stage_rank(self) -> int:
        """The pipeline rank that holds the last stage (and so computes the loss)."""
        return next(
            r for r in range(self.pp) if self.num_stages - 1 in rank_stages(r, self.pp, self.virtual_stages, self.style)
        )


def schedule_name(name: str) -> str:
    """The canonical spelling of a supported schedule name (case-insensitive); a clear error otherwise."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    try:
        get_schedule_class(name)
    except ValueError:
        raise ValueError(
            f"parallel.pp_schedule={name!r}: torch.distributed.pipelining has no such schedule; "
            f"use one of {', '.join(SCHEDULES)}"
        ) from None
    supported = {k.lower(): k for k in SCHEDULES}
    if name.lower() not in supported:
        raise ValueError(f"parallel.pp_schedule={name!r} is not supported here; use one of {', '.join(SCHEDULES)}")
    return supported[name.lower()]


def plan_pipeline(
    parallel: ParallelConfig,
    n_layers: int,
    rows_per_rank: int,
    *,
    tie_word_embeddings: bool = False,
    compile: bool = False,
) -> PipelinePlan:
    """Resolve and check the ``[parallel]`` pipeline keys for a model of ``n_layers`` layers whose data-parallel
    rank trains ``rows_per_rank`` sequences per optimizer step (``compile``: blocks are compiled); every
    combination that cannot run raises here."""
    pp, virtual = parallel.pp, parallel.pp_virtual_stages
    schedule = schedule_name(parallel.pp_schedule)
    stages_per_rank, style = SCHEDULES[schedule]
    if virtual < 1:
        raise ValueError(f"parallel.pp_virtual_stages must be >= 1, got {virtual}")
    if stages_per_rank == "one" and virtual != 1:
        raise ValueError(
            f"parallel.pp_schedule={schedule} runs one stage per rank, got parallel.pp_virtual_stages={virtual}; "
            "use Interleaved1F1B or InterleavedZeroBubble for several"
        )
    if stages_per_rank == "several" and virtual < 2:
        raise ValueError(
            f"parallel.pp_schedule={schedule} interleaves several stages per rank: set parallel.pp_virtual_stages "
            f">= 2 (got {virtual}), or use 1F1B"
        )
    if stages_per_rank == "two" and virtual != 2:
        raise ValueError(
            f"parallel.pp_schedule={schedule} holds exactly 2 stages per rank: set parallel.pp_virtual_stages=2"
        )
    if compile and "ZeroBubble" in schedule:
        raise ValueError(
            f"parallel.pp_schedule={schedule} splits each backward into input and weight parts, which compiled "
            "blocks do not support: set train.compile=false or use Interleaved1F1B"
        )
    if tie_word_embeddings and pp > 1:
        raise ValueError(
            "parallel.pp > 1 with tied input/output embeddings (Llama 3.2 1B/3B): the first stage holds the table "
            "and the last the projection; train these without pipeline parallel"
        )
    microbatches = parallel.pp_microbatches or pp
    if microbatches < 1:
        raise ValueError(f"parallel.pp_microbatches must be >= 1 (0 = pp), got {parallel.pp_microbatches}")
    if rows_per_rank % microbatches:
        raise ValueError(
            f"parallel.pp_microbatches={microbatches} must divide the {rows_per_rank} sequences each data-parallel "
            "rank trains per step (train.batch_size / data-parallel degree)"
        )
    if schedule == "1F1B" and microbatches < pp:
        raise ValueError(f"parallel.pp_schedule=1F1B needs parallel.pp_microbatches >= pp={pp}, got {microbatches}")
    if stages_per_rank == "several":
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ValueError(
                f"parallel.pp_schedule={schedule} runs micro-batches in rounds of about pp={pp}: "
                f"parallel.pp_microbatches={microbatches} must be divisible by its {rounds} rounds (a multiple of pp)"
            )
    layers = stage_layer_ids(n_layers, pp * virtual, lighter_ends=parallel.pp_lighter_ends)
    return PipelinePlan(schedule, pp, virtual, microbatches, style, layers)


# ----------------------------------------------------------------------------------------------------------------
# The model split into stages, and this rank's stages seen as one model.


def split_stage(model: nn.Module, stage: int, plan: PipelinePlan) -> nn.Module:
    """Cut ``model`` (an ``lm.Transformer``, best on the meta device) down to stage ``stage`` in place.

    The layers of other stages are deleted from the ``layers`` ModuleDict, so the survivors keep the full model's
    names (``layers.17...``) and checkpoints stay layout-independent; the embeddings stay on the first stage only,
    the final norm and output projection on the last.
    """
    keep = {str(i) for i in plan.stage_layers[stage]}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < plan.num_stages - 1:
        model.norm = None
        model.output = None
    return model


class PipelineStages(nn.Module):
    """This rank's pipeline stages seen as one module with the full model's parameter names.

    The stages' submodules are registered here too (a module may have several parents), so the optimizer, the
    gradient clipping and the DCP checkpointer see ``tok_embeddings`` / ``layers.N`` / ``norm`` / ``output``
    exactly as without pipelining: a checkpoint saved under one layout resumes under any other, and the export
    reads it unchanged. Running the stages is the schedule's job; calling this module is an error.
    """

    def __init__(self, stages: dict[int, nn.Module]) -> None:
        super().__init__()
        # A plain dict, not registered: the stages' own names would prefix every parameter.
        self.stages = dict(sorted(stages.items()))
        self.layers = nn.ModuleDict()
        for stage in self.stages.values():
            for name, layer in stage.layers.items():
                self.layers[name] = layer
        for name in ("tok_embeddings", "norm", "output"):
            owner = next((s for s in self.stages.values() if getattr(s, name) is not None), None)
            if owner is not None:
                setattr(self, name, getattr(owner, name))

    def forward(self, *args, **kwargs):
        raise RuntimeError("PipelineStages is run by its pipeline schedule (train.parallel.pp.Pipeline), not called")

    def train(self, mode: bool = True) -> PipelineStages:
        """Set training mode on this view and on every stage module."""
        super().train(mode)
        for stage in self.stages.values():
            stage.train(mode)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Running a step.


class Pipeline:
    """This rank's stages under a ``torch.distributed.pipelining`` schedule over the ``pp`` process group."""

    def __init__(
        self,
        plan: PipelinePlan,
        stages: dict[int, nn.Module],
        pp_group: dist.ProcessGroup,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        self.plan, self.group, self.device = plan, pp_group, device
        self.stages = [
            PipelineStage(module, index, plan.num_stages, device, group=pp_group)
            for index, module in sorted(stages.items())
        ]
        schedule_class = get_schedule_class(plan.schedule)
        # scale_grads: the summed micro-batch gradients are divided by their number, so with a mean loss per
        # micro-batch the step's gradient is the mean over all of this rank's sequences (as without pipelining).
        self.schedule = schedule_class(
            self.stages if plan.multi else self.stages[0],
            n_microbatches=plan.microbatches,
            loss_fn=loss_fn,
            scale_grads=True,
        )
        self.holds_last = any(stage.is_last for stage in self.stages)
        self.last_global_rank = dist.get_global_rank(pp_group, plan.last_stage_rank())

    def step(self, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]], targets: list[Any]) -> torch.Tensor:
        """Forward and backward every micro-batch (lists of ``plan.microbatches``); returns the mean micro-batch
        loss, the same on every rank of the pipeline (broadcast from the rank that holds the last stage)."""
        losses: list[torch.Tensor] = []
        self.schedule.step(
            arg_mbs=[(x,) for x in inputs], kwarg_mbs=kwargs, target_mbs=targets, losses=losses, return_outputs=False
        )
        if self.holds_last:
            mean = torch.stack([loss.detach().float() for loss in losses]).mean()
        else:
            mean = torch.zeros((), dtype=torch.float32, device=self.device)
        dist.broadcast(mean, src=self.last_global_rank, group=self.group)
        return mean
