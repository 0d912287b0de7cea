"""Scaling-law fits as the Llama 3 paper does them (section 3.2.1): IsoFLOPs parabolas, power laws, downstream.

    python -m train.scaling_fit RUNS.csv --out DIR [--seed 0] [--target 3.8e25 ...] [--chance 0.25]

A run is a dict ``{"compute": C, "params": N, "tokens": D, "loss": L[, "task_nll", "task_acc"]}``; a CSV with the
header ``compute,params,tokens,loss[,task_nll,task_acc]`` holds a list of them (``read_runs_csv``/``write_runs_csv``).
C is the run's own training FLOPs (``LMConfig.flops_per_token(seq_len)`` x tokens), not 6ND: ``k``, the median
C/(N·D) over the runs, links the two wherever a fit needs C from N and D. N is taken as the runs give it (non-embedding
or total; the fit does not care, but N* and the parametric surface are then in the same units, so say which).

1. IsoFLOPs: runs whose compute agrees within ``tol`` form a budget; per budget, loss = a·x² + b·x + c with
   x = log10(tokens), and again with x = log10(params). The minimum x* = -b/(2a) is the compute-optimal size; its
   standard error comes from the delta method, its interval from the bootstrap. Pitfalls are flagged per budget and
   listed in the warnings: too few runs, a parabola opening downward, a minimum outside the sampled range or with
   under two runs on one side (one with 3-4 runs: grid off-centre), a loss range small against the noise, an
   imprecise minimum.
   Budgets with no usable minimum (``EXCLUDING``) are left out of the power laws, and the warning says so.
2. Power laws: log10 D* = log10 A + α·log10 C through the budgets' optima (weighted by 1/se², se floored at half
   the median so that no budget dominates by luck), the same for N*, and L* = E + K·C^-γ for the best loss with E
   the parametric surface's (held fixed: the loss interval leaves out E's uncertainty). The paper's law is
   D*(C) = 0.29·C^0.53 (its N*(C) counts training tokens).
3. Bootstrap: every budget's losses are resampled and every parabola and power law refitted; percentile intervals
   for α, A, the per-budget optima and the predictions at the target computes (the paper's 3.8e25 FLOPs). The
   default resamples residuals (pooled over budgets) at every run's size, "pairs" the runs themselves within each
   budget: with 5-7 runs a budget the latter's intervals come out ~3x too wide (see ``bootstrap_optima``).
4. Cross-check (Chinchilla's approach 3): L(N, D) = E + A/N^a + B/D^b fitted to all runs at once (Huber loss on
   log L, δ=1e-3, L-BFGS from the best points of a grid of starts); its optimum under C = k·N·D gives
   D* ∝ C^(a/(a+b)) and N* ∝ C^(b/(a+b)), reported next to the IsoFLOPs exponents, with a warning where the
   parametric exponent falls outside the IsoFLOPs bootstrap interval.
5. Downstream, the paper's two steps: the task NLL of each budget's compute-optimal model (interpolated at x*) is
   linear in log10 C; accuracy is a sigmoid of the NLL over all runs, acc = lo + (hi - lo)·σ(k·(nll0 - nll))
   (4 parameters; ``chance``/``ceiling`` fix lo/hi, down to a 2-parameter sigmoid). ``predict_accuracy`` chains them.

``fit_all`` writes isoflops.png, power_law.png, downstream.png (when the runs carry task columns) and fit.json (every
number, its interval, the warnings); ``holdout_largest`` fits the smaller budgets and predicts the largest.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

RUN_KEYS = ("compute", "params", "tokens", "loss")
TASK_KEYS = ("task_nll", "task_acc")
AXES = ("tokens", "params")
PAPER_A, PAPER_ALPHA = 0.29, 0.53  # the paper's N*(C) = A·C^α, N* in training tokens
PAPER_TARGET_FLOPS = 3.8e25

# Per-budget flags. The first three leave the budget without a usable minimum: it is left out of the power laws.
TOO_FEW = "too_few_points"
DOWNWARD = "opens_downward"
OUTSIDE = "minimum_outside_range"
ONE_SIDED = "one_sided"
SHALLOW = "shallow"
UNCERTAIN = "uncertain_minimum"
EXACT = "exactly_determined"
EXCLUDING = frozenset({TOO_FEW, DOWNWARD, OUTSIDE})
SHALLOW_FACTOR = 3.0  # a grid whose loss range is under 3x the noise cannot place its minimum
UNCERTAIN_FRACTION = 0.25  # a minimum whose se exceeds a quarter of the grid's width is a guess


# ---- runs ---------------------------------------------------------------------------------------------------------


def check_runs(runs: Sequence[dict]) -> list[dict]:
    """Runs as float dicts, each with positive finite compute, params, tokens and loss (ValueError otherwise)."""
    out = []
    for i, run in enumerate(runs):
        row = {}
        for key in RUN_KEYS + TASK_KEYS:
            value = run.get(key)
            if value is None or value == "":
                if key in RUN_KEYS:
                    raise ValueError(f"run {i} has no {key!r}: {run}")
                continue
            row[key] = float(value)
            if key in RUN_KEYS and not (math.isfinite(row[key]) and row[key] > 0):
                raise ValueError(f"run {i}: {key}={value!r} must be a positive finite number")
        out.append(row)
    return out


def read_runs_csv(path: str | os.PathLike) -> list[dict]:
    """Runs from a CSV with the header compute,params,tokens,loss[,task_nll,task_acc] (empty cells: missing)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in RUN_KEYS if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (expected {','.join(RUN_KEYS)}[,task_nll,task_acc])")
    return check_runs(rows)


