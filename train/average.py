"""Model averaging (paper section 4): the weighted mean of checkpoints of one architecture, written as one checkpoint.

    python -m train.average OUT IN1 IN2 [IN3 ...] [--weights w1,w2,...] [--format hf|meta] [--overwrite]

"We average models obtained from experiments using various versions of data or hyperparameters at each RM, SFT, or
DPO stage." An input is an LM checkpoint directory (Meta or HF layout, as ``lm.read_state_dict`` reads it) or a
training run (its newest complete DCP checkpoint, read as ``train.export`` reads it). Every input must have the
same model config and the same tensor names and shapes; the first that differs is named with the key at fault.
The weights are relative, as ``numpy.average``'s: ``2,1`` means 2/3 and 1/3 (they must be non-negative with a
positive sum; default: equal). The sum is kept in fp32 and built one input at a time, so memory holds the sum and one
input's tensors; the average is written in the inputs' dtype (the wider one where they differ) into a staging
directory that replaces OUT only once complete. Reward models (``LMConfig.num_labels = 1``: a [1, dim] score head)
average the same way; a reward model and an LM differ in config and are refused together.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from common.atomic import commit_directory
from lm import LMConfig, Transformer, save_pretrained
from lm.checkpoint import detect_format, read_state_dict
from train.checkpoint import CheckpointError
from train.export import LM_CONFIG_FILE, load_checkpoint_model, read_lm_config, resolve_checkpoint

log = logging.getLogger("train.average")

class AverageError(ValueError):
    """Inputs that cannot be averaged: differing configs, names or shapes, bad weights, an unreadable input."""


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an LM checkpoint directory in Meta or HF layout (else it may be a training run)."""
    try:
        detect_format(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def read_input(path: str | os.PathLike) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """The config and Meta-named weights of one input: an LM checkpoint directory or a run's newest checkpoint."""
    path = Path(path)
    if is_model_dir(path):
        try:
            return read_state_dict(path)
        except (KeyError, ValueError, OSError) as error:
            raise AverageError(str(error).strip("'\"")) from None
    try:
        checkpoint = resolve_checkpoint(path)
        # As train.export reads a run: the config beside checkpoints/, the attention backend irrelevant to weights.
        config = read_lm_config(checkpoint.resolve().parent.parent / LM_CONFIG_FILE)
        config = dataclasses.replace(config, attn_backend="sdpa")
        model = load_checkpoint_model(checkpoint, config)
    except CheckpointError as error:
        raise AverageError(f"{path} is neither an LM checkpoint directory nor a readable run: {error}") from None
    return config, dict(model.state_dict())


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Relative weights scaled to sum to 1 (equal when None); refuses a wrong count, negatives or a zero sum."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise AverageError(f"{len(weights)} weights for {count} inputs")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise AverageError(f"weights must be finite, non-negative and not all 0: got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _check_config(config: LMConfig, reference: LMConfig, path: Path, first: Path) -> None:
    """Raise naming the config fields where ``path``'s model differs from the first input's."""
    # The HF form is canonical: one feed-forward width can be written with different multiple_of/multiplier pairs.
    mine, theirs = config.to_hf_config(), reference.to_hf_config()
    differing = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
    if differing:
        detail = ", ".join(f"{key}={mine.get(key)!r} (first: {theirs.get(key)!r})" for key in differing[:6])
        raise AverageError(f"{path}: config differs from the first input {first}: {detail}")


def _check_tensors(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path, first: Path) -> None:
    """Raise naming the key where ``path``'s tensor names or shapes differ from the first input's."""
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing:
        raise AverageError(f"{path}: missing {missing[0]} (present in the first input {first}); {len(missing)} missing")
    if unexpected:
        raise AverageError(
            f"{path}: unexpected {unexpected[0]} (absent from the first input {first}); {len(unexpected)} unexpected"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != shapes[key]:
            raise AverageError(f"{path}: {key} has shape {tuple(tensor.shape)} but {shapes[key]} in {first}")
        if not tensor.is_floating_point():
            raise AverageError(f"{path}: {key} is {tensor.dtype}, not a floating-point weight")


def average_checkpoints(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None
) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """The first input's config and the weighted average of every input's tensors (in the inputs' dtype)."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise AverageError(f"averaging needs at least 2 inputs, got {len(paths)}")
    weights = normalized_weights(weights, len(paths))
    reference, shapes, total, dtype = None, {}, {}, None
    for index, (path, weight) in enumerate(zip(paths, weights, strict=True)):
        started = time.perf_counter()
        config, state = read_input(path)
        if reference is None:
            reference, shapes = config, {key: tuple(t.shape) for key, t in state.items()}
        _check_config(config, reference, path, paths[0])
        _check_tensors(state, shapes, path, paths[0])
        size = sum(t.nbytes for t in state.values())
        for key in list(state):
            tensor = state.pop(key)  # dropped once added: the sum and this input's unread tensors stay in memory
            dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
            if key in total:
                total[key].add_(tensor.float(), alpha=weight)
            else:
                total[key] = tensor.float() * weight
        seconds = time.perf_counter() - started
        log.info(
            "input %d/%d %s (weight %.4g): %.1f MB in %.1f s (%.1f MB/s)",
            index + 1,
            len(paths),
            path,
            weight,
            size / 1e6,
            seconds,
            size / 1e6 / max(seconds, 1e-9),
        )
    return reference, {key: tensor.to(dtype) for key, tensor in total.items()}


def average_state_dicts(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The weighted average (relative weights; equal when None) of the inputs' Meta-named tensors."""
    return average_checkpoints(paths, weights)[1]


def model_with(config: LMConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer holding ``state`` by name (tensors assigned, not copied)."""
    with torch.device("meta"):
        model = Transformer(config)
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise AverageError(f"{key}: no such module in a Llama 3 model") from None
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    unset = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if unset:
        raise AverageError(f"the inputs lack {unset[0]} ({len(unset)} model weights missing)")
    return model


def write_average(
    out: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    *,
    format: str = "hf",
    overwrite: bool = False,
) -> Path:
    """Average ``paths`` and write the result to ``out`` (staged beside it, then renamed into place)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AverageError(f"{out} exists (pass --overwrite to replace it)")
    if any(out.resolve() == Path(p).resolve() for p in paths):
        raise AverageError(f"{out} is also an input: write the average elsewhere")
    config, state = average_checkpoints(paths, weights)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed process of the same id
    try:
        save_pretrained(model_with(config, state), staging, format=format)
        commit_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m train.average", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (a checkpoint in --format)")
    parser.add_argument("inputs", nargs="+", help="LM checkpoint directories (Meta or HF) or training run dirs")
    parser.add_argument("--weights", default=None, help="comma-separated relative weights, one per input")
    parser.add_argument("--format", choices=("hf", "meta"), default="hf")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        parser.error(f"--weights {args.weights!r}: expected comma-separated numbers")
    try:
        out = write_average(args.out, args.inputs, weights, format=args.format, overwrite=args.overwrite)
    except AverageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.inputs)} checkpoints into {out} ({args.format}):")
    for file in sorted(out.iterdir()):
        print(f"  {file.name}  {file.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
