"""Scaling laws as the Llama 3 paper does them (section 3.2.1): plan an IsoFLOPs grid, run it, fit it.

    python -m train.scaling plan [--config configs/scaling/cpu.toml] [--max-minutes 20] [--emit DIR [--gpu]]
    python -m train.scaling run --out DIR [--config ...] [--max-minutes 20] [--fit]
    python -m train.scaling fit --runs DIR          # fit the finished runs of DIR (train.scaling_fit.fit_all)
    python -m train.scaling fit --fit-only RUNS.csv --out DIR   # refit runs made elsewhere

Plan: for each compute budget C, ``sizes_per_budget`` model shapes from the ``shapes`` ladder around the expected
optimum (N* = sqrt(C / (6·tokens_per_param)), N the matmul parameters ``flops_per_token / 6``); each run trains on
D = C / ``LMConfig.flops_per_token(seq_len)`` tokens (attention included), rounded to whole sequences. The plan prints
each run's estimated time, from a time model measured on the machine it runs on (a few seconds of training steps of
the ladder's cheapest and dearest shapes; ``measure_speed = false`` keeps the config's numbers), and is refused when
the total exceeds ``max_minutes``. ``--emit DIR`` writes it as
train/lm.py configs (TOML) and a Slurm array script; ``--gpu`` plans the paper's budgets and shapes instead.

Run (CPU): a BYTE-LEVEL vocabulary (256 bytes + BOS + EOS), not the 128K one, whose output layer would take nearly all
FLOPs of these tiny models. The text is the default corpus's sources mixed by ``mixture``: its generated general, math
and multilingual text (data.default's generators, offline and deterministic) and its code, the interpreter's standard
library files (a tenth of them held out). The code is what makes the loss a power law: the generated sources are
templates, which a model learns in steps. Each run trains once over non-overlapping windows of the training stream's
prefix, in a seeded random order (no repeats), with AdamW (``train.optim``), linear warmup and a cosine decay to its
own length, logs metrics.jsonl, and is evaluated on a fixed held-out slice (the same sources from another seed and the
held-out files; loss in nats per byte) and on a downstream task: ``word_cloze`` (a held-out word among four, after
the 64 bytes before it; the option of the lowest summed NLL is the answer, as lm-eval grades multiple choice) or
``scene_colour`` (``evaluation.tasks.scene_colour_rows``: NLL of " <colour>." after "<text> The <shape> is"). A run
writes its final weights (model.safetensors) and result.json atomically at its end and is never redone; a missing
result.json is (re)run from scratch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import tomllib
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.atomic import atomic_write_text
from data.default import DEFAULT_WEIGHTS, source_document, stdlib_files
from data.scenes import COLOURS
from evaluation.tasks import scene_colour_rows
from lm.config import LMConfig
from lm.model import Transformer
from train import scaling_fit
from train.config import OptimConfig, to_toml
from train.metrics import MetricsLogger
from train.optim import build_optimizer, build_scheduler, clip_grad_norm

BOS, EOS = 256, 257
BYTE_VOCAB = 258
SOURCES = ("general", "math", "multilingual")  # the default corpus's generated sources (code: stdlib files)
HELDOUT_SEED_OFFSET = 1_000_003
WEIGHTS = "model.safetensors"  # each run's final weights, beside its result.json
TASK_SEED = 7  # scene_colour rows drawn from a seed of their own (evaluation.tasks' committed rows use 0)

# The paper's IsoFLOPs budgets (6e18 to 1e22 FLOPs) and shapes around 40M to 16B parameters, for --gpu.
PAPER_BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21, 1e22]
PAPER_SHAPES = [
    [512, 8], [640, 10], [768, 12], [1024, 14], [1280, 16], [1536, 18], [2048, 20], [2560, 24],
    [3072, 28], [3584, 30], [4096, 32], [5120, 40],
]  # fmt: skip


@dataclass
class ScalingConfig:
    """An IsoFLOPs grid and how each of its runs trains."""

    budgets: list[float] = field(default_factory=lambda: [1e11, 3e11, 1e12, 3e12])
    # The model ladder, smallest first: [dim, n_layers]; heads of head_dim channels.
    shapes: list[list[int]] = field(
        default_factory=lambda: [
            [8, 1], [16, 1], [24, 1], [32, 1], [32, 2], [48, 2], [64, 2], [64, 3], [96, 3], [128, 3], [128, 4],
            [160, 4], [192, 4],
        ]
    )  # fmt: skip
    sizes_per_budget: int = 5
    # `run` adds up to this many shapes to a budget whose loss minimum lies at an end of its sizes (run_grid).
    max_extra_sizes: int = 2
    # Where the plan centres a budget: the expected optimum has D = tokens_per_param x N (`run` re-centres the third
    # budget on from the smaller ones' optima).
    tokens_per_param: float = 30.0
    head_dim: int = 16
    n_kv_heads: int = 0  # 0 = n_heads (no GQA); otherwise a divisor of every shape's head count
    vocab_size: int = BYTE_VOCAB
    seq_len: int = 128
    batch_size: int = 16  # sequences per optimizer step: more steps for the small budgets' runs
    # The peak learning rate by size, as the paper sets it by model size: lr x (params / lr_reference_params) **
    # -lr_size_exponent, params the run's non-embedding parameters (0: one learning rate for every size). The CPU
    # grid's best rate falls as about params^-0.8; one rate (1e-2) left the small models far from their best and
    # biased the optimum towards larger models (bench/RESULTS.md).
    lr: float = 2.5e-2
    lr_size_exponent: float = 0.8
    lr_reference_params: float = 35_000.0
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of the run's own steps, at most max_warmup
    max_warmup: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0  # model initialisation
    data_seed: int = 0  # training text and its order; the held-out text is the same for every data_seed
    # Sources of the default corpus and their weights (default: all four at the default corpus's weights; {} = the
    # generated ones only). "code" is the interpreter's standard library (a tenth of its files held out): real text,
    # whose loss falls as a power law where the generated sources' templates are learnt in steps.
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    heldout_windows: int = 512  # spread evenly over HELDOUT_TEXT bytes of held-out text
    # The downstream task: "word_cloze" (a held-out word among word_cloze_options drawn from the held-out text, after
    # the 64 bytes before it) or "scene_colour" (the colour of a one-object scene's shape, 6 options).
    task: str = "word_cloze"
    task_rows: int = 240
    log_points: int = 5  # metrics.jsonl records per run (and the last step)
    # The time model of the plan: s = FLOPs / flops_per_s + steps x step_overhead_s + eval_s. With measure_speed,
    # `plan` and `run` measure flops_per_s and step_overhead_s on the machine they run on first (a few seconds); the
    # numbers here, fitted on the default grid's runs on the project's 2-core machine, are used otherwise.
    measure_speed: bool = True
    flops_per_s: float = 7e10
    step_overhead_s: float = 0.009
    eval_s: float = 1.0
    max_minutes: float = 20.0
    # --emit: what the train/lm.py configs get.
    lm_preset: str = "debug"
    lm_data_dir: str = "runs/data/text"
    lm_run_root: str = "runs/scaling"
    gpus_per_node: int = 8


def gpu_config(base: ScalingConfig | None = None) -> ScalingConfig:
    """The paper's budgets and shapes with the Llama 3 vocabulary, seq 8192, 64-sequence batches and one peak
    learning rate, 3e-4 (the paper sets it between 2e-4 and 4e-4 by size), for --emit."""
    base = base or ScalingConfig()
    return replace(
        base, budgets=list(PAPER_BUDGETS), shapes=[list(s) for s in PAPER_SHAPES], head_dim=128, n_kv_heads=8,
        vocab_size=128256, seq_len=8192, batch_size=64, tokens_per_param=20.0, lr=3e-4, lr_size_exponent=0.0,
        max_warmup=2000, lm_preset="llama3-8b", measure_speed=False, flops_per_s=0.4 * 989e12 * base.gpus_per_node,
        step_overhead_s=0.0, eval_s=60.0, max_minutes=math.inf,
    )  # fmt: skip


def load_scaling_config(path: str | os.PathLike | None) -> ScalingConfig:
    """A ScalingConfig from a TOML file of its fields (unknown keys are an error), or the defaults."""
    if not path:
        return ScalingConfig()
    with open(path, "rb") as f:
        table = tomllib.load(f)
    known = {f.name for f in fields(ScalingConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {sorted(known)}")
    return ScalingConfig(**table)


# ---- plan -----------------------------------------------------------------------------------------------------------


def lm_config(cfg: ScalingConfig, dim: int, n_layers: int) -> LMConfig:
    """One ladder shape: heads of head_dim, SwiGLU 8/3 wide (multiplier 1.0), the grid's vocabulary and seq_len."""
    n_heads = max(1, dim // cfg.head_dim)
    kv = cfg.n_kv_heads if cfg.n_kv_heads and n_heads % cfg.n_kv_heads == 0 else n_heads
    return LMConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=kv, vocab_size=cfg.vocab_size,
        multiple_of=16 if dim < 1024 else 256, ffn_dim_multiplier=1.0, max_seq_len=max(cfg.seq_len, 128),
    )  # fmt: skip


