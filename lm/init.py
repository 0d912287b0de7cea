"""Write a randomly initialized checkpoint of a preset: `python -m lm.init --preset debug --out DIR`."""

from __future__ import annotations

import argparse

import torch

from lm.checkpoint import save_pretrained
from lm.config import PRESETS, LMConfig
from lm.model import Transformer


def init_checkpoint(preset: str, out: str, *, seed: int = 0, fmt: str = "hf", dtype: str = "float32") -> None:
    """Build `preset` with fresh weights from `seed` (the trainer's `--run.seed` model) and save it to `out`."""
    config = LMConfig.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    save_pretrained(model.to(getattr(torch, dtype)), out, format=fmt)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="hf", choices=["hf", "meta"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    init_checkpoint(args.preset, args.out, seed=args.seed, fmt=args.format, dtype=args.dtype)
    print(f"wrote a random {args.preset} checkpoint ({args.format} layout) to {args.out}")


if __name__ == "__main__":
    main()
