"""`train/encoder.py` end to end on small synthetic data: CLIP and BEST-RQ learn, metrics follow the contract,
the encoder exports, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_utils import torchrun

from train.metrics import CONTRACT_KEYS, read_metrics

SCRIPT = "train/encoder.py"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Small embedded-default shards (images and speech), generated once for this module."""
    from data.synthetic import generate

    out = tmp_path_factory.mktemp("media")
    generate("images", out, train=1200, heldout=200)
    generate("speech", out, train=600, heldout=100)
    return out


def run(modality: str, run_dir, media, nproc: int, *extra: str) -> list[dict]:
    config = f"configs/encoder/{modality}_tiny.toml"
    proc = torchrun(
        SCRIPT,
        nproc,
        ["--modality", modality, "--config", config, f"--run.dir={run_dir}", f"--data.dir={media}", *extra],
        timeout=400,
    )
    if proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return read_metrics(str(run_dir))


def test_clip_pretraining_learns_retrieval_on_two_ranks(tmp_path, media):
    recs = run(
        "vision",
        tmp_path / "clip",
        media,
        2,
        "--train.steps=70",
        "--train.eval_interval=70",
        "--checkpoint.interval=70",
        "--metrics.log_interval=10",
    )
    for key in CONTRACT_KEYS:
        assert key in recs[0], key
    final = recs[-1]
    assert final["step"] == 70
    # Zero-shot retrieval among 20 held-out captions: chance is 5%.
    assert final["eval/retrieval_chance"] == pytest.approx(0.05)
    assert final["eval/retrieval_top1"] >= 0.2, final
    assert final["loss"] < recs[0]["loss"] - 0.5
    # The exported encoder loads with the encoders' own from_pretrained (strict: no missing or unexpected keys).
    from encoders.vision import VisionEncoder

    enc = VisionEncoder.from_pretrained(tmp_path / "clip" / "final" / "encoder")
    assert enc.cfg.image_size == 64
    meta = json.loads((tmp_path / "clip" / "final" / "pretraining.json").read_text())
    assert meta["objective"]["kind"] == "vision" and meta["last"]["step"] == 70
    from train.plot import plot_run

    assert os.path.getsize(plot_run(str(tmp_path / "clip"))) > 1000


def test_bestrq_learns_and_resume_is_exact(tmp_path, media):
    # One LR schedule for all three runs (the stopped run must not decay over its own 4 steps).
    common = ("--train.eval_interval=0", "--eval.batches=1", "--metrics.log_interval=1", "--checkpoint.interval=4")
    common += ("--optim.schedule_steps=8", "--optim.warmup_steps=2")
    full = run("speech", tmp_path / "full", media, 1, "--train.steps=8", *common)
    run("speech", tmp_path / "cut", media, 1, "--train.steps=4", *common)
    cut = run("speech", tmp_path / "cut", media, 1, "--train.steps=8", *common)
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)

    recs = run("speech", tmp_path / "learn", media, 2, "--train.steps=50", "--metrics.log_interval=10")
    last = recs[-1]
    assert last["chance"] == pytest.approx(1 / 64)
    assert last["eval/accuracy"] >= 5 * last["chance"], last
    # Beyond chance and beyond what ignoring the audio gives (the most frequent code, the unigram entropy).
    assert last["eval/accuracy"] >= last["eval/majority_accuracy"] + 0.08, last
    assert last["eval/loss"] < last["eval/unigram_entropy"] - 0.3, last
    assert last["loss"] < recs[0]["loss"] - 1.0
    from encoders.speech import SpeechEncoder

    assert SpeechEncoder.from_pretrained(tmp_path / "learn" / "final" / "encoder").cfg.dim == 64
    assert torch.isfinite(torch.tensor([r["loss"] for r in recs])).all()
