"""Rejection sampling (paper section 4.2.2): K samples per prompt from the policy, the best by the reward model kept.

    torchrun --nproc-per-node N train/rejection.py --config configs/posttrain/rejection_tiny.toml \\
        [--policy DIR] [--reward DIR] [--overwrite] [--section.key=value ...]

For each prompt of a chat file (JSONL or Parquet rows ``{"messages": [...]}``; the prompt is every message before
the last assistant turn when the dialog ends with one, else all of them; by default ``data.instruct``'s training
file) the policy (``models.policy``, an LM checkpoint: Meta or HF layout) draws ``sampling.samples`` answers with
temperature and nucleus sampling, in batched KV-cache generation (a prompt's K copies side by side, at most
``sampling.batch_size`` rows a batch). Each answer is scored by the reward model (``models.reward``, a
``num_labels=1`` checkpoint) on the dialog prompt + answer + end of turn, encoded as the reward model sees a
preference pair (``data.preference.encode_answer``); the answer of highest reward is chosen (by default among those
that ended with a stop token: a cut-off answer would teach SFT to stop mid-sentence). When a row has ``kind`` and
``answer`` (``data.instruct``'s graded rows) ``data.instruct.grade`` also grades every answer.

Written into ``run.dir``, atomically, rank 0 only: ``samples.jsonl`` (each prompt with all its answers, their
rewards, grades, whether they stopped, and the chosen index: the choice can be audited), ``sft.jsonl`` (prompt +
chosen answer as ``{messages}``, for ``train/sft.py --data.files``), ``preference.jsonl`` (``data.preference``'s
rows for the next round's reward model and DPO: on graded prompts, the right answer the reward model scored highest
as chosen against the wrong answer it scored highest, or with ``sampling.pairs = "all"`` every distinct right answer
against every distinct wrong one, the grader playing the annotator; prompts without both are left out) and, last,
``summary.json`` (one sample's accuracy, best-of-K by reward and by the grader, the reward model's ordering of right
against wrong answers, stop rate, ...).
A run whose outputs exist is skipped (``--overwrite`` redoes it), so a rounds pipeline can rerun its steps.

Ranks are data parallel only: the prompts are cut into generation batches, batch ``b`` is rank ``b % world``'s,
and every answer is drawn from a generator seeded by (``sampling.seed``, prompt index, sample index): the outputs
are the same on any number of ranks. Each rank holds a whole copy of both models, which suits models that fit one
device; larger ones would shard each model over a rank group (tensor parallel in ``train.parallel``) with a data
parallel group over those, the batches dealt to the groups as they are dealt to ranks here.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/rejection.py` puts train/ first on sys.path, where train/lm.py would shadow the `lm` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.atomic import atomic_write_text  # noqa: E402
from data.chat import check_messages, read_encoded_rows  # noqa: E402
from data.instruct import KINDS, TRAIN_FILE, ensure_instruct_data, grade  # noqa: E402
from data.preference import encode_answer  # noqa: E402
from lm import load_pretrained  # noqa: E402
from lm.generate import SamplingConfig, generate  # noqa: E402
from lm.model import Transformer  # noqa: E402
from lm.reward import score_sequences  # noqa: E402
from lm.tokenizer import ChatFormat, Tokenizer  # noqa: E402
from train.config import NonNegativeInt, PositiveFloat, PositiveInt, parse_cli, save_config  # noqa: E402
from train.parallel.mesh import exit_rank, init_distributed, run_then_destroy  # noqa: E402
from train.sft import configured_or_embedded  # noqa: E402

log = logging.getLogger("train.rejection")
SAMPLES_FILE, SFT_FILE, PREFERENCE_FILE, SUMMARY_FILE = "samples.jsonl", "sft.jsonl", "preference.jsonl", "summary.json"
OUTPUT_FILES = (SAMPLES_FILE, SFT_FILE, PREFERENCE_FILE, SUMMARY_FILE)
Grader = Callable[[str, str, str, str], bool]  # (kind, answer given, key, question)


@dataclass
class RejectionRunConfig:
    """Where the outputs go."""

    dir: str = "runs/posttrain/rejection_tiny"
    # Redo a run whose outputs all exist (else it is skipped).
    overwrite: bool = False
    timeout_s: PositiveFloat = 600.0


@dataclass
class RejectionModelsConfig:
    """The policy that samples and the reward model that scores (checkpoint dirs, Meta or HF layout)."""

    policy: str = "runs/posttrain/sft_tiny/hf"
    # "" = no reward model: the answers are only graded, and graded pairs of them collected (the paper's annotation
    # of the current models' answers, the grader playing the annotator) for the round's reward model.
    reward: str = "runs/posttrain/reward_tiny/hf"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: as stored


@dataclass
class RejectionDataConfig:
    """The prompts: chat files, or the embedded instruction data's training file."""

    # Comma-separated JSONL/Parquet files of {"messages": [...], "kind"?, "answer"?} rows; "" = dir's train.jsonl.
    files: str = ""
    dir: str = "runs/data/instruct"
    skip: NonNegativeInt = 0  # prompts passed over first (another stage's), counting from the top of the files
    limit: NonNegativeInt = 0  # the first prompts only (after skip); 0 = all
    seed: NonNegativeInt = 0  # of the embedded data, when it is written


