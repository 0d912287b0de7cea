"""``python -m data.curate``: curate raw documents into JSONL shards for ``data.prepare`` (see data.curate.pipeline)."""

from __future__ import annotations

import argparse
import json
import sys

from data.curate.pipeline import __doc__ as PIPELINE_DOC
from data.curate.pipeline import load_curate_config, run_pipeline
from data.curate.readers import MalformedInputError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the stages, print the report's summary."""
    parser = argparse.ArgumentParser(
        prog="python -m data.curate", description=PIPELINE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="a JSONL, Parquet, WARC or .txt file, or a directory of them")
    parser.add_argument("--output", required=True, help="the run's directory: curated/, removed/, report.json")
    parser.add_argument("--config", default=None, help="TOML with [run], [filters], [dedup] sections")
    parser.add_argument("--executor", choices=("local", "slurm"), default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name in ("executor", "tasks", "workers"):
        if getattr(args, name) is not None:
            overrides.append(f"--run.{name}={getattr(args, name)}")
    try:
        config = load_curate_config(args.config, overrides)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        report = run_pipeline(args.input, args.output, config)
    except MalformedInputError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    if report is None:
        print(f"submitted the curation stages to Slurm; logs under {args.output}/logs")
        print("when the jobs have finished, the same command with --executor local writes report.json (it skips")
        print("every finished task, so it runs nothing again)")
        return 0
    print(json.dumps({row["step"]: row["documents"] for row in report["funnel"]}, indent=1))
    print(f"curated {report['curated_documents']} of {report['input_documents']} documents -> {args.output}/curated")
    print(f"wrote {args.output}/report.json, funnel.png, scores.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