def write_runs_csv(runs: Sequence[dict], path: str | os.PathLike) -> None:
    """Write runs as read_runs_csv reads them; floats as repr, so they round-trip exactly."""
    runs = check_runs(runs)
    keys = list(RUN_KEYS) + [k for k in TASK_KEYS if any(k in r for r in runs)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in runs:
            writer.writerow([repr(r[k]) if k in r else "" for k in keys])


def group_budgets(runs: Sequence[dict], tol: float = 0.1) -> list[list[dict]]:
    """Runs grouped by compute budget, smallest first: a run joins a budget within (1 + tol)x of its first run."""
    groups: list[list[dict]] = []
    for run in sorted(runs, key=lambda r: r["compute"]):
        if groups and run["compute"] <= groups[-1][0]["compute"] * (1 + tol):
            groups[-1].append(run)
        else:
            groups.append([run])
    return groups


def _budget_compute(group: Sequence[dict]) -> float:
    return float(np.median([r["compute"] for r in group]))


# ---- IsoFLOPs parabolas ---------------------------------------------------------------------------------------------


@dataclass
class Parabola:
    """loss = a·x² + b·x + c over one budget's runs, x = log10(tokens or params); x_min is the optimum's log10 size."""

    a: float
    b: float
    c: float
    x_min: float
    loss_min: float
    x_min_se: float
    x_lo: float
    x_hi: float
    n: int
    resid_std: float
    flags: list[str] = field(default_factory=list)

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return self.a * x**2 + self.b * x + self.c

    @property
    def usable(self) -> bool:
        """Whether the minimum may enter the power law (no flag in EXCLUDING)."""
        return not EXCLUDING.intersection(self.flags)


def fit_parabola(x: Sequence[float], y: Sequence[float]) -> Parabola:
    """Least-squares parabola with its minimum, the minimum's delta-method se, and the shape flags."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n, nan = len(x), float("nan")
    lo, hi = (float(x.min()), float(x.max())) if n else (nan, nan)
    if np.unique(x).size < 3:
        return Parabola(nan, nan, nan, nan, nan, nan, lo, hi, n, nan, [TOO_FEW])
    xm = float(x.mean())  # centred for conditioning: x spans ~1 decade around log10 sizes of ~9-12
    t = x - xm
    design = np.stack([t**2, t, np.ones_like(t)], axis=1)
    (a, bt, ct), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ np.array([a, bt, ct])
    dof = n - 3
    s2 = float(resid @ resid) / dof if dof > 0 else nan
    cov = s2 * np.linalg.inv(design.T @ design)
    flags = [EXACT] if dof == 0 else []
    x_min = loss_min = se = nan
    if a <= 0:
        flags.append(DOWNWARD)
    else:
        x_min, loss_min = xm - bt / (2 * a), ct - bt**2 / (4 * a)
        grad = np.array([bt / (2 * a**2), -1 / (2 * a), 0.0])  # d x_min / d(a, bt, ct)
        se = float(math.sqrt(max(grad @ cov @ grad, 0.0))) if dof > 0 else nan
        if not lo <= x_min <= hi:
            flags.append(OUTSIDE)
        elif min(int((x < x_min).sum()), int((x > x_min).sum())) < (2 if n >= 5 else 1):
            flags.append(ONE_SIDED)
        if se > UNCERTAIN_FRACTION * (hi - lo):
            flags.append(UNCERTAIN)
    # Back from centred to raw x: a(x-m)² + bt(x-m) + ct.
    b, c = bt - 2 * a * xm, a * xm**2 - bt * xm + ct
    resid_std = math.sqrt(s2) if dof > 0 else nan
    return Parabola(float(a), float(b), float(c), float(x_min), float(loss_min), se, lo, hi, n, resid_std, flags)


@dataclass
class Budget:
    """One compute budget: its runs' IsoFLOPs parabolas in log10 tokens and log10 params."""

    compute: float
    runs: list[dict]
    tokens: Parabola
    params: Parabola

    def fit(self, axis: str) -> Parabola:
        """The parabola in log10 tokens or log10 params."""
        return self.tokens if axis == "tokens" else self.params


def fit_isoflops(runs: Sequence[dict], tol: float = 0.1, loss_noise: float | None = None) -> list[Budget]:
    """IsoFLOPs parabolas per budget, flagged; ``loss_noise`` (relative) floors the pooled residual noise estimate."""
    runs, budgets = check_runs(runs), []
    for group in group_budgets(runs, tol):
        loss = [r["loss"] for r in group]
        fits = {axis: fit_parabola(np.log10([r[axis] for r in group]), loss) for axis in AXES}
        budgets.append(Budget(_budget_compute(group), group, fits["tokens"], fits["params"]))
    noise = pooled_noise(budgets)
    if loss_noise is not None:
        noise = max(noise if math.isfinite(noise) else 0.0, loss_noise * float(np.median([r["loss"] for r in runs])))
    for budget in budgets:
        spread = float(np.ptp([r["loss"] for r in budget.runs]))
        for axis in AXES:
            fit = budget.fit(axis)
            if math.isfinite(noise) and fit.usable and spread < SHALLOW_FACTOR * noise:
                fit.flags.append(SHALLOW)
    return budgets


def pooled_noise(budgets: Sequence[Budget]) -> float:
    """Loss noise: the residual standard deviation pooled over every budget's tokens parabola (nan if none has dof)."""
    rss = dof = 0.0
    for budget in budgets:
        fit = budget.tokens
        if math.isfinite(fit.resid_std):
            rss += fit.resid_std**2 * (fit.n - 3)
            dof += fit.n - 3
    return math.sqrt(rss / dof) if dof else float("nan")


def _flag_message(flag: str, fit: Parabola, budget: Budget) -> str:
    """What a flag means for this budget, and what to do about it."""
    width = fit.x_hi - fit.x_lo
    spread = float(np.ptp([r["loss"] for r in budget.runs]))
    return {
        TOO_FEW: f"{fit.n} runs, {TOO_FEW}: a parabola needs 3 distinct sizes, no optimum",
        EXACT: f"3 runs, {EXACT}: the parabola passes through them exactly, no uncertainty on its minimum",
        DOWNWARD: f"{DOWNWARD} (a={fit.a:.3g} <= 0): no minimum; noisy or unconverged runs, or a grid too wide",
        OUTSIDE: f"{OUTSIDE}: 10^{fit.x_min:.2f} lies outside the sampled 10^[{fit.x_lo:.2f}, {fit.x_hi:.2f}]; "
        "the grid is off-centre, extend it towards the minimum",
        ONE_SIDED: f"{ONE_SIDED}: under {2 if fit.n >= 5 else 1} run(s) on one side of the minimum 10^{fit.x_min:.2f}; "
        "grid off-centre",
        SHALLOW: f"{SHALLOW}: the loss varies by {spread:.3g} across the grid, under {SHALLOW_FACTOR:g}x the noise; "
        "widen the grid",
        UNCERTAIN: f"{UNCERTAIN}: se {fit.x_min_se:.2f} decades exceeds {UNCERTAIN_FRACTION:g} of the grid's "
        f"{width:.2f}",
    }[flag]


def budget_warnings(budgets: Sequence[Budget], exclude: Collection[str] = EXCLUDING) -> list[str]:
    """One line per flag of every budget's fits, saying when the budget is left out of the power law."""
    lines = []
    for budget in budgets:
        for axis in AXES:
            fit = budget.fit(axis)
            dropped = bool(set(exclude).intersection(fit.flags))
            for flag in fit.flags:
                tail = "; excluded from the power law" if dropped and flag in exclude else ""
                where = f"budget {budget.compute:.3g} FLOPs, loss vs {axis}"
                lines.append(f"{where}: {_flag_message(flag, fit, budget)}{tail}")
    return lines


# ---- power laws -----------------------------------------------------------------------------------------------------


@dataclass
class PowerLaw:
    """y = A·C^alpha, fitted as log10 y = log10_A + alpha·log10 C."""

    alpha: float
    log10_A: float
    alpha_se: float
    log10_A_se: float
    n_points: int
    weighted: bool

    @property
    def A(self) -> float:
        """The coefficient, 10^log10_A."""
        return 10.0**self.log10_A

    def predict(self, compute: float | np.ndarray) -> np.ndarray:
        """y at the given compute(s)."""
        return 10.0 ** (self.log10_A + self.alpha * np.log10(np.asarray(compute, dtype=float)))


def _weights(se: np.ndarray | None) -> np.ndarray | None:
    """1/se² with se floored at half the median: a budget whose few runs fit by luck must not dominate."""
    if se is None or not np.all(np.isfinite(se)) or np.any(se <= 0):
        return None
    return 1.0 / np.maximum(se, 0.5 * np.median(se)) ** 2


def fit_power_law(compute: Sequence[float], y: Sequence[float], log10_se: Sequence[float] | None = None) -> PowerLaw:
    """Weighted (by 1/se² of log10 y, when every se is known) least-squares line in log-log; se scaled by the fit."""
    x, ly = np.log10(np.asarray(compute, dtype=float)), np.log10(np.asarray(y, dtype=float))
    w = _weights(None if log10_se is None else np.asarray(log10_se, dtype=float))
    if len(x) < 2:
        raise ValueError(f"a power law needs 2 budgets with a minimum, got {len(x)}")
    ww = np.ones_like(x) if w is None else w
    design = np.stack([np.ones_like(x), x], axis=1)
    gram = design.T @ (ww[:, None] * design)
    log10_a, alpha = np.linalg.solve(gram, design.T @ (ww * ly))
    resid = ly - design @ np.array([log10_a, alpha])
    dof = len(x) - 2
    # Scale by the reduced chi², as np.polyfit(cov=True): the per-budget se's are estimates from a few runs each.
    cov = np.linalg.inv(gram) * (float(ww @ resid**2) / dof if dof else float("nan"))
    se_alpha, se_a = float(np.sqrt(cov[1, 1])), float(np.sqrt(cov[0, 0]))
    return PowerLaw(float(alpha), float(log10_a), se_alpha, se_a, len(x), w is not None)


def _lines_batch(x: np.ndarray, ys: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and intercepts of weighted lines y = i + s·x through every row of ys [B, k]."""
    w = np.ones_like(x) if w is None else w
    xw = (w * x).sum() / w.sum()
    yw = ys @ w / w.sum()
    slope = ((ys - yw[:, None]) * (w * (x - xw))).sum(axis=1) / (w * (x - xw) ** 2).sum()
    return slope, yw - slope * xw


# ---- bootstrap ------------------------------------------------------------------------------------------------------


def _vertices_batch(x: np.ndarray, ys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minima (x*, loss*) of parabolas fitted to resampled losses ys[B, n], run i weighted counts[B, i]; nan: none."""
    xm = x.mean()
    t = x - xm
    m = counts @ np.stack([t**4, t**3, t**2, t, np.ones_like(t)]).T  # weighted moments, the normal equations
    rhs = (counts * ys) @ np.stack([t**2, t, np.ones_like(t)]).T
    gram = np.stack([m[:, [0, 1, 2]], m[:, [1, 2, 3]], m[:, [2, 3, 4]]], axis=1)
    # A resample with under 3 distinct sizes has no parabola: give it a harmless system and drop it after.
    distinct = (counts @ (x[:, None] == np.unique(x)[None, :])) > 0
    ok = distinct.sum(axis=1) >= 3
    gram[~ok] = np.eye(3)
    a, bt, ct = np.linalg.solve(gram, rhs[..., None])[..., 0].T
    ok &= a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        x_min = np.where(ok, xm - bt / (2 * a), np.nan)
        loss_min = np.where(ok & (ct - bt**2 / (4 * a) > 0), ct - bt**2 / (4 * a), np.nan)
    return x_min, loss_min


BOOTSTRAP_METHODS = ("residuals", "pairs")


def _pooled_relative_residuals(budgets: Sequence[Budget], axis: str) -> np.ndarray:
    """Every budget's parabola residuals relative to the fit, inflated by sqrt(n/(n-3)) for the fitted parameters;
    empty when no budget has more runs than parameters."""
    pool = [np.zeros(0)]
    for budget in budgets:
        fit, n = budget.fit(axis), len(budget.runs)
        if math.isfinite(fit.a) and n > 3:
            fitted = fit(np.log10([r[axis] for r in budget.runs]))
            pool.append((np.array([r["loss"] for r in budget.runs]) / fitted - 1.0) * math.sqrt(n / (n - 3)))
    return np.concatenate(pool)


def bootstrap_optima(
    budgets: Sequence[Budget], n_boot: int, rng: np.random.Generator, method: str = "residuals"
) -> dict[str, np.ndarray]:
    """Per resample [n_boot, budget]: log10 D*, log10 N* and the losses there (nan: no minimum).

    "pairs" resamples a budget's runs with replacement; with 5-7 runs a budget, many resamples keep 3 or 4 distinct
    sizes whose parabola swings wildly, and the intervals come out about 3x too wide (99.5% coverage for a nominal
    95% on synthetic runs with 0.5% noise). "residuals" (the default) keeps every size and puts on each parabola's
    fitted losses relative residuals drawn from all budgets' pooled (noise is multiplicative and alike across
    budgets; a budget's own 4 degrees of freedom would make the noise estimate itself noisy): about 97% (a little wide).
    Either refits every budget in every resample.
    """
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap method {method!r}; expected one of {BOOTSTRAP_METHODS}")
    out = {k: np.full((n_boot, len(budgets)), np.nan) for k in ("tokens", "params", "tokens_loss", "params_loss")}
    pools = {axis: _pooled_relative_residuals(budgets, axis) for axis in AXES}
    for j, budget in enumerate(budgets):
        n = len(budget.runs)
        if n < 3:
            continue
        loss = np.array([r["loss"] for r in budget.runs])
        uniform = rng.random((n_boot, n))  # the same draws for both axes: one refit of everything per resample
        for axis in AXES:
            x = np.log10([r[axis] for r in budget.runs])
            fit = budget.fit(axis)
            if method == "pairs":
                counts = np.stack([np.bincount(row, minlength=n) for row in (uniform * n).astype(int)]).astype(float)
                ys = np.broadcast_to(loss, (n_boot, n))
            elif math.isfinite(fit.a) and len(pools[axis]):  # no residuals (all fits exact): no interval
                counts = np.ones((n_boot, n))
                ys = fit(x)[None, :] * (1.0 + pools[axis][(uniform * len(pools[axis])).astype(int)])
            else:
                continue
            out[axis][:, j], out[f"{axis}_loss"][:, j] = _vertices_batch(x, ys, counts)
    return out


def _interval(samples: np.ndarray, ci: float) -> list[float]:
    samples = samples[np.isfinite(samples)]
    if not samples.size:
        return [float("nan"), float("nan")]
    return [float(v) for v in np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])]