@dataclass
class RejectionSamplingConfig:
    """How many answers per prompt and how they are drawn."""

    samples: PositiveInt = 8  # K (the paper: 10 to 30)
    temperature: PositiveFloat = 0.8
    top_p: PositiveFloat = 0.95  # at most 1
    max_new_tokens: PositiveInt = 64
    # Generated rows a batch: whole prompts of K rows each (one prompt at least).
    batch_size: PositiveInt = 64
    score_batch_size: PositiveInt = 32
    seed: int = 0
    # Choose only among answers that ended with a stop token.
    require_stop: bool = True
    # preference.jsonl's pairs of a graded prompt: "best", its best-rewarded right answer against its best-rewarded
    # wrong one (without a reward model, the first of each); "all", every distinct right answer against every
    # distinct wrong one. A tiny reward model trained on all of them orders the policy's answers better (0.58-0.60
    # of its right/wrong pairs against 0.51; bench/RESULTS.md, 2026-12-07).
    pairs: Literal["best", "all"] = "best"


@dataclass
class RejectionConfig:
    """Root config of ``train/rejection.py``."""

    run: RejectionRunConfig = field(default_factory=RejectionRunConfig)
    models: RejectionModelsConfig = field(default_factory=RejectionModelsConfig)
    data: RejectionDataConfig = field(default_factory=RejectionDataConfig)
    sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample for: its position in the input, its messages and tokens, and its grading key if any."""

    index: int
    messages: list[dict[str, Any]]
    ids: list[int]
    kind: str | None = None
    answer: str | None = None


def validate(cfg: RejectionConfig) -> None:
    """What can be checked before any process group: the model dirs, the input files, the sampling settings."""
    for role, path in (("policy", cfg.models.policy), ("reward", cfg.models.reward)):
        if (path or role == "policy") and not Path(path).is_dir():
            raise ValueError(f"models.{role}: checkpoint directory not found: {path}")
    for path in _configured_files(cfg.data.files):
        if not Path(path).is_file():
            raise ValueError(f"data.files: file not found: {path}")
    if cfg.sampling.top_p > 1:
        raise ValueError(f"sampling.top_p={cfg.sampling.top_p} must be in (0, 1]")


def _configured_files(files: str) -> list[str]:
    return [f.strip() for f in files.split(",") if f.strip()]


def prompt_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages before the last assistant turn when the dialog ends with one, else all of them (checked)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    last = messages[-1]
    prompt = messages[:-1] if isinstance(last, Mapping) and last.get("role") == "assistant" else list(messages)
    if not prompt:
        raise ValueError("the dialog has no prompt before its answer")
    # The prompt and an answer to come must make a dialog the chat format can write.
    check_messages([*prompt, {"role": "assistant", "content": "answer"}])
    if prompt[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant turn after dropping the answer")
    return prompt


def read_prompts(
    paths: Sequence[str | Path], chat: ChatFormat, *, max_prompt_tokens: int, limit: int = 0, skip: int = 0
) -> list[Prompt]:
    """The prompts of JSONL/Parquet chat files after the first ``skip`` (a bad row is a ChatDataError naming
    ``file:line``); a prompt's index is its place in the files, so its answers' seeds do not depend on ``skip``."""

    def encode(row: Mapping[str, Any]) -> Prompt:
        if "messages" not in row:
            raise ValueError("the row has no 'messages'")
        messages = prompt_messages(row["messages"])
        ids = chat.encode_dialog_prompt(messages)
        if len(ids) >= max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, leaving no room under {max_prompt_tokens}")
        kind, answer = row.get("kind"), row.get("answer")
        if (kind is None) != (answer is None):
            raise ValueError("a graded row needs both 'kind' and 'answer'")
        if kind is not None and (kind not in KINDS or not isinstance(answer, str)):
            raise ValueError(f"kind {kind!r} is not one of {KINDS}, or its answer {answer!r} is not a string")
        return Prompt(-1, messages, ids, kind, answer)

    rows, _ = read_encoded_rows(paths, encode, columns=["messages", "kind", "answer"])
    rows = rows[skip : skip + limit] if limit else rows[skip:]
    return [Prompt(skip + i, p.messages, p.ids, p.kind, p.answer) for i, p in enumerate(rows)]


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one answer: a hash of (seed, prompt, sample), the same on any rank or batch."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_answers(
    policy: Transformer, chat: ChatFormat, prompts: Sequence[Prompt], sampling: RejectionSamplingConfig
) -> list[list[tuple[list[int], bool]]]:
    """Each prompt's K answers: (token ids without the stop token, whether a stop token ended it)."""
    k = sampling.samples
    rows = [p.ids for p in prompts for _ in range(k)]
    seeds = [sample_seed(sampling.seed, p.index, i) for p in prompts for i in range(k)]
    draw = SamplingConfig(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        row_seeds=tuple(seeds),
    )
    outputs = generate(policy, chat.tokenizer, rows, sampling=draw)
    # generate draws this many tokens for every row of a (left-padded) batch; a row holding fewer met a stop token.
    budget = min(sampling.max_new_tokens, policy.config.max_seq_len - max(map(len, rows)))
    answers = [(list(out), len(out) < budget) for out in outputs]
    return [answers[i * k : (i + 1) * k] for i in range(len(prompts))]


