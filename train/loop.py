"""The one training loop every entry (lm, adapter, encoder) runs, and the run setup around it.

An entry script builds its model (parallelized with ``train.parallel``), a resumable data iterator and a
``loss_fn(model, micro_batch) -> (loss, metrics)``; :func:`train` does the rest: gradient accumulation, global-norm
clipping, the LR schedule, non-finite loss policy, periodic eval, checkpoint/resume and metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from train.checkpoint import Checkpointer, seed_everything
from train.config import JobConfig, save_config
from train.metrics import MetricsLogger, mem_gb, peak_flops
from train.optim import build_optimizer, build_scheduler, clip_grad_norm
from train.parallel.mesh import ParallelDims, device_type, dp_rank_and_size, setup, world_size
from train.parallel.mesh import rank as process_rank
from train.preemption import Preempted, PreemptionWatch
from train.rundir import claim as claim_run_dir

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[nn.Module, int], dict[str, Any]]


def combined_eval(*evals: EvalFn | None) -> EvalFn | None:
    """One ``eval_fn`` running each given one (in order, on every rank) and merging their metrics."""
    present = [e for e in evals if e is not None]
    if not present:
        return None
    return lambda model, step: {k: v for e in present for k, v in e(model, step).items()}


ForwardBackward = Callable[[nn.Module, list], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/Inf and ``train.skip_nonfinite`` is off."""


class DataExhaustedError(RuntimeError):
    """A rank's data iterator ran out before ``train.steps``."""


@dataclass
class RunContext:
    """What an entry needs after setup: layout, mesh, this rank's place and the device."""

    dims: ParallelDims
    mesh: DeviceMesh
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    def micro_batch_size(self, cfg: JobConfig) -> int:
        """Samples per rank per micro-step: the global ``train.batch_size`` over dp ranks and accumulation steps."""
        return micro_batch_size(cfg.train.batch_size, self.dp_size, cfg.train.grad_accum)


def micro_batch_size(batch_size: int, dp_size: int, grad_accum: int) -> int:
    """``batch_size / (dp_size * grad_accum)``; a global batch that does not split evenly is an error naming it."""
    per = dp_size * grad_accum
    if batch_size % per:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by dp ({dp_size}) x train.grad_accum ({grad_accum})"
        )
    return batch_size // per


