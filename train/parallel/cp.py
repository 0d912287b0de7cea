"""Context parallel, the Llama 3 paper's all-gather design, applied from outside the model.

A packed row of ``S`` tokens is cut into ``2 * cp`` chunks and cp rank ``i`` keeps chunks ``i`` and
``2 * cp - 1 - i``: under the causal mask early chunks see few keys and late chunks many, so pairing them gives
every rank the same attention work. In every layer each rank all-gathers the keys and values (after RoPE) of its
group, a differentiable all-gather whose backward reduce-scatters their gradients, puts them back in sequence
order, and lets its local queries attend to all of them under the causal and document masks, at the queries'
global positions. K and V are small under GQA (8 KV heads against 128 query heads for 405B), which is why the
paper gathers them rather than passing them around a ring.

RoPE positions and document ids come from the whole row before it is split (a document may start in another
rank's chunk). Each rank's loss covers its own tokens; all cp ranks hold the same number of tokens, so the mean
over ranks is the row's mean, and FSDP (sharding over ``dp_shard x cp``) averages the gradients to the same end.
Tensor parallel composes: inside attention K and V hold this rank's heads, and only the cp group gathers them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from lm.attention import AttentionInputs, AttentionMask, attend, document_positions

# torch 2.14 renamed the differentiable all-gather; the GPU machine runs 2.11.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


class ContextParallelError(ValueError):
    """A sequence that the context-parallel degree cannot split into equal chunks."""


def check_cp(seq_len: int, cp: int) -> None:
    """Raise before any work when ``seq_len`` cannot be cut into ``2 * cp`` equal chunks."""
    if cp > 1 and seq_len % (2 * cp):
        raise ContextParallelError(
            f"data.seq_len={seq_len} must be divisible by 2 * parallel.cp = {2 * cp}: context parallel cuts every "
            "row into 2 x cp equal chunks"
        )


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """Chunks ``cp_rank`` and ``2 * cp - 1 - cp_rank`` of ``x``'s ``2 * cp`` equal chunks along ``dim``."""
    check_cp(x.shape[dim], cp)
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim)


def unshard_sequence(gathered: torch.Tensor, cp: int, dim: int) -> torch.Tensor:
    """The inverse of ``shard_sequence`` over a group: ``gathered`` [cp, ...] stacks every rank's shard along dim 0;
    returns the full sequence (``dim`` counts in the shard, without the leading group dimension)."""
    first, second = gathered.chunk(2, dim=dim + 1)  # each [cp, ..., chunk, ...]: rank r's chunks r and 2cp-1-r
    ordered = torch.cat([first, second.flip(0)], dim=0)  # chunk j of the row is now entry j
    return torch.cat(ordered.unbind(0), dim=dim)


def query_positions(seq_len: int, cp_rank: int, cp: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where this rank's queries sit in the full row: [seq_len / cp] indices into [0, seq_len)."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp, dim=0)


def context_parallel_mask(
    backend: str, document_ids: torch.Tensor | None, *, seq_len: int, cp_rank: int, cp: int, device: torch.device
) -> AttentionMask:
    """The mask of this rank's queries against the gathered keys of the full row, causal (by global position) and,
    given the row's ``document_ids`` [B, seq_len], within documents. ``flex`` builds a block mask (CUDA kernels);
    every other backend gets SDPA's dense boolean mask [B or 1, 1, seq_len / cp, seq_len]."""
    q_pos = query_positions(seq_len, cp_rank, cp, device)
    q_docs = shard_sequence(document_ids, cp_rank, cp) if document_ids is not None else None
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        if q_docs is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return q_pos[q_idx] >= kv_idx
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_pos[q_idx] >= kv_idx) & (q_docs[b, q_idx] == document_ids[b, kv_idx])

        batch = None if document_ids is None else document_ids.shape[0]
        block_mask = create_block_mask(
            mask_mod, B=batch, H=None, Q_LEN=q_pos.numel(), KV_LEN=seq_len, device=str(device)
        )
        return AttentionMask("flex", block_mask=block_mask)
    key_pos = torch.arange(seq_len, device=device)
    allowed = (key_pos[None, :] <= q_pos[:, None])[None, None]
    if document_ids is not None:
        allowed = allowed & (q_docs[:, None, :, None] == document_ids[:, None, None, :])
    return AttentionMask("sdpa", dense=allowed)


class ContextParallelAttend:
    """Drop-in for ``lm.attention.attend``: gathers K and V over the cp group, then attends with local queries."""

    def __init__(self, group: dist.ProcessGroup, cp: int):
        self.group, self.cp = group, cp

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        n_kv = k.shape[1]
        # One collective for both: [B, 2 * n_kv, S_local, D] gathered along a new leading group dimension.
        kv = torch.cat([k, v], dim=1).contiguous()
        # The async result waits on first use; its .wait() would return a tensor detached from autograd.
        gathered = _all_gather_autograd(kv, 0, self.group).view(self.cp, *kv.shape)
        full = unshard_sequence(gathered, self.cp, dim=2)
        return attend(q, full[:, :n_kv], full[:, n_kv:], mask)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Swap the attention core of every layer of ``model`` (an ``lm.Transformer``) for the context-parallel one."""
    attend_cp = ContextParallelAttend(cp_mesh.get_group(), cp_mesh.size())
    for block in model.layers.values():
        block.attention.attend = attend_cp
    return model


def shard_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    document_ids: torch.Tensor | None,
    cp_mesh: DeviceMesh,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """This rank's share of a packed batch [B, S]: (inputs, targets, the model's keyword arguments: the attention
    inputs, RoPE positions of this rank's chunks of the full row and the context-parallel mask)."""
    cp_rank, cp = cp_mesh.get_local_rank(), cp_mesh.size()
    batch, seq_len = inputs.shape
    if document_ids is not None:
        positions = document_positions(document_ids)
    else:
        positions = torch.arange(seq_len, device=inputs.device).expand(batch, seq_len)
    mask = context_parallel_mask(backend, document_ids, seq_len=seq_len, cp_rank=cp_rank, cp=cp, device=inputs.device)
    inputs, targets, positions = (shard_sequence(t, cp_rank, cp) for t in (inputs, targets, positions))
    return inputs, targets, {"attention": AttentionInputs(positions, mask)}