def score_answers(
    reward: Transformer, chat: ChatFormat, prompt: Prompt, texts: Sequence[str], batch_size: int
) -> list[float | None]:
    """The reward of prompt + each answer + end of turn; None for an answer that cannot be encoded (empty, or over
    the reward model's max_seq_len)."""
    encoded: list[list[int] | None] = []
    for text in texts:
        try:
            encoded.append(encode_answer(prompt.messages, text, chat, reward.config.max_seq_len).ids)
        except ValueError:
            encoded.append(None)
    valid = [ids for ids in encoded if ids is not None]
    scores = iter(score_sequences(reward, valid, batch_size=batch_size).tolist() if valid else [])
    return [None if ids is None else next(scores) for ids in encoded]


def choose(samples: Sequence[Mapping[str, Any]], require_stop: bool) -> int | None:
    """The index of the answer of highest reward (the first of equals) among the eligible ones, or None."""
    eligible = [i for i, s in enumerate(samples) if s["reward"] is not None and (s["stopped"] or not require_stop)]
    return max(eligible, key=lambda i: (samples[i]["reward"], -i), default=None)


def prompt_record(
    prompt: Prompt,
    answers: Sequence[tuple[list[int], bool]],
    texts: Sequence[str],
    rewards: Sequence[float | None],
    require_stop: bool,
    grader: Grader,
) -> dict[str, Any]:
    """One prompt's row of ``samples.jsonl``: its answers, their rewards and grades, and the chosen one."""
    samples = []
    for (ids, stopped), text, reward in zip(answers, texts, rewards, strict=True):
        sample = {"text": text, "reward": reward, "stopped": stopped, "tokens": len(ids)}
        if prompt.kind is not None:
            sample["grade"] = bool(grader(prompt.kind, text, prompt.answer, prompt.messages[-1]["content"]))
        samples.append(sample)
    record: dict[str, Any] = {"index": prompt.index, "prompt": prompt.messages}
    if prompt.kind is not None:
        record.update(kind=prompt.kind, answer=prompt.answer)
    return {**record, "samples": samples, "chosen": choose(samples, require_stop)}


def rejection_sample(
    policy: Transformer,
    reward: Transformer | None,
    chat: ChatFormat,
    prompts: Sequence[Prompt],
    sampling: RejectionSamplingConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    grader: Grader = grade,
) -> list[dict[str, Any]]:
    """This rank's records (``prompt_record``): generation batch ``b`` of the prompts is rank ``b % world_size``'s.
    Without a reward model every reward is None (nothing is chosen; the answers are graded)."""
    per_batch = max(1, sampling.batch_size // sampling.samples)
    batches = [prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch)][rank::world_size]
    total, done, records = sum(map(len, batches)), 0, []
    start = last_log = time.perf_counter()
    for batch in batches:
        drawn = draw_answers(policy, chat, batch, sampling)
        for prompt, answers in zip(batch, drawn, strict=True):
            texts = [chat.decode_assistant(ids) for ids, _ in answers]
            rewards = (
                score_answers(reward, chat, prompt, texts, sampling.score_batch_size)
                if reward is not None
                else [None] * len(texts)
            )
            records.append(prompt_record(prompt, answers, texts, rewards, sampling.require_stop, grader))
        done += len(batch)
        now = time.perf_counter()
        if now - last_log > 10 or done == total:
            last_log = now
            log.info("rank %d: %d/%d prompts, %.2f prompts/s", rank, done, total, done / (now - start))
    return records


