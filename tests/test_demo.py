"""The Gradio demo: its API driven with gradio_client (text, image, audio turns, streaming, bad files) and its
answering function without a server (multi-turn chat prompts, limits). Answers must equal Llama3MM.generate's on
the same prompt and media, which proves the demo passes both through unchanged."""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data.synthetic import clip_frames, encode_mp4, random_clip
from demo.app import (
    ERROR_PREFIX,
    MAX_AUDIO_SECONDS,
    DemoChat,
    InputError,
    Settings,
    build_app,
    load_media,
    main,
    make_examples,
)
from encoders.speech import load_audio
from llama3mm import Llama3MM
from tests.dist_utils import free_port

PROMPTS = {"image": "Describe the image.", "video": "Describe the video.", "audio": "Transcribe the audio: <|audio|>"}
CONTEXT = 512  # room for a 30 s clip (383 audio tokens)
NEW_TOKENS = 8


def build_tiny_model(directory: Path) -> tuple[Llama3MM, Path]:
    """A random Llama3MM (Llama 3 vocabulary, dim 64, 2 layers) with image, video and speech parts, saved with
    its LM and loaded back as the demo loads a checkpoint."""
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
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None, max_seq_len=CONTEXT
    )
    lm = Transformer(cfg)
    lm.init_weights()
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=32, max_num_tiles=1))
    vision = VisionAdapter(VisionAdapterConfig.from_lm(cfg, encoder.cfg.output_dim, num_layers=1))
    video = VideoAdapter(VideoAdapterConfig.from_vision(vision.cfg, frames_per_group=4, num_latents=4))
    with torch.no_grad():  # open gates and larger weights, as if trained: the media change the greedy answer
        for name, p in [*vision.named_parameters(), *video.named_parameters()]:
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "gate" in name:
                p.fill_(0.8)
    speech_encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    speech = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=64, dim=48, heads=4, ffn_dim=96))
    lm_dir = save_pretrained(lm, directory / "lm", format="hf")
    mm = Llama3MM(
        lm,
        vision_encoder=encoder,
        vision_adapter=vision,
        video_adapter=video,
        speech_encoder=speech_encoder,
        speech_adapter=speech,
        lm_path=lm_dir,
        prompts=PROMPTS,  # as train/adapter.py records them in the checkpoint
    )
    mm.save_pretrained(directory / "mm")
    loaded = Llama3MM.from_pretrained(directory / "mm", device="cpu").eval()
    assert loaded.prompts == PROMPTS
    return loaded, directory / "mm"


@dataclass
class Served:
    """The demo serving a tiny model in this process."""

    mm: Llama3MM
    chat: DemoChat
    url: str
    files: Path


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[tuple[Llama3MM, DemoChat, str]]:
    """The demo serving a tiny model on a free port of 127.0.0.1, its uploads, caches and examples under directory."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLAMA3MM_CACHE", str(directory / "cache"))
        env.setenv("GRADIO_TEMP_DIR", str(directory / "gradio"))
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mm, path = build_tiny_model(directory)
        chat = DemoChat(mm, path)
        app = build_app(chat, directory / "examples")
        _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
        try:
            yield mm, chat, url
        finally:
            app.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, single_thread):
    """The demo (serving) with a folder for the files the tests upload."""
    directory = tmp_path_factory.mktemp("demo")
    with serving(directory) as (mm, chat, url):
        files = directory / "files"
        files.mkdir()
        yield Served(mm, chat, url, files)


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


def scene_png(path: Path) -> Path:
    """A synthetic scene of the embedded default data, as PNG."""
    import random

    from data.scenes import random_scene
    from data.synthetic import draw_scene

    draw_scene(random_scene(random.Random("test-demo")), 64).save(path)
    return path


def sine_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A 440 Hz tone as 16-bit WAV."""
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def opus_webm(path: Path, seconds: float, rate: int = 48000) -> Path:
    """A 440 Hz tone as Opus in WebM, the way a browser's microphone recording arrives."""
    import av

    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        size = stream.codec_context.frame_size or 960
        for start in range(0, len(samples), size):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + size], format="flt", layout="mono")
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height pixels, with no pixel data to speak of."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


def greedy(**settings) -> list:
    """The ChatInterface's additional inputs for greedy decoding of NEW_TOKENS tokens."""
    s = Settings(temperature=0.0, top_p=1.0, max_new_tokens=NEW_TOKENS, **settings)
    return [s.temperature, s.top_p, s.max_new_tokens, s.prompt_format]


def ask(
    client, text: str, files: list[Path] = (), prompt_format: str = "completion", new_chat: bool = True
) -> list[str]:
    """Every streamed state of the answer to one message, through the server's queue (the client's session keeps
    the conversation: new_chat starts another)."""
    from gradio_client import handle_file

    if new_chat:
        client.reset_session()
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    job = client.submit(message, *greedy(prompt_format=prompt_format), api_name="/chat")
    job.result(timeout=120)
    return job.outputs()


