"""Curation throughput: the whole datatrove pipeline and each step, beside the tokenizer of ``data.prepare``.

    python bench/curate.py [--documents 4000] [--workers 1,2]

Writes the default raw corpus (data.curate.raw), curates it with 1 and with 2 workers (tasks = 4, fresh output
each time), and prints documents/s and MB/s of the whole run (wall clock) and of each step (its time summed over
tasks, from datatrove's stats), then ``data.prepare``'s tokenization of the curated output on the same machine:
curation should not be the bottleneck of preparing data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.curate.pipeline import load_curate_config, run_pipeline  # noqa: E402
from data.curate.raw import write_raw_corpus  # noqa: E402


def main() -> None:
    """Curate the default raw corpus at each worker count and print the rates beside the tokenizer's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        raw = write_raw_corpus(Path(scratch) / "raw", documents=args.documents)
        megabytes = sum(p.stat().st_size for p in raw.glob("*.jsonl")) / 1e6
        print(f"default raw corpus: {args.documents} documents, {megabytes:.1f} MB of JSONL")
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(scratch) / f"curated-{workers}"
            config = load_curate_config(None, ["--run.tasks=4", f"--run.workers={workers}"])
            start = time.perf_counter()
            report = run_pipeline(raw, out, config)
            wall = time.perf_counter() - start
            print(
                f"\n{workers} worker(s): {wall:.1f} s, {args.documents / wall:,.0f} documents/s, "
                f"{megabytes / wall:.2f} MB/s (whole pipeline, wall clock); {report['curated_documents']} kept"
            )
            for step, seconds in sorted(report["seconds_per_step"].items(), key=lambda item: -item[1]):
                if seconds > 0.01:
                    print(f"  {step:45s} {seconds:7.2f} s  {args.documents / seconds:10,.0f} documents/s")
        start = time.perf_counter()
        from data.prepare import main as prepare

        prepare(["text", "--input", str(out / "curated"), "--output", str(Path(scratch) / "shards")])
        tokenize = time.perf_counter() - start
        manifest = json.loads((Path(scratch) / "shards" / "manifest.json").read_text())
        kept_mb = report["curated_bytes"] / 1e6
        print(
            f"\ndata.prepare on the curated output: {tokenize:.1f} s, {manifest['documents'] / tokenize:,.0f} "
            f"documents/s, {kept_mb / tokenize:.2f} MB/s"
        )


if __name__ == "__main__":
    main()
