"""The quickstart's stage graph in the Makefile: what `make -j2` may run side by side, and what must wait.

`make quickstart` runs its stages two at a time (bench/RESULTS.md, issue 22). These tests read the plan make itself
prints (`make -n`) and run the stage recipes with a failing interpreter, so a broken dependency or a failure lost in
a stage's labelled output shows here, not an hour into a quickstart.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ["qs-adapter-vision", "qs-adapter-video", "qs-adapter-speech"]


def make(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``make -f ROOT/Makefile ARGS`` in ``cwd`` (an empty directory: no run exists, every stage is planned)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def plan_position(plan: list[str], needle: str) -> int:
    """Index of the first planned command that contains ``needle``."""
    for i, line in enumerate(plan):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} is not in the plan:\n" + "\n".join(plan))


def test_every_stage_waits_for_what_it_reads(tmp_path: Path) -> None:
    """Text before the LM and the media; the LM and each encoder before its adapters; vision before video."""
    result = make("-n", *ADAPTERS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = result.stdout.splitlines()
    at = {
        "text": plan_position(plan, "-m data.default"),
        "media": plan_position(plan, "-m data.synthetic"),
        "lm": plan_position(plan, "train/lm.py"),
        "vision encoder": plan_position(plan, "train/encoder.py --modality vision"),
        "speech encoder": plan_position(plan, "train/encoder.py --modality speech"),
        "vision": plan_position(plan, "train/adapter.py --modality vision"),
        "video": plan_position(plan, "train/adapter.py --modality video"),
        "speech": plan_position(plan, "train/adapter.py --modality speech"),
    }
    before = [
        ("text", "lm"), ("text", "media"), ("media", "vision encoder"), ("media", "speech encoder"),
        ("lm", "vision"), ("vision encoder", "vision"), ("vision", "video"), ("lm", "speech"),
        ("speech encoder", "speech"),
    ]
    for first, then in before:
        assert at[first] < at[then], f"{then} is planned before {first}"
    # Two launches at once each need their own rendezvous port.
    launches = [line for line in plan if "torchrun" in line]
    assert len(launches) == 6 and all("--standalone" in line for line in launches), launches


def test_the_quickstart_runs_its_stages_two_at_a_time() -> None:
    """The quickstart hands the stages to make -j2, then composes what they left."""
    result = make("-n", "quickstart", "DEMO=0", cwd=ROOT)  # the install's rule reads ROOT/pyproject.toml
    assert result.returncode == 0, result.stderr
    plan = result.stdout.splitlines()
    parallel = plan_position(plan, "-j2 qs-adapter-vision qs-adapter-video qs-adapter-speech")
    assert parallel < plan_position(plan, "-m llama3mm.compose")


@pytest.mark.parametrize("target", ["qs-media", "qs-lm", "qs-encoder-vision", "qs-adapter-speech"])
def test_a_failing_stage_fails_the_make_through_its_label(tmp_path: Path, target: str) -> None:
    """A stage whose command fails stops make, although its output goes through a labelling pipe."""
    text = tmp_path / "runs/data/text/mixture.json"  # the corpus exists: the stage itself is what fails
    text.parent.mkdir(parents=True)
    text.write_text("{}")
    result = make(target, "PY=false", "VENV=/nonexistent", cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Error" in result.stderr and "] " in result.stdout  # labelled output, then make's error
