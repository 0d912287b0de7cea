"""The pretraining loss of a run: the chunked linear cross-entropy or whole logits, as the layout allows.

The loss maths lives in ``lm.loss``; what is here needs the run (its config and its TP/CP layout).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lm.loss import fused_loss_output_fn, token_cross_entropy
from train.config import JobConfig
from train.loop import LossFn, RunContext
from train.parallel.llama import model_inputs


def uses_fused_loss(cfg: JobConfig, ctx: RunContext) -> bool:
    """The chunked loss as configured, except under tensor parallel (the vocabulary-parallel cross-entropy)."""
    return cfg.model.loss == "fused" and ctx.dims.tp == 1


def make_loss(cfg: JobConfig, ctx: RunContext) -> LossFn:
    """``loss_fn(model, batch) -> (mean next-token cross-entropy, metrics)`` for the configured loss and layout."""
    fused = uses_fused_loss(cfg, ctx)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"].to(ctx.device, non_blocking=True)
        documents = batch["document_ids"].to(ctx.device, non_blocking=True)
        inputs, targets, model_kwargs = model_inputs(cfg, ctx, tokens, documents)
        if fused:
            # Inside forward, where FSDP has the output weight gathered: its gradient reaches the reduce-scatter.
            loss = model(inputs, **model_kwargs, output=fused_loss_output_fn(targets))
        else:
            loss = token_cross_entropy(model(inputs, **model_kwargs), targets)
        return loss, {}

    return loss_fn
