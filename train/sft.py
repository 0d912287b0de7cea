"""Supervised finetuning of a Llama 3 on chat data (paper section 4.1.3): loss on the assistant's tokens only.

    torchrun --nproc-per-node N train/sft.py --config configs/posttrain/sft_tiny.toml [--section.key=value ...]

Dialogs (JSONL or Parquet rows ``{"messages": [{role, content}]}``; by default the embedded instruction data of
``data.instruct``) are written in the Llama 3 chat format (``data.chat``), labelled on the assistant turns' content
and end of turn, and packed with document ids so that no dialog attends to another. The model starts from
``--model.init_from`` (Meta or HF layout) and is built and sharded as pretraining builds it
(``train.parallel.llama``); ``train.loop.train`` runs the steps, DCP checkpoints, resume and ``metrics.jsonl``,
and held-out prompts are answered greedily and graded (``eval/accuracy`` beside ``eval/chance``).
The loss of a step is the mean cross-entropy over the target tokens of the whole global batch, under every layout.
It runs data parallel (FSDP/HSDP) and tensor parallel (``--parallel.tp``: the chunked loss combines the vocabulary
shards in ``lm.loss``; whole logits go through the vocabulary-parallel cross-entropy); context and pipeline parallel
are refused.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/sft.py` puts train/ first on sys.path, where train/lm.py would shadow the `lm` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, TypeVar  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from data.chat import IGNORE_INDEX, PackedDialogs, read_dialogs  # noqa: E402
from data.instruct import HELDOUT_FILE, TRAIN_FILE, ensure_instruct_data  # noqa: E402
from evaluation.during_training import TaskEvalConfig, task_evaluator  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.loss import fused_loss_output_fn  # noqa: E402
from lm.tokenizer import ChatFormat, Tokenizer  # noqa: E402
from train.config import JobConfig, NonNegativeInt, PositiveInt, parse_cli  # noqa: E402
from train.export import write_lm_config  # noqa: E402
from train.lm import LMModelConfig, build_lm_config  # noqa: E402
from train.loop import LossFn, RunContext, combined_eval, init_run, micro_batch_size, train  # noqa: E402
from train.parallel.llama import make_forward_backward, model_inputs, parallelize_llama  # noqa: E402
from train.parallel.mesh import ParallelDims, exit_rank, run_then_destroy  # noqa: E402
from train.parallel.tp import check_tp  # noqa: E402
from train.posttrain.heldout import HeldOutGrader, read_graded_rows  # noqa: E402

log = logging.getLogger("train.sft")
C = TypeVar("C", bound=JobConfig)


@dataclass
class SFTDataConfig:
    """Chat files, tokenized with the Llama 3 chat format and packed into rows of ``seq_len + 1`` tokens."""

    # Comma-separated JSONL/Parquet files of {"messages": [...]} rows; "" = the embedded instruction data in dir.
    files: str = ""
    dir: str = "runs/data/instruct"
    seq_len: PositiveInt = 256
    # A bad row (missing or unknown role, empty answer, a dialog longer than a row) stops the run naming its
    # file:line, or is skipped and counted.
    on_bad_row: Literal["fail", "skip"] = "fail"
    seed: NonNegativeInt = 0


@dataclass
class SFTEvalConfig(TaskEvalConfig):
    """Held-out grading (every ``train.eval_interval`` steps and at the end): greedy answers, graded; and any
    lm-eval multiple-choice ``tasks`` (evaluation.during_training)."""

    # A JSONL of graded dialogs (data.instruct's rows: messages, kind, answer); "" = the embedded held-out prompts
    # when training on the embedded data, else none.
    file: str = ""
    samples: NonNegativeInt = 100
    max_new_tokens: PositiveInt = 48


@dataclass
class SFTJobConfig(JobConfig):
    """Root config of ``train/sft.py``."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)


def validate(cfg: SFTJobConfig, world_size: int | None = None) -> LMConfig:
    """Everything that can be checked before any process group or data work; returns the model's config."""
    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    dims = ParallelDims.from_config(cfg.parallel, world)
    if (dims.cp, dims.pp) != (1, 1):
        raise ValueError(
            "post-training runs data and tensor parallel only (FSDP/HSDP, TP): set parallel.cp and parallel.pp to 1"
        )
    lm_config = build_lm_config(cfg.model)
    check_tp(lm_config, dims.tp)
    if cfg.data.seq_len > lm_config.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={lm_config.max_seq_len}")
    micro_batch_size(cfg.train.batch_size, dims.dp, cfg.train.grad_accum)
    if lm_config.vocab_size < Tokenizer().n_words:  # the chat format's special tokens would index past it
        raise ValueError(f"the model's vocab_size={lm_config.vocab_size} lacks the Llama 3 chat format's tokens")
    return lm_config


def configured_or_embedded(files: str, rank: int, write_embedded: Callable[[], Path]) -> list[str]:
    """The comma-separated ``files``, or the embedded data file ``write_embedded`` makes (rank 0 writes, the
    others wait)."""
    if files:
        return [f.strip() for f in files.split(",") if f.strip()]
    path = write_embedded() if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return [str(path or write_embedded())]  # the others find it written


