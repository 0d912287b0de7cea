"""`python -m data.curate --executor slurm` on a stand-in Slurm: the README's command submits each stage as an array
job of the right size depending on the one before; and with an sbatch that runs what it is given, the jobs curate
the input in a shell where the project's environment is not activated, after which the same command with the local
executor writes the report without redoing a task."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data.curate.pipeline import load_curate_config, run_pipeline
from data.curate.raw import write_raw_corpus
from data.curate.report import read_documents
from data.default import source_document

# Records each submission (its arguments and script as jobs/<id>.json) and prints sbatch's answer; with
# FAKE_SLURM_RUN set it also runs each array task of the script at once, as the job would run on a node.
FAKE_SBATCH = """#!{python}
import json, os, re, subprocess, sys
jobs = os.environ["FAKE_SLURM_JOBS"]
job_id = 123 + len(os.listdir(jobs))
*args, script = sys.argv[1:]
text = open(script).read()
with open(os.path.join(jobs, f"{{job_id}}.json"), "w") as f:
    json.dump({{"args": args, "script": text}}, f)
if os.environ.get("FAKE_SLURM_RUN"):
    env = dict(os.environ, SLURM_JOB_ID=str(job_id), SLURM_NODELIST="node0")
    for arg in args:
        if arg.startswith("--export=ALL,"):
            env.update(item.split("=", 1) for item in arg.removeprefix("--export=ALL,").split(","))
    last = int(re.search(r"#SBATCH --array=0-(\\d+)", text).group(1))
    for task in range(last + 1):
        subprocess.run(["bash", script], env={{**env, "SLURM_ARRAY_TASK_ID": str(task)}}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job_id}}")
"""
# srun runs its command (after its own options: -l, -n 1); scontrol names the one node.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do [[ $1 == -n || $1 == -N ]] && shift; shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo node0
"""
STAGES = [
    "url_signature",
    "url_find",
    "filter",
    "line_count",
    "line_merge",
    "line_filter",
    "minhash_signature",
    "minhash_buckets",
    "minhash_cluster",
    "minhash_filter",
]


def fake_slurm(tmp_path: Path, run_jobs: bool) -> dict[str, str]:
    """The environment of a shell on a Slurm login node: sbatch, srun and scontrol stand-ins on a PATH that does
    not hold the project's environment (it is not activated)."""
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (
        ("sbatch", FAKE_SBATCH.format(python=sys.executable)),
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_SLURM_JOBS": str(jobs)}
    env.pop("FAKE_SLURM_RUN", None)
    return {**env, "FAKE_SLURM_RUN": "1"} if run_jobs else env


def submissions(tmp_path: Path) -> list[dict]:
    """Every sbatch call in order, with its job id."""
    paths = sorted((tmp_path / "jobs").glob("*.json"), key=lambda p: int(p.stem))
    return [{"id": int(p.stem), **json.loads(p.read_text())} for p in paths]


def directives(script: str) -> dict[str, str]:
    """A script's #SBATCH directives."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))


def test_each_stage_is_an_array_job_of_its_tasks_depending_on_the_one_before(tmp_path):
    """The README's Slurm command: one array job per stage (its tasks: --tasks, 1 for a global step, one per input
    shard for MinHash, one per band for its buckets) after the stage before, each followed by datatrove's job that
    merges its stats."""
    raw = write_raw_corpus(tmp_path / "raw", documents=200, seed=3)
    shards = len(list(raw.glob("*.jsonl")))
    command = [sys.executable, "-m", "data.curate", "--input", str(raw), "--output", str(tmp_path / "out")]
    command += ["--executor", "slurm", "--run.partition=PART", "--tasks", "1000"]
    run = subprocess.run(command, env=fake_slurm(tmp_path, run_jobs=False), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "submitted the curation stages to Slurm" in run.stdout
    jobs = submissions(tmp_path)
    stages, merges = jobs[0::2], jobs[1::2]
    assert len(jobs) == 2 * len(STAGES)
    tasks = [1000, 1, 1000, 1000, 1, 1000, shards, 14, 1, shards]
    for stage, merge, name, count, before in zip(stages, merges, STAGES, tasks, [None, *stages], strict=False):
        sbatch = directives(stage["script"])
        assert sbatch["job-name"] == f"curate_{name}" and sbatch["partition"] == "PART", sbatch
        assert sbatch["array"] == f"0-{count - 1}" and "qos" not in sbatch
        logs = tmp_path / "out" / "logs" / name
        assert f"launch_pickled_pipeline {logs / 'executor.pik'}" in stage["script"]
        assert f"export PATH={Path(sys.executable).parent}:$PATH" in stage["script"]
        assert len(json.loads((logs / "ranks_to_run.json").read_text())) == count
        dependency = [f"--dependency=afterok:{before['id']}"] if before else []
        assert stage["args"] == ["--export=ALL,RUN_OFFSET=0", *dependency]
        assert directives(merge["script"])["dependency"] == f"afterok:{stage['id']}"
        assert f"merge_stats {logs / 'stats'}" in merge["script"]


def test_slurm_jobs_curate_and_the_local_executor_then_writes_the_report(tmp_path):
    """The jobs run in order (as their dependencies make Slurm run them) in a shell without the environment and
    curate the input (the copy removed, the e-mail replaced); rerun with the local executor, every task is found
    done and report.json is written."""
    rng = random.Random(0)
    texts = [source_document("general", rng) + f"\n\nWrite to anna.smith@mail.example about {i}." for i in range(6)]
    rows = [{"id": f"d{i}", "text": text} for i, text in enumerate([*texts, texts[2]])]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "web.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data.curate", "--input", str(tmp_path / "in"), "--output", str(out)]
    command += ["--tasks", "2", "--dedup.minhash_bands=4"]  # 4 bands: fewer jobs, exact copies still found
    run = subprocess.run([*command, "--executor", "slurm"], env=fake_slurm(tmp_path, True), capture_output=True)
    assert run.returncode == 0, run.stderr[-3000:]
    curated = read_documents(out / "curated")
    assert sorted(d["id"] for d in curated) == ["d0", "d1", "d2", "d3", "d4", "d5"]
    assert all("anna.smith" not in d["text"] for d in curated)
    completions = sorted((p, p.stat().st_mtime_ns) for p in (out / "logs").glob("*/completions/*"))
    assert len(completions) == 2 + 1 + 2 + 2 + 1 + 2 + 1 + 4 + 1 + 1
    config = load_curate_config(None, ["--run.tasks=2", "--dedup.minhash_bands=4"])
    report = run_pipeline(tmp_path / "in", out, config)
    assert sorted((p, p.stat().st_mtime_ns) for p in (out / "logs").glob("*/completions/*")) == completions
    assert report["input_documents"] == 7 and report["curated_documents"] == 6
    assert report["funnel"][-1] == {"step": "minhash", "removed": 1, "documents": 6}
    assert all(isinstance(count, int) for reasons in report["reasons"].values() for count in reasons.values())


@pytest.mark.parametrize("partition", ["", "PART"])
def test_an_unnamed_partition_is_left_to_the_cluster(tmp_path, partition):
    """datatrove writes an empty partition as a bare `#SBATCH --partition`, which sbatch refuses."""
    from data.curate.pipeline import CurateSlurmExecutor

    executor = CurateSlurmExecutor([], tasks=1, time="1:00:00", partition=partition, logging_dir=str(tmp_path))
    assert executor.get_sbatch_args().get("partition") == (partition or None)
