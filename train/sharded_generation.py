"""Held-out generation and export on the FSDP-sharded model itself (train/adapter.py's ``eval.generate_sharded``):
no rank holds an unsharded copy of the model.

Every rank answers greedily a disjoint share of the generation samples, as many as every other rank (the last
shares padded with repeats whose answers are dropped: ``padded_share``), in batches, and rank 0 gathers the answers
in sample order (``gather_answers``). Each forward of a sharded unit all-gathers its parameters, a collective, so
every rank must run the same forwards in the same order: a batch's prompts are left-padded to the widest on any
rank, and decoding stops only when no row on any rank still runs (one all-reduced flag per step); a row that
stopped is fed on, its tokens dropped. The whole batch runs inside one forward of the root unit
(``register_fsdp_forward_method``): the root's own parameters (the extra token table, the image encoder's stem, the
projection) stay gathered while the units inside gather and free their own per call, as in training.

The decoding is ``lm.generate``'s step for step (KV cache, left-padded positions, greedy argmax, the tokenizer's
stop tokens, at most ``max_seq_len`` positions), with the vocabulary projection inside the LM's forward, where FSDP
has the output weight gathered.

The export gathers what ``Llama3MM.save_pretrained`` writes (every tensor outside the LM) to rank 0's host one tensor
at a time (``gathered_tensors``) and writes it with ``llama3mm.checkpoint.save_parts``: the same files as from an
unsharded model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from lm.attention import attention_inputs
from lm.generate import IncrementalDecoder, vocab_projection
from train.parallel import mesh

# The root method each batch's decoding runs as (a forward to FSDP: the root's parameters gathered around it).
ENTRY = "sharded_greedy_batch"


def padded_share(total: int, rank: int, ranks: int) -> tuple[list[int], int]:
    """The generation samples of ``rank`` (indices into ``total``): a contiguous block of ceil(total / ranks),
    padded with sample 0 so that every rank runs as many; and how many of them are real."""
    per = -(-total // ranks)
    start = min(rank * per, total)
    real = min(per, total - start)
    return list(range(start, start + real)) + [0] * (per - real), real


def agreed_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over the ranks (a collective; the value itself alone)."""
    if mesh.world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def left_padded(
    rows: list[list[int]], width: int, total_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Prompts left-padded to ``width`` [B, width], with each cache column's RoPE position and whether it holds a
    real token (both None when no row is padded), as lm.generate pads a batch."""
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, width - len(row) :] = torch.tensor(row)
    tokens = tokens.to(device)
    if all(len(row) == width for row in rows):
        return tokens, None, None
    pad = torch.tensor([width - len(row) for row in rows], device=device)
    columns = torch.arange(total_len, device=device)
    return tokens, (columns[None, :] - pad[:, None]).clamp(min=0), columns[None, :] >= pad[:, None]


def _last_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Called inside the LM's forward, where a sharded output weight is gathered; as lm.generate projects.
    return vocab_projection(hidden[:, -1].contiguous(), weight)


def _greedy_batch(
    mm: nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    media: dict[str, Any],
    total_len: int,
    stops: frozenset[int],
) -> list[list[int]]:
    """New ids of each row (stop token excluded): greedy decoding to ``total_len`` positions, every rank in step."""
    config, device, width = mm.lm.config, tokens.device, tokens.shape[1]

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        if positions is None:
            return mm.forward_with_media(ids, state, start_pos=start, output=_last_logits)
        end = start + ids.shape[1]
        attention = attention_inputs(
            config, *ids.shape, device, start_pos=start, key_valid=key_valid[:, :end], positions=positions[:, start:end]
        )
        return mm.forward_with_media(ids, state, attention=attention, output=_last_logits)

    state = mm.encode_media(tokens, **media)
    out: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    done = [False] * len(out)
    # The last sampled token is never fed back, so the cache needs one column less than the sequence.
    mm.lm.setup_cache(len(out), total_len - 1)
    try:
        logits = step(tokens, 0)
        for cur in range(width, total_len):
            next_token = logits.max(dim=-1).indices  # greedy, as lm.generate's temperature 0
            for b, t in enumerate(next_token.tolist()):
                done[b] = done[b] or t in stops
                if not done[b]:
                    out[b].append(t)
            # Every rank decodes while any rank has a row running: a rank that stopped alone would leave the others
            # waiting in their next all-gather.
            if not agreed_max(int(not all(done) and cur + 1 < total_len), device):
                break
            logits = step(next_token[:, None], cur)
    finally:
        mm.lm.clear_cache()
    return out


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ids, as ``Llama3MM.generate`` joins its streamed pieces."""
    decoder = IncrementalDecoder(tokenizer)
    return "".join(decoder.push(t) for t in ids) + decoder.flush()


def greedy_ids(
    model: nn.Module, rows: list[list[int]], media: dict[str, Any], max_new_tokens: int, device: torch.device
) -> list[list[int]]:
    """Greedy new ids (stop token excluded) of a (possibly FSDP-sharded) Llama3MM for prompts ``rows`` with their
    batched media (``encode_media``'s inputs). A collective: every rank calls it with a batch of its own (at least one
    row), as many times as every other rank."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    config = model.lm.config
    width = agreed_max(max(len(row) for row in rows), device)
    if width >= config.max_seq_len:
        raise ValueError(f"prompt of {width} tokens leaves no room under max_seq_len={config.max_seq_len}")
    total_len = min(config.max_seq_len, width + max_new_tokens)
    tokens, positions, key_valid = left_padded(rows, width, total_len, device)
    if ENTRY not in model.__dict__:
        # A no-op unless the model is an FSDP module; then each call gathers the root's parameters around it.
        setattr(model, ENTRY, lambda *args: _greedy_batch(model, *args))
        register_fsdp_forward_method(model, ENTRY)
    stops = frozenset(int(t) for t in model.tokenizer.stop_tokens)
    with torch.no_grad():
        return getattr(model, ENTRY)(tokens, positions, key_valid, media, total_len, stops)


def greedy_batch(
    model: nn.Module, rows: list[list[int]], media: dict[str, Any], max_new_tokens: int, device: torch.device
) -> list[str]:
    """The texts of ``greedy_ids``: a collective, as it is."""
    return [decode_ids(model.tokenizer, ids) for ids in greedy_ids(model, rows, media, max_new_tokens, device)]


def gather_answers(answers: list[str]) -> list[str] | None:
    """Every rank's answers, concatenated in rank order on rank 0 (None on the others): a collective."""
    if mesh.world_size() == 1:
        return list(answers)
    parts: list[Any] | None = [None] * mesh.world_size() if mesh.rank() == 0 else None
    dist.gather_object(answers, parts, dst=0)
    return None if parts is None else [a for part in parts for a in part]


def gathered_tensors(model: nn.Module, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """The model's state-dict entries that ``shapes`` names, whole and in those shapes (FSDP gives 0-dim parameters
    shape [1]), on rank 0's host; None on the others. A collective: FSDP's shards are all-gathered one tensor at a
    time, so no device holds more than one whole tensor of them."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name not in shapes:
                continue
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            if mesh.rank() == 0:
                out[name] = whole.detach().reshape(shapes[name]).cpu()
            del whole
    return out if mesh.rank() == 0 else None


__all__ = [
    "ENTRY",
    "agreed_max",
    "decode_ids",
    "gather_answers",
    "gathered_tensors",
    "greedy_batch",
    "greedy_ids",
    "left_padded",
    "padded_share",
]