def init_run(cfg: JobConfig) -> RunContext:
    """Validate the layout, start the process group, build the mesh, seed, lock the run directory (rank 0, until
    exit; a directory another job holds stops every rank) and save the resolved config."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dims, mesh = setup(cfg.parallel, cfg.run.timeout_s)
    rank = dist.get_rank()
    dp_rank, dp_size = dp_rank_and_size(mesh)
    dev = device_type()
    device = torch.device(dev, torch.cuda.current_device()) if dev == "cuda" else torch.device("cpu")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    # Same seed on every rank: model init must agree before fully_shard takes each rank's shard.
    seed_everything(cfg.run.seed)
    claim_run_dir(cfg.run.dir, rank)  # before anything is written there: a second job must not touch the first's
    if rank == 0:
        save_config(cfg, cfg.run.dir)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return RunContext(dims, mesh, rank, dims.world_size, dp_rank, dp_size, device)


def compile_default(cfg: JobConfig) -> bool:
    """``train.compile``, defaulting to on for CUDA and off on CPU."""
    return cfg.train.compile if cfg.train.compile is not None else torch.cuda.is_available()


def accumulate(
    model: nn.Module, loss_fn: LossFn, batches: list, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward each micro-batch (loss scaled by 1/len so gradients are the global-batch mean);
    returns the sums of the losses and of each metric over the micro-batches."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        loss, extra = loss_fn(model, batch)
        (loss / len(batches)).backward()
        loss_sum += loss.detach().float()
        for k, v in extra.items():
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.to(device)
    return loss_sum, sums


def train(
    cfg: JobConfig,
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    eval_fn: EvalFn | None = None,
    tokens_per_sample: int | None = None,
    flops_per_sample: float | None = None,
    checkpointer: Checkpointer | None = None,
    extra_metrics: Callable[[int], dict[str, Any]] | None = None,
    forward_backward: ForwardBackward | None = None,
    pp_group: dist.ProcessGroup | None = None,
) -> list[dict[str, Any]]:
    """Run ``cfg.train.steps`` optimizer steps (resuming if a checkpoint exists); returns the logged records.

    ``data`` yields micro-batches for this rank and has ``state_dict``/``load_state_dict`` (JSON-able). Every
    rank runs the same number of micro-steps: a rank whose iterator ends stops all of them with an error.
    ``loss_fn`` returns the mean loss of its micro-batch and a dict of scalars, averaged over micro-steps and ranks.
    ``eval_fn(model, step)`` runs on every rank (collectives inside are fine) every ``train.eval_interval`` steps
    and at the end; ``extra_metrics(step)`` adds entries (data stats, mixture weights) to each logged record.
    ``tokens_per_sample`` / ``flops_per_sample`` (training FLOPs, forward + backward) give tokens/s and MFU.
    ``forward_backward(model, micro_batches)`` replaces the default micro-step loop (pipeline schedules): it runs
    backward itself and returns the SUM of micro-batch losses and of each metric (see :func:`accumulate`).
    ``pp_group``: under pipeline parallel ``model`` holds this rank's stages only; the gradient norm spans the group.
    A signal in ``run.preempt_signals`` on any rank ends the run after the step in progress, checkpointed, with
    :class:`~train.preemption.Preempted` (SystemExit, code 0).
    """
    rank = process_rank()
    optimizer = optimizer or build_optimizer(model, cfg.optim)
    scheduler = scheduler or build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    checkpointer = checkpointer or Checkpointer(
        cfg.checkpoint, cfg.run.dir, model, optimizer, scheduler, data, seed=cfg.run.seed
    )
    metrics = MetricsLogger(cfg.run.dir, rank, total_steps=cfg.train.steps, tensorboard=cfg.metrics.tensorboard)
    # Per-rank streams for dropout / masking; a resume restores the saved ones over these.
    seed_everything(cfg.run.seed + 7919 * (rank + 1))
    start = checkpointer.maybe_resume()
    metrics.truncate_after(start)
    device = next(model.parameters()).device
    if forward_backward is None:

        def forward_backward(model: nn.Module, batches: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return accumulate(model, loss_fn, batches, device)

    run = _Run(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=checkpointer,
        metrics=metrics,
        forward_backward=forward_backward,
        pp_group=pp_group,
        device=device,
        start=start,
        throughput=_Throughput(cfg.train.batch_size, tokens_per_sample, flops_per_sample, _device_peak_flops(cfg)),
        iterator=data if hasattr(data, "__next__") else iter(data),
        eval_fn=eval_fn,
        extra_metrics=extra_metrics,
    )
    try:
        preempted_at = run.steps_until_preempted()
    finally:
        checkpointer.close()
        metrics.close()
    if preempted_at is not None:
        raise Preempted(preempted_at)
    return run.records


def _device_peak_flops(cfg: JobConfig) -> float | None:
    """The device's peak FLOP/s for MFU: ``metrics.peak_tflops`` when set, else the datasheet's (None: unknown)."""
    return cfg.metrics.peak_tflops * 1e12 if cfg.metrics.peak_tflops > 0 else peak_flops()


def next_batches(iterator: Iterator, grad_accum: int, device: torch.device, step: int, steps: int) -> list:
    """The step's ``grad_accum`` micro-batches; if any rank's data ran out, every rank raises DataExhaustedError.

    All micro-batches are fetched first and then agreed on: no rank may enter a collective the others skip.
    """
    batches, exhausted = [], 0.0
    for _ in range(grad_accum):
        try:
            batches.append(next(iterator))
        except StopIteration:
            exhausted = 1.0
            break
    if world_size() > 1:
        flag = torch.tensor([exhausted], device=device)
        dist.all_reduce(flag)
        exhausted = flag.item()
    if exhausted:
        raise DataExhaustedError(f"step {step}: a rank's data ran out before train.steps={steps}")
    return batches


def reduce_metrics(
    loss_sum: torch.Tensor, extra_sums: dict[str, torch.Tensor], grad_accum: int, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Global means of the loss and every extra metric, identical on all ranks, in one all-reduce."""
    keys = sorted(extra_sums)
    packed = torch.stack([loss_sum.float()] + [extra_sums[k].float().to(device) for k in keys]) / grad_accum
    world = world_size()
    if world > 1:
        dist.all_reduce(packed)
        packed /= world
    values = packed.tolist()
    return values[0], dict(zip(keys, values[1:], strict=True))


