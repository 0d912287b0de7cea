"""Adapter training on a frozen LM vs the same model with the LM unfrozen: peak memory, state and step time.

One CPU config (fp32, one process): an LM of dim 256, 4 layers, vocab 128256 (random weights), the tiny image
encoder and an image adapter with one cross-attention block; batch 8 of synthetic 64 px scenes captioned as in
train/adapter.py (prompt + <|image|> + caption, loss on the caption). One step = forward, backward, AdamW step,
zero_grad, through the trainer's own pieces (train.adapter.batch_loss, train.optim.build_optimizer).

Each mode runs in a fresh subprocess so that peak resident memory (ru_maxrss) is its own. Besides peak RSS the
bench counts the bytes that training state adds: parameter gradients and AdamW state (exp_avg, exp_avg_sq). The
frozen run must hold none of either for the LM: checked after its steps (the script exits non-zero otherwise).

    python bench/adapter_memory.py [--steps 4] [--batch 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LM_SHAPE = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=256)


def build(directory: Path, frozen: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The composed model (random LM saved to ``directory`` so Llama3MM records its path) and its optimizer."""
    from adapters.vision import VisionAdapter, VisionAdapterConfig
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from llama3mm import Llama3MM
    from lm.checkpoint import save_pretrained
    from lm.config import LMConfig
    from lm.model import Transformer
    from train.config import OptimConfig
    from train.optim import build_optimizer

    torch.manual_seed(0)
    lm = Transformer(LMConfig(**LM_SHAPE))
    lm.init_weights()
    save_pretrained(lm, directory / "lm", format="hf")
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny"))
    adapter = VisionAdapter(VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim))
    mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter, lm_path=directory / "lm")
    if not frozen:
        mm.lm.requires_grad_(True)
    return mm, build_optimizer(mm, OptimConfig(lr=1e-4))


def batch(mm: nn.Module, size: int) -> dict:
    """A training batch of synthetic scenes, built as train/adapter.py builds its own."""
    import random

    from data.scenes import caption, random_scene
    from data.synthetic import draw_scene
    from llama3mm.processor import DEFAULT_PROMPTS
    from train.adapter import PromptCollator, image_media

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(size)]
    samples = [{"image": draw_scene(s), "text": caption(s)} for s in scenes]
    return PromptCollator(mm, DEFAULT_PROMPTS["image"], image_media)(samples)


def state_bytes(mm: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of gradients and AdamW state, split into the LM's and the rest."""
    names = {p: n for n, p in mm.named_parameters()}
    out = {"lm_grad": 0, "lm_optim": 0, "other_grad": 0, "other_optim": 0, "lm_optim_tensors": 0}
    for p, name in names.items():
        part = "lm" if name.startswith("lm.") else "other"
        if p.grad is not None:
            out[f"{part}_grad"] += p.grad.numel() * p.grad.element_size()
        state = optimizer.state.get(p, {})
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                out[f"{part}_optim"] += v.numel() * v.element_size()
                out["lm_optim_tensors"] += part == "lm"
    return out


def run_mode(frozen: bool, steps: int, size: int) -> dict:
    """Train ``steps`` steps in this process; returns step times, peak RSS and state bytes."""
    from train.adapter import batch_loss

    with tempfile.TemporaryDirectory() as tmp:
        mm, optimizer = build(Path(tmp), frozen)
        data = batch(mm, size)
        mm.train()
        times, held = [], {}
        for step in range(steps + 1):  # the first step warms up (allocations, lazy init) and is not timed
            t0 = time.perf_counter()
            loss, _ = batch_loss(mm, data, torch.device("cpu"))
            loss.backward()
            if step == steps:  # measure the state while gradients are alive (between backward and zero_grad)
                held = state_bytes(mm, optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
        trainable = sum(p.numel() for p in mm.parameters() if p.requires_grad)
        lm_params = sum(p.numel() for p in mm.lm.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "frozen": frozen,
        "step_s": statistics.median(times),
        "peak_rss_gb": peak / 1e9,
        "trainable_params": trainable,
        "lm_params": lm_params,
        "loss": float(loss),
        **held,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes in subprocesses and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default="")
    parser.add_argument("--mode", choices=("frozen", "unfrozen"), help=argparse.SUPPRESS)  # one subprocess
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode == "frozen", args.steps, args.batch)))
        return 0

    results = {}
    for mode in ("frozen", "unfrozen"):
        cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        if proc.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    fr, un = results["frozen"], results["unfrozen"]
    gb = 1e9
    print(f"config: LM {LM_SHAPE} ({fr['lm_params'] / 1e6:.1f}M params), tiny ViT + 1 cross-attention block,")
    print(f"        batch {args.batch}, fp32, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'':>10} {'step s':>8} {'peak RSS GB':>12} {'grads GB':>9} {'AdamW GB':>9} {'trainable':>11}")
    for name, r in results.items():
        grads = (r["lm_grad"] + r["other_grad"]) / gb
        optim = (r["lm_optim"] + r["other_optim"]) / gb
        print(
            f"{name:>10} {r['step_s']:8.3f} {r['peak_rss_gb']:12.3f} {grads:9.3f} {optim:9.3f} "
            f"{r['trainable_params'] / 1e6:10.2f}M"
        )
    state = {
        name: sum(r[k] for k in ("lm_grad", "other_grad", "lm_optim", "other_optim")) for name, r in results.items()
    }
    print(
        f"frozen / unfrozen: step time {fr['step_s'] / un['step_s']:.2f}x, peak RSS "
        f"{fr['peak_rss_gb'] / un['peak_rss_gb']:.2f}x, gradient + optimizer state "
        f"{state['frozen'] / max(1, state['unfrozen']):.4f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    # The frozen run must hold no LM gradient and no LM optimizer state; the unfrozen one must (else the
    # comparison measured nothing).
    if fr["lm_grad"] or fr["lm_optim"] or fr["lm_optim_tensors"]:
        raise SystemExit(f"frozen run holds LM state: {fr}")
    if not (un["lm_grad"] and un["lm_optim"]):
        raise SystemExit(f"unfrozen run holds no LM state: {un}")
    print("check: the frozen run holds no LM gradients and no LM optimizer state")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
