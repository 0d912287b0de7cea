"""Reward model training (paper section 4.1.2): a Llama 3 with a scalar head, ranking answers to the same prompt.

    torchrun --nproc-per-node N train/reward.py --config configs/posttrain/reward_tiny.toml [--section.key=value ...]

The model is the LM of ``--model.init_from`` (Meta or HF layout, or an exported run; usually the SFT model) with
its output projection replaced by a head of one score (``LMConfig.num_labels = 1``, HF's
``LlamaForSequenceClassification``): every trunk weight is loaded strictly, the head starts at zero. A checkpoint
that already is a reward model loads whole (training continues). The reward of a dialog is the head at its last
token, the ``<|eot_id|>`` that ends the answer (``lm.reward.last_token_scores_output_fn``). Preference rows
(``data.preference``; by default the embedded pairs) rank edited > chosen > rejected when a row has an edited answer
(its 3 ordered pairs), else chosen > rejected; the loss is -log sigmoid(r_better - r_worse), no margin term, its
mean over every pair of the global batch under every layout (``train.posttrain.losses.ranking_reward_loss``'s
objective). ``metrics.jsonl`` logs the training pairs' ``rewards/pairwise_accuracy`` and ``rewards/margin`` (ties
count half), and on held-out pairs ``eval/pairwise_accuracy`` and ``eval/margin``. The run exports with
``python -m train.export RUN_DIR --out DIR`` to a checkpoint transformers reads as LlamaForSequenceClassification.
This slice runs data parallel (FSDP/HSDP) only; tensor parallel cannot split a head one score wide.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/reward.py` puts train/ first on sys.path, where train/lm.py would shadow the `lm` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import dataclasses  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from data.preference import PreferenceBatches, PreferencePair, read_preferences  # noqa: E402
from data.preference import pad_rows as pad_dialogs  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.reward import last_token_scores_output_fn  # noqa: E402
from lm.tokenizer import ChatFormat, Tokenizer  # noqa: E402
from train.config import JobConfig, NonNegativeInt, PositiveInt  # noqa: E402
from train.dpo import DPODataConfig, heldout_pairs_file, preference_files  # noqa: E402
from train.export import write_lm_config  # noqa: E402
from train.lm import LMModelConfig  # noqa: E402
from train.loop import LossFn, RunContext, combined_eval, train  # noqa: E402
from train.parallel.llama import model_inputs, parallelize_llama  # noqa: E402
from train.parallel.mesh import ParallelDims, exit_rank  # noqa: E402
from train.parallel.tp import check_tp  # noqa: E402
from train.sft import batch_layout, run_entry  # noqa: E402
from train.sft import validate as validate_lm  # noqa: E402

log = logging.getLogger("train.reward")


@dataclass
class RewardDataConfig(DPODataConfig):
    """DPO's preference files; each answer is encoded after its prompt and must fit ``seq_len`` tokens."""

    seq_len: PositiveInt = 128


@dataclass
class RewardEvalConfig:
    """Pairwise accuracy and margin on held-out preference pairs, every ``train.eval_interval`` steps and at the end."""

    # A preference file of held-out pairs; "" = the embedded held-out pairs when training on the embedded data.
    pairs_file: str = ""
    pairs: NonNegativeInt = 200


@dataclass
class RewardJobConfig(JobConfig):
    """Root config of ``train/reward.py``."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    eval: RewardEvalConfig = field(default_factory=RewardEvalConfig)


def validate(cfg: RewardJobConfig, world_size: int | None = None) -> LMConfig:
    """Everything that can be checked before any process group or data work; returns the reward model's config
    (the checkpoint's trunk with a head of one score)."""
    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    dims = ParallelDims.from_config(cfg.parallel, world)
    if dims.cp > 1 or dims.pp > 1:
        raise ValueError("train/reward.py runs data parallel only (FSDP/HSDP): set parallel.cp and pp to 1")
    base = validate_lm(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=1)), world // dims.tp)
    if base.num_labels not in (0, 1):
        raise ValueError(f"model.init_from={cfg.model.init_from} has a head of {base.num_labels} scores, not 1")
    # An LM tied to its embeddings (Llama 3.2 1B/3B) keeps its table; the head is a weight of its own.
    config = dataclasses.replace(base, num_labels=1, tie_word_embeddings=False)
    check_tp(config, dims.tp)  # refuses any tp > 1: the head's single row cannot be split
    return config


