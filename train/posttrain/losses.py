"""Post-training losses (paper section 4.1), pure functions of per-token log-probs and rewards.

DPO (4.1.4): the sigmoid loss on the policy's log-ratios against a reference, beta 0.1, with the formatting tokens
(headers, role names, end of turn) left out of the chosen and rejected log-likelihoods, plus an NLL term on the
chosen response with coefficient 0.2 that keeps them (the model still learns to stop). The NLL term is the mean over
the batch's chosen tokens, as TRL's "sft" loss type is; ``tests/test_posttrain_losses.py`` proves both terms and
their gradients equal TRL's.

Reward model (4.1.2): -log sigmoid(r_better - r_worse), no margin, averaged over every ordered pair of a ranking
(edited > chosen > rejected when an edited response exists; chosen > rejected otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_BETA = 0.1
DPO_NLL_WEIGHT = 0.2


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token log-probs [B, T] where ``mask`` is true: each sequence's log-likelihood [B]."""
    return (token_logps * mask.to(token_logps.dtype)).sum(-1)


def dpo_loss(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_dpo_mask: torch.Tensor,
    rejected_dpo_mask: torch.Tensor,
    chosen_nll_mask: torch.Tensor,
    beta: float = DPO_BETA,
    nll_weight: float = DPO_NLL_WEIGHT,
    nll_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss (mean over pairs) + ``nll_weight`` x the chosen responses' mean token NLL; and metrics.

    ``*_token_logps`` [B, T]: the policy's log-prob of each target token. ``ref_*_logps`` [B]: the reference
    model's sequence log-likelihoods over the same DPO masks (precomputed, no gradient). The DPO masks select the
    response tokens without the formatting tokens (:func:`data.chat.formatting_mask`); ``chosen_nll_mask`` selects
    every trained token of the chosen response, its end of turn included. ``nll_tokens``: the count the chosen
    NLL sum is divided by (default this batch's chosen tokens; under data parallel and gradient accumulation the
    global batch's count / (ranks x micro-batches), so that the mean over them is the global token mean).
    """
    chosen_logratios = sequence_logps(chosen_token_logps, chosen_dpo_mask) - ref_chosen_logps
    rejected_logratios = sequence_logps(rejected_token_logps, rejected_dpo_mask) - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)
    loss = -F.logsigmoid(margin).mean()
    if nll_weight:
        nll_mask = chosen_nll_mask.to(chosen_token_logps.dtype)
        denominator = nll_mask.sum().clamp(min=1) if nll_tokens is None else nll_tokens
        nll = -(chosen_token_logps * nll_mask).sum() / denominator
        loss = loss + nll_weight * nll
    metrics = {
        "rewards/chosen": beta * chosen_logratios.detach().mean(),
        "rewards/rejected": beta * rejected_logratios.detach().mean(),
        "rewards/margin": margin.detach().mean(),
        "rewards/accuracy": (margin.detach() > 0).float().mean(),
    }
    return loss, metrics


def ranking_reward_loss(rewards: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of -log sigmoid(r_i - r_j) over every pair i < j of each row's ranking ``rewards`` [B, K], best first.

    ``present`` [B, K] marks the responses a row has (a row without an edited response has K - 1); pairs with a
    missing side count for nothing. With K = 2 this is the pairwise loss of TRL's RewardTrainer (no margin).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} is not [batch, responses >= 2]")
    better, worse = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1, device=rewards.device)
    pair_losses = -F.logsigmoid(rewards[:, better] - rewards[:, worse])
    if present is None:
        return pair_losses.mean()
    counted = (present[:, better] & present[:, worse]).to(pair_losses.dtype)
    return (pair_losses * counted).sum() / counted.sum().clamp(min=1)
