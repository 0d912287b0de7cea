"""lm.loss.linear_cross_entropy against F.cross_entropy on materialized logits: loss and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm.loss import linear_cross_entropy


def _inputs(n_tokens=37, dim=16, vocab=101, dtype=torch.float32, seed=0, ignored=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=gen) * 2
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    targets[list(ignored)] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _reference(hidden, weight, targets, ignore_index=-100, grad_scale=1.0):
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    loss = F.cross_entropy((hidden @ weight.T).flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
    (loss * grad_scale).backward()
    return loss, hidden.grad, weight.grad


def _ours(hidden, weight, targets, grad_scale=1.0, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, **kwargs)
    (loss * grad_scale).backward()
    return loss, hidden.grad, weight.grad


def _assert_close(ours, reference, rtol=1e-5, atol=1e-6):
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 1000])
def test_equals_cross_entropy_with_ignored_rows_and_uneven_chunks(chunk_size):
    hidden, weight, targets = _inputs(ignored=(0, 5, 6, 36))
    _assert_close(_ours(hidden, weight, targets, chunk_size=chunk_size), _reference(hidden, weight, targets))


def test_three_dimensional_input_other_ignore_index_and_scaled_backward():
    hidden, weight, targets = _inputs(n_tokens=24)
    targets[3] = targets[17] = 7
    hidden, targets = hidden.view(2, 12, -1), targets.view(2, 12)
    ours = _ours(hidden, weight, targets, grad_scale=0.25, ignore_index=7, chunk_size=5)
    assert ours[1].shape == hidden.shape
    _assert_close(ours, _reference(hidden, weight, targets, ignore_index=7, grad_scale=0.25))


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden, weight, targets = _inputs(n_tokens=6, ignored=range(6))
    loss, grad_hidden, grad_weight = _ours(hidden, weight, targets, chunk_size=4)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


def test_frozen_inputs_get_no_gradient_and_weight_grad_accumulates_through_autograd():
    hidden, weight, targets = _inputs()
    _, hidden_grad, weight_grad = _reference(hidden, weight, targets)
    frozen = weight.clone().requires_grad_(False)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, frozen, targets, chunk_size=8).backward()
    assert frozen.grad is None
    torch.testing.assert_close(h.grad.double(), hidden_grad, rtol=1e-5, atol=1e-6)

    # Hidden states from a frozen trunk; the weight's gradient lands in .grad and adds to what is there.
    w = weight.clone().requires_grad_()
    w.grad = torch.ones_like(w)
    linear_cross_entropy(hidden, w, targets, chunk_size=8).backward()
    torch.testing.assert_close(w.grad.double(), weight_grad + 1, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), F.cross_entropy(hidden.double() @ weight.double().T, targets))


def test_bfloat16_inputs_close_to_fp32_reference():
    hidden, weight, targets = _inputs(n_tokens=64, dim=32, vocab=300, ignored=(1, 2))
    ours = _ours(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=24)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    _assert_close(ours, _reference(hidden, weight, targets), rtol=2e-2, atol=2e-3)


def test_bfloat16_equals_the_whole_logits_recipe_and_kept_buffers_do_not_mix_dtypes():
    """bf16 matmuls, fp32 softmax: what autograd gives for bf16 logits upcast to fp32 (HF's loss), call after call,
    with fp32 and bf16 calls (each dtype has its own kept CPU buffer) and a larger call between them."""
    hidden, weight, targets = _inputs(n_tokens=64, dim=32, vocab=300, ignored=(1, 2))
    h16, w16 = (x.bfloat16().requires_grad_() for x in (hidden, weight))
    loss = F.cross_entropy((h16 @ w16.T).float(), targets)
    loss.backward()
    expected = tuple(x.detach().double() for x in (loss, h16.grad, w16.grad))
    fp32 = _ours(hidden, weight, targets, chunk_size=24)
    for n_tokens in (64, 200, 64):
        big = _inputs(n_tokens=n_tokens, dim=32, vocab=300, seed=1)
        _ours(*big, chunk_size=24)
        _assert_close(_ours(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=24), expected, 1e-2, 1e-3)
        for a, b in zip(_ours(hidden, weight, targets, chunk_size=24), fp32, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shape_mismatch_fails_clearly():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="vocab"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)


def test_the_loss_on_labelled_positions_only_equals_the_loss_over_every_position():
    """SFT's output function skips the prompts' positions: the same mean and gradients as the ignore-index loss."""
    from lm.loss import fused_loss_output_fn

    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 10))
    targets[:, :6] = -100  # a prompt of six tokens in every row
    targets[1, 8] = -100
    results = []
    for labelled_only in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_loss_output_fn(targets, labelled_only=labelled_only)(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for every, labelled in zip(*results, strict=True):
        torch.testing.assert_close(labelled, every, rtol=1e-6, atol=1e-7)  # the loss is accumulated in fp32
    assert results[1][1][:, :6].abs().max() == 0  # the prompt positions get no gradient