def fresh_head(config: LMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with a zero score head in place of an LM's output projection (``load_full_weights``'
    ``adapt_state``); a reward model's own head is kept.

    Zero rather than random: every reward starts at 0 (the first loss is exactly log 2, no pair preferred by chance)
    and the values are the same under every layout without drawing any; the head's gradient is not zero (it is the
    hidden states' differences), and Adam's step does not depend on the gradient's scale, so the trunk trains from
    the second step on.
    """
    if config.num_labels == 1:
        return state
    trunk = state["tok_embeddings.weight"]
    return {**state, "output.weight": torch.zeros(1, config.dim, dtype=trunk.dtype)}


class RankingBatches(PreferenceBatches):
    """``PreferenceBatches`` for the reward model. A micro-batch of b pairs holds every answer of each (edited
    first when there is one) as ``tokens``/``document_ids`` rows with their ``lengths``; ``better``/``worse`` [P]:
    the rows of each ordered pair, ``owner`` [P]: its pair's position in the micro-batch; ``index`` [b]; and
    ``pair_scale``: the global batch's ordered pairs / (dp x grad_accum), which makes the summed pair losses,
    averaged over ranks and micro-batches, the global batch's mean."""

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The answers of pairs ``indices`` as padded rows, their lengths and the ordered pairs of row indices."""
        dialogs, better, worse, owner = [], [], [], []
        for position, i in enumerate(indices):
            ranked = [d for d in (self.pairs[i].edited, self.pairs[i].chosen, self.pairs[i].rejected) if d is not None]
            first = len(dialogs)
            dialogs += ranked
            for hi, lo in ranking_pairs(len(ranked)):
                better.append(first + hi)
                worse.append(first + lo)
                owner.append(position)
        padded = pad_dialogs(dialogs, self.width)
        return {
            "tokens": padded["tokens"],
            "document_ids": padded["document_ids"],
            "lengths": torch.tensor([len(d.ids) for d in dialogs]),
            "better": torch.tensor(better),
            "worse": torch.tensor(worse),
            "owner": torch.tensor(owner),
            "index": torch.tensor(list(indices)),
        }

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global batch ``step``, each with the global batch's ``pair_scale``."""
        indices = self.global_indices(step)
        pairs = sum(len(ranking_pairs(pair_answers(self.pairs[i]))) for i in indices)
        pair_scale = torch.tensor(pairs / (self.dp_size * self.grad_accum))
        mine = indices[self.dp_rank * self.share : (self.dp_rank + 1) * self.share]
        micro = self.share // self.grad_accum
        return [{**self.rows(mine[k : k + micro]), "pair_scale": pair_scale} for k in range(0, self.share, micro)]


def pair_answers(pair: PreferencePair) -> int:
    """How many answers a preference row ranks: 3 with an edited answer, else 2."""
    return 2 if pair.edited is None else 3


def ranking_pairs(answers: int) -> list[tuple[int, int]]:
    """Every ordered pair (better, worse) of a ranking of ``answers`` answers, best first."""
    return [(hi, lo) for hi in range(answers) for lo in range(hi + 1, answers)]


def sequence_rewards(model: nn.Module, cfg: RewardJobConfig, ctx: RunContext, batch: dict) -> torch.Tensor:
    """The reward [rows] of each row of ``batch``: the head at the row's last token (its answer's end of turn)."""
    tokens, documents = batch["tokens"].to(ctx.device), batch["document_ids"].to(ctx.device)
    inputs, _, model_kwargs = model_inputs(cfg, ctx, tokens, documents)
    return model(inputs, **model_kwargs, output=last_token_scores_output_fn(batch["lengths"])).squeeze(-1)


def pair_figures(
    rewards: torch.Tensor, batch: dict, counted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the batch's ordered pairs (those ``counted``, default all): -log sigmoid(r_better - r_worse), the
    right orderings (ties count half), and the margins r_better - r_worse."""
    margins = rewards[batch["better"].to(rewards.device)] - rewards[batch["worse"].to(rewards.device)]
    weight = torch.ones_like(margins) if counted is None else counted.to(margins)
    right = (margins > 0).to(margins) + 0.5 * (margins == 0).to(margins)
    return -(F.logsigmoid(margins) * weight).sum(), (right * weight).sum(), (margins.detach() * weight).sum()


def make_reward_loss(cfg: RewardJobConfig, ctx: RunContext) -> LossFn:
    """``loss_fn(model, batch)``: the micro-batch's summed pair losses over its ``pair_scale``; and the training
    pairs' accuracy and margin, scaled alike (so their mean over ranks and micro-batches is the global batch's)."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss, right, margin = pair_figures(sequence_rewards(model, cfg, ctx, batch), batch)
        scale = batch["pair_scale"].to(ctx.device)
        return loss / scale, {"rewards/pairwise_accuracy": right / scale, "rewards/margin": margin / scale}

    return loss_fn


