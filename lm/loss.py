"""Cross-entropy of the output projection without the full logits (`linear_cross_entropy`), and the LM's
next-token losses built on it (`fused_loss_output_fn`) or on whole logits (`token_cross_entropy`); per-token
log-probs without the full logits for post-training's sequence losses (`token_logprobs`, also over an output
weight sharded by vocabulary under tensor parallel, which SFT's loss uses there too).

With a 128K vocabulary the logits of a training batch are its largest tensor (1024 tokens: 525 MB in
fp32), and autograd keeps them, their log-softmax and their gradient alive at once. Here the tokens are
taken a chunk at a time: the chunk's logits are turned in place into d(loss)/d(logits) = softmax - one-hot,
and that is multiplied straight into the gradients of the hidden states and of the weight. Both gradients
are therefore computed in the forward pass (as Liger-kernel's fused linear cross-entropy does); backward
only scales them by the incoming gradient. At most one chunk of logits exists at any time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

# Tokens per chunk. On CPU the three matmuls run at full speed from ~1K rows, and a larger chunk means
# fewer read-modify-write passes over the [vocab, dim] weight gradient; the chunk's fp32 logits cost
# chunk_size * vocab * 4 bytes (1024 x 128256: 525 MB), which bounds the memory this function adds.
DEFAULT_CHUNK_SIZE = 1024


# PyTorch's CPU allocator hands large blocks back to the OS when they are freed, so a fresh chunk buffer
# page-faults in again on every call: ~0.25 s of kernel time per 525 MB on this project's 2-core machine,
# more than the softmax over it. One CPU buffer per dtype is therefore kept between calls (CUDA's caching
# allocator already does this on GPU); `free_cpu_buffer()` returns them.
_cpu_buffers: dict[torch.dtype, torch.Tensor] = {}
_cpu_buffer_lock = threading.Lock()


def _take_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        with _cpu_buffer_lock:
            buffer = _cpu_buffers.pop(dtype, None)
        if buffer is not None and buffer.numel() >= rows * cols:
            return buffer
    return torch.empty(rows * cols, dtype=dtype, device=device)


def _give_back(buffer: torch.Tensor) -> None:
    if buffer.device.type == "cpu":
        with _cpu_buffer_lock:
            kept = _cpu_buffers.get(buffer.dtype)
            if kept is None or kept.numel() < buffer.numel():
                _cpu_buffers[buffer.dtype] = buffer


def free_cpu_buffer() -> None:
    """Release the CPU logits buffers that linear_cross_entropy keeps between calls."""
    with _cpu_buffer_lock:
        _cpu_buffers.clear()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` over non-ignored tokens, chunked over tokens.

    hidden [N, D] or [B, S, D]; weight [V, D] (the output projection); targets [N] or [B, S] (ignore_index
    marks tokens that count for nothing). Equals `F.cross_entropy(hidden @ weight.T, targets,
    ignore_index=ignore_index)` and its gradients w.r.t. hidden and weight, except that a batch whose
    targets are all ignored gives 0 (not NaN). The loss is fp32 whatever the input dtype; with bf16 inputs
    the softmax and the weight gradient's sum over chunks are fp32 too.
    """
    _check_shapes(hidden, weight, targets, chunk_size)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index, chunk_size
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n_tokens = hidden.shape[0]
        valid = targets != ignore_index
        # 1 / (number of counted tokens), kept as a tensor so that no device sync is needed; 0 tokens -> 0.
        inv_count = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
        # Per-token weight of each row's gradient: 1/count where counted, 0 where ignored. It scales the
        # [chunk, dim] operands instead of the [chunk, vocab] gradient, which is never touched by a mask.
        row_scale = valid.to(torch.float32) * inv_count
        safe_targets = torch.where(valid, targets, 0)

        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # fp32 sum over chunks; the first chunk writes it (no [V, D] zero fill)
        # One fp32 buffer for every chunk (and call), and with bf16 inputs one more in their dtype for the matmuls'
        # results and operands: no fresh 0.5 GB each time (on CPU the matmuls then run 2.4x as fast as in fp32).
        vocab, mixed = weight.shape[0], hidden.dtype != torch.float32
        logits_buffer = _take_buffer(min(chunk_size, n_tokens), vocab, torch.float32, hidden.device)
        low_buffer = _take_buffer(min(chunk_size, n_tokens), vocab, hidden.dtype, hidden.device) if mixed else None
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h = hidden[start:end]
            tgt = safe_targets[start:end, None]
            scale = row_scale[start:end, None]
            logits = logits_buffer[: (end - start) * vocab].view(end - start, vocab)
            low = low_buffer[: (end - start) * vocab].view(end - start, vocab) if mixed else logits
            torch.mm(h, weight.t(), out=low)
            if mixed:
                logits.copy_(low)
            # In place: logits -> softmax -> softmax - one-hot = d(loss_row)/d(logits), one exp per logit.
            target_logit = logits.gather(1, tgt)
            row_max = logits.amax(1, keepdim=True)
            torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            # The loss needs log-sum-exp. The largest probability, exp(max - lse), is at least 1 / vocab and
            # never underflows (the target's may), so lse = max - log(largest probability) exactly.
            log_sum_exp = row_max - logits.amax(1, keepdim=True).log()
            loss += ((log_sum_exp - target_logit) * scale).sum()
            if not (need_hidden or need_weight):
                continue
            logits.scatter_add_(1, tgt, torch.full_like(scale, -1.0))
            grad = low.copy_(logits) if mixed else logits
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:end])
                grad_hidden[start:end] *= scale.to(hidden.dtype)
            if need_weight:
                scaled_h = h * scale.to(hidden.dtype)
                if grad_weight is None:
                    grad_weight = torch.mm(grad.t(), scaled_h)
                    if grad_weight.dtype != torch.float32:
                        grad_weight = grad_weight.float()
                elif hidden.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), scaled_h)
                else:
                    grad_weight += torch.mm(grad.t(), scaled_h)
        for buffer in (logits_buffer, low_buffer):
            if buffer is not None:
                _give_back(buffer)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        elif need_weight:  # no tokens at all
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Skipping the scaling pass for a plain loss.backward() needs grad_output's value: free on CPU, a device
        # sync elsewhere, where the pass is cheap anyway.
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_output
            grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] of each token (fp32, shaped like targets; ignored tokens give 0).

    Unlike the cross-entropy, the gradient reaching each token's log-prob is known only in backward (a DPO
    loss weighs whole sequences), so backward recomputes each chunk's logits: one chunk of [tokens, vocab]
    exists at a time, in forward and in backward, and only hidden, weight, targets and each token's log-sum-exp
    are saved.

    Under tensor parallel the model's ``output=`` function gets the output weight as a DTensor sharded by
    vocabulary rows over the TP mesh, and the hidden states as a sequence-sharded DTensor (sequence parallel):
    the hidden states are then all-gathered, each rank computes the logits of its vocabulary rows only, the
    log-sum-exps and the targets' logits are combined over the TP group, and in backward the hidden states'
    gradient is all-reduced over it. The result is the same plain tensor on every TP rank.
    """
    _check_shapes(hidden, weight, targets, chunk_size)
    hidden = replicated_hidden(hidden)
    local_weight, shard = _vocab_shard(weight)
    flat = _TokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), local_weight, targets.reshape(-1), ignore_index, chunk_size, shard
    )
    return flat.view(targets.shape)


def replicated_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as a plain tensor over every position: a sequence-sharded DTensor (TP's sequence parallel) is
    all-gathered.

    Its gradient must then be whole and the same on every TP rank (``token_logprobs`` all-reduces it), for the
    backward of the all-gather keeps each rank's own slice of it.
    """
    if isinstance(hidden, DTensor):
        return hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    return hidden


