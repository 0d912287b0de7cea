"""Direct preference optimization of a Llama 3 chat model (paper section 4.1.4), after SFT.

    torchrun --nproc-per-node N train/dpo.py --config configs/posttrain/dpo_tiny.toml [--section.key=value ...]

Preference rows (``data.preference``: a prompt, a chosen and a rejected answer; by default the embedded pairs made
from ``data.instruct``'s tasks) are encoded in the Llama 3 chat format, labelled on each answer and its end of turn,
and padded into rows, chosen and rejected side by side. The policy starts from ``--model.init_from`` (the SFT run
exported to HF) and is built and sharded as SFT builds it. The reference is that same initial policy: before step
1 one pass of it over the training pairs the run will reach stores each pair's chosen and rejected log-likelihoods in
``RUN_DIR/reference_logps.pt`` (a resume reads them back, or recomputes them identically from ``init_from``), so no
second copy of the model exists. The answers' per-token log-probs come from ``lm.loss.token_logprobs`` in the model's
``output=`` function (inside forward, where FSDP has the output weight gathered). The loss is
``train.posttrain.losses.dpo_loss``: DPO's sigmoid loss (beta 0.1) on the answers without their formatting tokens,
plus 0.2 x the chosen answers' token NLL (end of turn included), its mean over the whole global batch under every
layout. ``metrics.jsonl`` logs
``rewards/accuracy``, ``rewards/margin``, ``rewards/chosen`` and ``rewards/rejected`` of the training batches;
held-out prompts are answered greedily and graded (``eval/accuracy`` beside ``eval/chance``) as in SFT, and held-out
pairs (their reference scored in the same pass) give ``eval/reward_accuracy`` and ``eval/reward_margin``.
It runs data and tensor parallel (FSDP/HSDP, ``--parallel.tp``: ``token_logprobs`` combines the vocabulary shards of
the output weight); context and pipeline parallel are refused.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/dpo.py` puts train/ first on sys.path, where train/lm.py would shadow the `lm` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import functools  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from data.chat import IGNORE_INDEX, formatting_mask  # noqa: E402
from data.preference import (  # noqa: E402
    HELDOUT_PREFERENCE_FILE,
    PreferenceBatches,
    ensure_preference_data,
    read_preferences,
)
from evaluation.during_training import task_evaluator  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.loss import replicated_hidden, token_logprobs  # noqa: E402
from lm.tokenizer import ChatFormat, Tokenizer  # noqa: E402
from train.config import JobConfig, NonNegativeFloat, NonNegativeInt, PositiveFloat  # noqa: E402
from train.export import write_lm_config  # noqa: E402
from train.lm import LMModelConfig  # noqa: E402
from train.loop import LossFn, RunContext, combined_eval, train  # noqa: E402
from train.parallel.llama import model_inputs, parallelize_llama  # noqa: E402
from train.parallel.mesh import exit_rank, submesh  # noqa: E402
from train.posttrain.losses import DPO_BETA, DPO_NLL_WEIGHT, dpo_loss, sequence_logps  # noqa: E402
from train.sft import (  # noqa: E402
    SFTDataConfig,
    SFTEvalConfig,
    batch_layout,
    configured_or_embedded,
    held_out_grader,
    run_entry,
    validate,
)

log = logging.getLogger("train.dpo")
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPODataConfig(SFTDataConfig):
    """Preference files (rows {prompt | prompt_messages, chosen, rejected[, edited]}; "" = the embedded pairs in dir),
    each answer encoded after its prompt and padded into a row of ``seq_len + 1`` tokens; a bad row (no prompt, a
    missing or empty answer, an unknown role, too long) fails naming its file:line, or is skipped and counted."""

    # Rows of these kinds (the rows' "kind", as data.instruct and train/rejection.py write it) are thinned so that
    # each answer word is chosen about as often as rejected (data.preference.balance_answer_words). Pairs of a
    # policy's answers reject the words it overuses, and DPO learns that as a prior whatever the prompt says. In the
    # tiny round DPO fell 3 and 4.5 points below its SFT model on 1,000 further prompts; with the colours, shapes
    # and relations balanced, 1.2 on average over five runs (-0.3 to 3.6; bench/RESULTS.md).
    balance_kinds: list[str] = field(default_factory=list)


@dataclass
class DPOLossConfig:
    """The DPO objective's coefficients (paper: beta 0.1, NLL 0.2 on the chosen answers)."""

    beta: PositiveFloat = DPO_BETA
    # The paper masks the formatting tokens (headers, role names, end of turn) out of the DPO term: both answers share
    # them, so their likelihoods pull against each other. False keeps them (an ablation).
    mask_formatting: bool = True
    nll_weight: NonNegativeFloat = DPO_NLL_WEIGHT
    # "precomputed": the initial policy scores every pair the run's steps reach, once, before step 1 (no second model
    # in memory).
    # "online": a frozen copy of it, sharded as the policy is, scores each micro-batch (no pass over the data first).
    reference: Literal["precomputed", "online"] = "precomputed"


