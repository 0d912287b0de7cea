"""Data parallel (FSDP2 / HSDP), activation checkpointing and per-block compile, applied from outside the model.

Generic over any model that exposes its repeated blocks: an LM's ``model.layers`` (ModuleDict), an encoder's
block list. Order matters and follows torchtitan: activation checkpointing, then compile, then ``fully_shard``
(per block, then the root), so that each block's all-gather overlaps the previous block's compute.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from train.parallel.mesh import submesh

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Ops whose outputs selective checkpointing keeps: the expensive ones. Everything else (norms, activations,
# elementwise) is recomputed in backward, which costs little compute but most of the activation memory.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


_PROFILER_OPS = {
    torch.ops.profiler._record_function_enter.default,
    torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: ``layers`` / ``blocks`` / ``resblocks`` containers, searched in that order."""
    for name in ("layers", "blocks", "resblocks"):
        container = getattr(model, name, None)
        if isinstance(container, (nn.ModuleDict, nn.ModuleList)):
            return list(container.values() if isinstance(container, nn.ModuleDict) else container)
    raise ValueError(f"{type(model).__name__} exposes no block container (layers / blocks / resblocks): pass blocks")


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(blocks: Iterable[nn.Module], mode: str) -> None:
    """Activation checkpointing per block: ``none``, ``selective`` (keep matmul/attention outputs) or ``full``.

    Uses the composable ``checkpoint`` (a forward hook, no wrapper module) so parameter names and therefore
    checkpoint keys stay the same with and without it.
    """
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"train.ac must be none, selective or full, got {mode!r}")
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    # The composable checkpoint recomputes a block by calling it again, FSDP's pre-forward hook included; under a
    # mixed-precision policy that hook opens a profiler record_function, which in forward ran before (outside) the
    # checkpoint's region. Since torch 2.14 selective recompute refuses every op it did not meet in forward, so
    # these bookkeeping ops pass through it: they hold no tensors and change no values.
    SAC_IGNORED_OPS.update(_PROFILER_OPS)
    for block in blocks:
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=_selective_context)


def apply_compile(blocks: Iterable[nn.Module]) -> None:
    """``torch.compile`` each block in place (keeps its parameter names); repeated blocks share one graph."""
    for block in blocks:
        block.compile()


def dp_mesh_for_fsdp(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: ``dp_shard_cp``, or 2-D ``(dp_replicate, dp_shard_cp)`` for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        if mesh["cp"].size() == 1:
            return mesh["dp_replicate", "dp_shard"]
        return mesh["dp_replicate", "dp_shard_cp"]
    return submesh(mesh, "dp_shard_cp")


def _promote_scalar_params(model: nn.Module) -> None:
    """Reshape 0-dim parameters (e.g. CLIP's logit scale) to shape [1]: fully_shard cannot shard scalars.

    Broadcasting keeps the model's arithmetic unchanged; checkpoints then hold shape [1] for these entries.
    """
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    blocks: Iterable[nn.Module],
    *,
    param_dtype: str = "bfloat16",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    ignored_params: set[nn.Parameter] | None = None,
    mixed_precision_on_cpu: bool = False,
) -> nn.Module:
    """``fully_shard`` each block, then the root; mixed precision (bf16 params, fp32 reduce) on CUDA only.

    On CPU everything stays fp32 (the tests compare layouts at 1e-5) unless ``mixed_precision_on_cpu``, which
    applies the CUDA policy there too (a CPU test of the CUDA recipe). ``ignored_params`` (e.g. a frozen LM under
    trained adapters) stay plain tensors, replicated on every rank.
    """
    _promote_scalar_params(model)
    dp_mesh = dp_mesh_for_fsdp(mesh)
    if mesh.device_type == "cuda" or mixed_precision_on_cpu:
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    else:
        mp = MixedPrecisionPolicy()
    shard = functools.partial(fully_shard, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored_params)
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    shard(model, reshard_after_forward=reshard_after_forward)
    return model


def shard_frozen_units(units: Iterable[nn.Module], mesh: DeviceMesh) -> None:
    """``fully_shard`` each frozen unit (a frozen LM's layers, embeddings, the LM itself), before the root's.

    No mixed-precision policy: a frozen part computes in its stored dtype (``model.lm_dtype``), as it does when
    replicated, so sharding changes no value. Every unit reshards after forward: nothing of it trains, and a
    backward that passes through it gathers it again (FSDP2 supports ``requires_grad=False`` parameters).
    """
    dp_mesh = dp_mesh_for_fsdp(mesh)
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=True)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    blocks: Iterable[nn.Module] | None = None,
    *,
    ac: str = "none",
    compile: bool = False,
    param_dtype: str = "bfloat16",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    ignored_params: set[nn.Parameter] | None = None,
    mixed_precision_on_cpu: bool = False,
) -> nn.Module:
    """AC, compile and FSDP in torchtitan's order (per model, or per pipeline stage after its TP/CP plans)."""
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    apply_ac(blocks, ac)
    if compile:
        apply_compile(blocks)
    return apply_fsdp(
        model,
        mesh,
        blocks,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        reshard_after_forward=reshard_after_forward,
        ignored_params=ignored_params,
        mixed_precision_on_cpu=mixed_precision_on_cpu,
    )