def chat_files(cfg: SFTJobConfig, rank: int) -> list[str]:
    """The configured chat files, or the embedded instruction data (rank 0 writes it, the others wait)."""

    def embedded() -> Path:
        return ensure_instruct_data(cfg.data.dir, seed=cfg.data.seed) / TRAIN_FILE

    return configured_or_embedded(cfg.data.files, rank, embedded)


def held_out_grader(cfg: SFTJobConfig, lm_config: LMConfig, ctx: RunContext) -> HeldOutGrader | None:
    """The eval_fn grading held-out prompts, or None (no file, or eval.samples = 0)."""
    path = cfg.eval.file or ("" if cfg.data.files else str(Path(cfg.data.dir) / HELDOUT_FILE))
    if not path or not cfg.eval.samples:
        return None
    rows = read_graded_rows(path, cfg.eval.samples)
    return HeldOutGrader(lm_config, rows, ctx.rank, ctx.device, cfg.eval.max_new_tokens)


def make_sft_loss(cfg: SFTJobConfig, ctx: RunContext) -> LossFn:
    """``loss_fn(model, batch)``: this micro-batch's summed target-token cross-entropy times its ``loss_scale``.

    The scale (dp x grad_accum / the global batch's target tokens, from ``PackedDialogs``) turns the loop's mean
    over ranks and micro-batches into the global batch's mean token loss, whatever the layout.
    """

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tokens, documents, labels = (batch[k].to(ctx.device) for k in ("tokens", "document_ids", "labels"))
        inputs, _, model_kwargs = model_inputs(cfg, ctx, tokens, documents)
        targets = labels[:, 1:]
        count = (targets != IGNORE_INDEX).sum()
        if cfg.model.loss == "fused":
            # The chunked loss's mean over the answer tokens, times the count: a sum without the [tokens, vocab]
            # logits, and without the prompts' positions ever meeting the output projection.
            token_sum = model(inputs, **model_kwargs, output=fused_loss_output_fn(targets, labelled_only=True)) * count
        else:
            # Under TP the logits are vocabulary-sharded and this runs inside loss_parallel() (the forward_backward
            # of train.parallel.llama.make_forward_backward); its sum comes back a replicated DTensor.
            logits = model(inputs, **model_kwargs).flatten(0, 1).float()
            token_sum = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            if isinstance(token_sum, DTensor):
                token_sum = token_sum.full_tensor()
        return token_sum * batch["loss_scale"].to(ctx.device), {}

    return loss_fn


def run_entry(
    argv: list[str] | None,
    config_class: type[C],
    check: Callable[[C], LMConfig],
    run: Callable[[C, LMConfig, RunContext], list[dict]],
    prog: str,
    doc: str,
) -> list[dict]:
    """A post-training entry's ``main``: parse, ``check`` (a bad config is a usage error, before any process group),
    set up the mesh, then ``run`` with the process group torn down after it."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    cfg, _ = parse_cli(config_class, argv, parser)
    try:
        lm_config = check(cfg)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    ctx = init_run(cfg)
    return run_then_destroy(lambda: run(cfg, lm_config, ctx))


def batch_layout(cfg: JobConfig, ctx: RunContext, seq_len: int, seed: int) -> dict[str, int]:
    """The keyword arguments every post-training batcher (``data.chat.StepBatches``) takes from the run."""
    return {
        "seq_len": seq_len,
        "batch_size": cfg.train.batch_size,
        "dp_rank": ctx.dp_rank,
        "dp_size": ctx.dp_size,
        "grad_accum": cfg.train.grad_accum,
        "seed": seed,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and validate, set up the mesh, read and pack the dialogs, build the model, train."""
    return run_entry(argv, SFTJobConfig, validate, _run, "train/sft.py", __doc__)


def _run(cfg: SFTJobConfig, lm_config: LMConfig, ctx: RunContext) -> list[dict]:
    files = chat_files(cfg, ctx.rank)
    seq = cfg.data.seq_len
    dialogs, skipped = read_dialogs(
        files, ChatFormat(Tokenizer()), max_tokens=seq + 1, skip_bad=cfg.data.on_bad_row == "skip"
    )
    data = PackedDialogs(dialogs, **batch_layout(cfg, ctx, seq, cfg.data.seed))
    model = parallelize_llama(cfg, lm_config, ctx)
    if ctx.rank == 0:
        write_lm_config(lm_config, cfg.run.dir)
        log.info(
            "Llama 3 SFT: %.1fM parameters from %s, %d dialogs (%d bad rows skipped) from %s, seq %d, global batch %d",
            lm_config.num_params() / 1e6,
            cfg.model.init_from or f"a random preset {cfg.model.preset}",
            len(dialogs),
            skipped,
            ", ".join(files),
            seq,
            cfg.train.batch_size,
        )
    loss_fn = make_sft_loss(cfg, ctx)
    return train(
        cfg,
        model,
        loss_fn,
        data,
        forward_backward=make_forward_backward(
            cfg, lm_config, ctx, model, loss_fn, fused_loss=cfg.model.loss == "fused"
        ),
        eval_fn=combined_eval(held_out_grader(cfg, lm_config, ctx), task_evaluator(cfg.eval, lm_config, ctx.device)),
        tokens_per_sample=seq,
        flops_per_sample=lm_config.flops_per_token(seq) * seq,
        extra_metrics=lambda step: {**data.stats(), "data/bad_rows_skipped": skipped},
    )


if __name__ == "__main__":
    main()
    exit_rank()