@dataclass
class DPOEvalConfig(SFTEvalConfig):
    """SFT's held-out grading, plus reward accuracy and margin on held-out preference pairs."""

    # A preference file of held-out pairs; "" = the embedded held-out pairs when training on the embedded data.
    pairs_file: str = ""
    pairs: NonNegativeInt = 64


@dataclass
class DPOJobConfig(JobConfig):
    """Root config of ``train/dpo.py``."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)


def preference_files(cfg: DPOJobConfig, rank: int) -> list[str]:
    """The configured preference files, or the embedded pairs (rank 0 writes them, the others wait)."""
    return configured_or_embedded(
        cfg.data.files, rank, lambda: ensure_preference_data(cfg.data.dir, seed=cfg.data.seed)
    )


def answer_logprobs_output_fn(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's ``output`` function for per-token log-probs [B, S] of the labelled ``targets`` (0 elsewhere).

    Only the labelled positions go through ``token_logprobs``: the answers are a small part of each padded row, and
    the [tokens, vocab] work is most of a small model's.
    """
    labelled = targets != IGNORE_INDEX

    def output(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Under TP the hidden states arrive sequence-sharded: gathered whole before the answers are picked out.
        picked = token_logprobs(replicated_hidden(hidden)[labelled], weight, targets[labelled])
        return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(labelled, picked)

    return output


@functools.cache
def _tokenizer() -> Tokenizer:
    return Tokenizer()  # a few hundred milliseconds to build: once, not every micro-batch


def answer_logps(
    model: nn.Module, cfg: DPOJobConfig, ctx: RunContext, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's per-token log-probs [R, T] of the rows' targets, the DPO mask (answer tokens without formatting)
    and the NLL mask (every labelled token: the answer and its end of turn)."""
    tokens, documents, labels = (batch[k].to(ctx.device) for k in ("tokens", "document_ids", "labels"))
    inputs, _, model_kwargs = model_inputs(cfg, ctx, tokens, documents)
    targets = labels[:, 1:]
    token_logps = model(inputs, **model_kwargs, output=answer_logprobs_output_fn(targets))
    nll_mask = targets != IGNORE_INDEX
    dpo_mask = nll_mask & ~formatting_mask(tokens[:, 1:], _tokenizer()) if cfg.dpo.mask_formatting else nll_mask
    return token_logps, dpo_mask, nll_mask


ReferenceFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def make_dpo_loss(cfg: DPOJobConfig, ctx: RunContext, reference: ReferenceFn) -> LossFn:
    """``loss_fn(model, batch)``: ``dpo_loss`` of the micro-batch's pairs against ``reference(batch)`` [pairs, 2]
    (chosen, rejected), its chosen NLL divided by the batch's ``nll_tokens``; and the reward metrics."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        token_logps, dpo_mask, nll_mask = answer_logps(model, cfg, ctx, batch)
        pairs = batch["index"].numel()
        ref = reference(batch).to(ctx.device)
        return dpo_loss(
            token_logps[:pairs],
            token_logps[pairs:],
            ref[:, 0],
            ref[:, 1],
            chosen_dpo_mask=dpo_mask[:pairs],
            rejected_dpo_mask=dpo_mask[pairs:],
            chosen_nll_mask=nll_mask[:pairs],
            beta=cfg.dpo.beta,
            nll_weight=cfg.dpo.nll_weight,
            nll_tokens=batch["nll_tokens"].to(ctx.device),
        )

    return loss_fn


def reshard(model: nn.Module) -> None:
    """Free the weights a forward without backward left gathered: FSDP's root keeps them for the backward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def online_reference(model: nn.Module, cfg: DPOJobConfig, ctx: RunContext) -> ReferenceFn:
    """``dpo.reference = "online"``: the frozen ``model`` scores each micro-batch's pairs [pairs, 2] as it comes."""

    @torch.no_grad()
    def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        token_logps, dpo_mask, _ = answer_logps(model, cfg, ctx, batch)
        scored = sequence_logps(token_logps, dpo_mask).float()
        reshard(model)
        pairs = batch["index"].numel()
        return torch.stack([scored[:pairs], scored[pairs:]], dim=1)

    return reference


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    cfg: DPOJobConfig,
    ctx: RunContext,
    data: PreferenceBatches,
    micro: int,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """The (chosen, rejected) log-likelihoods [pairs, 2] over the DPO masks of the pairs ``indices`` (default:
    every pair) by ``model`` as it is now; the rows of the pairs not scored are NaN.

    Each data-parallel rank scores ``micro`` pairs per forward, every rank the same number of forwards (FSDP
    gathers weights in each: a rank out of pairs repeats the first pair and drops it); the shares are gathered over
    the data-parallel group onto every rank (the TP ranks of one group score the same pairs together).
    """
    world, wanted = ctx.dp_size, list(range(len(data.pairs)) if indices is None else indices)
    n, per_round = len(wanted), world * micro
    result = torch.full((len(data.pairs), 2), float("nan"))
    was_training = model.training
    model.eval()
    for start in range(0, n, per_round):
        mine = [start + ctx.dp_rank * micro + k for k in range(micro)]
        token_logps, dpo_mask, _ = answer_logps(model, cfg, ctx, data.rows([wanted[i if i < n else 0] for i in mine]))
        scored = sequence_logps(token_logps, dpo_mask).float().view(2, micro).T  # rows: chosen, rejected
        shares = [scored]
        if dist.is_initialized() and world > 1:
            shares = [torch.empty_like(scored) for _ in range(world)]
            dist.all_gather(shares, scored.contiguous(), group=submesh(ctx.mesh, "dp").get_group())
        for share, first in zip(shares, range(start, start + per_round, micro), strict=True):
            keep = max(0, min(micro, n - first))
            result[wanted[first : first + keep]] = share[:keep].cpu()
    model.train(was_training)
    reshard(model)  # the optimizer built next must see the sharded parameters
    return result


def pairs_fingerprint(sets: dict[str, PreferenceBatches], init_from: str) -> str:
    """What the stored reference was computed from: the initial weights' path and every pair's tokens."""
    digest = hashlib.sha256(init_from.encode())
    for name, data in sorted(sets.items()):
        digest.update(name.encode())
        for pair in data.pairs:
            for dialog in (pair.chosen, pair.rejected):
                digest.update(repr((dialog.ids, dialog.labels)).encode())
    return digest.hexdigest()


def reference_logps(
    model: nn.Module, cfg: DPOJobConfig, ctx: RunContext, sets: dict[str, PreferenceBatches]
) -> dict[str, torch.Tensor]:
    """Each set's reference log-likelihoods [pairs, 2] of the pairs the run reaches (training: those of its
    ``train.steps`` batches; any other set: all), NaN elsewhere: read from the run dir when stored for these pairs and
    weights, the missing ones scored by the initial ``model`` (before any step, or on a resume before its weights
    load), and stored. A short run over a large set scores only what it trains on."""
    path = Path(cfg.run.dir) / REFERENCE_FILE
    fingerprint = pairs_fingerprint(sets, cfg.model.init_from)
    stored = torch.load(path, weights_only=True) if path.is_file() else {}
    if stored.pop("fingerprint", None) != fingerprint:
        stored = {}
    logps, scored_any = {}, False
    for name, data in sets.items():
        wanted = data.pairs_within(cfg.train.steps) if name == "train" else range(len(data.pairs))
        known = stored.get(name, torch.full((len(data.pairs), 2), float("nan")))
        unscored = known.isnan().any(dim=1)
        missing = [i for i in wanted if unscored[i]]
        if missing:
            fresh = score_pairs(model, cfg, ctx, data, ctx.micro_batch_size(cfg), missing)
            known = torch.where(fresh.isnan(), known, fresh)
            scored_any = True
        logps[name] = known
    if scored_any and ctx.rank == 0:
        atomic_write(path, lambda tmp: torch.save({"fingerprint": fingerprint, **logps}, tmp))
    if dist.is_initialized():
        dist.barrier()
    return logps


class HeldOutPreferences:
    """Part of the loop's ``eval_fn``: reward accuracy and margin on held-out pairs (every rank scores its share)."""

    def __init__(self, cfg: DPOJobConfig, ctx: RunContext, data: PreferenceBatches, reference: torch.Tensor) -> None:
        self.cfg, self.ctx, self.data, self.reference = cfg, ctx, data, reference

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """eval/reward_accuracy (the share of pairs whose implicit reward prefers the chosen answer), eval/margin."""
        policy = score_pairs(model, self.cfg, self.ctx, self.data, self.ctx.micro_batch_size(self.cfg))
        ratios = policy - self.reference
        margin = self.cfg.dpo.beta * (ratios[:, 0] - ratios[:, 1])
        return {"eval/reward_accuracy": (margin > 0).float().mean().item(), "eval/reward_margin": margin.mean().item()}


def heldout_pairs_file(cfg: DPOJobConfig) -> str:
    """The held-out preference file: eval.pairs_file, else the embedded one when training on the embedded pairs."""
    if cfg.eval.pairs_file or cfg.data.files:
        return cfg.eval.pairs_file
    return str(Path(cfg.data.dir) / HELDOUT_PREFERENCE_FILE)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and validate, set up the mesh, read the pairs, build the model, score the reference, train."""
    return run_entry(argv, DPOJobConfig, validate, _run, "train/dpo.py", __doc__)


def read_heldout_pairs(cfg: DPOJobConfig, ctx: RunContext) -> PreferenceBatches | None:
    """The first ``eval.pairs`` held-out pairs, batched as the training pairs are (None: no file or none wanted)."""
    path = heldout_pairs_file(cfg)
    if not path or not cfg.eval.pairs:
        return None
    pairs, _ = read_preferences([path], ChatFormat(_tokenizer()), max_tokens=cfg.data.seq_len + 1)
    return PreferenceBatches(pairs[: cfg.eval.pairs], **batch_layout(cfg, ctx, cfg.data.seq_len, cfg.data.seed))


def _run(cfg: DPOJobConfig, lm_config: LMConfig, ctx: RunContext) -> list[dict]:
    files = preference_files(cfg, ctx.rank)
    seq = cfg.data.seq_len
    pairs, skipped = read_preferences(
        files,
        ChatFormat(_tokenizer()),
        max_tokens=seq + 1,
        skip_bad=cfg.data.on_bad_row == "skip",
        balance_kinds=cfg.data.balance_kinds,
        seed=cfg.data.seed,
    )
    data = PreferenceBatches(pairs, **batch_layout(cfg, ctx, seq, cfg.data.seed))
    model = parallelize_llama(cfg, lm_config, ctx)
    if ctx.rank == 0:
        write_lm_config(lm_config, cfg.run.dir)
    heldout = read_heldout_pairs(cfg, ctx)
    if cfg.dpo.reference == "online":
        frozen = parallelize_llama(cfg, lm_config, ctx).requires_grad_(False).eval()
        reference_fn = online_reference(frozen, cfg, ctx)
        micro = ctx.micro_batch_size(cfg)
        held_reference = None if heldout is None else score_pairs(frozen, cfg, ctx, heldout, micro)
    else:
        sets = {"train": data, **({"heldout": heldout} if heldout is not None else {})}
        reference = reference_logps(model, cfg, ctx, sets)
        reference_fn = lambda batch: reference["train"][batch["index"]]  # noqa: E731
        held_reference = reference.get("heldout")
    preferences = None if heldout is None else HeldOutPreferences(cfg, ctx, heldout, held_reference)
    if ctx.rank == 0:
        log.info(
            "Llama 3 DPO: %.1fM parameters from %s, %d pairs (%d bad rows skipped) from %s, seq %d, global batch %d "
            "pairs, beta %g, NLL weight %g",
            lm_config.num_params() / 1e6,
            cfg.model.init_from or f"a random preset {cfg.model.preset}",
            len(pairs),
            skipped,
            ", ".join(files),
            seq,
            cfg.train.batch_size,
            cfg.dpo.beta,
            cfg.dpo.nll_weight,
        )
    return train(
        cfg,
        model,
        make_dpo_loss(cfg, ctx, reference_fn),
        data,
        eval_fn=combined_eval(
            held_out_grader(cfg, lm_config, ctx), preferences, task_evaluator(cfg.eval, lm_config, ctx.device)
        ),
        tokens_per_sample=2 * seq,
        flops_per_sample=lm_config.flops_per_token(seq) * seq * 2,
        extra_metrics=lambda step: {**data.stats(), "data/bad_rows_skipped": skipped},
    )


if __name__ == "__main__":
    main()
    exit_rank()
