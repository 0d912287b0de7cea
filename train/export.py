"""Export a training checkpoint (DCP) as an HF or Meta checkpoint that ``lm.load_pretrained`` and transformers load.

    python -m train.export RUN_DIR/checkpoints/step-N --out DIR [--format hf|meta] [--dtype float32|bfloat16]
    python -m train.export RUN_DIR --out DIR        # the newest complete checkpoint of the run

The model's shape comes from ``RUN_DIR/lm_config.json`` (written by train/lm.py) or ``--lm-config``. Only the model
weights are read: the optimizer state (twice the model) never leaves the disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from common.atomic import atomic_write_text
from lm import LMConfig, Transformer, save_pretrained
from train.checkpoint import (
    META,
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_dcp_metadata,
    verify_checkpoint,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint ``path`` names: a ``step-N`` directory, or a run dir (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not (path / ".metadata").exists():
        # A run dir, or its checkpoints/ folder: the newest complete checkpoint there.
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if list_checkpoints(folder):
            found = latest_checkpoint(folder)
            if found is None:
                raise CheckpointError(f"{path}: no complete checkpoint under {folder}")
            return Path(found)
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (needs .metadata and {META}; a '.tmp' directory is a save "
            "in progress or one that crashed before committing)"
        )
    verify_checkpoint(path)
    return path


LM_CONFIG_FILE = "lm_config.json"


def write_lm_config(config: LMConfig, run_dir: str | os.PathLike) -> None:
    """Record a run's model shape as ``RUN_DIR/lm_config.json`` (atomically), for :func:`read_lm_config`."""
    atomic_write_text(Path(run_dir, LM_CONFIG_FILE), json.dumps(dataclasses.asdict(config), indent=2))


def read_lm_config(path: str | os.PathLike) -> LMConfig:
    """The LMConfig in an ``lm_config.json`` (``dataclasses.asdict`` of an LMConfig)."""
    try:
        with open(path) as f:
            table = json.load(f)
        return LMConfig(**table)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: pass --lm-config with the run's model config") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid LMConfig: {type(e).__name__}: {e}") from None


def load_checkpoint_model(ckpt: str | os.PathLike, config: LMConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build ``config``'s Transformer on CPU in ``dtype`` and fill it with the model weights of DCP ``ckpt``."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype=dtype).to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty gives each module its own tensor
    state = model.state_dict()
    metadata = read_dcp_metadata(ckpt).state_dict_metadata
    stored = {k.removeprefix("model."): v for k, v in metadata.items() if k.startswith("model.")}
    if config.tie_word_embeddings and "output.weight" not in stored:
        state.pop("output.weight")  # written once, as the embedding
    missing = sorted(set(state) - set(stored))
    unexpected = sorted(set(stored) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt} does not match the model config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for key, tensor in state.items():
        size = tuple(getattr(stored[key], "size", ()))
        if size != tuple(tensor.shape):
            raise CheckpointError(
                f"{ckpt}: model.{key} has shape {size} in the checkpoint but the config expects {tuple(tensor.shape)}"
            )
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            reader, planner = SafeFileSystemReader(str(ckpt)), SafeLoadPlanner()
            dcp.load({"model": state}, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{ckpt} cannot be loaded: {type(e).__name__}: {e}") from None
    return model.eval()


def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "hf",
    dtype: str = "float32",
    lm_config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Export checkpoint (or run dir) ``ckpt`` to ``out`` in ``format``; returns the checkpoint read."""
    path = resolve_checkpoint(ckpt)
    # Files of another export (another format, more shards) would be mixed with this one's.
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise CheckpointError(f"--out {out} is not empty (pass --overwrite to write into it anyway)")
    config_path = Path(lm_config) if lm_config else path.resolve().parent.parent / LM_CONFIG_FILE
    # The attention backend shapes no weight, and the run's (flex, xformers) may not load on the exporting machine.
    config = dataclasses.replace(read_lm_config(config_path), attn_backend="sdpa")
    model = load_checkpoint_model(path, config, DTYPES[dtype])
    save_pretrained(model, out, format=format)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N, or RUN_DIR for its newest checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("hf", "meta"), default="hf")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--lm-config", default=None, help="lm_config.json (default: RUN_DIR/lm_config.json)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    try:
        path = export(
            args.checkpoint,
            args.out,
            format=args.format,
            dtype=args.dtype,
            lm_config=args.lm_config,
            overwrite=args.overwrite,
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = json.loads((path / META).read_text()).get("step")
    print(f"exported {path} (step {step}) as {args.format} {args.dtype} to {args.out}:")
    for file in sorted(Path(args.out).iterdir()):
        print(f"  {file.name}  {file.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