def reward_pair_accuracy(graded: Sequence[Mapping[str, Any]]) -> float | None:
    """How often the reward model scores a right answer above a wrong one of the same prompt (ties count half), over
    every pair of distinct scored answers of the graded prompts; None when no prompt has both."""
    right_orderings, pairs = 0.0, 0
    for record in graded:
        scored = _distinct([s for s in record["samples"] if s["reward"] is not None])
        right = [s["reward"] for s in scored if s["grade"]]
        wrong = [s["reward"] for s in scored if not s["grade"]]
        pairs += len(right) * len(wrong)
        right_orderings += sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong)
    return right_orderings / pairs if pairs else None


def summarize(records: Sequence[Mapping[str, Any]], samples: int) -> dict[str, Any]:
    """Over the graded prompts: the accuracy of one answer (the mean grade of all), of the reward model's choice (a
    prompt without one counts as wrong) and of the grader's (any answer right), and how often the reward model
    orders a right answer above a wrong one; the stop rate, rewards, counts."""
    graded = [r for r in records if "kind" in r]
    every = [s for r in records for s in r["samples"]]
    rewards = [s["reward"] for s in every if s["reward"] is not None]
    chosen = [r["samples"][r["chosen"]] for r in records if r["chosen"] is not None]
    by_reward = [r["chosen"] is not None and r["samples"][r["chosen"]]["grade"] for r in graded]
    oracle = [any(s["grade"] for s in r["samples"]) for r in graded]
    # The reward model chooses among the same answers the grader looks through: it can never do better.
    assert all(o or not b for b, o in zip(by_reward, oracle, strict=True)), "best-of-K by reward beat the oracle"

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "prompts": len(records),
        "samples_per_prompt": samples,
        "graded_prompts": len(graded),
        "accuracy_one_sample": mean([s["grade"] for r in graded for s in r["samples"]]),
        "accuracy_best_of_k_reward": mean(by_reward) if rewards else None,
        "accuracy_best_of_k_oracle": mean(oracle),
        # The reward model on the policy's own answers, where best-of-K uses it: its held-out pairs are other text.
        "reward_pair_accuracy": reward_pair_accuracy(graded),
        "stop_rate": mean([s["stopped"] for s in every]),
        "chosen_rate": len(chosen) / max(1, len(records)),
        "reward_mean": mean(rewards),
        "reward_chosen_mean": mean([s["reward"] for s in chosen]),
    }


def sft_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The chosen answers as SFT dialogs ``{messages}`` (with the grading key when known)."""
    rows = []
    for r in records:
        if r["chosen"] is None:
            continue
        answer = {"role": "assistant", "content": r["samples"][r["chosen"]]["text"]}
        rows.append({"messages": [*r["prompt"], answer], **{k: r[k] for k in ("kind", "answer") if k in r}})
    return rows


def preference_rows(
    records: Sequence[Mapping[str, Any]], require_stop: bool, every_pair: bool = False
) -> list[dict[str, Any]]:
    """``data.preference`` rows from graded prompts: the right answer of highest reward against the wrong answer of
    highest reward (the one the reward model is most wrong about); without a reward model, the first right and the
    first wrong answer drawn; with ``every_pair``, every distinct right answer against every distinct wrong one.
    Prompts without both are left out."""
    rows = []
    for r in records:
        if "kind" not in r:
            continue
        scored = any(s["reward"] is not None for s in r["samples"])
        usable = [
            s for s in r["samples"] if (s["reward"] is not None or not scored) and (s["stopped"] or not require_stop)
        ]
        right = [s for s in usable if s["grade"]]
        wrong = [s for s in usable if not s["grade"]]
        if every_pair:
            pairs = itertools.product(_distinct(right), _distinct(wrong))
        elif right and wrong:
            # max keeps the first of equals: with no rewards (all 0), the first answer drawn.
            pairs = [tuple(max(group, key=lambda s: s["reward"] or 0.0) for group in (right, wrong))]
        else:
            pairs = []
        for chosen, rejected in pairs:
            row = {"prompt_messages": r["prompt"], "chosen": chosen["text"], "rejected": rejected["text"]}
            rows.append({**row, "kind": r["kind"], "answer": r["answer"]})
    return rows


def _distinct(samples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One sample of each text, in the order the texts were first drawn (the same text has the same grade and
    reward)."""
    return list({s["text"]: s for s in samples}.values())


