"""`train/encoder.py` end to end on small synthetic data: CLIP and BEST-RQ learn, metrics follow the contract,
the encoder exports, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_utils import torchrun

from encoders.vision import VisionEncoderConfig
from train.config import load_config
from train.encoder import EncoderJobConfig
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
    # The first 180 steps of a 1,200-step schedule on the shipped encoder: on 96 px tiles the loss sits at chance
    # (log 32) for about 100 steps before retrieval rises, so a schedule shortened to 70 steps decays before it
    # leaves chance.
    shipped = load_config(EncoderJobConfig, "configs/encoder/vision_tiny.toml", [])
    recs = run(
        "vision",
        tmp_path / "clip",
        media,
        2,
        "--vision.objective=clip",
        "--optim.weight_decay=0.1",
        "--train.steps=180",
        "--optim.schedule_steps=1200",
        "--train.eval_interval=180",
        "--checkpoint.interval=180",
        "--metrics.log_interval=10",
    )
    for key in CONTRACT_KEYS:
        assert key in recs[0], key
    final = recs[-1]
    assert final["step"] == 180
    # Zero-shot retrieval among 20 held-out captions: chance is 5%.
    assert final["eval/retrieval_chance"] == pytest.approx(0.05)
    assert final["eval/retrieval_top1"] >= 0.2, final
    assert final["loss"] < recs[0]["loss"] - 0.5
    # The exported encoder loads with the encoders' own from_pretrained (strict: no missing or unexpected keys).
    from encoders.vision import VisionEncoder

    enc = VisionEncoder.from_pretrained(tmp_path / "clip" / "final" / "encoder")
    vision = shipped.model.vision
    assert (enc.cfg.image_size, enc.cfg.patch_size) == (vision["image_size"], vision["patch_size"])
    meta = json.loads((tmp_path / "clip" / "final" / "pretraining.json").read_text())
    assert meta["objective"]["kind"] == "vision" and meta["last"]["step"] == 180
    from train.plot import plot_run

    assert os.path.getsize(plot_run(str(tmp_path / "clip"))) > 1000


def test_tag_pretraining_learns_on_two_ranks(tmp_path, media):
    """The shipped objective (tags) for the first 300 steps of its schedule: held-out tags called right beyond
    always calling each tag's commoner answer, and the encoder exports with its tags beside it."""
    shipped = load_config(EncoderJobConfig, "configs/encoder/vision_tiny.toml", [])
    assert shipped.vision.objective == "tags"
    recs = run(
        "vision",
        tmp_path / "tags",
        media,
        2,
        "--train.steps=300",
        f"--optim.schedule_steps={shipped.train.steps}",
        "--train.eval_interval=300",
        "--checkpoint.interval=300",
    )
    final = recs[-1]
    assert final["step"] == 300
    # 36 tags: 4 shapes, 6 colours, 2 sizes, 24 colour-shape pairs; about 0.83 right by the commoner answers.
    assert 0.75 < final["eval/tag_majority"] < 0.9, final
    assert final["eval/tag_accuracy"] >= final["eval/tag_majority"] + 0.04, final
    assert final["loss"] < recs[0]["loss"] - 0.3
    from encoders.vision import VisionEncoder

    enc = VisionEncoder.from_pretrained(tmp_path / "tags" / "final" / "encoder")
    assert enc.cfg.image_size == shipped.model.vision["image_size"]
    meta = json.loads((tmp_path / "tags" / "final" / "pretraining.json").read_text())
    assert meta["objective"]["tags"] == (media / "images" / "tags.txt").read_text().split("\n")[:-1]


def test_mixed_precision_on_cpu_reaches_the_encoder_stage(tmp_path, media):
    """`--parallel.mixed_precision_on_cpu` computes the stage in bf16 (train/stage.py once ignored it): the losses
    move off fp32's and stay near them."""
    steps = ["--train.steps=20", "--train.eval_interval=20", "--checkpoint.interval=20", "--metrics.log_interval=5"]
    fp32 = run("vision", tmp_path / "fp32", media, 1, *steps)
    bf16 = run("vision", tmp_path / "bf16", media, 1, *steps, "--parallel.mixed_precision_on_cpu=true")
    pairs = [(a["loss"], b["loss"]) for a, b in zip(fp32, bf16, strict=True) if "loss" in a]
    assert len(pairs) >= 4, pairs
    assert any(a != b for a, b in pairs), pairs
    assert all(abs(a - b) < 0.02 for a, b in pairs), pairs


def test_tags_need_their_vocabulary_and_each_image_known_tags(tmp_path):
    from train.encoder import read_tags, tags_transform

    cfg = load_config(EncoderJobConfig, "configs/encoder/vision_tiny.toml", [f"--data.dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="shards"):
        read_tags(cfg)  # no data, no tags beside it
    cfg.vision.tags_file = str(tmp_path / "tags.txt")
    with pytest.raises(FileNotFoundError, match="tags.txt"):
        read_tags(cfg)
    (tmp_path / "tags.txt").write_text("red\ncircle\nred\n")
    with pytest.raises(ValueError, match="'red'"):
        read_tags(cfg)
    (tmp_path / "tags.txt").write_text("red\n\ncircle\n")
    tags = read_tags(cfg)
    assert tags == ["red", "circle"]
    transform = tags_transform(VisionEncoderConfig.from_preset("tiny"), tags)
    batch = {"key": ["a", "b"], "image": torch.rand(2, 3, 64, 64), "meta": [{"tags": ["circle"]}, {"tags": []}]}
    out = transform(batch)
    assert out["targets"].tolist() == [[0.0, 1.0], [0.0, 0.0]] and out["images"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="'square' of image b"):
        transform(dict(batch, meta=[{"tags": ["red"]}, {"tags": ["square"]}]))
    with pytest.raises(ValueError, match="image a has no"):
        transform(dict(batch, meta=[{}, {"tags": []}]))


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


def test_interrupted_generation_is_redone_not_trained_on(tmp_path):
    """Shards left by a data.synthetic run that never finished (its marker still there, no manifest) are
    regenerated by the trainer's data check; a complete set is reused as it is."""
    from data.synthetic import GENERATING_MARKER, generate
    from train.encoder import EncoderJobConfig
    from train.media import ensure_data

    cfg = EncoderJobConfig()
    cfg.data.dir, cfg.data.train_count, cfg.data.heldout_count = str(tmp_path), 40, 10
    generate("images", tmp_path, train=40, heldout=10)
    images = tmp_path / "images"
    (images / "manifest.json").unlink()
    (images / GENERATING_MARKER).touch()
    shard = sorted(images.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # what a kill mid-write could leave
    ensure_data(cfg, "vision", rank=0)
    assert (images / "manifest.json").exists() and not (images / GENERATING_MARKER).exists()
    assert shard.stat().st_size > 1000
    before = shard.stat().st_mtime_ns
    ensure_data(cfg, "vision", rank=0)
    assert shard.stat().st_mtime_ns == before