def nonfinite(loss: float, grad_norm: float) -> str | None:
    """What is NaN/Inf (``"loss X"`` or ``"gradient norm X"``), or None when both are finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    return f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"


@dataclass
class _Throughput:
    """Step time, tokens/s and MFU over the steps since the last record (eval and checkpoint time left out)."""

    batch_size: int
    tokens_per_sample: int | None
    flops_per_sample: float | None
    peak: float | None
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0

    def restart(self) -> None:
        """Open a new window (after a record, an eval or a checkpoint)."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def record(self, device: torch.device) -> dict[str, Any]:
        """The window's figures, averaged over its steps."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - self.window_start) / max(1, self.window_steps)
        samples_per_s = self.batch_size / dt
        record: dict[str, Any] = {
            "tokens_per_s": samples_per_s * self.tokens_per_sample if self.tokens_per_sample else None,
            "samples_per_s": samples_per_s,
            "step_time_s": dt,
            "mfu": None,
            "mem_gb": mem_gb(),
        }
        if self.flops_per_sample:
            flops = self.flops_per_sample * samples_per_s / world_size()
            record["tflops"] = flops / 1e12
            record["mfu"] = flops / self.peak if self.peak else None
        return record


@dataclass
class _Run:
    """One :func:`train` call's state, and its optimizer step cut into named parts."""

    cfg: JobConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpointer: Checkpointer
    metrics: MetricsLogger
    forward_backward: ForwardBackward
    pp_group: dist.ProcessGroup | None
    device: torch.device
    start: int
    throughput: _Throughput
    iterator: Iterator
    eval_fn: EvalFn | None
    extra_metrics: Callable[[int], dict[str, Any]] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    # The first of the skipped steps in a row up to now (None: the last step updated the weights).
    first_skipped: int | None = None
    # The last step this call checkpointed (0: none yet): a preemption there needs no second save.
    saved_step: int = 0

    def steps_until_preempted(self) -> int | None:
        """Run the steps after ``start``; on a preemption signal (any rank), checkpoint the step and return it."""
        with PreemptionWatch(self.cfg.run.preempt_signals, self.device) as preemption:
            for step in range(self.start + 1, self.cfg.train.steps + 1):
                self.step(step)
                if step < self.cfg.train.steps and preemption.requested():
                    if self.saved_step != step and self.cfg.checkpoint.enable:
                        self.checkpointer.save(step)
                    self.checkpointer.wait()  # an async save must be committed before the exit
                    if process_rank() == 0:
                        log.warning("preempted: stopped after step %d (checkpointed); rerun to resume", step)
                    return step
        return None

    def step(self, step: int) -> None:
        """Forward, backward, the optimizer step (or the non-finite policy), then record, eval and checkpoint."""
        tc = self.cfg.train
        batches = next_batches(self.iterator, tc.grad_accum, self.device, step, tc.steps)
        self.model.train()
        loss_sum, extra_sums = self.forward_backward(self.model, batches)
        loss, extra = reduce_metrics(loss_sum, extra_sums, tc.grad_accum, self.device)
        grad_norm = clip_grad_norm(self.model.parameters(), tc.max_grad_norm, self.pp_group).item()
        lr = self.optimizer.param_groups[0]["lr"]
        what = nonfinite(loss, grad_norm)
        if what is not None:
            self.skip_nonfinite(step, what, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
            return
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.first_skipped = None
        self.throughput.window_steps += 1
        self.after_update(step, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}, extra)

    def skip_nonfinite(self, step: int, what: str, figures: dict[str, Any]) -> None:
        """Stop the run naming the step, or (``train.skip_nonfinite``) drop its gradients and record it skipped."""
        if not self.cfg.train.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}; stopping (set train.skip_nonfinite=true to skip such steps)"
            )
        if self.first_skipped is None:
            self.first_skipped = step
        limit = self.cfg.train.max_consecutive_skips
        if step - self.first_skipped + 1 > limit:
            raise NonFiniteLossError(
                f"non-finite loss or gradient norm at every step from {self.first_skipped} to {step} "
                f"(more than train.max_consecutive_skips={limit} in a row); stopping: the run has diverged"
            )
        log.warning("step %d: non-finite %s, skipping the optimizer step", step, what)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        skipped = {**figures, "skipped": True}
        self.metrics.log(skipped)
        self.records.append(skipped)
        # The data position and schedule moved on: a checkpoint due here (the last step's above all) is still due.
        if self.maybe_checkpoint(step):
            self.throughput.restart()

    def after_update(self, step: int, figures: dict[str, Any], extra: dict[str, float]) -> None:
        """Log a record every ``metrics.log_interval`` steps, eval every ``train.eval_interval``, checkpoint."""
        tc = self.cfg.train
        last = step == tc.steps
        do_log = step % max(1, self.cfg.metrics.log_interval) == 0 or last or step == self.start + 1
        do_eval = self.eval_fn is not None and ((tc.eval_interval > 0 and step % tc.eval_interval == 0) or last)
        record: dict[str, Any] | None = None
        if do_log or do_eval:
            record = {**figures, **self.throughput.record(self.device), **extra}
            if self.extra_metrics is not None:
                record.update(self.extra_metrics(step))
        if do_eval:
            record.update(self.evaluate(step))
        if record is not None:
            self.metrics.log(record)
            self.records.append(record)
        saved = self.maybe_checkpoint(step)
        if record is not None or saved:  # throughput windows exclude eval and checkpoint time
            self.throughput.restart()

    def maybe_checkpoint(self, step: int) -> bool:
        """Save if ``step`` is a checkpoint step (every ``checkpoint.interval`` and the last); True if saved."""
        saved = self.checkpointer.should_save(step, step == self.cfg.train.steps)
        if saved:
            self.checkpointer.save(step)
            self.saved_step = step
        return saved

    def evaluate(self, step: int) -> dict[str, Any]:
        """``eval_fn``'s metrics, in eval mode and without gradients."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.model, step)
        self.model.train(was_training)
        return metrics