def test_image_turn_streams_the_answer_generate_gives(served, client):
    """An image turn (completion format): several growing partial answers, the last equal to generate() on the
    adapter's training prompt with the same image (the user's text is not used by this format)."""
    png = scene_png(served.files / "scene.png")
    outputs = ask(client, "What is this?", [png])
    expected = served.mm.generate(
        PROMPTS["image"], images=[Image.open(png).convert("RGB")], max_new_tokens=NEW_TOKENS, temperature=0
    )
    assert len(outputs) > 1 and all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    assert outputs[-1] == expected and expected
    text_only = served.mm.generate(PROMPTS["image"], max_new_tokens=NEW_TOKENS, temperature=0)
    assert expected != text_only  # the image reached the model


def test_audio_and_text_turns_equal_generate(served, client):
    """An audio turn answers the speech prompt with the clip; chat text turns are the Llama 3 chat prompt of the
    session's conversation."""
    wav = sine_wav(served.files / "tone.wav", 1.0)
    audio_answer = ask(client, "", [wav])[-1]
    expected = served.mm.generate(PROMPTS["audio"], audio=load_audio(wav), max_new_tokens=NEW_TOKENS, temperature=0)
    assert audio_answer == expected and not expected.startswith(ERROR_PREFIX)

    text_answer = ask(client, "Hello, who are you?", prompt_format="chat")[-1]
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    assert text_answer == served.mm.chat(messages, max_new_tokens=NEW_TOKENS, temperature=0)
    second = ask(client, "And then?", prompt_format="chat", new_chat=False)[-1]
    messages += [{"role": "assistant", "content": text_answer}, {"role": "user", "content": "And then?"}]
    assert second == served.mm.chat(messages, max_new_tokens=NEW_TOKENS, temperature=0)
    completion = ask(client, "A small red circle", prompt_format="completion")[-1]
    assert completion == served.mm.generate("A small red circle", max_new_tokens=NEW_TOKENS, temperature=0)


def test_bad_files_are_answered_in_the_chat_and_the_server_keeps_serving(served, client):
    """A text file named .png, a PNG declaring 20,000 x 20,000 pixels and a truncated PNG each get a message
    naming the file and the reason; a concurrent good request and the next turn are answered normally."""
    from gradio_client import Client

    fake = served.files / "notes.png"
    fake.write_text("this is text, not a picture\n" * 20)
    huge = png_header(served.files / "huge.png", 20_000, 20_000)
    broken = served.files / "broken.png"
    broken.write_bytes(scene_png(served.files / "whole.png").read_bytes()[:200])
    other_user = Client(served.url, verbose=False)
    good = other_user.submit(
        {"text": "A small red circle", "files": []}, *greedy(prompt_format="completion"), api_name="/chat"
    )

    answers = {f.name: ask(client, "Describe", [f]) for f in (fake, huge, broken)}
    assert answers["notes.png"] == [
        ERROR_PREFIX + "notes.png is not an image, video or audio file (its content is none of them)"
    ]
    assert answers["huge.png"][-1].startswith(
        ERROR_PREFIX + "huge.png is an image of 400,000,000 pixels; the demo takes"
    )
    assert answers["broken.png"][-1].startswith(ERROR_PREFIX + "broken.png looks like an image (PNG) but is corrupt")
    expected = served.mm.generate("A small red circle", max_new_tokens=NEW_TOKENS, temperature=0)
    assert good.result(timeout=120) == expected
    assert ask(client, "A small red circle")[-1] == expected


def test_info_panel_names_the_loaded_parts(served):
    """The page's info panel names the LM path and shape and every encoder and adapter; absent parts say so."""
    import json
    import urllib.request

    with urllib.request.urlopen(served.url + "config", timeout=30) as response:
        config = json.loads(response.read())
    panel = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-info")
    assert str(served.mm.lm_path) in panel and "dim 64, 2 layers" in panel and "vocab 128,256" in panel
    for name in ("VisionEncoder", "VisionAdapter", "VideoAdapter", "SpeechEncoder", "SpeechAdapter"):
        assert f"`{name}`" in panel
    assert "Uploads it takes**: image, video, audio" in panel
    text_only = DemoChat(Llama3MM(served.mm.lm, lm_path="/somewhere/lm"))
    info = text_only.info_markdown()
    assert "Image**: encoder absent, adapter absent" in info and "none (text only)" in info
    assert text_only.default_settings().prompt_format == "chat"  # no adapter prompts: a chat model
    answer = list(text_only.stream({"text": "hi", "files": [str(scene_png(served.files / "s.png"))]}, [], Settings()))
    assert answer == [ERROR_PREFIX + "s.png is image, but this model has no image parts (it takes: text only)"]


