"""What each run achieved, one line per run: ``python -m train.report RUN_DIR [RUN_DIR ...]``.

Reads ``RUN_DIR/metrics.jsonl``: the steps run, the training loss at the start and the end (mean of the first and
last few logged steps), and the held-out figures of the last evaluation (``eval/*``: retrieval, accuracy beside
its chance, loss). The quickstart prints it after its stages, so a new user sees what each one learnt.
"""

from __future__ import annotations

import argparse
import os

from train.metrics import read_metrics

# Logged steps averaged for the start and end losses: single steps of small batches are noisy.
_WINDOW = 5


def _mean_loss(records: list[dict]) -> float:
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    return sum(losses) / len(losses) if losses else float("nan")


def summarize(run_dir: str) -> str:
    """One line: run name, steps, start -> end training loss, and the last evaluation's held-out figures."""
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {os.path.join(run_dir, 'metrics.jsonl')}: has the run started?")
    # Two path parts: runs/encoder/vision_tiny and runs/adapter/vision_tiny share their last one.
    name = "/".join(os.path.normpath(run_dir).split(os.sep)[-2:])
    line = (
        f"{name:<20} {records[-1]['step']:>5} steps  loss {_mean_loss(records[:_WINDOW]):.2f} -> "
        f"{_mean_loss(records[-_WINDOW:]):.2f}"
    )
    evaluated = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), None)
    if evaluated is not None:
        figures = {k.removeprefix("eval/"): v for k, v in evaluated.items() if k.startswith("eval/")}
        shown = [f"{k} {v:.3g}" for k, v in sorted(figures.items()) if isinstance(v, (int, float))]
        line += f"  | held-out at step {evaluated['step']}: " + ", ".join(shown)
    return line


def main(argv: list[str] | None = None) -> None:
    """CLI: print one summary line per run directory."""
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        print(summarize(run_dir))


if __name__ == "__main__":
    main()
