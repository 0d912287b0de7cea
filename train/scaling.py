"""Scaling laws as the Llama 3 paper does them (section 3.2.1): plan an IsoFLOPs grid, run it, fit it.

    python -m train.scaling plan [--config configs/scaling/cpu.toml] [--max-minutes 20] [--emit DIR [--gpu]]
    python -m train.scaling run --out DIR [--config ...] [--max-minutes 20] [--fit]
    python -m train.scaling fit --runs DIR          # fit the finished runs of DIR (train.scaling_fit.fit_all)
    python -m train.scaling fit --fit-only RUNS.csv --out DIR   # refit runs made elsewhere

Plan: for each compute budget C, ``sizes_per_budget`` model shapes from the ``shapes`` ladder around the expected
optimum (N* = sqrt(C / (6·tokens_per_param)), N the matmul parameters ``flops_per_token / 6``); each run trains on
D = C / ``LMConfig.flops_per_token(seq_len)`` tokens (attention included), rounded to whole sequences. The plan prints
each run's estimated time and is refused when the total exceeds ``max_minutes``. ``--emit DIR`` writes it as
train/lm.py configs (TOML) and a Slurm array script; ``--gpu`` plans the paper's budgets and shapes instead.

Run (CPU): a BYTE-LEVEL vocabulary (256 bytes + BOS + EOS), not the 128K one, whose output layer would take nearly all
FLOPs of these tiny models. The text is the default corpus's general, math and multilingual sources (data.default's
generators, offline and deterministic; the stdlib code source is left out), mixed by the default weights. Each run
trains once over contiguous non-overlapping windows of the training stream (no repeats; every run reads the same
prefix), with AdamW (``train.optim``), linear warmup and a cosine decay to its own length, logs metrics.jsonl, and is
evaluated on a fixed held-out slice (the same generators from another seed; loss in nats per byte) and on the
scene_colour task (``evaluation.tasks.scene_colour_rows``, byte-level: NLL of " <colour>." after "<text> The <shape>
is", per answer; accuracy: the gold colour has the lowest NLL of the six). A run writes result.json atomically at its
end and is never redone; a missing result.json is (re)run from scratch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import tomllib
import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text
from data.default import DEFAULT_WEIGHTS, source_document
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

    budgets: list[float] = field(default_factory=lambda: [3e10, 1e11, 3e11, 1e12])
    # The model ladder, smallest first: [dim, n_layers]; heads of head_dim channels.
    shapes: list[list[int]] = field(
        default_factory=lambda: [
            [8, 1], [16, 1], [24, 1], [32, 1], [32, 2], [48, 2], [64, 2], [64, 3], [96, 3], [128, 3], [128, 4],
        ]
    )  # fmt: skip
    sizes_per_budget: int = 5
    # Where the grid is centred: the expected optimum has D = tokens_per_param x N.
    tokens_per_param: float = 200.0
    head_dim: int = 16
    n_kv_heads: int = 0  # 0 = n_heads (no GQA); otherwise a divisor of every shape's head count
    vocab_size: int = BYTE_VOCAB
    seq_len: int = 128
    batch_size: int = 32  # sequences per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of the run's own steps, at most max_warmup
    max_warmup: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0  # model initialisation
    data_seed: int = 0  # training text; the held-out text uses data_seed + HELDOUT_SEED_OFFSET
    heldout_windows: int = 64
    task_rows: int = 120
    log_points: int = 5  # metrics.jsonl records per run (and the last step)
    # The time model of the plan, measured on this machine (2 shared CPU cores): s = FLOPs / flops_per_s +
    # steps x step_overhead_s + eval_s.
    flops_per_s: float = 8e9
    step_overhead_s: float = 0.01
    eval_s: float = 1.0
    max_minutes: float = 20.0
    # --emit: what the train/lm.py configs get.
    lm_preset: str = "debug"
    lm_data_dir: str = "runs/data/text"
    lm_run_root: str = "runs/scaling"
    gpus_per_node: int = 8


def gpu_config(base: ScalingConfig | None = None) -> ScalingConfig:
    """The paper's budgets and shapes with the Llama 3 vocabulary, seq 8192, 64-sequence batches, for --emit."""
    base = base or ScalingConfig()
    return replace(
        base, budgets=list(PAPER_BUDGETS), shapes=[list(s) for s in PAPER_SHAPES], head_dim=128, n_kv_heads=8,
        vocab_size=128256, seq_len=8192, batch_size=64, tokens_per_param=20.0, lr=3e-4, max_warmup=2000,
        lm_preset="llama3-8b", flops_per_s=0.4 * 989e12 * base.gpus_per_node, step_overhead_s=0.0, eval_s=60.0,
        max_minutes=math.inf,
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


def _pick_shapes(cfg: ScalingConfig, budget: float, costs: list[float]) -> list[int]:
    """Indices of sizes_per_budget consecutive ladder shapes centred on the expected optimum (clamped to the ends)."""
    n_opt = math.sqrt(budget / (6 * cfg.tokens_per_param))
    centre = int(np.argmin([abs(math.log(c / 6 / n_opt)) for c in costs]))
    k = min(cfg.sizes_per_budget, len(costs))
    start = min(max(0, centre - k // 2), len(costs) - k)
    return list(range(start, start + k))


def plan_grid(cfg: ScalingConfig) -> list[PlannedRun]:
    """Every run of the grid: per budget, the shapes around the expected optimum and D = C / FLOPs per token."""
    configs = [lm_config(cfg, d, n) for d, n in cfg.shapes]
    costs = [c.flops_per_token(cfg.seq_len) for c in configs]
    if costs != sorted(costs):
        raise ValueError("shapes must be ordered by cost (FLOPs per token), smallest first")
    runs = []
    for budget in sorted(cfg.budgets):
        for i in _pick_shapes(cfg, budget, costs):
            (dim, n_layers), fpt = cfg.shapes[i], costs[i]
            seqs = max(1, round(budget / fpt / cfg.seq_len))
            steps = math.ceil(seqs / cfg.batch_size)
            tokens = seqs * cfg.seq_len
            est = tokens * fpt / cfg.flops_per_s + steps * cfg.step_overhead_s + cfg.eval_s
            params = configs[i].num_params(exclude_embeddings=True)
            runs.append(PlannedRun(f"C{budget:.0e}_d{dim}_l{n_layers}", budget, dim, n_layers, params, fpt, tokens,
                                   steps, est))  # fmt: skip
    return runs


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
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=_warmup(cfg, run.steps), decay="cosine",
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


def corpus_bytes(n_tokens: int, seed: int) -> np.ndarray:
    """n_tokens byte tokens: documents of the generated sources mixed by the default weights, each BOS ... EOS."""
    weights = [DEFAULT_WEIGHTS[s] for s in SOURCES]
    pick = random.Random(f"scaling:mix:{seed}")
    rngs = {s: random.Random(f"scaling:{s}:{seed}") for s in SOURCES}
    out, used = [], 0
    while used < n_tokens:
        source = pick.choices(SOURCES, weights)[0]
        doc = np.frombuffer(source_document(source, rngs[source]).encode(), dtype=np.uint8).astype(np.int16)
        out.append(np.concatenate([[BOS], doc, [EOS]]).astype(np.int16))
        used += len(out[-1])
    return np.concatenate(out)[:n_tokens]


def cached_corpus(data_dir: Path, n_tokens: int, seed: int) -> np.ndarray:
    """corpus_bytes, cached at data_dir/bytes_<seed>.npy (regenerated when too short): the same prefix always."""
    path = data_dir / f"bytes_{seed}.npy"
    if path.exists():
        data = np.load(path)
        if len(data) >= n_tokens:
            return data[:n_tokens]
    data = corpus_bytes(n_tokens, seed)
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


# ---- one run --------------------------------------------------------------------------------------------------------


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
    """scene_colour: the gold continuation's mean NLL (nats, summed over its bytes) and the accuracy."""
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
    nll = nll.view(len(contexts), len(COLOURS))
    gold_t = torch.tensor(gold)
    acc = (nll.argmin(-1) == gold_t).float().mean().item()
    return nll.gather(1, gold_t[:, None]).mean().item(), acc


def train_run(cfg: ScalingConfig, run: PlannedRun, train_data: np.ndarray, heldout: torch.Tensor, task: tuple,
              run_dir: Path) -> dict:  # fmt: skip
    """Train one run once over its windows and evaluate it; returns its result record (not yet written)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(lm_config(cfg, run.dim, run.n_layers))
    model.init_weights(cfg.seed)
    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=_warmup(cfg, run.steps),
                        decay="cosine", min_lr_ratio=cfg.min_lr_ratio)  # fmt: skip
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, run.steps)
    seqs = run.tokens // cfg.seq_len
    data = torch.from_numpy(train_data[: run.tokens + 1].astype(np.int64))
    logger = MetricsLogger(str(run_dir), total_steps=run.steps, quiet=True)  # the grid prints a line per run
    every = max(1, run.steps // max(1, cfg.log_points))
    t0 = time.perf_counter()
    for step in range(run.steps):
        first, last = step * cfg.batch_size, min(seqs, (step + 1) * cfg.batch_size)
        rows = torch.stack([data[i * cfg.seq_len : (i + 1) * cfg.seq_len + 1] for i in range(first, last)])
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad_norm(model.parameters(), cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
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
    return {**asdict(run), "compute": run.compute, "loss": loss_h, "train_loss": loss.item(), "task_nll": task_nll,
            "task_acc": task_acc, "train_s": train_s, "wall_s": time.perf_counter() - t0,
            "params_note": "non-embedding parameters, output layer included", "vocab_size": cfg.vocab_size}  # fmt: skip


# ---- the grid -------------------------------------------------------------------------------------------------------


def result_path(out: Path, run: PlannedRun) -> Path:
    """Where a run's result.json lives: its presence means the run is done."""
    return out / "runs" / run.name / "result.json"


# Fields that only choose which runs the grid holds or how long they are expected to take: a grid directory may be
# extended by changing them. Every other field changes what a run of a given budget and shape computes.
GRID_ONLY = frozenset(
    {"budgets", "shapes", "sizes_per_budget", "tokens_per_param", "flops_per_s", "step_overhead_s", "eval_s",
     "max_minutes", "lm_preset", "lm_data_dir", "lm_run_root", "gpus_per_node"}
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


def run_grid(cfg: ScalingConfig, out: str | os.PathLike, *, verbose: bool = True) -> list[dict]:
    """Run every planned run not yet finished (result.json written atomically at its end); returns all results."""
    out = Path(out)
    check_settings(cfg, out)
    runs = plan_grid(cfg)
    todo = [r for r in runs if not result_path(out, r).exists()]
    say = print if verbose else (lambda *a, **k: None)
    say(f"BYTE-LEVEL vocabulary ({cfg.vocab_size}: 256 bytes + BOS + EOS) over the default corpus's generated text")
    est = _hms(sum(r.est_s for r in todo))
    say(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run (estimated {est})")
    if todo:
        need = max(r.tokens for r in todo) + 1
        train_data = cached_corpus(out / "data", need, cfg.data_seed)
        held = cached_corpus(out / "data", cfg.heldout_windows * cfg.seq_len + 1, cfg.data_seed + HELDOUT_SEED_OFFSET)
        heldout = torch.from_numpy(held.astype(np.int64)).unfold(0, cfg.seq_len + 1, cfg.seq_len)
        task = colour_task(cfg.task_rows)
    t0 = time.perf_counter()
    for k, run in enumerate(todo):
        run_dir = result_path(out, run).parent
        if run_dir.exists():  # an unfinished run: start it over
            for stale in run_dir.iterdir():
                stale.unlink()
        result = train_run(cfg, run, train_data, heldout, task, run_dir)
        atomic_write_text(result_path(out, run), json.dumps(result, indent=1) + "\n")
        done = time.perf_counter() - t0
        say(f"[{k + 1}/{len(todo)}] {run.name}: heldout {result['loss']:.4f} nats/byte, task nll "
            f"{result['task_nll']:.3f} acc {result['task_acc']:.3f} | {run.tokens / result['train_s']:,.0f} tok/s, "
            f"{_hms(result['wall_s'])} (est {_hms(run.est_s)}) | elapsed {_hms(done)}", flush=True)  # fmt: skip
    return [json.loads(result_path(out, r).read_text()) for r in runs]


def collect_runs(runs_dir: str | os.PathLike) -> list[dict]:
    """The finished runs under DIR/runs/*/result.json (or DIR/*/result.json) as train.scaling_fit runs."""
    root = Path(runs_dir)
    paths = sorted(root.glob("runs/*/result.json")) or sorted(root.glob("*/result.json"))
    if not paths:
        raise ValueError(f"{root}: no finished run (no runs/*/result.json)")
    keys = (*scaling_fit.RUN_KEYS, *scaling_fit.TASK_KEYS)
    return [{k: r[k] for k in keys if k in r} for r in (json.loads(p.read_text()) for p in paths)]


def fit_runs(runs: Sequence[dict], out: str | os.PathLike, seed: int = 0, n_boot: int = 1000) -> dict:
    """fit_all on the runs (runs.csv, fit.json, plots in out; targets: 10x the largest budget) and, with 3+
    budgets, the hold-out of the largest (holdout.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scaling_fit.write_runs_csv(runs, out / "runs.csv")
    target = 10 * max(r["compute"] for r in runs)
    result = scaling_fit.fit_all(runs, out, seed, n_boot=n_boot, targets=(target,), chance=1 / len(COLOURS))
    try:
        hold = scaling_fit.holdout_largest(runs, chance=1 / len(COLOURS))
    except ValueError as e:
        hold = {"error": str(e)}
    atomic_write_text(out / "holdout.json", json.dumps(scaling_fit._jsonable(hold), indent=1) + "\n")
    result["holdout"] = hold
    return result


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
        print(report(fit_runs(runs, out, args.seed, args.n_boot)))
        print(f"wrote {out}/fit.json, holdout.json and the plots")
        return
    cfg = _config_from_args(args)
    runs = plan_grid(cfg)
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
        run_grid(cfg, args.out)
    except ValueError as e:
        parser.exit(2, f"python -m train.scaling run: error: {e}\n")
    print(f"grid done in {_hms(time.perf_counter() - t0)}")
    if args.fit:
        out = os.path.join(args.out, "fit")
        print(report(fit_runs(collect_runs(args.out), out)))


if __name__ == "__main__":
    main()
