"""Post-training losses against TRL (the installed version's own code, called on the same tensors).

DPO: TRL 1.x has no standalone loss function; `DPOTrainer._compute_loss(model, inputs)` computes the loss from the
model's per-token log-probs (`outputs.log_probs`, its fused LM head's output) and precomputed reference sequence
log-probs. It is called here unbound, on a stand-in trainer carrying exactly the attributes `DPOTrainer.__init__` sets
from `DPOConfig(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], precompute_ref_log_probs=True)`,
and a stand-in model returning our per-token log-probs. Reward: `RewardTrainer.compute_loss` the same way, on a
model returning the rewards as its [2B, 1] logits.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl  # the peer: a dev dependency (pyproject's dev extra), never skipped

from data.chat import formatting_mask
from lm.tokenizer import ChatFormat, Tokenizer
from train.posttrain.losses import dpo_loss, ranking_reward_loss, sequence_logps

PAIRS, LENGTH = 3, 11


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _stand_in_trainer(args, **attributes):
    return SimpleNamespace(
        args=args,
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def _trl_dpo(token_logps, completion_mask, ref_chosen, ref_rejected, loss_type, loss_weights):
    """TRL's DPO loss on per-token log-probs [2B, L-1] of a batch [chosen; rejected] with completion_mask [2B, L]."""
    args = trl.DPOConfig(
        output_dir="unused",
        use_cpu=True,
        bf16=False,
        beta=0.1,
        loss_type=loss_type,
        loss_weights=loss_weights,
        precompute_ref_log_probs=True,
    )
    trainer = _stand_in_trainer(
        args,
        beta=args.beta,
        precompute_ref_logps=args.precompute_ref_log_probs,
        loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        use_weighting=args.use_weighting,
        aux_loss_enabled=False,
    )
    zeros = torch.zeros_like(token_logps)

    def model(**kwargs):
        # TRL's fused head gives log-probs only where labels are not -100 (the completion); 0 elsewhere.
        shift_mask = completion_mask[:, 1:].to(token_logps.dtype)
        return SimpleNamespace(log_probs=token_logps * shift_mask, entropy=zeros, mean_logits=zeros, is_top1=zeros > 0)

    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(2 * PAIRS, LENGTH - 1, generator=gen) * 3
    # Prompts of different lengths, then the completion to the end (padding left out of one row).
    completion_mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row, start in enumerate([3, 5, 2, 4, 6, 3]):
        completion_mask[row, start:] = 1
    completion_mask[1, -2:] = 0
    ref = -torch.rand(2 * PAIRS, generator=gen) * 20
    return token_logps, completion_mask, ref[:PAIRS], ref[PAIRS:]


def _ours(token_logps, completion_mask, ref_chosen, ref_rejected, nll_weight):
    shift_mask = completion_mask[:, 1:].bool()
    chosen, rejected = token_logps.chunk(2)
    chosen_mask, rejected_mask = shift_mask.chunk(2)
    loss, _ = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_dpo_mask=chosen_mask,
        rejected_dpo_mask=rejected_mask,
        chosen_nll_mask=chosen_mask,
        nll_weight=nll_weight,
    )
    return loss


@pytest.mark.parametrize(
    "nll_weight,loss_type,loss_weights",
    [(0.2, ["sigmoid", "sft"], [1.0, 0.2]), (0.0, ["sigmoid"], None)],
    ids=["sigmoid+0.2sft", "sigmoid"],
)
def test_dpo_loss_and_gradient_equal_trl(nll_weight, loss_type, loss_weights):
    token_logps, completion_mask, ref_chosen, ref_rejected = _batch()
    results = []
    for compute in (
        lambda x: _trl_dpo(x, completion_mask, ref_chosen, ref_rejected, loss_type, loss_weights),
        lambda x: _ours(x, completion_mask, ref_chosen, ref_rejected, nll_weight),
    ):
        x = token_logps.clone().requires_grad_()
        loss = compute(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (trl_loss, trl_grad), (our_loss, our_grad) = results
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-6, atol=1e-7)


def test_dpo_with_no_nll_weight_is_plain_sigmoid_dpo():
    token_logps, completion_mask, ref_chosen, ref_rejected = _batch(seed=1)
    mask = completion_mask[:, 1:]
    logps = sequence_logps(token_logps, mask)
    chosen, rejected = logps.chunk(2)
    plain = -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    torch.testing.assert_close(_ours(token_logps, completion_mask, ref_chosen, ref_rejected, 0.0), plain)


