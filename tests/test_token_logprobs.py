"""lm.loss.token_logprobs against a full log_softmax gather: values and gradients w.r.t. hidden and weight."""

from __future__ import annotations

import pytest
import torch

from lm.loss import token_logprobs


def _inputs(shape=(3, 13), dim=16, vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen) * 2
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[0, :4] = -100  # a prompt's worth of ignored tokens
    targets[2, -1] = -100
    # A per-token upstream gradient, as a sequence loss gives: every token weighed differently.
    upstream = torch.randn(*shape, generator=gen)
    return hidden, weight, targets, upstream


def _reference(hidden, weight, targets, upstream):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    valid = targets != -100
    logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    (logp * upstream).sum().backward()
    return logp, hidden.grad, weight.grad


def _ours(hidden, weight, targets, upstream, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logp = token_logprobs(hidden, weight, targets, **kwargs)
    (logp * upstream).sum().backward()
    return logp, hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1024])
def test_values_and_gradients_equal_full_log_softmax(chunk_size):
    inputs = _inputs()
    ours = _ours(*inputs, chunk_size=chunk_size)
    want = _reference(*inputs)
    assert ours[0].dtype == torch.float32 and ours[0].shape == inputs[2].shape
    for got, ref in zip(ours, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ignored_tokens_give_zero_and_no_gradient():
    hidden, weight, targets, upstream = _inputs()
    targets[:] = -100
    logp, grad_hidden, grad_weight = _ours(hidden, weight, targets, upstream, chunk_size=4)
    assert torch.equal(logp, torch.zeros_like(logp))
    assert torch.equal(grad_hidden, torch.zeros_like(grad_hidden))
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight))


def test_flat_tokens_and_a_shape_mismatch():
    hidden, weight, targets, upstream = _inputs()
    flat = token_logprobs(hidden.flatten(0, 1), weight, targets.flatten(), chunk_size=7)
    torch.testing.assert_close(flat, token_logprobs(hidden, weight, targets).flatten())
    with pytest.raises(ValueError, match="disagree on tokens"):
        token_logprobs(hidden, weight, targets[:, :-1])