def write_outputs(
    out: str | Path,
    records: Sequence[Mapping[str, Any]],
    sampling: RejectionSamplingConfig,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the four output files (each atomically, the summary last); returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["index"])
    sft, pairs = sft_rows(records), preference_rows(records, sampling.require_stop, sampling.pairs == "all")
    for name, rows in ((SAMPLES_FILE, records), (SFT_FILE, sft), (PREFERENCE_FILE, pairs)):
        atomic_write_text(out / name, "".join(json.dumps(row) + "\n" for row in rows))
    counts = {"sft_rows": len(sft), "preference_pairs": len(pairs)}
    summary = {**summarize(records, sampling.samples), **counts, **(extra or {})}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def outputs_exist(out: str | Path) -> bool:
    """Whether a finished run's outputs are all in ``out``."""
    return all((Path(out) / name).is_file() for name in OUTPUT_FILES)


def load_models(cfg: RejectionModelsConfig, device: torch.device) -> tuple[Transformer, Transformer | None]:
    """The policy (a language model) and the reward model (one score; None when ``cfg.reward`` is ""), checked
    against the chat format."""
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    policy = load_pretrained(cfg.policy, device=device, dtype=dtype).eval()
    reward = load_pretrained(cfg.reward, device=device, dtype=dtype).eval() if cfg.reward else None
    if policy.config.num_labels:
        raise ValueError(f"models.policy={cfg.policy} is a reward model (num_labels={policy.config.num_labels})")
    if reward is not None and reward.config.num_labels != 1:
        raise ValueError(f"models.reward={cfg.reward} has num_labels={reward.config.num_labels}, not 1")
    words = Tokenizer().n_words
    for role, model in (("policy", policy), ("reward", reward)):
        # The chat format's special tokens would index past a smaller vocabulary.
        if model is not None and model.config.vocab_size < words:
            raise ValueError(f"models.{role}: vocab_size={model.config.vocab_size} lacks the chat format's tokens")
    return policy, reward


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Parse and validate, start the process group, sample, score, choose; rank 0 returns the summary."""
    parser = argparse.ArgumentParser(prog="train/rejection.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=None, help="policy checkpoint dir (sets models.policy)")
    parser.add_argument("--reward", default=None, help="reward model checkpoint dir (sets models.reward)")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished run (sets run.overwrite)")
    cfg, args = parse_cli(RejectionConfig, argv, parser)
    cfg.models.policy = args.policy or cfg.models.policy
    cfg.models.reward = args.reward or cfg.models.reward
    cfg.run.overwrite = cfg.run.overwrite or args.overwrite
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init_distributed(cfg.run.timeout_s)
    return run_then_destroy(lambda: _run(cfg))


def _run(cfg: RejectionConfig) -> dict[str, Any] | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(cfg.run.dir)
    if outputs_exist(out) and not cfg.run.overwrite:
        log.info("rejection sampling: %s holds a finished run, skipped (--overwrite redoes it)", out)
        return json.loads((out / SUMMARY_FILE).read_text()) if rank == 0 else None
    start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    files = configured_or_embedded(
        cfg.data.files, rank, lambda: ensure_instruct_data(cfg.data.dir, seed=cfg.data.seed) / TRAIN_FILE
    )
    policy, reward = load_models(cfg.models, device)
    chat = ChatFormat(Tokenizer())
    prompts = read_prompts(
        files, chat, max_prompt_tokens=policy.config.max_seq_len, limit=cfg.data.limit, skip=cfg.data.skip
    )
    log.info(
        "rejection sampling: %d prompts from %s, %d answers each, policy %s, reward %s, %d ranks",
        len(prompts),
        ", ".join(files),
        cfg.sampling.samples,
        cfg.models.policy,
        cfg.models.reward or "none (graded pairs only)",
        world,
    )
    with torch.inference_mode():
        records = rejection_sample(policy, reward, chat, prompts, cfg.sampling, rank=rank, world_size=world)
    gathered: list[list[dict[str, Any]]] | None = [[] for _ in range(world)] if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return None
    wall = time.perf_counter() - start
    timing = {"wall_s": round(wall, 1), "prompts_per_s": round(len(prompts) / wall, 3)}
    save_config(cfg, out)
    summary = write_outputs(out, [r for part in gathered for r in part], cfg.sampling, timing)
    log.info("rejection sampling: wrote %s: %s", out, json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
    exit_rank()
