"""Attention behind one function, with three backends: PyTorch SDPA, flex_attention, xformers.

RoPE positions and the mask are built once per forward (`attention_inputs`, the one place that builds them) and
shared by every layer, so the per-layer cost is the kernel alone. Queries are [B, n_heads, S, head_dim]; keys and
values are [B, n_kv_heads, T, head_dim] (grouped-query attention: each KV head serves n_heads // n_kv_heads query
heads).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lm.config import ATTENTION_BACKENDS, LMConfig


@dataclass
class AttentionMask:
    """Which keys each query may attend to, in the form the chosen backend wants."""

    backend: str
    is_causal: bool = False  # plain causal mask, queries and keys aligned
    dense: torch.Tensor | None = None  # bool [B, 1, S, T], True = attend (SDPA)
    block_mask: Any = None  # flex_attention BlockMask
    xformers_bias: Any = None  # xformers AttentionBias; inputs are flattened to one row when set
    document_ids: torch.Tensor | None = None  # [B, S], kept for backends that rebuild per shape


@dataclass
class AttentionInputs:
    """What every layer of one forward shares: RoPE positions ([S] or [B, S]), the mask, and where the KV cache
    is written (None: no cache). Built by `attention_inputs`, or by context parallel for its local queries."""

    positions: torch.Tensor
    mask: AttentionMask
    start_pos: int | None = None


def attention_inputs(
    config: LMConfig,
    batch: int,
    seq: int,
    device: torch.device,
    *,
    document_ids: torch.Tensor | None = None,
    start_pos: int | None = None,
    key_valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> AttentionInputs:
    """Positions and mask of `seq` queries per row: causal, within documents, against a KV cache.

    document_ids [B, S]: packed rows; no attention across documents, positions restart at each document.
    start_pos: the queries are written to the KV cache at [start_pos, start_pos + S) and see everything before.
    key_valid [B, start_pos + S]: False at the left padding of a batch of prompts (inference).
    positions [B, S]: explicit RoPE positions (left-padded rows); derived from the above otherwise.
    """
    if positions is None:
        if document_ids is not None:
            positions = document_positions(document_ids)
        else:
            positions = torch.arange(start_pos or 0, (start_pos or 0) + seq, device=device)
    mask = build_mask(
        config.attn_backend,
        batch=batch,
        q_len=seq,
        kv_len=(start_pos or 0) + seq,
        device=device,
        document_ids=document_ids,
        key_valid=key_valid,
    )
    return AttentionInputs(positions, mask, start_pos)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 at the first token of every document of a packed row."""
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """True when xformers imports and its memory-efficient kernel runs on this machine."""
    try:
        import xformers.ops as xops  # noqa: F401

        if not torch.cuda.is_available():
            return False
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # a missing package, an ABI mismatch with this torch, or no CUDA kernel
        return False


def check_backend(backend: str) -> None:
    """Fail early with a clear message when a backend cannot run here."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    if backend == "xformers" and not xformers_available():
        raise RuntimeError(
            "attention backend 'xformers' is not usable here (it needs CUDA and an xformers build "
            "that matches this torch); use 'sdpa' or 'flex'"
        )


def build_mask(
    backend: str,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> AttentionMask:
    """Build the mask for queries at key positions [kv_len - q_len, kv_len) under causal + document rules.

    `document_ids` [B, S] (training, q_len == kv_len) forbids attention across documents of a packed row.
    `key_valid` [B, kv_len] marks real tokens in a left-padded batch (inference); a padding query still
    sees itself so that no softmax row is empty (an empty row would turn into NaN and spread).
    """
    check_backend(backend)
    offset = kv_len - q_len
    if key_valid is not None or (backend != "sdpa" and offset):
        backend = "sdpa"  # cached, padded inference: a dense mask is small, and SDPA handles any offset
    if document_ids is None and key_valid is None:
        if offset and q_len == 1:
            return AttentionMask("sdpa")  # one new token sees the whole cache
        if offset == 0:
            if backend == "flex":
                return AttentionMask("flex", block_mask=_causal_block_mask(q_len, str(device)))
            if backend == "xformers":
                import xformers.ops.fmha.attn_bias as xbias

                return AttentionMask("xformers", xformers_bias=xbias.LowerTriangularMask())
            return AttentionMask("sdpa", is_causal=True)
    if backend == "flex":
        return AttentionMask("flex", block_mask=_document_block_mask(document_ids), document_ids=document_ids)
    if backend == "xformers":
        import xformers.ops.fmha.attn_bias as xbias

        lengths = _document_lengths(document_ids)
        bias = xbias.BlockDiagonalCausalMask.from_seqlens(lengths)
        return AttentionMask("xformers", xformers_bias=bias, document_ids=document_ids)
    query_pos = torch.arange(offset, kv_len, device=device)
    key_pos = torch.arange(kv_len, device=device)
    allowed = key_pos[None, :] <= query_pos[:, None]
    allowed = allowed.expand(batch, 1, q_len, kv_len)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])
    return AttentionMask("sdpa", dense=allowed)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads; returns [B, n_heads, S, head_dim]."""
    batch, n_heads, q_len, head_dim = q.shape
    grouped_query = k.shape[1] != n_heads
    if mask.backend == "sdpa":
        if q_len == 1 and mask.dense is None and grouped_query:
            # One decode step: each KV head's query group is a short query sequence against that head's
            # keys, a plain (non-GQA) attention that avoids expanding K and V for every query head.
            grouped = q.reshape(batch, k.shape[1], n_heads // k.shape[1], head_dim)
            return F.scaled_dot_product_attention(grouped, k, v).reshape(batch, n_heads, 1, head_dim)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal, enable_gqa=grouped_query
        )
    if mask.backend == "flex":
        return _flex_attention(q.device.type)(q, k, v, block_mask=mask.block_mask, enable_gqa=grouped_query)
    return _xformers_attention(q, k, v, mask)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    import xformers.ops as xops

    batch, n_heads, seq, head_dim = q.shape
    groups = n_heads // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants [B, S, H, D]
    if mask.document_ids is not None:  # block-diagonal biases describe one concatenated row
        q, k, v = (t.reshape(1, batch * seq, n_heads, head_dim) for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=mask.xformers_bias)
    return out.reshape(batch, seq, n_heads, head_dim).transpose(1, 2)


def _document_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the consecutive same-document runs of every row, rows concatenated."""
    flat = document_ids.flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    row_starts = torch.zeros_like(change)
    row_starts[:: document_ids.shape[1]] = True
    starts = torch.nonzero(change | row_starts).flatten().tolist() + [flat.numel()]
    return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]


@functools.lru_cache(maxsize=4)
def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    # On CPU flex_attention runs eagerly (unfused, forward only): a reference path for tests and
    # mask checks, where torch's advice to compile is noise.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=device)


def _document_block_mask(document_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    batch, seq = document_ids.shape
    return create_block_mask(
        causal_same_document, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=str(document_ids.device)
    )