# ---- Chinchilla's approach 3 ----------------------------------------------------------------------------------------


@dataclass
class ParametricFit:
    """L(N, D) = E + A/N^a + B/D^b, with k = C/(N·D) to turn a compute budget into an optimal N, D."""

    E: float
    A: float
    B: float
    a: float
    b: float
    k: float = 6.0
    objective: float = float("nan")
    n_starts: int = 0

    def loss(self, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
        """The surface's loss at N params and D tokens."""
        n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E + self.A / n**self.a + self.B / d**self.b

    @property
    def alpha_tokens(self) -> float:
        """Exponent of the optimal tokens, D* ∝ C^(a/(a+b))."""
        return self.a / (self.a + self.b)

    @property
    def alpha_params(self) -> float:
        """Exponent of the optimal params, N* ∝ C^(b/(a+b))."""
        return self.b / (self.a + self.b)

    def optimum(self, compute: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N*, D*, L*) minimising L on N·D = C/k: there a·A/N^a = b·B/D^b."""
        nd = np.asarray(compute, dtype=float) / self.k
        g = (self.a * self.A / (self.b * self.B)) ** (1.0 / (self.a + self.b))
        n_opt = g * nd ** (self.b / (self.a + self.b))
        d_opt = nd / n_opt
        return n_opt, d_opt, self.loss(n_opt, d_opt)

    def law(self, axis: str) -> tuple[float, float]:
        """(A, alpha) of its compute-optimal tokens or params: y*(C) = A·C^alpha."""
        n1, d1, _ = self.optimum(1.0)
        return (float(d1), self.alpha_tokens) if axis == "tokens" else (float(n1), self.alpha_params)


def _huber_objective(
    theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor, delta: float
) -> torch.Tensor:
    """Mean Huber loss of log L for each row of theta = (log A, log B, log E, a, b), in units of delta."""
    terms = torch.stack(
        [
            theta[:, 0:1] - theta[:, 3:4] * log_n,
            theta[:, 1:2] - theta[:, 4:5] * log_d,
            theta[:, 2:3].expand(-1, log_n.numel()),
        ]
    )
    resid = torch.logsumexp(terms, dim=0) - log_l
    huber = torch.nn.functional.huber_loss(resid, torch.zeros_like(resid), delta=delta, reduction="none")
    return huber.mean(dim=1) / delta


def _lbfgs(theta0: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], max_iter: int) -> torch.Tensor:
    """L-BFGS (strong Wolfe) from theta0 [1, p]; tolerances tiny because a noise-free objective ends near 0."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(theta)[0]
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


def fit_parametric(runs: Sequence[dict], delta: float = 1e-3, n_starts: int = 5, max_iter: int = 300) -> ParametricFit:
    """Chinchilla's approach 3: Huber on log L over all runs, L-BFGS from the best n_starts points of a start grid."""
    runs = check_runs(runs)
    log_n, log_d, log_l = (
        torch.tensor(np.log([r[k] for r in runs]), dtype=torch.float64) for k in ("params", "tokens", "loss")
    )

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return _huber_objective(theta, log_n, log_d, log_l, delta)

    # Chinchilla's grid of initialisations (log A, log B, log E, a, b), coarser; scored in one batched evaluation.
    exps = (0.1, 0.3, 0.6, 1.0)
    grid = torch.tensor(
        list(itertools.product(range(0, 30, 5), range(0, 30, 5), (-1.0, -0.5, 0.0, 0.5, 1.0), exps, exps)),
        dtype=torch.float64,
    )
    with torch.no_grad():
        starts = grid[torch.argsort(objective(grid))[:n_starts]]
    best, best_value = starts[0], math.inf
    for start in starts:
        theta = _lbfgs(start[None], objective, max_iter)
        value = float(objective(theta)[0])
        if math.isfinite(value) and value < best_value:
            best, best_value = theta[0], value
    log_a, log_b, log_e, a, b = best.tolist()
    k = float(np.median([r["compute"] / (r["params"] * r["tokens"]) for r in runs]))
    return ParametricFit(math.exp(log_e), math.exp(log_a), math.exp(log_b), a, b, k, best_value * delta, n_starts)


# ---- downstream -----------------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


@dataclass
class DownstreamFit:
    """Task NLL of the compute-optimal model linear in log10 C, then accuracy a sigmoid of that NLL."""

    nll_intercept: float
    nll_slope: float
    nll_slope_se: float
    lo: float
    hi: float
    k: float
    nll0: float
    n_budgets: int
    n_runs: int
    acc_rmse: float

    def predict_nll(self, compute: float | np.ndarray) -> np.ndarray:
        """Step 1: the compute-optimal model's task NLL at this compute."""
        return self.nll_intercept + self.nll_slope * np.log10(np.asarray(compute, dtype=float))

    def accuracy_from_nll(self, nll: float | np.ndarray) -> np.ndarray:
        """Step 2: accuracy = lo + (hi - lo)·σ(k·(nll0 - nll))."""
        return self.lo + (self.hi - self.lo) * _sigmoid(self.k * (self.nll0 - np.asarray(nll, dtype=float)))

    def predict_accuracy(self, compute: float | np.ndarray) -> np.ndarray:
        """Both steps: accuracy of the compute-optimal model at this compute."""
        return self.accuracy_from_nll(self.predict_nll(compute))


def predict_accuracy(fit: DownstreamFit | dict, compute: float | np.ndarray) -> np.ndarray:
    """Accuracy at a compute from a DownstreamFit or the ``downstream`` dict of fit_all's result."""
    if isinstance(fit, dict):
        fit = DownstreamFit(**{f: fit[f] for f in DownstreamFit.__dataclass_fields__})
    return fit.predict_accuracy(compute)


def _levenberg_marquardt(
    resid: Callable[[np.ndarray], np.ndarray], p0: Sequence[float], iters: int = 300
) -> tuple[np.ndarray, float]:
    """Minimise |resid(p)|² (Levenberg-Marquardt, forward-difference Jacobian); returns (p, cost)."""
    p = np.asarray(p0, dtype=float)
    r = resid(p)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        h = 1e-7 * np.maximum(np.abs(p), 1.0)
        jac = np.stack([(resid(p + h[i] * np.eye(len(p))[i]) - r) / h[i] for i in range(len(p))], axis=1)
        grad, hess = jac.T @ r, jac.T @ jac
        new = math.inf
        while lam < 1e12:
            step = np.linalg.solve(hess + lam * np.diag(np.diag(hess) + 1e-12), -grad)
            r_new = resid(p + step)
            new = float(r_new @ r_new)
            if math.isfinite(new) and new < cost:
                break
            lam *= 10
        if not new < cost:
            break
        p, r, gain, cost = p + step, r_new, cost - new, new
        lam = max(lam / 10, 1e-12)
        if gain <= 1e-12 * cost + 1e-30:
            break
    return p, cost


def fit_sigmoid(
    nll: Sequence[float], acc: Sequence[float], lo: float | None = None, hi: float | None = None
) -> tuple[float, float, float, float, float]:
    """(lo, hi, k, nll0, rmse) of acc = lo + (hi - lo)·σ(k·(nll0 - nll)); lo/hi given are held fixed."""
    nll, acc = np.asarray(nll, dtype=float), np.asarray(acc, dtype=float)
    free = [name for name, value in (("lo", lo), ("hi", hi)) if value is None]
    fixed = {"lo": lo, "hi": hi}

    def unpack(p: np.ndarray) -> tuple[float, float, float, float]:
        values = {**fixed, **dict(zip(free + ["k", "nll0"], p, strict=True))}
        return values["lo"], values["hi"], values["k"], values["nll0"]

    def resid(p: np.ndarray) -> np.ndarray:
        low, high, k, nll0 = unpack(p)
        return low + (high - low) * _sigmoid(k * (nll0 - nll)) - acc

    spread = max(float(np.ptp(nll)), 1e-6)
    best, best_cost = None, math.inf
    for k0 in (2.0, 8.0, 32.0):  # the steepness is the ill-conditioned parameter: several starts
        starts = {"lo": float(acc.min()), "hi": float(acc.max())}
        p0 = [starts[name] for name in free] + [k0 / spread, float(np.median(nll))]
        p, cost = _levenberg_marquardt(resid, p0)
        if cost < best_cost:
            best, best_cost = p, cost
    return (*unpack(best), math.sqrt(best_cost / len(acc)))


def value_at_optimum(budget: Budget, key: str) -> float:
    """A task metric of the budget's compute-optimal model: quadratic in log10 tokens, read at the loss's minimum."""
    rows = [r for r in budget.runs if math.isfinite(r.get(key, math.nan))]
    if not rows:
        return float("nan")
    x = np.log10([r["tokens"] for r in rows])
    v = np.array([r[key] for r in rows])
    fit = budget.tokens
    if not math.isfinite(fit.x_min):  # no minimum: the lowest-loss run stands for the optimum
        return float(v[int(np.argmin([r["loss"] for r in rows]))])
    if np.unique(x).size < 3:
        return float(v[int(np.argmin(np.abs(x - fit.x_min)))])
    return float(np.polyval(np.polyfit(x, v, 2), np.clip(fit.x_min, x.min(), x.max())))


def fit_downstream(
    budgets: Sequence[Budget],
    chance: float | None = None,
    ceiling: float | None = None,
    exclude: Collection[str] = EXCLUDING,
) -> DownstreamFit | None:
    """The paper's two steps on runs with task_nll and task_acc; None when they are missing (or under 2 budgets)."""
    usable = [b for b in budgets if not set(exclude).intersection(b.tokens.flags)]
    points = [(b.compute, value_at_optimum(b, "task_nll")) for b in usable]
    points = [(c, v) for c, v in points if math.isfinite(v)]
    pairs = [(r["task_nll"], r["task_acc"]) for b in budgets for r in b.runs if "task_nll" in r and "task_acc" in r]
    n_free = 2 + (chance is None) + (ceiling is None)
    if len(points) < 2 or len(pairs) <= n_free:
        return None
    x, y = np.log10([c for c, _ in points]), np.array([v for _, v in points])
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - 2
    s2 = float(((y - design @ coef) ** 2).sum()) / dof if dof else float("nan")
    slope_se = math.sqrt(s2 * np.linalg.inv(design.T @ design)[1, 1]) if dof else float("nan")
    lo, hi, k, nll0, rmse = fit_sigmoid([p[0] for p in pairs], [p[1] for p in pairs], chance, ceiling)
    return DownstreamFit(float(coef[0]), float(coef[1]), slope_se, lo, hi, k, nll0, len(points), len(pairs), rmse)


# ---- the power laws through the IsoFLOPs optima --------------------------------------------------------------------


@dataclass
class IsoFLOPsFit:
    """The budgets, and power laws through their optima: "tokens", "params", and "loss": L* - irreducible against C."""

    budgets: list[Budget]
    laws: dict[str, PowerLaw]
    used: dict[str, list[int]]
    warnings: list[str]
    irreducible: float = 0.0

    def predict(self, name: str, compute: float | np.ndarray) -> np.ndarray:
        """D*, N* or L* at the given compute(s)."""
        return self.laws[name].predict(compute) + (self.irreducible if name == "loss" else 0.0)

    def predict_draws(self, name: str, boot: dict, compute: float | np.ndarray) -> np.ndarray:
        """The bootstrap's predictions [n_valid, len(compute)] of D*, N* or L*."""
        logs = boot[name]["intercept"][:, None] + boot[name]["slope"][:, None] * np.log10(np.atleast_1d(compute))
        return 10**logs + (self.irreducible if name == "loss" else 0.0)


def fit_compute_optimal(
    runs: Sequence[dict],
    tol: float = 0.1,
    loss_noise: float | None = None,
    exclude: Collection[str] = EXCLUDING,
    irreducible: float = 0.0,
) -> IsoFLOPsFit:
    """IsoFLOPs parabolas per budget, then D*, N* and L* power laws through the budgets not flagged in ``exclude``.

    The best loss follows L*(C) = irreducible + K·C^-gamma: a pure power law (irreducible 0) bends away from the
    optima as the loss nears its floor and under-predicts on extrapolation (by 4% one decade out on the tests'
    surface); fit_all passes the parametric surface's E.
    """
    budgets = fit_isoflops(runs, tol, loss_noise)
    warnings = budget_warnings(budgets, exclude)
    laws: dict[str, PowerLaw] = {}
    used: dict[str, list[int]] = {}
    for axis in AXES:
        used[axis] = [j for j, b in enumerate(budgets) if not set(exclude).intersection(b.fit(axis).flags)]
        fits = [budgets[j].fit(axis) for j in used[axis]]
        if len(fits) < 2:
            warnings.append(f"loss vs {axis}: {len(fits)} budget(s) with a usable minimum, no power law")
            continue
        compute = [budgets[j].compute for j in used[axis]]
        laws[axis] = fit_power_law(compute, [10**f.x_min for f in fits], [f.x_min_se for f in fits])
        if axis == "tokens":
            best = np.array([f.loss_min for f in fits])
            if irreducible and np.any(best <= irreducible):
                warnings.append(
                    f"loss law: a budget's best loss is below the irreducible {irreducible:.4g}; pure power law"
                )
                irreducible = 0.0
            laws["loss"] = fit_power_law(compute, best - irreducible)
    return IsoFLOPsFit(budgets, laws, used, warnings, irreducible)


def bootstrap_laws(fit: IsoFLOPsFit, n_boot: int = 1000, seed: int = 0, method: str = "residuals") -> dict[str, dict]:
    """Per law: bootstrap slopes and intercepts (runs resampled within budgets, all refitted), and the optima drawn."""
    draws = bootstrap_optima(fit.budgets, n_boot, np.random.default_rng(seed), method)
    out: dict[str, dict] = {"draws": draws}
    for name in fit.laws:
        axis = "tokens" if name == "loss" else name
        idx = fit.used[axis]
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample's best loss under the floor: nan, dropped
            ys = np.log10(draws["tokens_loss"][:, idx] - fit.irreducible) if name == "loss" else draws[axis][:, idx]
        # A resample where some budget lost its minimum has no law: drop it (the interval is conditional on it).
        ok = np.all(np.isfinite(ys), axis=1)
        se = None if name == "loss" else np.array([fit.budgets[j].fit(axis).x_min_se for j in idx])
        x = np.log10([fit.budgets[j].compute for j in idx])
        slope, intercept = _lines_batch(x, ys[ok], _weights(se))
        out[name] = {"slope": slope, "intercept": intercept, "valid": float(ok.mean())}
    return out


# ---- synthetic runs -------------------------------------------------------------------------------------------------


def synthetic_runs(
    surface: ParametricFit,
    budgets: Sequence[float],
    n_sizes: int = 7,
    span: float = 0.6,
    shift: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """Runs on a known loss surface: per budget, n_sizes params log-spaced over ±span decades around N*(C) moved by
    ``shift`` decades, tokens C/(k·N), loss times (1 + noise·normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for compute in budgets:
        n_opt, _, _ = surface.optimum(compute)
        for u in np.linspace(-span, span, n_sizes) + shift:
            params = float(n_opt) * 10.0**u
            tokens = compute / (surface.k * params)
            loss = float(surface.loss(params, tokens)) * (1.0 + noise * rng.standard_normal())
            runs.append({"compute": float(compute), "params": params, "tokens": tokens, "loss": loss})
    return runs


# ---- fit on the smaller budgets, predict the largest ----------------------------------------------------------------


def _optimum_record(budget: Budget) -> dict[str, float]:
    return {
        "tokens": 10**budget.tokens.x_min,
        "params": 10**budget.params.x_min,
        "loss": budget.tokens.loss_min,
        "task_nll": value_at_optimum(budget, "task_nll"),
        "task_acc": value_at_optimum(budget, "task_acc"),
    }


def holdout_largest(
    runs: Sequence[dict],
    tol: float = 0.1,
    *,
    chance: float | None = None,
    ceiling: float | None = None,
    parametric: bool = True,
    exclude: Collection[str] = EXCLUDING,
) -> dict:
    """Fit every budget but the largest and predict the largest's optimum, best loss and task metrics; with the
    largest's own IsoFLOPs measurements and predicted/measured ratios."""
    groups = group_budgets(check_runs(runs), tol)
    if len(groups) < 3:
        raise ValueError(f"holding out the largest budget needs 3 budgets, got {len(groups)}")
    smaller = [r for g in groups[:-1] for r in g]
    target = fit_isoflops(groups[-1], tol)[0]
    predicted = {}
    surface = fit_parametric(smaller) if parametric else None
    if surface is not None:
        n_opt, d_opt, l_opt = surface.optimum(target.compute)
        predicted.update(parametric_params=float(n_opt), parametric_tokens=float(d_opt), parametric_loss=float(l_opt))
    fit = fit_compute_optimal(smaller, tol, exclude=exclude, irreducible=surface.E if surface is not None else 0.0)
    predicted.update({name: float(fit.predict(name, target.compute)) for name in fit.laws})
    down = fit_downstream(fit.budgets, chance, ceiling, exclude)
    if down is not None:
        predicted.update(
            task_nll=float(down.predict_nll(target.compute)), task_acc=float(down.predict_accuracy(target.compute))
        )
    measured = _optimum_record(target)
    ratio = {}
    for name, value in predicted.items():
        key = name.removeprefix("parametric_")
        if math.isfinite(measured.get(key, math.nan)):
            ratio[name] = value / measured[key]
    warnings = fit.warnings + budget_warnings([target], exclude)
    return {
        "compute": target.compute,
        "fit_budgets": [b.compute for b in fit.budgets],
        "predicted": predicted,
        "measured": measured,
        "ratio": ratio,
        "warnings": warnings,
    }


# ---- plots ----------------------------------------------------------------------------------------------------------


def _pyplot():  # noqa: ANN202 - matplotlib only when plotting, on the file backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_isoflops(budgets: Sequence[Budget], path: str) -> str:
    """Loss against tokens and params per budget: runs, fitted parabolas, minima starred (flagged: dashed, x)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(budgets), 1)))
    for ax, axis in zip(axes, AXES, strict=True):
        for budget, color in zip(budgets, colors, strict=False):
            fit = budget.fit(axis)
            ax.scatter(
                [r[axis] for r in budget.runs],
                [r["loss"] for r in budget.runs],
                color=color,
                s=16,
                label=f"{budget.compute:.2g}" + ("" if fit.usable else " (flagged)"),
            )
            if math.isfinite(fit.a):
                pad = 0.15 * (fit.x_hi - fit.x_lo)
                xs = np.linspace(fit.x_lo - pad, fit.x_hi + pad, 100)
                ax.plot(10**xs, fit(xs), color=color, ls="-" if fit.usable else "--", lw=1.2)
            if math.isfinite(fit.x_min):
                marker = dict(marker="*", s=140, edgecolors="k") if fit.usable else dict(marker="x", s=80)
                ax.scatter([10**fit.x_min], [fit.loss_min], color=color, zorder=3, **marker)
        ax.set_xscale("log")
        ax.set_xlabel(f"training {axis}" if axis == "tokens" else "parameters")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(title="budget (FLOPs)", fontsize=7)
    fig.suptitle("IsoFLOPs: parabolas in log size, minima starred (dashed, x: flagged, not in the power law)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _optimum_points(ax, fit: IsoFLOPsFit, axis: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    """The budgets' optima with ±se bars; open markers for budgets left out of the law."""
    for j, budget in enumerate(fit.budgets):
        opt = budget.fit(axis)
        if not math.isfinite(opt.x_min):
            continue
        se = opt.x_min_se if math.isfinite(opt.x_min_se) else 0.0
        y = 10**opt.x_min
        face = "C0" if j in fit.used[axis] else "none"
        ax.errorbar([budget.compute], [y], yerr=[[y - y / 10**se], [y * 10**se - y]], fmt="o", color="C0", mfc=face)


def plot_power_law(
    fit: IsoFLOPsFit,
    boot: dict,
    surface: ParametricFit | None,
    targets: Sequence[float],
    path: str,
    ci: float = 0.95,
) -> str:
    """Optimal tokens, params and best loss against compute: optima, laws, bootstrap band, parametric and paper."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    computes = [b.compute for b in fit.budgets]
    grid = np.logspace(np.log10(min(computes) / 2), np.log10(max([*computes, *targets]) * 2), 200)
    for ax, name in zip(axes, ("tokens", "params", "loss"), strict=True):
        if name == "loss":
            used = fit.used["tokens"]
            ax.scatter([computes[j] for j in used], [fit.budgets[j].tokens.loss_min for j in used], color="C0")
        else:
            _optimum_points(ax, fit, name)
        if name in fit.laws:
            law = fit.laws[name]
            floor = f"{fit.irreducible:.3g} + " if name == "loss" and fit.irreducible else ""
            ax.plot(grid, fit.predict(name, grid), color="C0", label=f"IsoFLOPs: {floor}{law.A:.3g}·C^{law.alpha:.3f}")
            if len(boot[name]["slope"]):
                band = np.quantile(fit.predict_draws(name, boot, grid), [(1 - ci) / 2, (1 + ci) / 2], axis=0)
                ax.fill_between(grid, *band, color="C0", alpha=0.2, label=f"{ci:.0%} bootstrap")
        if surface is not None:
            n_opt, d_opt, l_opt = surface.optimum(grid)
            alpha = {"tokens": surface.alpha_tokens, "params": surface.alpha_params}.get(name)
            label = "parametric L(N, D) optimum" + (f": C^{alpha:.3f}" if alpha is not None else "")
            ax.plot(grid, {"tokens": d_opt, "params": n_opt, "loss": l_opt}[name], "--", color="C1", label=label)
        if name == "tokens":
            ax.plot(grid, PAPER_A * grid**PAPER_ALPHA, ":", color="k", label=f"paper: {PAPER_A}·C^{PAPER_ALPHA}")
        for target in targets:
            ax.axvline(target, color="gray", lw=0.8, ls="-.")
        ax.set_xscale("log")
        ax.set_yscale("linear" if name == "loss" else "log")
        ax.set_xlabel("compute (FLOPs)")
        ax.set_ylabel({"tokens": "optimal training tokens", "params": "optimal parameters", "loss": "best loss"}[name])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal models (open markers: budgets left out of the law; dash-dot: prediction targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_downstream(fit: IsoFLOPsFit, down: DownstreamFit, targets: Sequence[float], path: str) -> str:
    """The two steps: task NLL against compute (runs, optima, the line) and accuracy against NLL (the sigmoid)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = [r for b in fit.budgets for r in b.runs if "task_nll" in r]
    left.scatter([r["compute"] for r in runs], [r["task_nll"] for r in runs], color="0.6", s=10, label="runs")
    optima = [(b.compute, value_at_optimum(b, "task_nll")) for b in fit.budgets]
    left.scatter(*zip(*optima, strict=True), color="C0", s=30, zorder=3, label="compute-optimal (at x*)")
    grid = np.logspace(np.log10(min(c for c, _ in optima) / 2), np.log10(max([*targets, optima[-1][0]]) * 2), 100)
    left.plot(grid, down.predict_nll(grid), color="C0", label=f"{down.nll_intercept:.3g} {down.nll_slope:+.3g}·log10 C")
    pairs = [(r["task_nll"], r["task_acc"]) for r in runs if "task_acc" in r]
    right.scatter(*zip(*pairs, strict=True), color="0.6", s=10, label="runs")
    nlls = np.linspace(
        min(float(down.predict_nll(grid).min()), min(p[0] for p in pairs)), max(p[0] for p in pairs), 200
    )
    right.plot(
        nlls,
        down.accuracy_from_nll(nlls),
        color="C1",
        label=f"{down.lo:.2f} + {down.hi - down.lo:.2f}·σ({down.k:.3g}·({down.nll0:.3g} - nll))",
    )
    for target in targets:
        nll = float(down.predict_nll(target))
        left.scatter([target], [nll], marker="*", s=150, color="C3", zorder=4, label=f"predicted at {target:.2g}")
        right.scatter(
            [nll],
            [down.accuracy_from_nll(nll)],
            marker="*",
            s=150,
            color="C3",
            zorder=4,
            label=f"predicted at {target:.2g}: {float(down.predict_accuracy(target)):.3f}",
        )
    left.set_xscale("log")
    left.set_xlabel("compute (FLOPs)")
    left.set_ylabel("task NLL of the correct answer")
    right.set_xlabel("task NLL of the correct answer")
    right.set_ylabel("task accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Downstream: NLL linear in log compute, then accuracy a sigmoid of NLL")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- everything, as fit.json ----------------------------------------------------------------------------------------


def _jsonable(value: object) -> object:
    """Plain JSON types; nan and inf become null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _law_json(law: PowerLaw, boot: dict | None, ci: float, irreducible: float | None = None) -> dict:
    out = {**asdict(law), "A": law.A}
    if irreducible is not None:  # the loss law: L* = irreducible + A·C^alpha
        out["irreducible"] = irreducible
    if boot is not None:
        log10_a_ci = _interval(boot["intercept"], ci)
        out.update(
            alpha_ci=_interval(boot["slope"], ci),
            log10_A_ci=log10_a_ci,
            A_ci=[10**v for v in log10_a_ci],
            bootstrap_valid=boot["valid"],
        )
    return out


def _budget_json(j: int, fit: IsoFLOPsFit, boot: dict, ci: float) -> dict:
    budget = fit.budgets[j]
    out = {
        "compute": budget.compute,
        "n_runs": len(budget.runs),
        "task_nll_at_optimum": value_at_optimum(budget, "task_nll"),
        "task_acc_at_optimum": value_at_optimum(budget, "task_acc"),
    }
    for axis in AXES:
        x_ci = _interval(boot["draws"][axis][:, j], ci)
        out[axis] = {
            **asdict(budget.fit(axis)),
            "used": j in fit.used[axis],
            "x_min_ci": x_ci,
            "optimum": 10 ** budget.fit(axis).x_min,
            "optimum_ci": [10**v for v in x_ci],
        }
    return out


def _prediction_json(
    target: float, fit: IsoFLOPsFit, boot: dict, surface: ParametricFit | None, down: DownstreamFit | None, ci: float
) -> dict:
    out: dict = {"compute": target, "paper_tokens": PAPER_A * target**PAPER_ALPHA}
    for name in fit.laws:
        draws = fit.predict_draws(name, boot, target)[:, 0]
        out[name] = {"value": float(fit.predict(name, target)[()]), "ci": _interval(draws, ci)}
    if surface is not None:
        n_opt, d_opt, l_opt = surface.optimum(target)
        out["parametric"] = {"params": float(n_opt), "tokens": float(d_opt), "loss": float(l_opt)}
    if down is not None:
        out["task_nll"] = float(down.predict_nll(target))
        out["task_acc"] = float(down.predict_accuracy(target))
    return out


def cross_check(fit: IsoFLOPsFit, boot: dict, surface: ParametricFit | None, ci: float) -> tuple[dict, list[str]]:
    """IsoFLOPs exponents next to the parametric surface's; a warning where it leaves the bootstrap interval."""
    out, warnings = {}, []
    for axis in AXES:
        if axis not in fit.laws or surface is None:
            continue
        iso = fit.laws[axis].alpha
        lo, hi = _interval(boot[axis]["slope"], ci)
        param = surface.alpha_tokens if axis == "tokens" else surface.alpha_params
        inside = bool(lo <= param <= hi) if math.isfinite(lo) else None  # no interval, no verdict
        out[axis] = {
            "isoflops_alpha": iso,
            "isoflops_alpha_ci": [lo, hi],
            "parametric_alpha": param,
            "difference": param - iso,
            "parametric_inside_ci": inside,
        }
        if inside is False:
            warnings.append(
                f"cross-check, {axis}: the parametric surface's exponent {param:.3f} lies outside the "
                f"IsoFLOPs {ci:.0%} interval [{lo:.3f}, {hi:.3f}] (IsoFLOPs alpha {iso:.3f})"
            )
    return out, warnings


def _parametric_json(surface: ParametricFit | None) -> dict | None:
    if surface is None:
        return None
    laws = {axis: dict(zip(("A", "alpha"), surface.law(axis), strict=True)) for axis in AXES}
    return {**asdict(surface), "alpha_tokens": surface.alpha_tokens, "alpha_params": surface.alpha_params, "laws": laws}


def fit_all(
    runs: Sequence[dict],
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    tol: float = 0.1,
    n_boot: int = 1000,
    bootstrap: str = "residuals",
    targets: Sequence[float] = (PAPER_TARGET_FLOPS,),
    ci: float = 0.95,
    loss_noise: float | None = None,
    chance: float | None = None,
    ceiling: float | None = None,
    exclude: Collection[str] = EXCLUDING,
    parametric: bool = True,
    plots: bool = True,
) -> dict:
    """Every fit with its interval and the warnings; writes fit.json (and the plots) into out_dir and returns it."""
    runs = check_runs(runs)
    surface = fit_parametric(runs) if parametric and len(runs) > 5 else None
    fit = fit_compute_optimal(runs, tol, loss_noise, exclude, surface.E if surface is not None else 0.0)
    boot = bootstrap_laws(fit, n_boot, seed, bootstrap)
    down = fit_downstream(fit.budgets, chance, ceiling, exclude)
    warnings = list(fit.warnings)
    for name in fit.laws:
        if boot[name]["valid"] == 0:
            warnings.append(
                f"bootstrap, {name}: no interval (no resample kept every budget's minimum, or no budget "
                "has more runs than the parabola's 3 parameters)"
            )
        elif boot[name]["valid"] < 0.9:
            warnings.append(
                f"bootstrap, {name}: {1 - boot[name]['valid']:.0%} of resamples left a budget without "
                "a minimum; the interval counts only the rest"
            )
    checked, extra = cross_check(fit, boot, surface, ci)
    warnings += extra
    if down is None:
        warnings.append("downstream: no fit (needs task_nll and task_acc on runs of 2+ usable budgets)")
    result = {
        "n_runs": len(runs),
        "seed": seed,
        "tol": tol,
        "ci": ci,
        "n_boot": n_boot,
        "bootstrap": bootstrap,
        "k_flops_per_param_token": float(np.median([r["compute"] / (r["params"] * r["tokens"]) for r in runs])),
        "loss_noise": pooled_noise(fit.budgets),
        "budgets": [_budget_json(j, fit, boot, ci) for j in range(len(fit.budgets))],
        "laws": {
            name: _law_json(law, boot[name], ci, fit.irreducible if name == "loss" else None)
            for name, law in fit.laws.items()
        },
        "parametric": _parametric_json(surface),
        "cross_check": checked,
        "downstream": asdict(down) if down is not None else None,
        "predictions": [_prediction_json(t, fit, boot, surface, down, ci) for t in targets],
        "paper": {"A": PAPER_A, "alpha": PAPER_ALPHA, "law": "D*(C) = A·C^alpha, D* in training tokens"},
        "warnings": warnings,
    }
    os.makedirs(out_dir, exist_ok=True)
    files = []
    if plots:
        files.append(plot_isoflops(fit.budgets, os.path.join(out_dir, "isoflops.png")))
        if fit.laws:
            files.append(plot_power_law(fit, boot, surface, targets, os.path.join(out_dir, "power_law.png"), ci))
        if down is not None:
            files.append(plot_downstream(fit, down, targets, os.path.join(out_dir, "downstream.png")))
    result["files"] = [os.path.basename(f) for f in [*files, "fit.json"]]
    result = _jsonable(result)
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summary(result: dict) -> str:
    """A few lines for the terminal: the laws with their intervals, the predictions, the warnings."""
    lines = []
    for name, law in result["laws"].items():
        ci = (
            "[" + ", ".join(f"{v:.4f}" for v in law["alpha_ci"]) + "]"
            if None not in law.get("alpha_ci", [None])
            else "n/a"
        )
        floor = f"{law['irreducible']:.4g} + " if law.get("irreducible") else ""
        lines.append(
            f"{name:>6}: {floor}{law['A']:.4g}·C^{law['alpha']:.4f}, alpha CI {ci} ({law['n_points']} budgets)"
        )
    for check in (result.get("cross_check") or {}).values():
        lines.append(f"parametric alpha {check['parametric_alpha']:.4f} vs IsoFLOPs {check['isoflops_alpha']:.4f}")
    for pred in result["predictions"]:
        parts = [
            f"{k}={v['value']:.4g} [{v['ci'][0]:.4g}, {v['ci'][1]:.4g}]"
            for k, v in pred.items()
            if isinstance(v, dict) and "value" in v and None not in v["ci"]
        ]
        if pred.get("task_acc") is not None:
            parts.append(f"task_acc={pred['task_acc']:.3f}")
        lines.append(f"at {pred['compute']:.3g} FLOPs: " + " ".join(parts))
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: refit runs from a CSV."""
    parser = argparse.ArgumentParser(
        prog="python -m train.scaling_fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", help="runs: compute,params,tokens,loss[,task_nll,task_acc]")
    parser.add_argument("--out", required=True, help="directory for fit.json and the plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=0.1, help="relative compute tolerance within a budget")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--bootstrap", choices=BOOTSTRAP_METHODS, default="residuals", help="what to resample")
    parser.add_argument("--target", type=float, action="append", help=f"compute to predict at ({PAPER_TARGET_FLOPS:g})")
    parser.add_argument("--chance", type=float, default=None, help="fix the sigmoid's floor (e.g. 0.25)")
    parser.add_argument("--ceiling", type=float, default=None, help="fix the sigmoid's ceiling (e.g. 1.0)")
    parser.add_argument("--loss-noise", type=float, default=None, help="relative loss noise, if known")
    args = parser.parse_args(argv)
    result = fit_all(
        read_runs_csv(args.csv),
        args.out,
        args.seed,
        tol=args.tol,
        n_boot=args.n_boot,
        bootstrap=args.bootstrap,
        targets=args.target or (PAPER_TARGET_FLOPS,),
        loss_noise=args.loss_noise,
        chance=args.chance,
        ceiling=args.ceiling,
    )
    print(summary(result))
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in result['files'])}")


if __name__ == "__main__":
    main()
