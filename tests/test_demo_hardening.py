"""The demo is shared by many users: nothing one of them sends may take it down. Media bombs, generations that
overlap or are stopped, bad settings and prompts, unexpected failures and a damaged model directory are each
answered with a reason (in the chat, or at start-up) while the demo goes on serving."""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo.app import (
    ERROR_PREFIX,
    GENERATION_QUEUE,
    MAX_FILES_PER_CONVERSATION,
    MAX_FILES_PER_MESSAGE,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARACTERS,
    UPLOAD_CLEANUP,
    VIDEO_FRAMES,
    DemoChat,
    EvenlySpread,
    InputError,
    Settings,
    build_app,
    load_media,
    main,
)
from tests.test_demo import build_tiny_model, sine_wav

GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=6, prompt_format="completion")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    """A tiny random model and the directory it is saved in (mm/ beside the lm/ it names)."""
    return build_tiny_model(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def chat(tiny) -> DemoChat:
    """The demo's answering side over the tiny model (no server)."""
    mm, path = tiny
    return DemoChat(mm, path)


@pytest.fixture(scope="module")
def saved(tiny) -> Path:
    """The folder holding the tiny model's mm/ and lm/ checkpoints."""
    return tiny[1].parent


def answer(chat: DemoChat, text: str, settings: Settings = GREEDY) -> str:
    """The whole answer to one text message in a new conversation."""
    return list(chat.stream(text, [], settings))[-1]


# ---- one generation at a time -------------------------------------------------------------------------------


def test_interleaved_generations_each_equal_their_solo_answer(chat):
    """Two answers stepped alternately (as two users' requests would run if they overlapped) each equal the
    answer given alone: neither overwrites the other's KV cache on the shared model."""
    solo = {text: answer(chat, text) for text in ("A small red circle", "Two blue squares")}
    first, second = (chat.stream(text, [], GREEDY) for text in solo)
    answers = dict.fromkeys(solo, "")
    pending = {"A small red circle": first, "Two blue squares": second}
    while pending:
        for text, stream in list(pending.items()):
            try:
                answers[text] = next(stream)
            except StopIteration:
                del pending[text]
    assert answers == solo and all(solo.values())


def test_a_stopped_generation_closed_later_leaves_the_next_answer_intact(chat):
    """A user stops an answer after two pieces; another's request starts; the stopped generator is closed only
    then (as a server may close it late): the other answer is still its solo answer."""
    expected = answer(chat, "Two blue squares")
    stopped = chat.stream("A small red circle", [], GREEDY)
    next(stopped), next(stopped)
    other = chat.stream("Two blue squares", [], GREEDY)
    first = next(other)
    stopped.close()
    assert [first, *other][-1] == expected


def test_every_generating_event_shares_one_queue(chat, tmp_path):
    """The page's submit (and retry, examples) and the /chat API event sit in one Gradio concurrency group with
    limit 1, so a browser user and an API client never generate at the same time."""
    app = build_app(chat, tmp_path / "examples")
    generating = [fn for fn in app.fns.values() if getattr(fn.fn, "__wrapped__", None) == chat.respond]
    assert len({id(fn.fn) for fn in generating}) >= 2  # the page's wrapper and the API's
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in generating} == {(GENERATION_QUEUE, 1)}
    assert any(fn.api_name == "chat" for fn in generating)


