"""Training throughput and MFU of the real trainer on one device, beside that device's own matmul roof.

Runs ``train/lm.py``'s model build (``train.parallel.llama``: meta device -> activation checkpointing -> compile
-> FSDP2 -> init) and training loop on one process with random tokens (no tokenizer or shards needed: the GPU
hosts have torch alone), on the Llama 3 8B shape with its layers cut to fit one device. Prints tokens/s, model
TFLOP/s (FLOPs of ``LMConfig.flops_per_token``, attention included), MFU against the datasheet peak
(``train.metrics``), and the same FLOP/s as a fraction of a large matmul timed in the same run (the device's
practical roof: the peer every kernel competes with).

    python bench/mfu.py                                   # CUDA: 8B shape, 8 layers, seq 8192, bf16, compiled
    python bench/mfu.py --preset debug --layers 2 --seq 256 --steps 4 --no-compile   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.config import LMConfig  # noqa: E402
from train.config import load_config  # noqa: E402
from train.lm import LMJobConfig, build_lm_config  # noqa: E402
from train.loop import init_run, train  # noqa: E402
from train.losses import make_loss  # noqa: E402
from train.metrics import peak_flops  # noqa: E402
from train.parallel.llama import parallelize_llama  # noqa: E402
from train.parallel.mesh import destroy_distributed  # noqa: E402


class RandomTokens:
    """Endless batches of uniform random tokens as one document per row; a state for the checkpoint API."""

    def __init__(self, batch: int, seq: int, vocab: int) -> None:
        self.shape, self.vocab = (batch, seq + 1), vocab
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self) -> RandomTokens:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, self.vocab, self.shape, generator=self.generator)
        return {"tokens": tokens, "document_ids": torch.zeros(self.shape, dtype=torch.int32)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def matmul_roof(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` on ``device``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Train a few steps, print and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/lm/llama3_8b.toml"))
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--layers", type=int, default=8, help="layers kept of the preset (fit one device)")
    parser.add_argument("--dim", type=int, default=None, help="override the preset's width")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=12, help="steps; the first third are warm-up (compile)")
    parser.add_argument("--ac", default="selective", choices=["none", "selective", "full"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flex", "xformers"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--run-dir", default=str(ROOT / "runs/bench/mfu"), help="where metrics.jsonl goes")
    args = parser.parse_args(argv)

    cfg = load_config(LMJobConfig, args.config, _overrides(args))
    lm_config = build_lm_config(cfg.model)
    ctx = init_run(cfg)
    try:
        model = parallelize_llama(cfg, lm_config, ctx)
        data = RandomTokens(args.batch, args.seq, lm_config.vocab_size)
        records = train(
            cfg,
            model,
            make_loss(cfg, ctx),
            data,
            tokens_per_sample=args.seq,
            flops_per_sample=lm_config.flops_per_token(args.seq) * args.seq,
        )
    finally:
        destroy_distributed()

    return _report(args, cfg, lm_config, ctx.device, records)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of one device, one pipeline-free layout, no checkpoints, a record every step."""
    overrides = [
        f"--model.preset={args.preset}",
        f"--model.n_layers={args.layers}",
        f"--model.attn_backend={args.attn}",
        "--model.init_from=",
        f"--data.seq_len={args.seq}",
        f"--train.batch_size={args.batch}",
        f"--train.steps={args.steps}",
        f"--train.ac={args.ac}",
        "--train.grad_accum=1",
        "--parallel.dp_replicate=1",
        "--parallel.dp_shard=1",
        "--parallel.tp=1",
        "--parallel.pp=1",
        "--parallel.cp=1",
        "--checkpoint.enable=false",
        "--metrics.log_interval=1",
        "--metrics.tensorboard=false",
        f"--run.dir={args.run_dir}",
    ]
    if args.dim is not None:
        overrides.append(f"--model.dim={args.dim}")
    if args.compile is not None:
        overrides.append(f"--train.compile={str(args.compile).lower()}")
    return overrides


def _report(
    args: argparse.Namespace, cfg: LMJobConfig, lm_config: LMConfig, device: torch.device, records: list[dict]
) -> dict:
    """Median tokens/s after the warm-up third, as model FLOP/s against the matmul roof and the datasheet peak."""
    timed = records[len(records) // 3 :] or records
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    flops = lm_config.flops_per_token(args.seq) * tokens_per_s
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    roof = matmul_roof(device, dtype, 8192 if cuda else 2048)
    peak = peak_flops() if cuda else None
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "preset": args.preset,
        "layers": args.layers,
        "params": lm_config.num_params(),
        "seq": args.seq,
        "batch": args.batch,
        "ac": args.ac,
        "compile": cfg.train.compile if cfg.train.compile is not None else cuda,
        "dtype": "bf16 params, fp32 reduce" if cuda else "fp32",
        "tokens_per_s": tokens_per_s,
        "model_tflops": flops / 1e12,
        "mfu": flops / peak if peak else None,
        "matmul_roof_tflops": roof / 1e12,
        "fraction_of_matmul_roof": flops / roof,
        "mem_gb": max(r["mem_gb"] for r in records),
        "last_loss": records[-1]["loss"],
    }
    print(
        f"{device_name}: {args.preset} x {args.layers} layers ({lm_config.num_params() / 1e9:.2f}B), "
        f"seq {args.seq} x batch {args.batch}, ac {args.ac}, compile {result['compile']}"
    )
    print(f"ours: {tokens_per_s:,.0f} tokens/s, {flops / 1e12:.1f} model TFLOP/s, {result['mem_gb']:.1f} GB")
    print(f"matmul roof ({dtype}, same run): {roof / 1e12:.1f} TFLOP/s -> ours at {flops / roof:.0%} of it")
    if peak:
        print(f"MFU vs the datasheet peak {peak / 1e12:.0f} TFLOP/s: {flops / peak:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
