"""train.adapter_eval: caption metrics equal their peers (sacrebleu's corpus BLEU, jiwer's WER) on real strings
(pocketsphinx's own recognition of its LibriVox sentences against their transcripts, scikit-image's captions), the
media control, and the adapter stage's evaluation: the synthetic graders on the embedded data only; elsewhere the
held-out loss with shuffled media beside the real one, equal while the adapter's gates are shut and apart once a
few steps have taught it data where the media decide the caption."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.grading import normalize_text
from tests.real_media import POCKETSPHINX, photos, transcripts
from train.adapter_eval import (
    caption_metrics,
    corpus_bleu,
    edit_distance,
    is_embedded_data,
    rank_share,
    shuffled_media,
    word_error_rate,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
]


def recognised(folder: Path, match_file: str) -> tuple[list[str], list[str]]:
    """pocketsphinx's hypotheses of a test folder (its `.match` / `.hyp` file: "words (id score)") and the package's
    transcripts of the same recordings, in the same order."""
    refs = transcripts(folder)
    hyps, wanted = [], []
    for line in (folder / match_file).read_text().splitlines():
        match = re.fullmatch(r"(.*?)\s*\((\S+)(?: -?\d+)?\)\s*", line)
        if match:
            hyps.append(match.group(1))
            wanted.append(refs[match.group(2)])
    return hyps, wanted


def sacrebleu_score(hypotheses: list[str], references: list[str], **options) -> float:
    import sacrebleu

    norm = [normalize_text(t) for t in hypotheses], [[normalize_text(t) for t in references]]
    return sacrebleu.corpus_bleu(*norm, tokenize="none", **options).score


CAPTIONED = [
    # (hypotheses, references): a perfect match, clipping of repeats, no 4-gram, no 2-gram, no match, brevity.
    (["Chelsea the cat."], ["Chelsea the cat."]),
    (["the the the the the cat"], ["the cat sat on the mat"]),
    (["a cup of coffee", "surface of the moon"], ["Coffee cup.", "Surface of the moon."]),
    (["moon cat", "cup"], ["Surface of the moon.", "Coffee cup."]),
    (["nothing here"], ["Greek coins from Pompeii."]),
    (["human"], ["Human retina."]),
]


@pytest.mark.parametrize("hypotheses, references", CAPTIONED)
def test_bleu4_equals_sacrebleu(hypotheses, references):
    assert corpus_bleu(hypotheses, references) == pytest.approx(sacrebleu_score(hypotheses, references), abs=1e-9)


def test_bleu4_and_wer_equal_their_peers_on_real_recognition_output():
    """pocketsphinx's recognition of the LibriVox sentences and of the cards recordings, as the package ships it,
    scored against the package's transcripts: BLEU-4 equals sacrebleu's and WER jiwer's; the cards were recognised
    perfectly; the scikit-image captions against each other's agree with the peers too."""
    import jiwer

    hyps, refs = recognised(POCKETSPHINX / "librivox", "test-lm.match")
    assert len(hyps) == 5 and refs[1] == "he was not an ill disposed young man"
    assert word_error_rate(hyps, refs) == pytest.approx(jiwer.wer(refs, [normalize_text(h) for h in hyps]), abs=1e-12)
    assert 0.2 < word_error_rate(hyps, refs) < 0.6  # a 2016 recogniser on 64 kb/s LibriVox
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu_score(hyps, refs), abs=1e-9)
    assert caption_metrics(hyps, refs) == {
        "eval/bleu4": corpus_bleu(hyps, refs),
        "eval/wer": word_error_rate(hyps, refs),
    }
    for hyp, ref in zip(hyps, refs, strict=True):  # sentence by sentence too
        assert word_error_rate([hyp], [ref]) == pytest.approx(jiwer.wer(ref, normalize_text(hyp)), abs=1e-12)
        assert corpus_bleu([hyp], [ref]) == pytest.approx(sacrebleu_score([hyp], [ref]), abs=1e-9)

    cards, card_refs = recognised(POCKETSPHINX / "cards", "cards.hyp")
    assert len(cards) == 5 and word_error_rate(cards, card_refs) == 0.0
    assert corpus_bleu(cards, card_refs) == pytest.approx(100.0)

    captions = [photo.caption for photo in photos()]
    shifted = captions[1:] + captions[:1]
    assert word_error_rate(shifted, captions) == pytest.approx(
        jiwer.wer([normalize_text(c) for c in captions], [normalize_text(c) for c in shifted]), abs=1e-12
    )
    assert corpus_bleu(shifted, captions) == pytest.approx(sacrebleu_score(shifted, captions), abs=1e-9)


def test_wer_counts_edits_and_texts_compare_normalised():
    assert edit_distance("a b c d".split(), "a x c d e".split()) == 2  # one substitution, one insertion
    assert word_error_rate(["Ten of clubs!"], ["ten of clubs"]) == 0.0  # case and punctuation are no error
    assert word_error_rate([""], ["ten of clubs"]) == 1.0 and word_error_rate(["a b c d e f"], ["a"]) == 5.0
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(["x"], ["?"])
    assert math.isnan(caption_metrics(["x"], ["?"])["eval/wer"])


