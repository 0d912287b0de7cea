"""Training step speed: lm.Transformer + linear_cross_entropy vs HF transformers' LlamaForCausalLM.

One step = zero_grad, forward, loss, backward, AdamW step, on the CPU bench config (dim 512, 8 layers,
8 heads, 2 KV heads, FFN 1536, vocab 128256), batch 4 x 256 tokens, fp32, the same weights on both sides
(ours saved in HF's layout and loaded by HF). Both predict the same next tokens: inputs x = 256 tokens, and
target i = x[i + 1], the last position of a row counting for nothing (HF shifts `labels=x` that way inside;
ours gets the shifted targets with -100 at the end). Ours computes the loss as train/lm.py does:
`linear_cross_entropy(model(x, output="hidden").flatten(0, 1), model.output.weight, targets.flatten())`;
HF takes `model(input_ids=x, labels=x).loss` (its default SDPA attention). Both use torch.optim.AdamW with
the same hyperparameters and implementation flag.

Step times of ours and HF alternate (ours, HF, ours, HF, ...) after warm-up, so that load from other
processes on a shared machine hits both alike; the median is reported. The roof is an fp32 GEMM
(2048 x 2048 x 2048) timed between the steps in the same run: "% of roof" = achieved model FLOP/s
(LMConfig.flops_per_token(256) x tokens/s) / GEMM FLOP/s.

    python bench/train_step.py [--steps 5] [--threads N] [--json OUT] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.checkpoint import save_pretrained  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.loss import linear_cross_entropy  # noqa: E402
from lm.model import Transformer  # noqa: E402

# ffn_hidden_dim = 512 * ceil(int(2 * 4 * 512 / 3) / 512) = 512 * ceil(1365 / 512) = 1536.
CONFIG = LMConfig(
    dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=512, ffn_dim_multiplier=None
)
BATCH, SEQ = 4, 256
GEMM_N = 2048
OPTIMIZER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# AdamW implementations torch offers on CPU; "fused" was the fastest here (see RESULTS.md), so it is the default.
IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ours_step(model: Transformer, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    hidden = model(x, output="hidden")
    loss = linear_cross_entropy(hidden.flatten(0, 1), model.output.weight, targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.item()


def _hf_step(model, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, repeats: int = 5) -> float:
    """Seconds per 2048^3 fp32 matmul, the mean of `repeats`."""
    return _timed(lambda: [torch.mm(a, b, out=out) for _ in range(repeats)]) / repeats


def _profile(model: Transformer, optimizer: torch.optim.Optimizer, x: torch.Tensor, targets: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _ours_step(model, optimizer, x, targets)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def _report(times: dict[str, list[float]], step1_losses: tuple[float, float], args: argparse.Namespace) -> None:
    """Print the table of median step times (and write it to --json)."""
    med = {k: statistics.median(v) for k, v in times.items()}

    tokens = BATCH * SEQ
    roof = 2 * GEMM_N**3 / med["gemm"]
    flops_per_token = CONFIG.flops_per_token(SEQ)
    result = {
        "ours_tokens_per_s": tokens / med["ours"],
        "hf_tokens_per_s": tokens / med["hf"],
        "ours_over_hf": med["hf"] / med["ours"],
        "roof_gflops": roof / 1e9,
        "ours_roof_fraction": flops_per_token * tokens / med["ours"] / roof,
        "hf_roof_fraction": flops_per_token * tokens / med["hf"] / roof,
        "ours_step_s": times["ours"],
        "hf_step_s": times["hf"],
        "step1_loss": {"ours": step1_losses[0], "hf": step1_losses[1]},
        "threads": args.threads,
        "optimizer": args.optimizer,
        "load_average": os.getloadavg()[0],
    }
    print(
        f"median of {args.steps} interleaved steps each; GEMM roof {result['roof_gflops']:.1f} GFLOP/s; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token"
    )
    header = f"{'':<6} {'tok/s':>8} {'step s':>8} {'% of roof':>10}"
    print()
    print(header)
    print("-" * len(header))
    for name in ("ours", "hf"):
        print(
            f"{name:<6} {result[f'{name}_tokens_per_s']:>8.1f} {med[name]:>8.2f} "
            f"{100 * result[f'{name}_roof_fraction']:>9.0f}%"
        )
    print(f"\nours / HF: {result['ours_over_hf']:.2f}x   (load average at the end {result['load_average']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--optimizer", choices=IMPLEMENTATIONS, default="fused", help="AdamW implementation, both sides"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of ours")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    ours = Transformer(CONFIG)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp, format="hf")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.train(), hf.train()
    flags = {**OPTIMIZER, **IMPLEMENTATIONS[args.optimizer]}
    ours_opt = torch.optim.AdamW(ours.parameters(), **flags)
    hf_opt = torch.optim.AdamW(hf.parameters(), **flags)

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=gen)
    targets = torch.cat([x[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    gemm_a, gemm_b, gemm_out = (torch.randn(GEMM_N, GEMM_N) for _ in range(3))

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"config: dim {CONFIG.dim}, {CONFIG.n_layers} layers, {CONFIG.n_heads} heads, {CONFIG.n_kv_heads} KV heads, "
        f"FFN {CONFIG.ffn_hidden_dim}, vocab {CONFIG.vocab_size}; batch {BATCH} x {SEQ}, fp32; "
        f"AdamW {args.optimizer} ({', '.join(f'{k}={v}' for k, v in flags.items())}) on both sides"
    )

    # Step 1 from identical weights must give the same loss; it doubles as the first warm-up step.
    ours_loss, hf_loss = _ours_step(ours, ours_opt, x, targets), _hf_step(hf, hf_opt, x)
    print(f"step 1 loss: ours {ours_loss:.6f}, HF {hf_loss:.6f} (|diff| {abs(ours_loss - hf_loss):.1e})")
    if abs(ours_loss - hf_loss) > 1e-4 * abs(hf_loss):
        raise SystemExit("losses differ on step 1: the two sides do not compute the same thing")
    _ours_step(ours, ours_opt, x, targets), _hf_step(hf, hf_opt, x)
    _gemm(gemm_a, gemm_b, gemm_out, repeats=2)
    if args.profile:
        _profile(ours, ours_opt, x, targets)

    times = {"ours": [], "hf": [], "gemm": []}
    for _ in range(args.steps):
        times["ours"].append(_timed(lambda: _ours_step(ours, ours_opt, x, targets)))
        times["hf"].append(_timed(lambda: _hf_step(hf, hf_opt, x)))
        times["gemm"].append(_gemm(gemm_a, gemm_b, gemm_out))
    _report(times, (ours_loss, hf_loss), args)


if __name__ == "__main__":
    main()
