"""`python -m evaluation.suite`: a named suite on one checkpoint writes a report (JSON and a table) with every
task's metric and the needle grid; the paper suite runs MMLU, GSM8K and HumanEval from local files."""

from __future__ import annotations

import json

import pytest

from lm.config import LMConfig
from lm.model import Transformer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama 3 (full vocabulary, tiny widths, a 1K context) in HF layout."""
    from lm.checkpoint import save_pretrained

    path = tmp_path_factory.mktemp("suite") / "model"
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    config.max_seq_len = 1024
    model = Transformer(config)
    model.init_weights(seed=2)
    save_pretrained(model.eval(), path, format="hf")
    return path


def read_report(out) -> tuple[dict, dict[str, dict]]:
    report = json.loads((out / "report.json").read_text())
    return report, {row["task"]: row for row in report["rows"]}


def test_default_suite_reports_every_task_and_the_needle_grid(checkpoint, tmp_path, capsys):
    from evaluation.suite import main

    out = tmp_path / "default"
    main(["--checkpoint", str(checkpoint), "--out", str(out), "--limit", "6", "--needle-trials", "1"])
    report, rows = read_report(out)
    assert set(rows) == {"scene_colour", "default_math", "default_translation", "needle"}
    assert all(0.0 <= row["value"] <= 1.0 for row in rows.values())
    assert rows["scene_colour"]["samples"] == 6
    assert report["needle"]["lengths"] == [256, 512, 1024]  # those that fit the model's context
    assert (out / "needle.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| scene_colour | 0 | acc |" in printed and (out / "report.md").read_text().strip() in printed


def test_paper_suite_runs_mmlu_gsm8k_and_humaneval_from_local_files(checkpoint, tmp_path):
    from test_benchmarks import gsm8k_exemplars

    from evaluation.suite import main

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_exemplars()))
    out = tmp_path / "paper"
    argv = ["--checkpoint", str(checkpoint), "--suite", "paper", "--out", str(out), "--limit", "1"]
    main([*argv, "--gsm8k", str(gsm8k), "--allow-code-execution", "--needle-trials", "1"])
    report, rows = read_report(out)
    wanted = {"mmlu_offline", "mmlu_offline_stem", "mmlu_offline_anatomy", "gsm8k_cot_offline", "humaneval_offline"}
    assert wanted <= set(rows)
    assert rows["mmlu_offline_anatomy"]["samples"] == 1
    assert rows["mmlu_offline_anatomy"]["shots"] == 5 and rows["gsm8k_cot_offline"]["shots"] == 8
    assert rows["humaneval_offline"]["value"] == 0.0  # a random model's code does not run
    assert report["notes"] == []
    # Without the flags the tasks that need them are left out, and the report says why.
    main([*argv, "--needle-trials", "1"])
    report, rows = read_report(out)
    assert "gsm8k_cot_offline" not in rows and "humaneval_offline" not in rows
    assert any("--gsm8k" in note for note in report["notes"])
    assert any("--allow-code-execution" in note for note in report["notes"])