@dataclass(frozen=True)
class _VocabShard:
    """This rank's rows [start, start + local vocabulary) of a weight sharded by vocabulary over ``group``."""

    group: dist.ProcessGroup
    ranks: int
    start: int


def _vocab_shard(weight: torch.Tensor) -> tuple[torch.Tensor, _VocabShard | None]:
    """The local rows of the output weight and where they sit; a plain tensor is the whole vocabulary."""
    if not isinstance(weight, DTensor):
        return weight, None
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"the output weight is a DTensor placed {weight.placements} on a {weight.device_mesh.ndim}-D mesh; "
            "expected it sharded by vocabulary rows (Shard(0)) over one tensor-parallel mesh dimension"
        )
    mesh, vocab = weight.device_mesh, weight.shape[0]
    # DTensor's Shard(0) splits as torch.chunk does: ceil(vocab / ranks) rows each, the last ranks short or empty.
    per_rank = -(-vocab // mesh.size())
    start = min(mesh.get_local_rank() * per_rank, vocab)
    local = weight.to_local()
    if local.shape[0] != min(per_rank, vocab - start):
        raise ValueError(f"local output weight rows {local.shape[0]} do not match a torch.chunk split of {vocab}")
    return local, _VocabShard(mesh.get_group(), mesh.size(), start)


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on tokens")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"weight {tuple(weight.shape)} is not [vocab, {hidden.shape[-1]}]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(hidden, weight.t()).float()


def _combine_over_vocab_shards(
    log_sum_exp: torch.Tensor, target_logit: torch.Tensor, shard: _VocabShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary's log-sum-exp and target logits from each rank's (its rows only; a target's logit is
    0 on the ranks that do not hold it): one all-gather of 2 floats per token."""
    mine = torch.stack([log_sum_exp, target_logit])
    every = [torch.empty_like(mine) for _ in range(shard.ranks)]
    dist.all_gather(every, mine, group=shard.group)
    every = torch.stack(every)  # [ranks, 2, tokens]
    return every[:, 0].logsumexp(0), every[:, 1].sum(0)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, shard):
        valid = targets != ignore_index
        # Targets as rows of the local weight: under TP each rank holds rows [start, start + local vocabulary).
        local_targets = torch.where(valid, targets, 0) - (shard.start if shard else 0)
        owned = valid & (local_targets >= 0) & (local_targets < weight.shape[0])
        local_targets = torch.where(owned, local_targets, 0)
        n_tokens = hidden.shape[0]
        target_logit = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
        log_sum_exp = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            logits = _chunk_logits(hidden[start:end], weight)
            target_logit[start:end] = logits.gather(1, local_targets[start:end, None]).squeeze(1)
            log_sum_exp[start:end] = logits.logsumexp(1)
        target_logit = torch.where(owned, target_logit, 0.0)
        if shard is not None:
            log_sum_exp, target_logit = _combine_over_vocab_shards(log_sum_exp, target_logit, shard)
        ctx.save_for_backward(hidden, weight, local_targets, owned, valid, log_sum_exp)
        ctx.chunk_size, ctx.shard = chunk_size, shard
        return torch.where(valid, target_logit - log_sum_exp, 0.0)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, owned, valid, log_sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        # d logp_t / d logits = one-hot(t) - softmax, weighted by each token's incoming gradient (0 where ignored);
        # the one-hot lands on the rank whose rows hold t.
        token_grad = torch.where(valid, grad_output.float(), 0.0)
        owned_grad = torch.where(owned, token_grad, 0.0)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # fp32 sum over chunks
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            logits = _chunk_logits(hidden[start:end], weight)
            grad = logits.sub_(log_sum_exp[start:end, None]).exp_().mul_(-token_grad[start:end, None])
            grad = grad.scatter_add_(1, targets[start:end, None], owned_grad[start:end, None]).to(hidden.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if need_weight:
                chunk_grad = torch.mm(grad.t(), hidden[start:end]).float()
                grad_weight = chunk_grad if grad_weight is None else grad_weight.add_(chunk_grad)
        if need_hidden and ctx.shard is not None:  # each rank's part is its vocabulary rows' share of the sum
            dist.all_reduce(grad_hidden, group=ctx.shard.group)
        if need_weight:
            grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


__all__ = ["DEFAULT_CHUNK_SIZE", "free_cpu_buffer", "linear_cross_entropy", "replicated_hidden", "token_logprobs"]


def token_logprobs_output_fn(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's ``output`` function for per-token log-probs [B, S] of ``targets`` without whole logits."""
    return lambda hidden, weight: token_logprobs(hidden, weight, targets)


def fused_loss_output_fn(
    targets: torch.Tensor, *, labelled_only: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's ``output`` function for the chunked loss: linear + cross-entropy without whole logits.

    Under tensor parallel (the weight a vocabulary-sharded DTensor) it is the mean of ``-token_logprobs``, which
    combines the vocabulary shards; that path recomputes each chunk's logits in backward (one matmul more than
    ``linear_cross_entropy``, which takes its gradients in forward and knows nothing of shards).
    ``labelled_only``: only the positions with a target (not -100) meet the output projection. In SFT's packed
    rows the prompts are most of the tokens, and the [tokens, vocab] work is most of a small model's.
    """

    def output(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        picked = targets
        if labelled_only:
            labelled = targets != -100
            hidden, picked = replicated_hidden(hidden)[labelled], targets[labelled]
        if isinstance(weight, DTensor):
            counted = (picked != -100).sum().clamp(min=1)
            return -token_logprobs(hidden, weight, picked).sum() / counted
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, picked.flatten())

    return output


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [B, S, V] (vocabulary-sharded under TP) and ``targets`` [B, S]."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if isinstance(loss, DTensor):  # vocabulary-parallel: a replicated scalar, made plain (differentiably)
        loss = loss.full_tensor()
    return loss
