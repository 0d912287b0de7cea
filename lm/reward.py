"""A sequence's score from a Llama 3 with a score head (``LMConfig.num_labels``): the reward model's reward.

The paper's reward model is the LM with its output projection replaced by a scalar head read at the last token
(section 4.1.2), which is HF's ``LlamaForSequenceClassification`` with ``num_labels=1``. Rows are right-padded
(causal attention: padding after a row's last token cannot change it), and only the last tokens' hidden states
meet the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lm.model import Transformer


def last_token_scores_output_fn(lengths: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's ``output`` function for scores [B, num_labels] at each row's last real token (``lengths`` [B])."""

    def output(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]
        return last.float() @ weight.float().t()

    return output


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, max len] and each row's length [B]; empty rows are refused."""
    if any(len(row) == 0 for row in rows):
        raise ValueError("a sequence to score is empty")
    lengths = torch.tensor([len(row) for row in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, lengths


@torch.no_grad()
def score_sequences(model: Transformer, rows: Sequence[Sequence[int]], *, batch_size: int = 16) -> torch.Tensor:
    """Scores [len(rows)] (fp32; [len(rows), num_labels] for a head of several) of token rows, by ``model``."""
    if not model.config.num_labels:
        raise ValueError("the model has no score head (LMConfig.num_labels = 0): it is a language model")
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(rows), batch_size):
        tokens, lengths = pad_rows(rows[start : start + batch_size])
        scores.append(model(tokens.to(device), output=last_token_scores_output_fn(lengths)).cpu())
    result = torch.cat(scores) if scores else torch.zeros(0, model.config.num_labels)
    return result.squeeze(-1) if model.config.num_labels == 1 else result


__all__ = ["last_token_scores_output_fn", "pad_rows", "score_sequences"]
