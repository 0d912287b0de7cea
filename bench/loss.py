"""Output projection + cross-entropy, forward and backward: `lm.loss.linear_cross_entropy` vs the whole-logits loss.

The peer is what HF transformers' causal LMs do (`LlamaForCausalLM` then `ForCausalLMLoss`): the logits
`hidden @ weight.T` in the model's dtype, upcast to fp32, `F.cross_entropy`, autograd for the gradients. Ours
takes the tokens a chunk at a time and never holds the [tokens, vocab] logits with their gradient (lm/loss.py).
Both get the same hidden states, output weight (128,256 x dim) and targets, in fp32 and in bf16; both compute the
gradients of the hidden states and of the weight. Times alternate (ours, peer, ours, ...) after one warm-up call
each, and the median is reported. Peak memory: the CUDA allocator's peak over the call, or on CPU the growth of the
resident set over one call in a fresh process of its own (the allocator hands freed blocks back to the OS).

    python bench/loss.py [--tokens 1024] [--dim 128] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.posttrain_step import memory_kb  # noqa: E402
from lm.loss import linear_cross_entropy  # noqa: E402

VOCAB = 128256


def ours(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The chunked loss, as train/lm.py computes it."""
    return linear_cross_entropy(hidden, weight, targets)


def peer(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whole logits, upcast to fp32 before the cross-entropy (HF's ForCausalLMLoss)."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def timed_call(fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """Seconds, loss and peak extra memory (GB) of one forward and backward."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    if hidden.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = memory_kb("VmHWM")
    start = time.perf_counter()
    loss = fn(hidden, weight, targets)
    loss.backward()
    if hidden.is_cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    else:
        peak = (memory_kb("VmHWM") - base) * 1024 / 1e9
    return time.perf_counter() - start, float(loss.detach()), peak


def cpu_peak(name: str, dtype: str, args: argparse.Namespace) -> float:
    """Resident-set growth (GB) of one call of `name` in `dtype`, measured in a fresh process."""
    argv = [sys.executable, __file__, f"--tokens={args.tokens}", f"--dim={args.dim}", f"--peak={name}:{dtype}"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["peak_gb"]


def main(argv: list[str] | None = None) -> None:
    """Print the time and memory of ours and the peer in fp32 and bf16, and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per call (the debug LM's batch: 8 x 128)")
    parser.add_argument("--dim", type=int, default=128, help="hidden width (the debug LM's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # NAME:DTYPE, one call in this process (cpu_peak)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=generator).to(args.device)
    weight = (torch.randn(VOCAB, args.dim, generator=generator) * args.dim**-0.5).to(args.device)
    targets = torch.randint(0, VOCAB, (args.tokens,), generator=generator).to(args.device)
    if args.peak:
        name, dtype = args.peak.split(":")
        fn, dt = {"ours": ours, "peer": peer}[name], getattr(torch, dtype)
        print(json.dumps({"peak_gb": timed_call(fn, hidden.to(dt), weight.to(dt), targets)[2]}))
        return
    print(f"{args.tokens} tokens x dim {args.dim} -> vocab {VOCAB}, {args.device}, {args.threads} threads")
    print("| dtype | ours s | peer s | peer / ours | ours peak GB | peer peak GB | loss ours | loss peer |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.to(dtype), weight.to(dtype)
        runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "peer": []}
        for step in range(args.steps + 1):
            for name, fn in (("ours", ours), ("peer", peer)):
                result = timed_call(fn, h, w, targets)
                if step:  # the first call of each warms up
                    runs[name].append(result)
        t_ours, t_peer = (statistics.median(r[0] for r in runs[n]) for n in ("ours", "peer"))
        if args.device == "cpu":
            m_ours, m_peer = (cpu_peak(n, str(dtype).removeprefix("torch."), args) for n in ("ours", "peer"))
        else:
            m_ours, m_peer = (max(r[2] for r in runs[n]) for n in ("ours", "peer"))
        l_ours, l_peer = runs["ours"][-1][1], runs["peer"][-1][1]
        print(
            f"| {str(dtype).removeprefix('torch.')} | {t_ours:.3f} | {t_peer:.3f} | {t_peer / t_ours:.2f} | "
            f"{m_ours:.2f} | {m_peer:.2f} | {l_ours:.5f} | {l_peer:.5f} |"
        )


if __name__ == "__main__":
    main()