@torch.no_grad()
def heldout_figures(model: nn.Module, cfg: RewardJobConfig, ctx: RunContext, data: RankingBatches) -> dict:
    """``eval/pairwise_accuracy`` (ties count half) and ``eval/margin`` over every ordered pair of ``data``.

    Each rank takes ``micro`` pairs a forward, every rank the same number of forwards (FSDP gathers weights in
    each; a rank out of pairs repeats pair 0 and counts none of its orderings); the sums are all-reduced.
    """
    world, n, micro = ctx.dp_size, len(data.pairs), ctx.micro_batch_size(cfg)
    sums = torch.zeros(3, dtype=torch.float64)  # right, margin, ordered pairs
    was_training = model.training
    model.eval()
    for start in range(0, n, world * micro):
        mine = [start + ctx.dp_rank * micro + k for k in range(micro)]
        batch = data.rows([i if i < n else 0 for i in mine])
        real = torch.tensor(mine)[batch["owner"]] < n
        _, right, margin = pair_figures(sequence_rewards(model, cfg, ctx, batch), batch, real)
        sums += torch.tensor([right.item(), margin.item(), real.sum().item()], dtype=torch.float64)
    model.train(was_training)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # forwards without backward leave the root's weights gathered
    if dist.is_initialized() and world > 1:
        sums = sums.to(ctx.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    right, margin, pairs = sums.tolist()
    return {"eval/pairwise_accuracy": right / max(pairs, 1), "eval/margin": margin / max(pairs, 1)}


class HeldOutRankings:
    """The loop's ``eval_fn``: pairwise accuracy and margin on held-out pairs (every rank scores its share)."""

    def __init__(self, cfg: RewardJobConfig, ctx: RunContext, data: RankingBatches) -> None:
        self.cfg, self.ctx, self.data = cfg, ctx, data

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """eval/pairwise_accuracy and eval/margin of the held-out pairs, by ``model`` as it is now."""
        return heldout_figures(model, self.cfg, self.ctx, self.data)


def ranking_batches(pairs: Sequence[PreferencePair], cfg: RewardJobConfig, ctx: RunContext) -> RankingBatches:
    """``pairs`` batched for this rank as the config says."""
    return RankingBatches(pairs, **batch_layout(cfg, ctx, cfg.data.seq_len, cfg.data.seed))


def read_heldout_rankings(cfg: RewardJobConfig, ctx: RunContext, chat: ChatFormat) -> HeldOutRankings | None:
    """The eval_fn of the first ``eval.pairs`` held-out pairs (None: no file, or none wanted)."""
    path = heldout_pairs_file(cfg)
    if not path or not cfg.eval.pairs:
        return None
    pairs, _ = read_preferences([path], chat, max_tokens=cfg.data.seq_len)
    return HeldOutRankings(cfg, ctx, ranking_batches(pairs[: cfg.eval.pairs], cfg, ctx))


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and validate, set up the mesh, read the pairs, build the reward model, train."""
    return run_entry(argv, RewardJobConfig, validate, _run, "train/reward.py", __doc__)


def build_reward_model(cfg: RewardJobConfig, lm_config: LMConfig, ctx: RunContext) -> nn.Module:
    """The sharded reward model: ``init_from``'s trunk (every weight, strictly) and a zero head, or a reward model
    whole; from no checkpoint, the preset's random trunk and a zero head."""
    model = parallelize_llama(cfg, lm_config, ctx, adapt_state=fresh_head)
    if not cfg.model.init_from:
        with torch.no_grad():
            model.output.weight.zero_()
    return model


def _run(cfg: RewardJobConfig, lm_config: LMConfig, ctx: RunContext) -> list[dict]:
    files = preference_files(cfg, ctx.rank)
    chat = ChatFormat(Tokenizer())
    # Rows of seq_len + 1 as DPO's, the model reading the first seq_len: every answer fits within them.
    pairs, skipped = read_preferences(files, chat, max_tokens=cfg.data.seq_len, skip_bad=cfg.data.on_bad_row == "skip")
    data = ranking_batches(pairs, cfg, ctx)
    model = build_reward_model(cfg, lm_config, ctx)
    heldout = read_heldout_rankings(cfg, ctx, chat)
    if ctx.rank == 0:
        write_lm_config(lm_config, cfg.run.dir)
        log.info(
            "Llama 3 reward model: %.1fM parameters from %s, %d preference rows (%d with an edited answer, %d bad "
            "rows skipped) from %s, seq %d, global batch %d preference rows",
            lm_config.num_params() / 1e6,
            cfg.model.init_from or f"a random preset {cfg.model.preset}",
            len(pairs),
            sum(p.edited is not None for p in pairs),
            skipped,
            ", ".join(files),
            cfg.data.seq_len,
            cfg.train.batch_size,
        )
    seq = cfg.data.seq_len
    return train(
        cfg,
        model,
        make_reward_loss(cfg, ctx),
        data,
        eval_fn=combined_eval(heldout),
        tokens_per_sample=2 * seq,
        flops_per_sample=lm_config.flops_per_token(seq) * seq * 2,
        extra_metrics=lambda step: {**data.stats(), "data/bad_rows_skipped": skipped},
    )


if __name__ == "__main__":
    main()
    exit_rank()