def test_shuffled_media_gives_every_target_another_samples_media():
    samples = [{"key": str(i), "text": f"caption {i}", "image": f"pixels {i}", "meta": {}} for i in range(4)]
    moved = shuffled_media(samples)
    assert [s["text"] for s in moved] == [s["text"] for s in samples]
    assert [s["image"] for s in moved] == ["pixels 1", "pixels 2", "pixels 3", "pixels 0"]
    assert samples[0]["image"] == "pixels 0"  # the input is left alone
    audio = [{"text": "a", "audio": torch.zeros(3)}, {"text": "b", "audio": torch.ones(5)}]
    assert [len(s["audio"]) for s in shuffled_media(audio)] == [5, 3]
    assert shuffled_media(samples[:1]) == []  # nothing to shuffle with
    # A rank's share: its last sample gets the media of the split's next one, so a share of one has a control.
    assert [s["image"] for s in shuffled_media(samples[:2], samples[2])] == ["pixels 1", "pixels 2"]
    assert [s["image"] for s in shuffled_media(samples[3:], samples[0])] == ["pixels 0"]


def test_rank_shares_are_disjoint_and_equal_so_every_rank_runs_the_same_forwards():
    assert [rank_share(100, 32, r, 2) for r in range(2)] == [(0, 32), (32, 32)]
    assert [rank_share(3, 32, r, 2) for r in range(2)] == [(0, 1), (1, 1)]  # 3 held out: one each, one left out
    assert rank_share(1, 32, 1, 2) == (0, 0)  # fewer samples than ranks: no held-out loss anywhere


# ----------------------------------------------------------------------------------------------------------------
# The adapter stage's evaluation.


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_shards(directory: Path, train: int = 32, heldout: int = 8) -> None:
    """img2dataset-like shards where the image decides the caption ("a red picture"): shades of four colours."""
    import webdataset

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for split, count in (("train", train), ("heldout", heldout)):
        with webdataset.TarWriter(str(directory / f"{split}-000000.tar")) as sink:
            for i in range(count):
                name = list(COLOURS)[i % len(COLOURS)]
                pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (48, 48, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{split}{i:04d}", "jpg": buf.getvalue(), "txt": f"a {name} picture"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LM (Llama 3 vocabulary) and image encoder saved as the vision stage loads them."""
    from tests.test_real_media import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))[1].parent


def vision_stage(tiny_dir: Path, data_dir: Path):
    """train/adapter.py's vision stage (model, collator, loss, evaluator) on data_dir, with a fresh adapter."""
    from tests.test_real_media import stage_config
    from train.adapter import RECIPES
    from train.loop import RunContext

    cfg = stage_config("vision", data_dir, tiny_dir)
    cfg.model.train_encoder = False
    cfg.eval.samples, cfg.eval.loss_samples, cfg.eval.batch_size = 4, 8, 8
    ctx = RunContext(dims=None, mesh=None, rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    return RECIPES["vision"].build(cfg, ctx)


def test_embedded_data_keep_the_synthetic_graders(tiny_dir, tmp_path):
    """On data.synthetic's scenes the evaluation grades answers as before (accuracy beside chance), with no
    control and no caption metrics; the same shards without their manifest are other data."""
    import shutil

    from data.synthetic import generate

    generate("images", tmp_path / "embedded", train=4, heldout=4)
    assert is_embedded_data(tmp_path / "embedded", "image")
    stage = vision_stage(tiny_dir, tmp_path / "embedded")
    scores = stage.eval_fn(stage.model, 0)
    assert set(scores) == {"eval/loss", "eval/accuracy", "eval/chance", "eval/exact_match"}, scores
    shutil.copytree(tmp_path / "embedded" / "images", tmp_path / "other", ignore=shutil.ignore_patterns("*.json"))
    assert not is_embedded_data(tmp_path / "other", "image")
    assert is_embedded_data(tmp_path / "embedded" / "images", "image")  # the kind's own folder, named directly


def test_shuffled_media_loss_equals_the_loss_while_gates_are_shut_and_rises_once_the_adapter_reads(tiny_dir, tmp_path):
    """A fresh image adapter's gates are 0: the held-out loss is the same whichever image a caption gets. After 40
    steps on images whose colour decides the caption, the held-out loss with each picture's own image is well
    below the loss with another picture's image (5.7 against 6.9 nats), and the word error rate has fallen."""
    from data.media_stream import MediaStreamLoader

    colour_shards(tmp_path / "colours")
    stage = vision_stage(tiny_dir, tmp_path / "colours")
    model = stage.model
    start = stage.eval_fn(model, 0)
    assert set(start) == {"eval/loss", "eval/loss_shuffled_media", "eval/bleu4", "eval/wer"}
    assert start["eval/loss_shuffled_media"] == start["eval/loss"]

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.98))
    loader = MediaStreamLoader(
        str(tmp_path / "colours" / "train-000000.tar"), kind="image", batch_size=8, **stage.decode
    )
    for _, samples in zip(range(40), loader, strict=False):
        loss, _ = stage.loss_fn(model, stage.transform(samples))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    end = stage.eval_fn(model, 40)
    assert end["eval/loss"] < start["eval/loss"] - 1.0, (start, end)
    assert end["eval/loss_shuffled_media"] > end["eval/loss"] + 0.3, end
    # The answers too: 40 steps are enough for the greedy captions to name the colours (3-word captions hold no
    # 4-gram, so their BLEU-4 is 0 however good they are, as sacrebleu's is).
    assert end["eval/wer"] < start["eval/wer"] and end["eval/bleu4"] == 0.0