@dataclass
class PlannedRun:
    """One run of the grid."""

    name: str
    budget: float
    dim: int
    n_layers: int
    params: int  # non-embedding parameters (the output layer included)
    flops_per_token: float
    tokens: int
    steps: int
    est_s: float

    @property
    def compute(self) -> float:
        """The run's training FLOPs: tokens x flops_per_token."""
        return self.tokens * self.flops_per_token


def _pick_shapes(cfg: ScalingConfig, budget: float, costs: list[float], tokens_opt: float | None = None) -> list[int]:
    """Indices of sizes_per_budget consecutive ladder shapes centred on the expected optimum (clamped to the ends):
    the run whose tokens are nearest ``tokens_opt``, or by default nearest D = tokens_per_param x N."""
    if tokens_opt is None:
        n_opt = math.sqrt(budget / (6 * cfg.tokens_per_param))
        centre = int(np.argmin([abs(math.log(c / 6 / n_opt)) for c in costs]))
    else:
        centre = int(np.argmin([abs(math.log(budget / c / tokens_opt)) for c in costs]))
    k = min(cfg.sizes_per_budget, len(costs))
    start = min(max(0, centre - k // 2), len(costs) - k)
    return list(range(start, start + k))


def ladder(cfg: ScalingConfig) -> tuple[list[LMConfig], list[float]]:
    """The ladder's model configs and their FLOPs per token; ValueError unless ordered by cost."""
    configs = [lm_config(cfg, d, n) for d, n in cfg.shapes]
    costs = [c.flops_per_token(cfg.seq_len) for c in configs]
    if costs != sorted(costs):
        raise ValueError("shapes must be ordered by cost (FLOPs per token), smallest first")
    return configs, costs


def planned_run(cfg: ScalingConfig, budget: float, index: int, configs: list[LMConfig], costs: list[float]
                ) -> PlannedRun:  # fmt: skip
    """Ladder shape ``index`` at ``budget``: D = C / FLOPs per token in whole sequences, steps and estimated time."""
    (dim, n_layers), fpt = cfg.shapes[index], costs[index]
    seqs = max(1, round(budget / fpt / cfg.seq_len))
    steps = math.ceil(seqs / cfg.batch_size)
    tokens = seqs * cfg.seq_len
    est = tokens * fpt / cfg.flops_per_s + steps * cfg.step_overhead_s + cfg.eval_s
    params = configs[index].num_params(exclude_embeddings=True)
    return PlannedRun(f"C{budget:.0e}_d{dim}_l{n_layers}", budget, dim, n_layers, params, fpt, tokens, steps, est)


def plan_grid(cfg: ScalingConfig) -> list[PlannedRun]:
    """Every run of the grid as planned: per budget, the shapes around the expected optimum (D = tokens_per_param x
    N) and D = C / FLOPs per token. ``run`` re-centres and extends budgets from the runs it finishes (run_grid)."""
    configs, costs = ladder(cfg)
    return [planned_run(cfg, b, i, configs, costs) for b in sorted(cfg.budgets) for i in _pick_shapes(cfg, b, costs)]


def check_time(runs: Sequence[PlannedRun], max_minutes: float) -> float:
    """The grid's estimated minutes; ValueError when over max_minutes, saying what to cut."""
    minutes = sum(r.est_s for r in runs) / 60
    if minutes > max_minutes:
        largest = max(r.budget for r in runs)
        share = sum(r.est_s for r in runs if r.budget == largest) / 60
        raise ValueError(
            f"the grid needs an estimated {minutes:.1f} min, over --max-minutes {max_minutes:g}: drop or shrink the "
            f"largest budget {largest:.3g} FLOPs ({share:.1f} min of it), or raise --max-minutes"
        )
    return minutes


def format_plan(cfg: ScalingConfig, runs: Sequence[PlannedRun]) -> str:
    """The grid as a table: run, budget, shape, parameters, tokens, tokens/param, steps, estimated time."""
    lines = [
        f"vocabulary: {cfg.vocab_size}"
        + (" (BYTE-LEVEL: 256 bytes + BOS + EOS)" if cfg.vocab_size == BYTE_VOCAB else ""),
        f"seq_len {cfg.seq_len}, batch {cfg.batch_size} sequences ({cfg.seq_len * cfg.batch_size} tokens)",
        f"{'run':<24} {'budget':>9} {'dim':>5} {'layers':>6} {'params':>11} {'tokens':>13} {'D/N':>7} "
        f"{'steps':>7} {'est':>8}",
    ]
    for r in runs:
        lines.append(
            f"{r.name:<24} {r.budget:>9.3g} {r.dim:>5} {r.n_layers:>6} {r.params:>11,} {r.tokens:>13,} "
            f"{r.tokens / r.params:>7.1f} {r.steps:>7} {_hms(r.est_s):>8}"
        )
    lines.append(f"{len(runs)} runs, estimated {_hms(sum(r.est_s for r in runs))} in all")
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "inf"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---- emit: train/lm.py configs and a Slurm array -------------------------------------------------------------------


def lm_job_config(cfg: ScalingConfig, run: PlannedRun) -> object:
    """The train/lm.py config (LMJobConfig) of one planned run."""
    from train.lm import LMJobConfig

    job = LMJobConfig()
    shape = lm_config(cfg, run.dim, run.n_layers)
    job.run.dir = f"{cfg.lm_run_root}/{run.name}"
    job.run.seed = cfg.seed
    m = job.model
    m.preset, m.dim, m.n_layers, m.n_heads, m.n_kv_heads = (
        cfg.lm_preset,
        shape.dim,
        shape.n_layers,
        shape.n_heads,
        shape.n_kv_heads,
    )
    m.vocab_size, m.multiple_of, m.ffn_dim_multiplier, m.max_seq_len = (
        shape.vocab_size,
        shape.multiple_of,
        shape.ffn_dim_multiplier,  # None would keep the preset's
        cfg.seq_len,
    )
    job.data.dir, job.data.seq_len = cfg.lm_data_dir, cfg.seq_len
    job.train.steps, job.train.batch_size = run.steps, cfg.batch_size
    job.train.max_grad_norm = cfg.max_grad_norm
    job.optim = OptimConfig(
        lr=run_lr(cfg, run), weight_decay=cfg.weight_decay, warmup_steps=_warmup(cfg, run.steps), decay="cosine",
        min_lr_ratio=cfg.min_lr_ratio,
    )  # fmt: skip
    job.checkpoint.interval = max(1, run.steps // 10)
    return job


def sbatch_script(cfg: ScalingConfig, config_paths: Sequence[str]) -> str:
    """A Slurm array over the configs: task i runs train/slurm/train_lm.sbatch on config i (one node each)."""
    listed = "\n".join(f"    {p}" for p in config_paths)
    return f"""#!/bin/bash
# The IsoFLOPs grid of `python -m train.scaling plan --emit`: one array task per run, {len(config_paths)} runs.
# Submit from the repository root:  sbatch THIS_FILE ; then fit:  python -m train.scaling fit --runs {cfg.lm_run_root}
#SBATCH --job-name=llama3-scaling
#SBATCH --array=0-{len(config_paths) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={cfg.gpus_per_node}
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
CONFIGS=(
{listed}
)
export GPUS_PER_NODE={cfg.gpus_per_node}
exec bash train/slurm/train_lm.sbatch "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"
"""


def emit(cfg: ScalingConfig, runs: Sequence[PlannedRun], out: str | os.PathLike) -> list[Path]:
    """Write DIR/configs/<run>.toml (train/lm.py), DIR/scaling.sbatch and DIR/plan.json; returns the paths."""
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    paths = []
    for run in runs:
        path = out / "configs" / f"{run.name}.toml"
        header = f"# IsoFLOPs run {run.name}: {run.budget:.3g} FLOPs, {run.params:,} params, {run.tokens:,} tokens\n"
        atomic_write_text(path, header + to_toml(lm_job_config(cfg, run)) + "\n")
        paths.append(path)
    script = out / "scaling.sbatch"
    atomic_write_text(script, sbatch_script(cfg, [str(p) for p in paths]))
    plan = out / "plan.json"
    atomic_write_text(
        plan, json.dumps({"config": asdict(cfg), "runs": [asdict(r) for r in runs]}, indent=1, default=str)
    )
    return [*paths, script, plan]


# ---- data: bytes of the default corpus's text -----------------------------------------------------------------------


def _held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10 == 0


def code_documents(seed: int, heldout: bool) -> Iterator[str]:
    """The code source's documents: the interpreter's standard library files (data.default's selection rules), a
    tenth of them (by a hash of the path) held out, the rest in an order drawn from ``seed``, cycled if exhausted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in stdlib_files(1 << 40) if _held_out(f.relative_to(root).as_posix()) == heldout]
    random.Random(f"scaling:code:{seed}").shuffle(files)
    while True:
        for path in files:
            yield path.read_text(encoding="utf-8", errors="replace")


def corpus_bytes(n_tokens: int, seed: int, mixture: dict[str, float] | None = None, heldout: bool = False
                 ) -> np.ndarray:  # fmt: skip
    """n_tokens byte tokens: documents of the default corpus's sources mixed by ``mixture`` (default: the generated
    sources at their default weights), each BOS ... EOS; code documents are standard library files."""
    mixture = mixture or {s: DEFAULT_WEIGHTS[s] for s in SOURCES}
    unknown = sorted(set(mixture) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"mixture: unknown sources {unknown}; the default corpus has {sorted(DEFAULT_WEIGHTS)}")
    sources, weights = list(mixture), list(mixture.values())
    pick = random.Random(f"scaling:mix:{seed}")
    rngs = {s: random.Random(f"scaling:{s}:{seed}") for s in sources}
    code = code_documents(seed, heldout) if "code" in mixture else None
    out, used = [], 0
    while used < n_tokens:
        source = pick.choices(sources, weights)[0]
        text = next(code) if source == "code" else source_document(source, rngs[source])
        doc = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int16)
        out.append(np.concatenate([[BOS], doc, [EOS]]).astype(np.int16))
        used += len(out[-1])
    return np.concatenate(out)[:n_tokens]


def cached_corpus(data_dir: Path, n_tokens: int, seed: int, mixture: dict[str, float] | None = None,
                  heldout: bool = False) -> np.ndarray:  # fmt: skip
    """corpus_bytes, cached under data_dir (regenerated when too short): the same prefix always."""
    tag = "" if mixture is None else "_" + hashlib.sha256(json.dumps(mixture, sort_keys=True).encode()).hexdigest()[:8]
    path = data_dir / f"bytes_{seed}{tag}{'_heldout' if heldout else ''}.npy"
    if path.exists():
        data = np.load(path)
        if len(data) >= n_tokens:
            return data[:n_tokens]
    data = corpus_bytes(n_tokens, seed, mixture, heldout)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, data)
    os.replace(tmp, path)
    return data


def colour_task(rows: int, seed: int = TASK_SEED) -> tuple[list[bytes], list[list[bytes]], list[int]]:
    """scene_colour as bytes: per row the context, the six continuations " <colour>." and the gold index."""
    contexts, options, gold = [], [], []
    for row in scene_colour_rows(rows, seed):
        contexts.append(f"{row['text']} The {row['shape']} is".encode())
        options.append([f" {c}.".encode() for c in COLOURS])
        gold.append(row["gold"])
    return contexts, options, gold


CLOZE_OPTIONS = 4
CLOZE_CONTEXT = 64  # bytes of context before the word
CLOZE_TEXT = 400_000  # bytes of held-out text the words are drawn from
# A word of 3 to 12 letters after a space, newline, "(" or ".", and before a non-letter.
CLOZE_WORD = re.compile(r"(?<=[ \n(.])[A-Za-z_]{3,12}(?=[^A-Za-z_])")


def cloze_task(text: np.ndarray, rows: int, seed: int = TASK_SEED) -> tuple[list[bytes], list[list[bytes]], list[int]]:
    """word_cloze: per row the CLOZE_CONTEXT bytes before a held-out word, the word and CLOZE_OPTIONS - 1 other
    words of the same text as options (shuffled), and the gold index. Graded like lm-eval's multiple choice: the
    option of the lowest summed NLL; its accuracy rises smoothly with the model's loss, where scene_colour's stays
    at chance until a model learns to copy."""
    raw = bytes(text[text < 256].astype(np.uint8)).decode("latin-1")
    words = [(m.start(), m.group()) for m in CLOZE_WORD.finditer(raw) if m.start() >= CLOZE_CONTEXT]
    vocab = sorted({w for _, w in words})
    if len(words) < rows or len(vocab) < CLOZE_OPTIONS:
        raise ValueError(f"word_cloze: the held-out text has {len(words)} words, under the {rows} rows asked")
    rng = random.Random(f"word_cloze:{seed}")
    contexts, options, gold = [], [], []
    for pos, word in rng.sample(words, rows):
        row = [word, *rng.sample([v for v in vocab if v != word], CLOZE_OPTIONS - 1)]
        rng.shuffle(row)
        contexts.append(raw[pos - CLOZE_CONTEXT : pos].encode("latin-1"))
        options.append([w.encode() for w in row])
        gold.append(row.index(word))
    return contexts, options, gold


TASK_CHANCE = {"word_cloze": 1 / CLOZE_OPTIONS, "scene_colour": 1 / len(COLOURS)}


HELDOUT_TEXT = 2_000_000  # bytes of held-out text the loss windows are spread over (a hundred or so code files)


def heldout_windows(cfg: ScalingConfig, data_dir: Path) -> torch.Tensor:
    """The held-out loss windows [heldout_windows, seq + 1], evenly spaced over HELDOUT_TEXT bytes of held-out text
    (the held-out code files and the generators from a seed of their own: the same for every data_seed), so that no
    single long document decides the loss."""
    text = cached_corpus(data_dir, HELDOUT_TEXT, HELDOUT_SEED_OFFSET, cfg.mixture or None, heldout=True)
    starts = np.linspace(0, len(text) - cfg.seq_len - 1, cfg.heldout_windows).astype(np.int64)
    return torch.from_numpy(np.stack([text[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64))


def downstream_task(cfg: ScalingConfig, data_dir: Path) -> tuple[list[bytes], list[list[bytes]], list[int]]:
    """The configured task's rows (word_cloze: from held-out text of the grid's mixture, cached in data_dir)."""
    if cfg.task == "scene_colour":
        return colour_task(cfg.task_rows)
    if cfg.task != "word_cloze":
        raise ValueError(f"task: {cfg.task!r} is not one of {sorted(TASK_CHANCE)}")
    text = cached_corpus(data_dir, CLOZE_TEXT, HELDOUT_SEED_OFFSET + 1, cfg.mixture or None, True)
    return cloze_task(text, cfg.task_rows)


# ---- one run --------------------------------------------------------------------------------------------------------


def run_lr(cfg: ScalingConfig, run: PlannedRun) -> float:
    """The run's peak learning rate: ``lr`` scaled to its size by ``lr_size_exponent``."""
    return cfg.lr * (run.params / cfg.lr_reference_params) ** -cfg.lr_size_exponent


def _warmup(cfg: ScalingConfig, steps: int) -> int:
    return min(cfg.max_warmup, int(cfg.warmup_fraction * steps))


@torch.no_grad()
def heldout_loss(model: Transformer, windows: torch.Tensor) -> float:
    """Mean next-byte loss (nats) over held-out windows [n, seq + 1]."""
    model.eval()
    total = 0.0
    for chunk in windows.split(16):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / windows[:, 1:].numel()


@torch.no_grad()
def task_scores(model: Transformer, task: tuple[list[bytes], list[list[bytes]], list[int]]) -> tuple[float, float]:
    """A multiple-choice task: the gold continuation's mean NLL (nats, summed over its bytes) and the accuracy."""
    model.eval()
    contexts, options, gold = task
    seqs = [[BOS, *ctx, *opt] for ctx, opts in zip(contexts, options, strict=True) for opt in opts]
    starts = [1 + len(ctx) for ctx, opts in zip(contexts, options, strict=True) for _ in opts]
    width = max(map(len, seqs))
    tokens = torch.full((len(seqs), width), EOS, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    nll = torch.zeros(len(seqs))
    for lo in range(0, len(seqs), 64):
        logp = model(tokens[lo : lo + 64, :-1]).float().log_softmax(-1)
        tok = logp.gather(-1, tokens[lo : lo + 64, 1:, None])[..., 0]
        for j in range(tok.shape[0]):
            i = lo + j
            nll[i] = -tok[j, starts[i] - 1 : len(seqs[i]) - 1].sum()
    model.train()
    nll = nll.view(len(contexts), len(options[0]))
    gold_t = torch.tensor(gold)
    acc = (nll.argmin(-1) == gold_t).float().mean().item()
    return nll.gather(1, gold_t[:, None]).mean().item(), acc


def save_weights(model: Transformer, path: Path) -> None:
    """The run's final weights (safetensors, written atomically): a few hundred KB, so tasks can be scored again."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_weights(cfg: ScalingConfig, run: PlannedRun, run_dir: Path) -> Transformer:
    """A finished run's model from its saved weights."""
    model = Transformer(lm_config(cfg, run.dim, run.n_layers))
    model.load_state_dict(load_file(str(run_dir / WEIGHTS)))
    return model.eval()


def _train_step(model: Transformer, rows: torch.Tensor, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float
                ) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """One optimizer step on windows [b, seq + 1]: (loss, gradient norm, the lr it used)."""
    loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = clip_grad_norm(model.parameters(), max_grad_norm)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    return loss, gnorm, lr


def train_run(cfg: ScalingConfig, run: PlannedRun, train_data: np.ndarray, heldout: torch.Tensor, task: tuple,
              run_dir: Path) -> dict:  # fmt: skip
    """Train one run once over its windows and evaluate it; returns its result record (not yet written)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(lm_config(cfg, run.dim, run.n_layers))
    model.init_weights(cfg.seed)
    optim = OptimConfig(lr=run_lr(cfg, run), weight_decay=cfg.weight_decay, warmup_steps=_warmup(cfg, run.steps),
                        decay="cosine", min_lr_ratio=cfg.min_lr_ratio)  # fmt: skip
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, run.steps)
    seqs = run.tokens // cfg.seq_len
    data = torch.from_numpy(train_data[: run.tokens + 1].astype(np.int64))
    # The windows in a seeded random order: in stream order a long document (a standard library file spans dozens of
    # batches) would make the last steps, and so the final loss, depend on which source the stream ended in.
    order = torch.randperm(seqs, generator=torch.Generator().manual_seed(cfg.data_seed))
    logger = MetricsLogger(str(run_dir), total_steps=run.steps, quiet=True)  # the grid prints a line per run
    every = max(1, run.steps // max(1, cfg.log_points))
    t0 = time.perf_counter()
    for step in range(run.steps):
        first, last = step * cfg.batch_size, min(seqs, (step + 1) * cfg.batch_size)
        rows = torch.stack([data[i * cfg.seq_len : (i + 1) * cfg.seq_len + 1] for i in order[first:last].tolist()])
        loss, gnorm, lr = _train_step(model, rows, opt, sched, cfg.max_grad_norm)
        if (step + 1) % every == 0 or step + 1 == run.steps:
            elapsed = time.perf_counter() - t0
            rate = (last * cfg.seq_len) / elapsed
            logger.log({"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": gnorm.item(),
                        "tokens_per_s": rate, "tokens": last * cfg.seq_len, "run": run.name})  # fmt: skip
    train_s = time.perf_counter() - t0
    loss_h = heldout_loss(model, heldout)
    task_nll, task_acc = task_scores(model, task)
    logger.log({"step": run.steps, "eval/heldout_loss": loss_h, "eval/task_nll": task_nll, "eval/task_acc": task_acc})
    logger.close()
    save_weights(model, run_dir / WEIGHTS)
    return {**asdict(run), "compute": run.compute, "lr": run_lr(cfg, run), "loss": loss_h, "train_loss": loss.item(),
            "task_nll": task_nll, "task_acc": task_acc, "train_s": train_s, "wall_s": time.perf_counter() - t0,
            "params_note": "non-embedding parameters, output layer included", "vocab_size": cfg.vocab_size}  # fmt: skip


# ---- the grid -------------------------------------------------------------------------------------------------------


def result_path(out: Path, run: PlannedRun) -> Path:
    """Where a run's result.json lives: its presence means the run is done."""
    return out / "runs" / run.name / "result.json"


# Fields that only choose which runs the grid holds or how long they are expected to take: a grid directory may be
# extended by changing them. Every other field changes what a run of a given budget and shape computes.
GRID_ONLY = frozenset(
    {"budgets", "shapes", "sizes_per_budget", "max_extra_sizes", "tokens_per_param", "measure_speed", "flops_per_s",
     "step_overhead_s", "eval_s", "max_minutes", "lm_preset", "lm_data_dir", "lm_run_root", "gpus_per_node"}
)  # fmt: skip


def check_settings(cfg: ScalingConfig, out: Path) -> None:
    """Record the training settings in out/settings.json; ValueError when the directory's runs used others."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in GRID_ONLY}
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if diff:
            raise ValueError(f"{out}: its runs were trained with other settings ({', '.join(diff)}); use a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def predicted_tokens(results: Sequence[dict], budget: float) -> float | None:
    """The compute-optimal tokens at ``budget`` from the finished budgets' IsoFLOPs minima (a power law through the
    usable ones); None under two usable budgets."""
    if len({r["budget"] for r in results}) < 2:
        return None
    points = [(b.compute, 10**b.tokens.x_min) for b in scaling_fit.fit_isoflops(results) if b.tokens.usable]
    if len(points) < 2:
        return None
    return float(scaling_fit.fit_power_law(*zip(*points, strict=True)).predict(budget))


def extension(results: Sequence[dict], indices: Sequence[int], n_shapes: int) -> int | None:
    """The ladder shape to add to a budget whose loss minimum (in log params) is not bracketed by its runs: the next
    one beyond the end it lies at or beyond; None when bracketed (or the ladder ends there)."""
    fit = scaling_fit.fit_parabola(np.log10([r["params"] for r in results]), [r["loss"] for r in results])
    lowest = int(np.argmin([r["loss"] for r in results]))
    order = np.argsort([r["params"] for r in results])
    if fit.usable and scaling_fit.ONE_SIDED not in fit.flags:
        return None
    if math.isfinite(fit.x_min):
        smaller = fit.x_min < float(np.median(np.log10([r["params"] for r in results])))
    elif lowest in (order[0], order[-1]):
        smaller = lowest == order[0]
    else:
        return None  # opens downward around an inner run: noise, not a missing side
    index = min(indices) - 1 if smaller else max(indices) + 1
    return index if 0 <= index < n_shapes else None


def run_grid(cfg: ScalingConfig, out: str | os.PathLike, *, verbose: bool = True) -> list[dict]:
    """Run the grid budget by budget, smallest first: each budget centred on the optimum the finished budgets
    predict (from the third on; the first two as planned), then extended by up to ``max_extra_sizes`` shapes while
    its minimum lies at an end. A finished run (result.json, written atomically) is never redone, and a rerun makes
    the same choices from the same results. Returns every run's result."""
    out = Path(out)
    check_settings(cfg, out)
    say = print if verbose else (lambda *a, **k: None)
    say(f"BYTE-LEVEL vocabulary ({cfg.vocab_size}: 256 bytes + BOS + EOS) over the default corpus "
        f"({', '.join(f'{k} {v:g}' for k, v in (cfg.mixture or {s: DEFAULT_WEIGHTS[s] for s in SOURCES}).items())})")
    configs, costs = ladder(cfg)
    planned = plan_grid(cfg)
    say(f"{len(planned)} runs planned, {sum(result_path(out, r).exists() for r in planned)} of them done (estimated "
        f"{_hms(sum(r.est_s for r in planned))} in all); budgets from the third on are re-centred")
    inputs = GridInputs(cfg, out)
    results: list[dict] = []
    for budget in sorted(cfg.budgets):
        tokens_opt = predicted_tokens(results, budget)
        indices = _pick_shapes(cfg, budget, costs, tokens_opt)
        if tokens_opt is not None:
            say(f"budget {budget:.3g}: centred on {tokens_opt:.3g} tokens, the smaller budgets' optimum law")
        mine = [inputs.result(planned_run(cfg, budget, i, configs, costs), say) for i in indices]
        for _ in range(cfg.max_extra_sizes):
            index = extension(mine, indices, len(costs))
            if index is None:
                break
            say(f"budget {budget:.3g}: the minimum is not bracketed; adding {cfg.shapes[index]}")
            indices.append(index)
            mine.append(inputs.result(planned_run(cfg, budget, index, configs, costs), say))
        results += mine
    return results


class GridInputs:
    """What every run of a grid reads (training text, held-out windows, the task), made on first need; and the
    runs themselves, trained unless finished."""

    def __init__(self, cfg: ScalingConfig, out: Path) -> None:
        self.cfg, self.out, self.t0, self.count = cfg, out, time.perf_counter(), 0
        self.train_data: np.ndarray | None = None

    def load(self, tokens: int) -> None:
        """The training stream's first ``tokens`` + 1, the held-out windows and the task."""
        cfg, data = self.cfg, self.out / "data"
        self.train_data = cached_corpus(data, tokens + 1, cfg.data_seed, cfg.mixture or None)
        self.heldout = heldout_windows(cfg, data)
        self.task = downstream_task(cfg, data)

    def result(self, run: PlannedRun, say: Callable[..., None]) -> dict:
        """The run's result: read when finished, else trained now (an unfinished run starts over)."""
        path = result_path(self.out, run)
        if path.exists():
            return json.loads(path.read_text())
        if self.train_data is None or len(self.train_data) < run.tokens + 1:
            # Enough for the largest planned run, so the stream is generated once.
            self.load(max([run.tokens, *(r.tokens for r in plan_grid(self.cfg))]))
        if path.parent.exists():
            for stale in path.parent.iterdir():
                stale.unlink()
        result = train_run(self.cfg, run, self.train_data, self.heldout, self.task, path.parent)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        self.count += 1
        say(f"[{self.count}] {run.name}: heldout {result['loss']:.4f} nats/byte, task nll {result['task_nll']:.3f} "
            f"acc {result['task_acc']:.3f} | {run.tokens / result['train_s']:,.0f} tok/s, {_hms(result['wall_s'])} "
            f"(est {_hms(run.est_s)}) | elapsed {_hms(time.perf_counter() - self.t0)}", flush=True)  # fmt: skip
        return result


def measure_time_model(cfg: ScalingConfig, runs: Sequence[PlannedRun], seconds: float = 1.0
                       ) -> tuple[float, float] | None:  # fmt: skip
    """(flops_per_s, step_overhead_s) on this machine, as it is loaded now: training steps of the plan's cheapest and
    dearest shapes on random bytes, each timed for about ``seconds``, fitted as finished runs are (fit_time_model).
    Where load makes the cheap shape's steps time too fast for a positive overhead, the dearest shape's rate alone
    (no overhead); None when the plan has only one shape."""
    timed = []
    ends = [min(runs, key=lambda r: r.flops_per_token), max(runs, key=lambda r: r.flops_per_token)]
    for run in ends[: 1 + (ends[0].name != ends[1].name)]:
        model = Transformer(lm_config(cfg, run.dim, run.n_layers))
        model.init_weights(cfg.seed)
        optim = OptimConfig(lr=run_lr(cfg, run), weight_decay=cfg.weight_decay, warmup_steps=0)
        opt = build_optimizer(model, optim)
        sched = build_scheduler(opt, optim, 1_000_000)
        rows = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
        _train_step(model, rows, opt, sched, cfg.max_grad_norm)  # the first step allocates: not timed
        steps, t0 = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - t0 < seconds:
            _train_step(model, rows, opt, sched, cfg.max_grad_norm)
            steps += 1
        compute = steps * cfg.batch_size * cfg.seq_len * run.flops_per_token
        timed.append({"compute": compute, "steps": steps, "train_s": time.perf_counter() - t0})
    if len(timed) < 2:
        return None
    return fit_time_model(timed) or (timed[-1]["compute"] / timed[-1]["train_s"], 0.0)


def fit_time_model(results: Sequence[dict]) -> tuple[float, float] | None:
    """(flops_per_s, step_overhead_s) of the plan's time model, least squares on finished runs' training seconds
    (train_s = compute / flops_per_s + steps x step_overhead_s); None when under 2 runs or not both positive."""
    rows = [(r["compute"], r["steps"], r["train_s"]) for r in results if r.get("train_s")]
    if len(rows) < 2:
        return None
    a = np.array([[c, n] for c, n, _ in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(a, np.array([t for *_, t in rows]), rcond=None)
    if coef[0] <= 0 or coef[1] <= 0:
        return None
    return float(1 / coef[0]), float(coef[1])


def collect_runs(runs_dir: str | os.PathLike) -> list[dict]:
    """The finished runs under DIR/runs/*/result.json (or DIR/*/result.json) as train.scaling_fit runs."""
    root = Path(runs_dir)
    paths = sorted(root.glob("runs/*/result.json")) or sorted(root.glob("*/result.json"))
    if not paths:
        raise ValueError(f"{root}: no finished run (no runs/*/result.json)")
    keys = (*scaling_fit.RUN_KEYS, *scaling_fit.TASK_KEYS)
    return [{k: r[k] for k in keys if k in r} for r in (json.loads(p.read_text()) for p in paths)]


def fit_runs(runs: Sequence[dict], out: str | os.PathLike, seed: int = 0, n_boot: int = 1000,
             chance: float | None = TASK_CHANCE["word_cloze"]) -> dict:  # fmt: skip
    """fit_all on the runs (runs.csv, fit.json, plots in out; targets: 10x the largest budget) and, with 3+
    budgets, the hold-out of the largest (holdout.json); ``chance`` is the task's floor (None: fitted)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scaling_fit.write_runs_csv(runs, out / "runs.csv")
    target = 10 * max(r["compute"] for r in runs)
    result = scaling_fit.fit_all(runs, out, seed, n_boot=n_boot, targets=(target,), chance=chance)
    try:
        hold = scaling_fit.holdout_largest(runs, chance=chance)
    except ValueError as e:
        hold = {"error": str(e)}
    atomic_write_text(out / "holdout.json", json.dumps(scaling_fit._jsonable(hold), indent=1) + "\n")
    result["holdout"] = hold
    return result


def grid_chance(runs_dir: str | os.PathLike) -> float:
    """The chance accuracy of the task a grid directory's runs were scored on (its settings.json)."""
    path = Path(runs_dir) / "settings.json"
    task = json.loads(path.read_text()).get("task", "scene_colour") if path.exists() else "scene_colour"
    return TASK_CHANCE[task]


def report(result: dict) -> str:
    """The fit's summary, the parabola count and the hold-out's predicted vs measured figures."""
    lines = [scaling_fit.summary(result)]
    budgets = result["budgets"]
    good = sum(1 for b in budgets if b["tokens"]["a"] and b["tokens"]["a"] > 0 and "minimum_outside_range"
               not in b["tokens"]["flags"])  # fmt: skip
    lines.append(f"parabolas (loss vs tokens) opening upward with the minimum inside the range: {good}/{len(budgets)}")
    hold = result.get("holdout", {})
    if "error" in hold:
        lines.append(f"hold-out: {hold['error']}")
    elif hold:
        lines.append(f"hold-out of the largest budget {hold['compute']:.3g} FLOPs (fit on {len(hold['fit_budgets'])}):")
        for name in sorted(hold["predicted"]):
            key = name.removeprefix("parametric_")
            measured = hold["measured"].get(key)
            ratio = hold["ratio"].get(name)
            lines.append(f"  {name:>18}: predicted {hold['predicted'][name]:.4g}, measured "
                         f"{'n/a' if measured is None else f'{measured:.4g}'}"
                         f"{'' if ratio is None else f', ratio {ratio:.3f}'}")  # fmt: skip
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace) -> ScalingConfig:
    """The TOML config (or defaults), --gpu, then the command line's overrides."""
    cfg = load_scaling_config(args.config)
    if getattr(args, "gpu", False):
        cfg = gpu_config(cfg)
    if args.budgets:
        cfg = replace(cfg, budgets=[float(b) for b in args.budgets])
    if args.max_minutes is not None:
        cfg = replace(cfg, max_minutes=args.max_minutes)
    return cfg


def _measured(cfg: ScalingConfig, runs: list[PlannedRun]) -> tuple[ScalingConfig, list[PlannedRun]]:
    """The config with this machine's measured time model, and the plan estimated with it (the config's numbers,
    said so, when the measurement gives no fit)."""
    timing = measure_time_model(cfg, runs)
    if timing is None:
        print(f"time model: the config's (measuring on this machine gave no fit): flops_per_s = {cfg.flops_per_s:.3g}, "
              f"step_overhead_s = {cfg.step_overhead_s:.3g}")  # fmt: skip
        return cfg, runs
    print(f"time model measured on this machine: flops_per_s = {timing[0]:.3g}, step_overhead_s = {timing[1]:.3g} "
          f"(the config's: {cfg.flops_per_s:.3g}, {cfg.step_overhead_s:.3g}; measure_speed = false uses those)")
    cfg = replace(cfg, flops_per_s=timing[0], step_overhead_s=timing[1])
    return cfg, plan_grid(cfg)


def _parser() -> argparse.ArgumentParser:
    """plan, run and fit."""
    parser = argparse.ArgumentParser(prog="python -m train.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("plan", "run"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=None, help="TOML of ScalingConfig fields (configs/scaling/cpu.toml)")
        p.add_argument("--budgets", nargs="+", default=None, help="compute budgets in FLOPs")
        p.add_argument("--max-minutes", type=float, default=None, help="refuse a grid estimated to take longer")
    plan = sub.choices["plan"]
    plan.add_argument("--emit", default=None, help="write train/lm.py configs, scaling.sbatch and plan.json here")
    plan.add_argument("--gpu", action="store_true", help="the paper's budgets and shapes (128K vocabulary)")
    run = sub.choices["run"]
    run.add_argument("--out", required=True, help="the grid's directory (runs/, data/, fit/)")
    run.add_argument("--fit", action="store_true", help="fit the runs when they are done")
    fit = sub.add_parser("fit")
    fit.add_argument("--runs", default=None, help="a grid directory of `run`")
    fit.add_argument("--fit-only", default=None, help="refit runs made elsewhere: a CSV compute,params,tokens,loss,...")
    fit.add_argument("--out", default=None, help="where fit.json and the plots go (default RUNS/fit)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--n-boot", type=int, default=1000)
    fit.add_argument("--chance", type=float, default=None,
                     help="--fit-only: the task's chance accuracy, the sigmoid's floor (default: fitted)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: plan, run or fit."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "fit":
        if bool(args.runs) == bool(args.fit_only):
            parser.error("fit: give exactly one of --runs DIR and --fit-only CSV")
        if args.fit_only and not args.out:
            parser.error("fit --fit-only: --out DIR is required")
        runs = scaling_fit.read_runs_csv(args.fit_only) if args.fit_only else collect_runs(args.runs)
        out = args.out or os.path.join(args.runs, "fit")
        chance = args.chance if args.fit_only else grid_chance(args.runs)
        print(report(fit_runs(runs, out, args.seed, args.n_boot, chance)))
        print(f"wrote {out}/fit.json, holdout.json and the plots")
        return
    cfg = _config_from_args(args)
    runs = plan_grid(cfg)
    if cfg.measure_speed:
        cfg, runs = _measured(cfg, runs)
    print(format_plan(cfg, runs))
    try:
        check_time(runs, cfg.max_minutes)
    except ValueError as e:
        parser.exit(2, f"python -m train.scaling {args.command}: error: {e}\n")
    if args.command == "plan":
        if args.emit:
            paths = emit(cfg, runs, args.emit)
            print(f"wrote {len(paths) - 2} train/lm.py configs, {paths[-2]} and {paths[-1]}")
        return
    t0 = time.perf_counter()
    try:
        results = run_grid(cfg, args.out)
    except ValueError as e:
        parser.exit(2, f"python -m train.scaling run: error: {e}\n")
    print(f"grid done in {_hms(time.perf_counter() - t0)}")
    timing = fit_time_model(results)
    if timing:
        print(f"time model fitted on these runs: flops_per_s = {timing[0]:.3g}, step_overhead_s = {timing[1]:.3g} "
              f"(the config's: {cfg.flops_per_s:.3g}, {cfg.step_overhead_s:.3g})")  # fmt: skip
    if args.fit:
        out = os.path.join(args.out, "fit")
        print(report(fit_runs(collect_runs(args.out), out, chance=TASK_CHANCE[cfg.task])))


if __name__ == "__main__":
    main()