# ---- settings and prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "top_p", "max_new_tokens", "reason"),
    [
        (float("nan"), 0.9, 8, "settings: temperature must be a finite number >= 0, got nan"),
        (float("inf"), 0.9, 8, "settings: temperature must be a finite number >= 0, got inf"),
        (-0.5, 0.9, 8, "settings: temperature must be a finite number >= 0, got -0.5"),
        (0.6, float("nan"), 8, "settings: top_p must be in (0, 1] (or None), got nan"),
        (0.6, -1.0, 8, "settings: top_p must be in (0, 1] (or None), got -1.0"),
        (0.6, 0.9, 2.5, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 2.5"),
        (0.6, 0.9, 10**9, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 1000000000"),
        (0.6, 0.9, float("inf"), f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got inf"),
        (0.6, 0.9, 0, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 0"),
        ("warm", 0.9, 8, "temperature must be a number, got 'warm'"),
        (0.6, None, 8, "top-p must be a number, got None"),
    ],
)
def test_bad_settings_from_the_api_are_answered_with_the_reason(chat, temperature, top_p, max_new_tokens, reason):
    """Settings the page's sliders would not send (NaN, inf, negative, fractional or huge) arrive through the
    /chat API as the ChatInterface function's inputs: the answer is one message with the reason."""
    got = list(chat.respond("A small red circle", [], temperature, top_p, max_new_tokens, "completion"))
    assert got == [ERROR_PREFIX + reason]


def test_good_settings_from_the_api_are_taken_as_the_page_sends_them(chat):
    """Whole-number floats and numeric strings (as JSON clients send them) are accepted; the answer equals the
    same settings given directly."""
    got = list(chat.respond("A small red circle", [], "0", 1, 6.0, "completion"))[-1]
    assert got == answer(chat, "A small red circle") and not got.startswith(ERROR_PREFIX)
    assert list(chat.respond("hi", [], 0.0, 1.0, 6, "poetry")) == [
        ERROR_PREFIX + "prompt format 'poetry': choose one of completion, chat"
    ]


def test_huge_prompts_are_refused_before_tokenising_and_empty_ones_answered(chat, monkeypatch):
    """A 3 MB message, or a conversation whose history adds up to more than MAX_PROMPT_CHARACTERS, is refused
    without being tokenised; an empty message is answered with what to send."""
    tokenised = []
    encode = chat.mm.tokenizer.encode
    monkeypatch.setattr(
        chat.mm.tokenizer, "encode", lambda text, **kw: tokenised.append(len(text)) or encode(text, **kw)
    )
    huge = "the red circle " * 200_000
    refused = list(chat.stream(huge, [], GREEDY))
    assert refused == [
        ERROR_PREFIX + f"the conversation's text is {len(huge):,} characters; the demo takes up to "
        f"{MAX_PROMPT_CHARACTERS:,}: shorten the message or clear the conversation"
    ]
    half = "x" * (MAX_PROMPT_CHARACTERS // 2 + 1)
    history = [{"role": "user", "content": half}, {"role": "assistant", "content": half}]
    chat_settings = Settings(0.0, 1.0, 4, "chat")
    assert list(chat.stream("and?", history, chat_settings))[0].startswith(ERROR_PREFIX + "the conversation's text is")
    assert tokenised == []
    assert list(chat.stream({"text": "", "files": []}, [], GREEDY)) == [
        ERROR_PREFIX + "the message is empty: type some text or upload a file"
    ]


# ---- unexpected failures and uploads ------------------------------------------------------------------------


def test_an_unexpected_failure_is_a_short_message_and_the_next_request_works(chat, monkeypatch, caplog):
    """A generate() that raises (here after its first piece) is answered with a short message naming the kind of
    failure, no traceback, logged on the server; the next message is answered as usual."""
    generate = chat.mm.generate

    def failing(*args, **kwargs):
        yield "A"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(chat.mm, "generate", failing)
    got = list(chat.respond("A small red circle", [], 0.0, 1.0, 6, "completion"))
    assert got[-1] == (
        ERROR_PREFIX + "the demo failed while answering (RuntimeError); it goes on serving: send the message "
        "again, or start a new chat"
    )
    assert "illegal memory access" in caplog.text  # the server's log keeps the detail
    monkeypatch.setattr(chat.mm, "generate", generate)
    assert answer(chat, "A small red circle") == list(chat.respond("A small red circle", [], 0, 1, 6, "completion"))[-1]
    assert not answer(chat, "A small red circle").startswith(ERROR_PREFIX)


def test_uploads_are_deleted_after_a_day(chat, tmp_path):
    """The app asks Gradio to delete its cached uploads: hourly, those older than a day."""
    app = build_app(chat, tmp_path / "examples")
    assert app.delete_cache == UPLOAD_CLEANUP == (3600, 86400)


# ---- a damaged model directory ------------------------------------------------------------------------------


def _halved(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [
        ("mm/vision_adapter/model.safetensors", _halved),
        ("mm/llama3mm.json", lambda data: b'{"format": "llama3mm",'),
        ("mm/speech_encoder/config.json", lambda data: b"{dim: 64}"),
        ("lm/model.safetensors", _halved),
        ("lm/config.json", lambda data: b"\xff\xfe not json"),
    ],
)
def test_a_damaged_checkpoint_stops_the_demo_naming_the_file(saved, tmp_path, damaged, damage):
    """A truncated safetensors part or a malformed JSON file, in a Llama3MM checkpoint or a bare LM checkpoint,
    stops main() at start-up with exit code 1 and a message naming the file: no traceback from a library."""
    import os
    import shutil

    part = damaged.split("/")[0]  # mm/ names the original lm/ (an absolute path), so one folder is copied
    checkpoint = tmp_path / part
    shutil.copytree(saved / part, checkpoint, copy_function=os.symlink)  # links: the LM is 66 MB
    target = tmp_path / damaged
    data = target.read_bytes()
    target.unlink()  # the link, not the original
    target.write_bytes(damage(data))
    with pytest.raises(SystemExit) as stopped:
        main(["--checkpoint", str(checkpoint)])
    message = str(stopped.value.code)
    assert message.startswith(f"--checkpoint {checkpoint}: cannot load it: {target} is damaged")
    assert "Traceback" not in message and len(message) < 400


# ---- media bombs --------------------------------------------------------------------------------------------


def wav_declaring_rate(path: Path, rate: int) -> Path:
    """A 1.3 s 16 kHz tone as 16-bit WAV (42 KB) whose header is edited to claim `rate` samples a second."""
    sine_wav(path, 1.3)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt "
    data[24:32] = struct.pack("<II", rate, rate * 2)  # sample rate, then byte rate (mono, 2 bytes a sample)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("rate", "reason"),
    [
        (1_000_003, "declares a sample rate of 1,000,003 Hz; the demo takes audio sampled at 4,000 to 384,000 Hz"),
        (100, "declares a sample rate of 100 Hz; the demo takes audio sampled at 4,000 to 384,000 Hz"),
        (44_101, "is sampled at 44,101 Hz, which has no small ratio to 16,000 Hz (resampling it would take"),
    ],
)
def test_audio_with_an_absurd_sample_rate_is_refused(tmp_path, rate, reason):
    """A 42 KB WAV whose header claims ~1 MHz (21 ms of samples; resampling would take some 64 GB), too low a rate,
    or a rate coprime to 16 kHz (a 2.8 GB resampling kernel) is refused from the header, naming the file and
    the rate; a common rate still loads."""
    with pytest.raises(InputError) as refused:
        load_media(wav_declaring_rate(tmp_path / "bomb.wav", rate))
    assert str(refused.value).startswith("bomb.wav " + reason)
    assert load_media(wav_declaring_rate(tmp_path / "cd.wav", 44_100)).value.shape == (math.ceil(20800 * 16 / 44.1),)


def write_clip(target, container_format: str, frames: int, fps: int, size: int = 16, codec: str = "mpeg4") -> None:
    """A clip of grey frames, brightness rising with the frame index, written with PyAV."""
    import av

    with av.open(target, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            image = np.full((size, size, 3), index * 7 % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


class _Unseekable(io.RawIOBase):
    """A write-only stream: a muxer writing to it cannot go back to fill in the clip's duration."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.data += data
        return len(data)


def test_video_length_is_measured_while_decoding(tmp_path):
    """A 130 s Matroska clip that declares no duration (written as a stream), and one whose header claims 10 s,
    are refused once decoding passes 120 s; WebM and MPEG-TS clips within the limit load."""
    import av

    stream = _Unseekable()
    write_clip(stream, "matroska", 130, fps=1)
    undeclared = tmp_path / "undeclared.mkv"
    undeclared.write_bytes(bytes(stream.data))
    lying = tmp_path / "lying.mkv"
    write_clip(str(lying), "matroska", 130, fps=1)
    data = lying.read_bytes()
    duration = data.index(b"\x44\x89\x88")  # the Segment's Duration: an 8-byte float of milliseconds
    lying.write_bytes(data[: duration + 3] + struct.pack(">d", 10_000.0) + data[duration + 11 :])
    for clip, declared in ((undeclared, None), (lying, 10.0)):
        with av.open(str(clip)) as container:
            assert container.streams.video[0].frames == 0
            assert (container.duration and container.duration / av.time_base) == declared
        with pytest.raises(InputError, match=f"{clip.name} runs past 120 s; the demo takes clips up to that long"):
            load_media(clip)
    for container_format, suffix, codec in (("webm", "webm", "libvpx"), ("mpegts", "ts", "mpeg4")):
        path = tmp_path / f"short.{suffix}"
        write_clip(str(path), container_format, 20, fps=4, codec=codec)
        assert load_media(path).value.shape == (20, 3, 16, 16)


def test_decoded_frames_are_capped_and_only_the_sampled_ones_kept(tmp_path, monkeypatch):
    """Frames are counted while decoding (a 2 s clip of 60 frames is refused under a cap of 50); a long stream
    with no frame count keeps VIDEO_FRAMES frames, those load_video would pick (exactly, for a short clip), and
    the selection never holds more than twice that many."""
    from demo import app
    from encoders.video import load_video, sample_indices

    clip = tmp_path / "fast.ts"
    write_clip(str(clip), "mpegts", 60, fps=30)
    monkeypatch.setattr(app, "MAX_VIDEO_DECODED_FRAMES", 50)
    with pytest.raises(InputError, match="fast.ts has over 50 frames; the demo takes clips up to 120 s"):
        load_media(clip)
    monkeypatch.undo()

    long = tmp_path / "long.ts"
    write_clip(str(long), "mpegts", 1000, fps=25)
    assert load_media(long).value.shape == (VIDEO_FRAMES, 3, 16, 16)
    short = tmp_path / "short.mp4"
    write_clip(str(short), "mp4", 100, fps=25, size=32)
    assert torch.equal(load_media(short).value, load_video(short).permute(0, 3, 1, 2))

    spread, held = EvenlySpread(VIDEO_FRAMES), 0
    for index in range(10_000):
        spread.offer(lambda index=index: index)
        held = max(held, len(spread.kept))
    picks = spread.picks()
    assert held < 2 * VIDEO_FRAMES and len(picks) == VIDEO_FRAMES and picks == sorted(set(picks))
    assert all(
        abs(a - b) <= spread.stride / 2 for a, b in zip(picks, sample_indices(10_000, VIDEO_FRAMES), strict=True)
    )


def test_large_video_frames_are_kept_scaled_down(tmp_path, monkeypatch):
    """Frames over MAX_VIDEO_FRAME_PIXELS (here 8 x 8) are kept scaled down to it, the aspect ratio kept."""
    from demo import app

    monkeypatch.setattr(app, "MAX_VIDEO_FRAME_PIXELS", 8 * 8)
    clip = tmp_path / "large.webm"
    write_clip(str(clip), "webm", 6, fps=4, codec="libvpx")
    assert load_media(clip).value.shape == (6, 3, 8, 8)


def test_decoded_media_kept_for_reuse_are_bounded_in_bytes(tmp_path, monkeypatch):
    """The cache of decoded uploads drops the least recently used past its byte budget (not a count), and never
    keeps one upload larger than the whole budget."""
    from demo import app

    images = []
    for k in range(3):
        images.append(tmp_path / f"{k}.png")
        Image.new("RGB", (100, 100), (k, 0, 0)).save(images[-1])
    cache = app._MediaCache(max_bytes=2 * 100 * 100 * 3)  # room for two decoded images
    monkeypatch.setattr(app, "_MEDIA_CACHE", cache)
    first = load_media(images[0])
    assert load_media(images[0]) is first  # reused
    load_media(images[1]), load_media(images[2])
    assert load_media(images[0]) is not first  # dropped for the other two, decoded again
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    assert load_media(big) is not load_media(big)


def test_too_many_files_in_a_message_or_a_conversation_are_refused(chat, tmp_path):
    """Five files in one message, or a conversation that would hold more than MAX_FILES_PER_CONVERSATION, are
    answered with the limit (before any is decoded)."""
    files = [str(tmp_path / f"{k}.png") for k in range(MAX_FILES_PER_MESSAGE + 1)]  # never written: not decoded
    settings = Settings(0.0, 1.0, 4, "chat")
    assert list(chat.stream({"text": "these?", "files": files}, [], settings)) == [
        ERROR_PREFIX + f"the message has {len(files)} files; the demo takes up to {MAX_FILES_PER_MESSAGE} per "
        "message: send them over several messages"
    ]
    image = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(image)
    upload = {"type": "file", "file": {"path": str(tmp_path / "gone.png")}}
    history = [
        {"role": "user", "content": [upload] * MAX_FILES_PER_CONVERSATION},
        {"role": "assistant", "content": "Many pictures."},
    ]
    refused = list(chat.stream({"text": "and this?", "files": [str(image)]}, history, settings))
    assert refused == [
        ERROR_PREFIX + f"the conversation would hold {MAX_FILES_PER_CONVERSATION + 1} files; the demo takes up "
        f"to {MAX_FILES_PER_CONVERSATION} per conversation: start a new chat"
    ]