def _dialog_ids(chat, answer):
    ids = chat.encode_dialog_prompt([{"role": "user", "content": "What colour is the ball?"}])
    return ids + chat.encode_message({"role": "assistant", "content": answer})[len(chat.encode_header("assistant")) :]


def test_formatting_tokens_get_no_gradient_from_the_dpo_term():
    tokenizer = Tokenizer()
    chat = ChatFormat(tokenizer)
    # A two-turn answer: the second assistant turn's header lies inside the response.
    second_turn = chat.encode_message({"role": "assistant", "content": "Red."})
    chosen_ids = _dialog_ids(chat, "It is red.") + second_turn
    rejected_ids = _dialog_ids(chat, "Blue, I think it is blue.")
    width = max(len(chosen_ids), len(rejected_ids))
    ids = torch.tensor([ids + [tokenizer.eot_id] * (width - len(ids)) for ids in (chosen_ids, rejected_ids)])
    prompt = len(chat.encode_dialog_prompt([{"role": "user", "content": "What colour is the ball?"}]))
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[0, prompt : len(chosen_ids)] = True
    response[1, prompt : len(rejected_ids)] = True
    formatting = formatting_mask(ids, tokenizer)
    header = chat.encode_header("assistant")
    assert formatting[0, prompt - len(header) : prompt].all()  # the prompt's own assistant header
    # The first turn's end, the second's header, its answer "Red." (not formatting), its end.
    second = len(chosen_ids) - len(second_turn)
    want = [True] * (1 + len(header)) + [False] * (len(second_turn) - len(header) - 1) + [True]
    assert formatting[0, second - 1 : len(chosen_ids)].tolist() == want
    assert not formatting[0, prompt : prompt + 3].any()  # "It is red"

    token_logps = -torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    x = token_logps.clone().requires_grad_()
    dpo_masks = response & ~formatting
    loss, _ = dpo_loss(
        x[:1], x[1:], torch.zeros(1), torch.zeros(1),
        chosen_dpo_mask=dpo_masks[:1], rejected_dpo_mask=dpo_masks[1:], chosen_nll_mask=response[:1], nll_weight=0.0,
    )  # fmt: skip
    loss.backward()
    assert torch.equal(x.grad[formatting], torch.zeros_like(x.grad[formatting]))
    assert (x.grad[dpo_masks] != 0).all()

    # The NLL term still trains the end of turn: the chosen response's <|eot_id|> gets gradient from it.
    x.grad = None
    nll_only = dpo_loss(
        x[:1], x[1:], torch.zeros(1), torch.zeros(1),
        chosen_dpo_mask=dpo_masks[:1], rejected_dpo_mask=dpo_masks[1:], chosen_nll_mask=response[:1], nll_weight=0.2,
    )[0] - loss.detach()  # fmt: skip
    nll_only.backward()
    end_of_turn = len(chosen_ids) - 1
    assert ids[0, end_of_turn] == tokenizer.eot_id and x.grad[0, end_of_turn] != 0


def _trl_reward(rewards_chosen, rewards_rejected):
    args = trl.RewardConfig(output_dir="unused", use_cpu=True, bf16=False)
    trainer = _stand_in_trainer(args)

    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat([rewards_chosen, rewards_rejected])[:, None])

    inputs = {
        "input_ids": torch.ones(2 * len(rewards_chosen), 4),
        "attention_mask": torch.ones(2 * len(rewards_chosen), 4),
    }
    return trl.RewardTrainer.compute_loss(trainer, model, inputs)


def test_reward_loss_equals_trl_reward_trainer():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 2, generator=gen) * 2
    x = rewards.clone().requires_grad_()
    y = rewards.clone().requires_grad_()
    ours = ranking_reward_loss(x)
    theirs = _trl_reward(y[:, 0], y[:, 1])
    (ours + theirs).backward()  # independent leaves: each gets its own loss's gradient
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x.grad, y.grad)


def test_edited_chosen_rejected_ranking_counts_every_ordered_pair():
    rewards = torch.tensor([[3.0, 1.0, -1.0], [0.5, 2.0, 0.0]])
    present = torch.tensor([[True, True, True], [False, True, True]])  # the second row has no edited response

    def pair(better, worse):
        return -F.logsigmoid(torch.tensor(better - worse))

    want = (pair(3.0, 1.0) + pair(3.0, -1.0) + pair(1.0, -1.0) + pair(2.0, 0.0)) / 4
    torch.testing.assert_close(ranking_reward_loss(rewards, present), want)
    torch.testing.assert_close(ranking_reward_loss(rewards[1:, 1:]), pair(2.0, 0.0))
