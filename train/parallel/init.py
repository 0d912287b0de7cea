"""Random initialisation of a sharded Llama 3: every layout starts from the bits of the same one-rank model.

DTensor's own random ops are no use here: on CPU each rank draws its shard from the same RNG state (every shard a
copy of the first), and its offset-based RNG is CUDA-only and depends on the placements anyway. Instead each rank
asks ``lm.model.init_values`` for exactly the region of the full parameter its shard covers; those values come from
per-parameter, per-row-block generators keyed by the full model's names, so they are the same whatever the layout
(1 rank, FSDP, HSDP, TP, PP and their combinations) and the same as ``Transformer.init_weights(seed)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

# What DCP itself uses to place a shard in the full tensor (FSDP's strided shards of TP shards included).
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lm.config import LMConfig
from lm.model import init_values


def init_sharded_weights(model: nn.Module, config: LMConfig, seed: int) -> None:
    """Fill this rank's shard of every parameter of ``model`` (full-model names; after ``to_empty``) from ``seed``.

    Memory: one parameter's local shard plus one generator block of rows (``lm.model.INIT_BLOCK_ELEMENTS``) at a
    time, on CPU, copied to the parameter's device; no rank ever holds a whole parameter larger than a block.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if local.is_meta:  # the dry run's model: nothing to fill, and drawing 405B values would take hours
                continue
            region = None
            if isinstance(param, DTensor):
                sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                region = [slice(offset, offset + size) for offset, size in zip(offsets, sizes, strict=True)]
            local.copy_(init_values(name, param.shape, config, seed, region))