def test_a_chat_model_offers_the_instruction_data_s_requests_and_a_base_model_a_completion(served, tmp_path):
    """A post-trained LM (no adapter prompts, chat by default) is offered a scene question, a translation and a sum,
    each labelled with the answer the grader accepts; a model with adapter prompts keeps the completion example."""
    text_only = DemoChat(Llama3MM(served.mm.lm, lm_path="/somewhere/lm"))
    examples, labels = make_examples(text_only, tmp_path / "chat")
    assert [e["files"] for e in examples] == [[], [], []]
    scene, translation, sum_ = (e["text"] for e in examples)
    assert scene.startswith("Scene: ") and scene.endswith("?"), scene
    assert translation.startswith("Translate into "), translation
    assert "?" in sum_ and any(c.isdigit() for c in sum_), sum_
    assert all(label.startswith("Text: ") and label.endswith(".") for label in labels), labels
    _, base_labels = make_examples(served.chat, tmp_path / "base")
    assert base_labels[-1] == "Text: A small red circle"


def test_chat_history_becomes_one_llama3_dialog(served):
    """Chat format without a server: the history's images, audio, video and replies enter the prompt in order, a
    refused turn is left out, and the answer equals chat() on the same dialog and media."""
    image = scene_png(served.files / "history.png")
    wav = sine_wav(served.files / "history.wav", 0.5)
    clip = served.files / "clip.mp4"
    clip.write_bytes(encode_mp4(clip_frames(random_clip(__import__("random").Random(3)), 32, 8), fps=8))
    bad = served.files / "bad.png"
    bad.write_text("not an image")

    def file(path: Path) -> dict:
        return {"type": "file", "file": {"path": str(path)}}

    history = [
        {"role": "user", "content": [file(image), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [file(bad)]},
        {"role": "assistant", "content": [{"type": "text", "text": ERROR_PREFIX + "bad.png is not an image"}]},
        {"role": "user", "content": [file(wav)]},
        {"role": "user", "content": "And this?"},
        {"role": "assistant", "content": "A tone."},
    ]
    message = {"text": "And the clip?", "files": [str(clip)]}
    answer = list(served.chat.stream(message, history, Settings(0.0, 1.0, NEW_TOKENS, "chat")))
    pil = Image.open(image).convert("RGB")
    dialog = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": [{"type": "text", "text": "And the clip?"}]},
    ]
    from encoders.video import load_video

    expected = served.mm.chat(
        dialog,
        images=[pil],
        audio=[load_audio(wav)],
        video=load_video(clip).permute(0, 3, 1, 2),
        max_new_tokens=NEW_TOKENS,
        temperature=0,
    )
    assert answer[-1] == expected and len(answer) > 1
    without_clip = served.mm.chat(
        dialog, images=[pil], audio=[load_audio(wav)], max_new_tokens=NEW_TOKENS, temperature=0
    )
    assert without_clip != expected  # the clip reached the model


def test_limits_long_audio_is_trimmed_and_long_prompts_refused(served, tmp_path):
    """A 10-minute clip is cut to its first MAX_AUDIO_SECONDS with a note, a browser's Opus recording is read; a
    130 s video, an over-large image, a prompt over the context, an empty message and an empty file are refused
    with their reasons; max_new_tokens is held inside the context."""
    long_wav = sine_wav(tmp_path / "long.wav", 600.0)
    notes: list[str] = []
    answer = list(
        served.chat.stream(
            {"text": "", "files": [str(long_wav)]}, [], Settings(0.0, 1.0, 2, "completion"), notes.append
        )
    )
    assert notes == [f"long.wav is 600 s long: only its first {MAX_AUDIO_SECONDS:.0f} s are heard"]
    assert not answer[-1].startswith(ERROR_PREFIX)
    assert load_media(long_wav).value.shape == (int(MAX_AUDIO_SECONDS * 16000),)

    recording = load_media(opus_webm(tmp_path / "recording.webm", 1.0))
    assert recording.kind == "audio" and abs(recording.value.numel() - 16000) < 1000 and recording.note is None
    long_video = tmp_path / "long.mp4"
    long_video.write_bytes(encode_mp4([Image.new("RGB", (32, 32))] * 130, fps=1))
    with pytest.raises(InputError, match=r"long.mp4 is a 130 s video; the demo takes clips up to 120 s"):
        load_media(long_video)

    long_text = "the red circle " * 200
    refused = list(served.chat.stream(long_text, [], Settings(0.0, 1.0, 4, "chat")))
    assert len(refused) == 1 and refused[0].startswith(ERROR_PREFIX + "the prompt is ")
    assert f"the model's context is {CONTEXT:,} tokens" in refused[0]
    assert list(served.chat.stream({"text": " ", "files": []}, [], Settings())) == [
        ERROR_PREFIX + "the message is empty: type some text or upload a file"
    ]
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(InputError, match="empty.wav is empty"):
        load_media(empty)
    with pytest.raises(InputError, match=r"big.png is an image of 36,000,000 pixels \(6,000 x 6,000\); the demo takes"):
        load_media(png_header(tmp_path / "big.png", 6000, 6000))
    ids, budget = served.chat._fit_context("the red circle", {}, 10_000)
    assert len(ids) + budget == CONTEXT


def test_missing_default_checkpoint_says_how_to_make_it(tmp_path, monkeypatch):
    """Without --checkpoint and without the quickstart's model, the demo exits with what to run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="make quickstart"):
        main([])
    with pytest.raises(SystemExit, match="--checkpoint nowhere: no such directory"):
        main(["--checkpoint", "nowhere"])
