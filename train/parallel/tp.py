"""Tensor and sequence parallel for the Llama 3 transformer, as DTensor plans applied from outside the model.

Megatron's layout: q/k/v and w1/w3 split by output columns (each rank holds whole heads), wo and w2 split by
input rows, so each attention and feed-forward block needs one all-reduce, which sequence parallel turns into a
reduce-scatter + all-gather pair: between blocks the activations are sharded along the sequence, and the norms
run on that shard. The embedding is split by vocabulary rows; the output projection by vocabulary columns, with
its logits left sharded for the vocabulary-parallel cross-entropy (``loss_parallel``) so the full [tokens, vocab]
logits never exist on one rank.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lm.config import LMConfig


class TensorParallelError(ValueError):
    """A model shape that the tensor-parallel degree cannot split."""


def check_tp(config: LMConfig, tp: int) -> None:
    """Raise before any work when ``config`` cannot be split ``tp`` ways (whole heads per rank)."""
    if tp <= 1:
        return
    problems = []
    if config.n_kv_heads % tp:
        problems.append(f"n_kv_heads={config.n_kv_heads}")
    if config.n_heads % tp:
        problems.append(f"n_heads={config.n_heads}")
    if config.ffn_hidden_dim % tp:
        problems.append(f"the feed-forward width {config.ffn_hidden_dim}")
    if config.output_dim % tp:
        problems.append(f"the score head's num_labels={config.num_labels}")
    if problems:
        raise TensorParallelError(
            f"parallel.tp={tp} must divide {' and '.join(problems)}: each rank holds whole attention heads "
            "(GQA: whole KV heads) and an equal slice of the feed-forward"
        )
    if config.tie_word_embeddings:
        raise TensorParallelError(
            "parallel.tp > 1 with tied input/output embeddings (Llama 3.2 1B/3B) is not supported: the table is "
            "split by rows for the lookup and by columns for the projection; train these with FSDP (tp = 1)"
        )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (an ``lm.Transformer``) over ``tp_mesh`` in place; logits come out vocab-sharded DTensors
    when ``loss_parallel`` (compute the loss under ``torch.distributed.tensor.parallel.loss_parallel()``)."""
    check_tp(model.config, tp_mesh.size())
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)

    # Attention takes (x, rope, mask, start_pos): only x is sharded; the rotations and the mask are computed
    # from the full sequence on every rank.
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
    return model
