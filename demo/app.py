"""The Gradio demo: a multimodal chat with a Llama3MM (text plus image, video and audio uploads), streamed.

    python -m demo [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]

`DemoChat.stream` turns (message, history, settings) into the growing answer; the Gradio app (`build_app`) only
wires it to a `gr.ChatInterface`, so the whole answering path runs and is tested without a server.

Prompt formats: "completion" answers an upload with the prompt its adapter was trained with (`mm.prompts`, what
train/adapter.py used; the tiny embedded model is a base LM that knows nothing else) and continues a text-only turn
as plain text; "chat" writes the whole conversation in the Llama 3 chat format, media where they were uploaded.

Bad input (a file that is no image/video/audio, a corrupt one, one over the limits, a prompt longer than the
context, settings out of range) is answered in the chat with a message starting with ERROR_PREFIX; such turns are
left out of later prompts, so the conversation goes on. The demo is shared: work per upload is bounded by what is
decoded (not what headers claim), one generation runs at a time whichever way it arrives (page or API), and an
unexpected failure is answered with a short message while the server goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import random
import re
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llama3mm import Llama3MM
from llama3mm.processor import DEFAULT_PROMPTS
from lm.generate import SamplingConfig

log = logging.getLogger("demo")

DEFAULT_CHECKPOINT = Path("runs/llama3mm/tiny")
MAX_IMAGE_PIXELS = 25_000_000  # 5,000 x 5,000; the vision encoder sees at most a few 560-pixel tiles anyway
MAX_AUDIO_SECONDS = 30.0
MAX_VIDEO_SECONDS = 120.0
VIDEO_FRAMES = 64  # what encoders.video.load_video keeps of a clip: the most frames the model sees
MAX_VIDEO_DECODED_FRAMES = 7_200  # 120 s at 60 frames a second, counted while decoding
MAX_VIDEO_FRAME_PIXELS = 1280 * 720  # larger frames are scaled down: the encoder sees each as one 560-pixel tile
# Audio rates outside this range are no recording; within it, a rate without a small ratio to 16 kHz (44,101 Hz)
# would make torchaudio's resampling kernel gigabytes: (rate / gcd) * (16,000 / gcd) is held under this.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 384_000
MAX_RESAMPLE_RATIO = 1_000_000
MAX_FILES_PER_MESSAGE = 4
MAX_FILES_PER_CONVERSATION = 16
MAX_MEDIA_CACHE_BYTES = 512 * 2**20  # decoded uploads kept for later turns of their conversations
MAX_FILE_SIZE = "100mb"
MAX_NEW_TOKENS = 1024  # the slider's top; the API may ask for anything
# Far more text than a 128K-token context holds (about 4 characters a token): refused before it is tokenised.
MAX_PROMPT_CHARACTERS = 1_000_000
# Uploads (Gradio's cache) are deleted a day after they arrive, checked hourly: (frequency, age) in seconds.
UPLOAD_CLEANUP = (3600, 86400)
AUDIO_RATE = 16000
FORMATS = ("completion", "chat")
ERROR_PREFIX = "⚠️ "
# Gradio's queue group of every event that generates (the textbox, retry, examples and the /chat API): one answer
# at a time, whichever way a request comes in.
GENERATION_QUEUE = "llama3mm-generate"
# Containers PyPI's FFmpeg (PyAV) may read as video or audio; image2/*_pipe would take any file named .png.
VIDEO_CONTAINERS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "gif", "mpeg", "mpegts", "flv"}
AUDIO_CONTAINERS = {"mp3", "ogg", "wav", "flac", "aac", "matroska", "webm", "mov", "mp4", "m4a", "asf", "aiff"}


class InputError(ValueError):
    """Bad user input: answered in the chat, never raised to the server."""


@dataclass(frozen=True)
class Media:
    """One decoded upload: kind is image (PIL), video (uint8 [F, 3, H, W]) or audio (float 16 kHz [samples])."""

    kind: str
    value: Any
    name: str
    note: str | None = None


@dataclass(frozen=True)
class Settings:
    """Generation settings of one turn: what the page's sliders set, and the prompt format; InputError, with
    the reason, for values the demo does not take."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 64
    prompt_format: str = "chat"

    def __post_init__(self) -> None:
        # The page's sliders and radio bound these, but the /chat API takes any value: each is checked here once.
        if self.prompt_format not in FORMATS:
            raise InputError(f"prompt format {self.prompt_format!r}: choose one of {', '.join(FORMATS)}")
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 1 <= count <= MAX_NEW_TOKENS:
            raise InputError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got {count!r}")
        try:
            self.sampling(count)
        except ValueError as e:  # SamplingConfig's checks of temperature and top-p
            raise InputError(f"settings: {e}") from e

    @classmethod
    def from_inputs(cls, temperature: Any, top_p: Any, max_new_tokens: Any, prompt_format: Any) -> Settings:
        """Settings from the page's or an API client's values (numbers may come as floats or strings)."""
        count = _number(max_new_tokens, "max new tokens")
        if math.isfinite(count) and count.is_integer():
            count = int(count)
        return cls(_number(temperature, "temperature"), _number(top_p, "top-p"), count, str(prompt_format))

    def sampling(self, max_new_tokens: int) -> SamplingConfig:
        """These settings as lm's SamplingConfig, drawing at most `max_new_tokens` (what the context leaves)."""
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p)


def _number(value: Any, name: str) -> float:
    """`value` as a float, or InputError naming the setting."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be a number, got {value!r}") from e


# ---- uploads --------------------------------------------------------------------------------------------------


class _MediaCache:
    """Decoded uploads by (path, modification time, size), least recently used dropped past a size in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[Media, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Media | None:
        """The cached media of `key`, if any (now the most recently used)."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: tuple, media: Media) -> None:
        """Keep `media` (unless it alone is over the budget), dropping the least recently used past it."""
        size = _media_bytes(media)
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = (media, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


def _media_bytes(media: Media) -> int:
    """The memory a decoded upload holds (tensor bytes, or an image's pixels times its bands)."""
    if isinstance(media.value, torch.Tensor):
        return media.value.numel() * media.value.element_size()
    width, height = media.value.size
    return width * height * len(media.value.getbands())


_MEDIA_CACHE = _MediaCache(MAX_MEDIA_CACHE_BYTES)


def load_media(path: str | Path) -> Media:
    """Decode an upload by its content (never its extension) within the demo's limits, or raise InputError."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    if stat is None:
        raise InputError(f"{path.name}: the uploaded file is gone; please upload it again")
    # Keyed by modification time and size too: history turns re-read their files on every later turn.
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    media = _MEDIA_CACHE.get(key)
    if media is None:
        media = _decode_media(path, stat.st_size)
        _MEDIA_CACHE.put(key, media)
    return media


def _decode_media(path: Path, size: int) -> Media:
    """One upload decoded (uncached): image, then libsndfile's audio, then PyAV's video or audio."""
    name, file = path.name, str(path)
    if size == 0:
        raise InputError(f"{name} is empty")
    image = _open_image(file, name)
    if image is not None:
        return image
    audio = _read_soundfile(file, name)
    if audio is not None:
        return audio
    return _read_av(file, name)


def _open_image(path: str, name: str) -> Media | None:
    """An image (None when the content is no image format PIL knows); refused over MAX_IMAGE_PIXELS unread."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        # PIL refuses far larger images itself, naming only the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise InputError(_too_many_pixels(name, int(found.group(1)) if found else None)) from e
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return None
    with image:
        width, height = image.size
        # Image.open reads only the header, so a huge image is refused before a byte of it is decoded.
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(_too_many_pixels(name, width * height, f" ({width:,} x {height:,})"))
        try:
            return Media("image", image.convert("RGB"), name)
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{name} looks like an image ({image.format}) but is corrupt: {e}") from e


def _too_many_pixels(name: str, pixels: int | None, shape: str = "") -> str:
    size = f"of {pixels:,} pixels{shape}" if pixels else "of too many pixels"
    return f"{name} is an image {size}; the demo takes images up to {MAX_IMAGE_PIXELS:,} pixels (e.g. 5,000 x 5,000)"


def _read_soundfile(path: str, name: str) -> Media | None:
    """WAV/FLAC/OGG audio through libsndfile (None when it is no such file), at most MAX_AUDIO_SECONDS of it."""
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception:  # libsndfile raises several types for "not my format"
        return None
    _check_sample_rate(name, info.samplerate)
    keep = int(MAX_AUDIO_SECONDS * info.samplerate)
    try:
        data, rate = soundfile.read(path, frames=keep, dtype="float32", always_2d=True)
    except Exception as e:
        raise InputError(f"{name} looks like audio ({info.format}) but is corrupt: {e}") from e
    return _audio_media(torch.from_numpy(data).mean(dim=1), rate, info.frames / max(info.samplerate, 1), name)


def _check_sample_rate(name: str, rate: int) -> None:
    """InputError for an audio rate no recording has, or one too costly to resample to AUDIO_RATE."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InputError(
            f"{name} declares a sample rate of {rate:,} Hz; the demo takes audio sampled at {MIN_SAMPLE_RATE:,} "
            f"to {MAX_SAMPLE_RATE:,} Hz"
        )
    common = math.gcd(rate, AUDIO_RATE)
    if (rate // common) * (AUDIO_RATE // common) > MAX_RESAMPLE_RATIO:
        raise InputError(
            f"{name} is sampled at {rate:,} Hz, which has no small ratio to {AUDIO_RATE:,} Hz (resampling it would "
            "take gigabytes): save it at a common rate such as 16,000, 44,100 or 48,000 Hz"
        )


def _audio_media(waveform: torch.Tensor, rate: int, seconds: float, name: str) -> Media:
    from encoders.speech import resample

    if waveform.numel() == 0:
        raise InputError(f"{name} holds no audio samples")
    if waveform.numel() < rate * 0.02:
        raise InputError(f"{name} is shorter than 20 ms: too short to hear")
    note = None
    if seconds > MAX_AUDIO_SECONDS + 1e-6:
        note = f"{name} is {seconds:.0f} s long: only its first {MAX_AUDIO_SECONDS:.0f} s are heard"
    return Media("audio", resample(waveform, rate, AUDIO_RATE).contiguous(), name, note)


def _read_av(path: str, name: str) -> Media:
    """Video (frames) or audio in the containers PyAV reads; anything else is refused as no media file."""
    import av

    try:
        container = av.open(path)
    except Exception as e:  # av.error.* for every "cannot read this"
        raise InputError(f"{name} is not an image, video or audio file (its content is none of them)") from e
    with container:
        formats = set(container.format.name.split(","))
        has_video = bool(container.streams.video) and bool(formats & VIDEO_CONTAINERS)
        has_audio = bool(container.streams.audio) and bool(formats & AUDIO_CONTAINERS)
        if not has_video and not has_audio:
            raise InputError(f"{name} is not an image, video or audio file (its content is none of them)")
        seconds = container.duration / av.time_base if container.duration else None
        if has_video:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{name}: {width:,} x {height:,} video frames are over the limit of {MAX_IMAGE_PIXELS:,} pixels"
                )
            if seconds is not None and seconds > MAX_VIDEO_SECONDS:
                raise InputError(
                    f"{name} is a {seconds:.0f} s video; the demo takes clips up to {MAX_VIDEO_SECONDS:.0f} s"
                )
            try:
                return Media("video", _decode_video(container, stream, name), name)
            except InputError:
                raise
            except Exception as e:  # av.error.* from a damaged stream
                raise InputError(f"{name} looks like a video but cannot be decoded: {e}") from e
        return _decode_av_audio(container, name, seconds)


def _decode_video(container: Any, stream: Any, name: str) -> torch.Tensor:
    """Uint8 frames [F, 3, H, W], F <= VIDEO_FRAMES spread over the clip as encoders.video.load_video spreads them.

    The clip is decoded as a stream and refused past MAX_VIDEO_SECONDS or MAX_VIDEO_DECODED_FRAMES as measured
    (a container may declare no length, or a false one); only the frames that may be sampled are kept.
    """
    frames = EvenlySpread(VIDEO_FRAMES)
    start, size = None, None
    for frame in container.decode(stream):
        if frame.width * frame.height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{name}: its {frame.width:,} x {frame.height:,} frames are over {MAX_IMAGE_PIXELS:,} pixels"
            )
        if frame.time is not None:
            start = frame.time if start is None else start
            if frame.time - start > MAX_VIDEO_SECONDS:
                raise InputError(f"{name} runs past {MAX_VIDEO_SECONDS:.0f} s; the demo takes clips up to that long")
        if frames.seen == MAX_VIDEO_DECODED_FRAMES:
            raise InputError(
                f"{name} has over {MAX_VIDEO_DECODED_FRAMES:,} frames; the demo takes clips up to "
                f"{MAX_VIDEO_SECONDS:.0f} s at up to {MAX_VIDEO_DECODED_FRAMES / MAX_VIDEO_SECONDS:.0f} frames a second"
            )
        size = size or _scaled_size(frame.width, frame.height, MAX_VIDEO_FRAME_PIXELS)
        frames.offer(lambda frame=frame, size=size: frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
    if not frames.seen:
        raise InputError(f"{name} looks like a video but holds no frames")
    return torch.from_numpy(np.stack(frames.picks())).permute(0, 3, 1, 2).contiguous()


class EvenlySpread:
    """Up to `count` items of a stream of unknown length, spread over all of it, never holding 2 x count.

    Every stride-th item is kept, the stride doubling whenever 2 x count are held; `picks` returns those nearest
    encoders.video.sample_indices over everything seen (exactly those while the stride is 1).
    """

    def __init__(self, count: int):
        self.count = count
        self.kept: list[Any] = []
        self.stride = 1
        self.seen = 0

    def offer(self, make: Callable[[], Any]) -> None:
        """Count one more item, keeping make()'s value when it falls on the stride (make() is skipped otherwise)."""
        if self.seen % self.stride == 0:
            self.kept.append(make())
            if len(self.kept) == 2 * self.count:
                self.kept, self.stride = self.kept[::2], self.stride * 2
        self.seen += 1

    def picks(self) -> list[Any]:
        """The kept items nearest sample_indices(seen, count): distinct, as picks are at least a stride apart."""
        from encoders.video import sample_indices

        nearest = (int(i / self.stride + 0.5) for i in sample_indices(self.seen, self.count))
        return [self.kept[min(k, len(self.kept) - 1)] for k in nearest]


def _scaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down to at most max_pixels, the aspect kept (even sides, as video scalers prefer)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _decode_av_audio(container: Any, name: str, seconds: float | None) -> Media:
    """The first MAX_AUDIO_SECONDS of the first audio stream as a mono float waveform (e.g. a browser recording)."""
    import av

    if container.streams.audio[0].rate:  # 0 when the container leaves it to the decoder
        _check_sample_rate(name, container.streams.audio[0].rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    limit = int(MAX_AUDIO_SECONDS * AUDIO_RATE)
    chunks, total = [], 0
    try:
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                chunks.append(torch.from_numpy(out.to_ndarray().reshape(-1).copy()))
                total += chunks[-1].numel()
            if total >= limit:
                break
    except Exception as e:
        raise InputError(f"{name} looks like audio but cannot be decoded: {e}") from e
    waveform = torch.cat(chunks)[:limit] if chunks else torch.zeros(0)
    if seconds is None:
        seconds = MAX_AUDIO_SECONDS + 1 if total >= limit else total / AUDIO_RATE
    return _audio_media(waveform, AUDIO_RATE, seconds, name)


# ---- answering ------------------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """The text of a Gradio message content (str, item dict or list of items)."""
    items = content if isinstance(content, list) else [content]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and item.get("type") == "text":
            texts.append(str(item.get("text", "")))
    return "".join(texts)


def _files_of(content: Any) -> list[str]:
    """Paths of the files in a Gradio message content."""
    items = content if isinstance(content, list) else [content]
    paths = []
    for item in items:
        if isinstance(item, Mapping):
            file = item.get("file", item) if item.get("type", "file") == "file" else None
            path = file.get("path") if isinstance(file, Mapping) else None
            if path:
                paths.append(str(path))
        elif isinstance(item, tuple) and item:  # the older tuple form of a file message
            paths.append(str(item[0]))
    return paths


@dataclass
class _Turn:
    role: str
    text: str
    files: list[str]


def _turns(history: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    """History as alternating turns (a user's consecutive messages merged), without refused turns."""
    turns: list[_Turn] = []
    for message in history:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        text, files = _text_of(message.get("content")), _files_of(message.get("content"))
        if turns and turns[-1].role == role:
            turns[-1].text += ("\n" if turns[-1].text and text else "") + text
            turns[-1].files += files
        else:
            turns.append(_Turn(role, text, files))
    kept: list[_Turn] = []
    for turn in turns:
        if turn.role == "assistant" and turn.text.startswith(ERROR_PREFIX):
            if kept and kept[-1].role == "user":
                kept.pop()  # the refused upload or prompt: it would be refused again
            continue
        kept.append(turn)
    return kept


class DemoChat:
    """The answering side of the demo for one loaded Llama3MM (shared by every session, one answer at a time)."""

    def __init__(self, mm: Llama3MM, checkpoint: str | Path | None = None):
        self.mm = mm.eval()
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.prompts = dict(mm.prompts)  # media kind -> its adapter's training prompt (empty: a chat model)
        # Reentrant: a generation dropped elsewhere may be finalised (closed) inside another's locked step.
        self._model_lock = threading.RLock()

    # ---- what the model can do ------------------------------------------------------------------------------

    def modalities(self) -> list[str]:
        """The upload kinds the loaded parts can take."""
        mm, kinds = self.mm, []
        if mm.vision_encoder is not None and mm.vision_adapter is not None:
            kinds.append("image")
            if mm.video_adapter is not None:
                kinds.append("video")
        if mm.speech_encoder is not None and mm.speech_adapter is not None:
            kinds.append("audio")
        return kinds

    def default_settings(self) -> Settings:
        """Completion and greedy decoding for a model with adapter prompts (a tiny base LM); chat otherwise."""
        if self.prompts:
            return Settings(temperature=0.0, top_p=1.0, max_new_tokens=32, prompt_format="completion")
        return Settings(max_new_tokens=min(256, self.mm.config.max_seq_len // 2), prompt_format="chat")

    def training_prompt(self, kind: str) -> str | None:
        """The prompt the adapter of `kind` was trained with, if the checkpoint records it."""
        return self.prompts.get(kind) or None

    def info_markdown(self) -> str:
        """Which LM, encoders and adapters are loaded, and the demo's limits."""
        mm, cfg = self.mm, self.mm.config

        def part(module: torch.nn.Module | None) -> str:
            if module is None:
                return "absent"
            params = sum(p.numel() for p in module.parameters())
            return f"`{type(module).__name__}` ({params / 1e6:.2f} M parameters)"

        lm_path = mm.lm_path or "(saved with the checkpoint)"
        lines = [
            f"**Checkpoint**: `{self.checkpoint or '(in memory)'}`",
            f"**Language model**: `{lm_path}`: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
            f"({cfg.n_kv_heads} KV), vocab {cfg.vocab_size:,}, context {cfg.max_seq_len:,} tokens",
            f"**Image**: encoder {part(mm.vision_encoder)}, adapter {part(mm.vision_adapter)}",
            f"**Video**: adapter {part(mm.video_adapter)}",
            f"**Speech**: encoder {part(mm.speech_encoder)}, adapter {part(mm.speech_adapter)}",
            f"**Uploads it takes**: {', '.join(self.modalities()) or 'none (text only)'}",
        ]
        if self.prompts:
            trained = "; ".join(f"{kind}: “{prompt}”" for kind, prompt in sorted(self.prompts.items()))
            lines.append(f"**Adapter training prompts** (the completion format uses them): {trained}")
        lines.append(
            f"**Limits**: images up to {MAX_IMAGE_PIXELS:,} pixels, audio trimmed to its first "
            f"{MAX_AUDIO_SECONDS:.0f} s, video up to {MAX_VIDEO_SECONDS:.0f} s, files up to {MAX_FILE_SIZE} "
            f"({MAX_FILES_PER_MESSAGE} a message, {MAX_FILES_PER_CONVERSATION} a conversation); "
            f"conversations up to {MAX_PROMPT_CHARACTERS:,} characters (and the context), answers up to "
            f"{MAX_NEW_TOKENS:,} new tokens."
        )
        return "\n\n".join(lines)

    # ---- one answer -----------------------------------------------------------------------------------------

    def stream(
        self,
        message: str | Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
        settings: Settings,
        notify: Callable[[str], None] | None = None,
    ) -> Iterator[str]:
        """The growing answer to `message` ({"text", "files"} or a str) after `history` (Gradio messages).

        Bad input yields one message starting with ERROR_PREFIX; `notify` receives notes (e.g. a trimmed clip).
        So does an unexpected failure (logged with its traceback): the next request is served as usual.
        """
        try:
            yield from self._answer(message, history, settings, notify or log.info)
        except InputError as e:
            yield ERROR_PREFIX + str(e)
        except Exception as e:
            log.exception("answering a message failed")
            yield (
                f"{ERROR_PREFIX}the demo failed while answering ({type(e).__name__}); it goes on serving: send the "
                "message again, or start a new chat"
            )

    def _answer(
        self,
        message: str | Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
        settings: Settings,
        notify: Callable[[str], None],
    ) -> Iterator[str]:
        """The growing answer; bad input raises InputError before anything is generated."""
        prompt, media = self._prompt(message, history, settings, notify)
        ids, max_new_tokens = self._fit_context(prompt, media, settings.max_new_tokens)
        pieces = self.mm.generate(ids, **media, sampling=settings.sampling(max_new_tokens), stream=True)
        answer = ""
        for piece in self._one_at_a_time(pieces):
            answer += piece
            yield answer
        if not answer:
            yield "(the model ended its answer at once: no text)"

    def _one_at_a_time(self, pieces: Iterator[str]) -> Iterator[str]:
        """`pieces` stepped (and closed) holding the model lock, with its own KV cache in the shared LM.

        The LM keeps its KV cache on the model, set up on a generation's first step and cleared when it closes:
        stepped this way, generations that interleave, or one stopped by its user and closed (or garbage
        collected) while another runs, each see and clear only their own cache.
        """
        own: list = [None] * len(self.mm.lm.layers)

        def step(action: Callable[[], Any]) -> Any:
            nonlocal own
            with self._model_lock:
                others = self._swap_kv_caches(own)
                try:
                    return action()
                finally:
                    own = self._swap_kv_caches(others)

        try:
            while True:
                try:
                    piece = step(lambda: next(pieces))
                except StopIteration:
                    return
                yield piece
        finally:
            step(pieces.close)

    def _swap_kv_caches(self, caches: list) -> list:
        """Put `caches` (one per layer) into the shared LM's attention layers; return those they held."""
        attentions = [layer.attention for layer in self.mm.lm.layers.values()]
        held = [attention.cache for attention in attentions]
        for attention, cache in zip(attentions, caches, strict=True):
            attention.cache = cache
        return held

    def _prompt(
        self,
        message: str | Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
        settings: Settings,
        notify: Callable[[str], None],
    ) -> tuple[str | list[dict], dict[str, Any]]:
        """The prompt (text or chat messages) and generate()'s media keywords for this turn."""
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text = str(message.get("text") or "")
        _check_prompt_length(len(text))
        files = [f.get("path") if isinstance(f, Mapping) else str(f) for f in message.get("files") or []]
        if len(files) > MAX_FILES_PER_MESSAGE:
            raise InputError(
                f"the message has {len(files)} files; the demo takes up to {MAX_FILES_PER_MESSAGE} per message: "
                "send them over several messages"
            )
        uploads = [self._checked(load_media(f)) for f in files]
        for item in uploads:
            if item.note:
                notify(item.note)
        if not text.strip() and not uploads:
            raise InputError("the message is empty: type some text or upload a file")
        if settings.prompt_format == "completion":
            return self._completion_prompt(text, uploads)
        return self._chat_prompt(text, uploads, history, notify)

    def _checked(self, item: Media) -> Media:
        if item.kind not in self.modalities():
            takes = ", ".join(self.modalities()) or "text only"
            raise InputError(f"{item.name} is {item.kind}, but this model has no {item.kind} parts (it takes: {takes})")
        return item

    def _completion_prompt(self, text: str, uploads: list[Media]) -> tuple[str, dict[str, Any]]:
        if not uploads:
            return text, {}
        if len(uploads) > 1:
            raise InputError(
                f"the completion format answers one upload per message, got {len(uploads)}: send them one by one "
                "or choose the chat format"
            )
        item = uploads[0]
        prompt = self.training_prompt(item.kind) or text.strip() or DEFAULT_PROMPTS[item.kind]
        return prompt, _media_kwargs(uploads)

    def _chat_prompt(
        self, text: str, uploads: list[Media], history: Sequence[Mapping[str, Any]], notify: Callable[[str], None]
    ) -> tuple[list[dict], dict[str, Any]]:
        messages: list[dict] = []
        every: list[Media] = []
        turns = _turns(history)
        _check_prompt_length(len(text) + sum(len(turn.text) for turn in turns))
        files = len(uploads) + sum(len(turn.files) for turn in turns)
        if files > MAX_FILES_PER_CONVERSATION:
            raise InputError(
                f"the conversation would hold {files} files; the demo takes up to {MAX_FILES_PER_CONVERSATION} per "
                "conversation: start a new chat"
            )
        for turn in turns:
            if turn.role == "user":
                earlier = [self._checked(load_media(f)) for f in turn.files]
                every += earlier
                messages.append({"role": "user", "content": _chat_content(turn.text, earlier)})
            else:
                messages.append({"role": "assistant", "content": turn.text})
        every += uploads
        messages.append({"role": "user", "content": _chat_content(text, uploads)})
        videos = [m for m in every if m.kind == "video"]
        if len(videos) > 1:
            notify(f"the model sees one clip per conversation: {videos[-1].name}, the latest")
        return messages, _media_kwargs(every)

    def _fit_context(self, prompt: str | list[dict], media: dict[str, Any], max_new_tokens: int) -> tuple[list, int]:
        """The prompt's token ids and the new-token budget, or InputError when the prompt fills the context."""
        try:
            inputs = self.mm.processor.prompt_inputs(prompt, images=media.get("images"), audio=media.get("audio"))
        except ValueError as e:  # e.g. "<|image|>" typed into a text prompt without an image
            raise InputError(f"cannot build the prompt: {e}") from e
        ids = inputs["tokens"][0].tolist()
        context = self.mm.config.max_seq_len
        if len(ids) >= context:
            raise InputError(
                f"the prompt is {len(ids):,} tokens, but the model's context is {context:,} tokens: shorten the "
                "message or clear the conversation"
            )
        return ids, max(1, min(int(max_new_tokens), context - len(ids)))

    def respond(
        self,
        message: str | Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        prompt_format: str,
    ) -> Iterator[str]:
        """The ChatInterface function: settings come as its additional inputs; notes become toasts."""
        import gradio as gr

        try:
            settings = Settings.from_inputs(temperature, top_p, max_new_tokens, prompt_format)
        except InputError as e:
            yield ERROR_PREFIX + str(e)
            return
        yield from self.stream(message, history, settings, notify=lambda note: gr.Warning(note))


def _check_prompt_length(characters: int) -> None:
    """InputError for a conversation's text over MAX_PROMPT_CHARACTERS (cheaper to count than to tokenise)."""
    if characters > MAX_PROMPT_CHARACTERS:
        raise InputError(
            f"the conversation's text is {characters:,} characters; the demo takes up to "
            f"{MAX_PROMPT_CHARACTERS:,}: shorten the message or clear the conversation"
        )


def _chat_content(text: str, media: list[Media]) -> list[dict]:
    """Chat content items: images and audio where uploaded (before the text, as the textbox sends them)."""
    items: list[dict] = []
    for item in media:
        if item.kind == "image":
            items.append({"type": "image"})  # the pixels go to generate() with the others, in order
        elif item.kind == "audio":
            items.append({"type": "audio"})
    if text:
        items.append({"type": "text", "text": text})
    return items


def _media_kwargs(media: list[Media]) -> dict[str, Any]:
    """generate()'s images / audio / video keywords (video: the last clip, since a row sees one)."""
    kwargs: dict[str, Any] = {}
    images = [m.value for m in media if m.kind == "image"]
    audio = [m.value for m in media if m.kind == "audio"]
    videos = [m.value for m in media if m.kind == "video"]
    if images:
        kwargs["images"] = images
    if audio:
        kwargs["audio"] = audio
    if videos:
        kwargs["video"] = videos[-1]
    return kwargs


# ---- examples from the embedded default data ------------------------------------------------------------------


def make_examples(chat: DemoChat, directory: str | Path) -> tuple[list[dict], list[str]]:
    """Example messages (with their labels, the true captions) for the parts the model has, written to directory."""
    from data.scenes import caption, motion_caption, random_scene
    from data.synthetic import clip_frames, draw_scene, encode_mp4, random_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random("demo-examples")  # a seed of its own: scenes the adapters were not trained on
    kinds = chat.modalities()
    examples: list[dict] = []
    labels: list[str] = []

    def ask(kind: str) -> str:
        # The markers are the processor's business: shown in the textbox they would read as text to type.
        prompt = chat.training_prompt(kind) or DEFAULT_PROMPTS[kind]
        return prompt.replace("<|audio|>", "").replace("<|image|>", "").strip()

    if "image" in kinds:
        for k in range(2):
            scene = random_scene(rng)
            path = directory / f"scene_{k}.png"
            draw_scene(scene, 64).save(path)
            examples.append({"text": ask("image"), "files": [str(path)]})
            labels.append(f"Image: {caption(scene)}")
    if "video" in kinds:
        clip = random_clip(rng)
        path = directory / "clip.mp4"
        path.write_bytes(encode_mp4(clip_frames(clip, 64, 16), fps=8))
        examples.append({"text": ask("video"), "files": [str(path)]})
        labels.append(f"Video: {motion_caption(clip['object'], clip['direction'])}")
    if "audio" in kinds:
        try:
            examples_audio = _spoken_examples(directory, rng)
        except (RuntimeError, OSError) as e:  # no espeak-ng: the other examples still serve
            log.warning("no spoken examples: %s", e)
            examples_audio = []
        for path, text in examples_audio:
            examples.append({"text": ask("audio"), "files": [str(path)]})
            labels.append(f"Audio: “{text}” spoken")
    if chat.default_settings().prompt_format == "chat":
        # A post-trained LM: requests of the kinds its instruction data taught, about the demo's own scenes and sums.
        from data.instruct import math_dialog, scene_dialog, translation_dialog

        for dialog in (scene_dialog(rng), translation_dialog(rng), math_dialog(rng)):
            examples.append({"text": dialog["messages"][0]["content"], "files": []})
            labels.append(f"Text: {dialog['messages'][1]['content']}")
    else:
        examples.append({"text": "A small red circle", "files": []})
        labels.append("Text: A small red circle")
    return examples, labels


def _spoken_examples(directory: Path, rng: random.Random) -> list[tuple[Path, str]]:
    import soundfile

    from data.synthetic import ESPEAK_RATE, speak, speech_texts

    texts = speech_texts()
    out = []
    for k, text in enumerate((rng.choice(texts["word"]), rng.choice(texts["colour_shape"]))):
        path = directory / f"spoken_{k}.wav"
        soundfile.write(path, speak(text), ESPEAK_RATE)
        out.append((path, text))
    return out


# ---- the app --------------------------------------------------------------------------------------------------


def build_app(chat: DemoChat, examples_dir: str | Path | None = None) -> Any:
    """The Gradio Blocks app: an info panel over a multimodal ChatInterface with settings and examples."""
    import gradio as gr

    defaults = chat.default_settings()
    context = chat.mm.config.max_seq_len
    if examples_dir is None:
        examples_dir = Path(tempfile.gettempdir()) / "llama3mm-demo-examples"
    examples, labels = make_examples(chat, examples_dir)
    kinds = chat.modalities()
    file_types = [kind for kind in ("image", "video", "audio") if kind in kinds]
    completion_info = (
        "completion: an upload is answered from the prompt its adapter was trained with (your text is ignored: "
        "the tiny model knows only those prompts); a text-only message is continued as plain text. chat: the "
        "Llama 3 chat format with the whole conversation."
    )
    with gr.Blocks(title="Llama 3 herd: multimodal chat", analytics_enabled=False, delete_cache=UPLOAD_CLEANUP) as app:
        gr.Markdown("# Llama 3 herd: multimodal chat")
        with gr.Accordion("Loaded model", open=True):
            gr.Markdown(chat.info_markdown(), elem_id="model-info")
        textbox = gr.MultimodalTextbox(
            file_types=file_types or None,
            file_count="multiple",
            sources=["upload", "microphone"] if "audio" in kinds else ["upload"],
            placeholder="Type a message or upload " + (", ".join(file_types) or "nothing: this model reads text only"),
            interactive=True,
            elem_id="chat-input",
            render=False,
        )
        gr.ChatInterface(
            chat.respond,
            multimodal=True,
            textbox=textbox,
            chatbot=gr.Chatbot(elem_id="chatbot", height=420, render=False),
            additional_inputs=[
                gr.Slider(
                    0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)", render=False
                ),
                gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (1 = off)", render=False),
                gr.Slider(
                    1,
                    min(MAX_NEW_TOKENS, context),
                    value=defaults.max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    render=False,
                ),
                gr.Radio(
                    list(FORMATS),
                    value=defaults.prompt_format,
                    label="Prompt format",
                    info=completion_info,
                    render=False,
                ),
            ],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            # Settings left out of the examples, so they show as labelled cards in the empty chat.
            examples=[[example] for example in examples],
            example_labels=labels,
            cache_examples=False,
            api_name="chat",
        )
    _share_generation_queue(app, chat.respond)
    # One answer at a time: every session shares the model and its KV cache.
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def _share_generation_queue(app: Any, respond: Callable[..., Any]) -> None:
    """Put every event that runs `respond` into GENERATION_QUEUE, one at a time.

    ChatInterface wraps its function once for the page's events and once for the /chat API, and Gradio's queue
    groups events by function: left alone, a browser and an API client would generate at the same time.
    """
    for block_fn in app.fns.values():
        if getattr(block_fn.fn, "__wrapped__", None) == respond:
            block_fn.concurrency_id, block_fn.concurrency_limit = GENERATION_QUEUE, 1


def load_model(checkpoint: Path, lm_path: str | Path | None = None) -> Llama3MM:
    """The checkpoint's model, or SystemExit with the reason, naming a damaged file (never a library traceback)."""
    try:
        return Llama3MM.from_pretrained(checkpoint, lm_path=lm_path)
    except Exception as e:  # safetensors, json, torch and our own loaders each raise their own types
        reason = _damaged_file(checkpoint, lm_path) or f"{type(e).__name__}: {e}"
        sys.exit(f"--checkpoint {checkpoint}: cannot load it: {reason}")


def _damaged_file(checkpoint: Path, lm_path: str | Path | None = None) -> str | None:
    """What is wrong with the first unreadable JSON or safetensors file of a checkpoint (and its LM), if any."""
    from safetensors import safe_open

    directories = [checkpoint]
    if lm_path is not None:
        directories.append(Path(lm_path))
    else:
        try:  # a Llama3MM checkpoint names its LM, which may live elsewhere
            named = Path(json.loads((checkpoint / "llama3mm.json").read_text())["lm"]["path"])
            directories.append(named if named.is_absolute() else checkpoint / named)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for path in sorted(p for directory in directories for p in directory.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):  # reads the header and checks the file holds what it lists
                    pass
        except Exception as e:
            return f"{path} is damaged (truncated or not {path.suffix[1:]}): {e}"
    return None


def main(argv: list[str] | None = None) -> None:
    """Load a checkpoint and serve the demo (never shared publicly; 127.0.0.1 unless --host says otherwise)."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help=f"a Llama3MM or LM checkpoint directory (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--lm", help="the LM of a Llama3MM checkpoint moved away from it (sha256-checked)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if not checkpoint.is_dir():
        if args.checkpoint:
            sys.exit(f"--checkpoint {checkpoint}: no such directory")
        sys.exit(
            f"no model at {DEFAULT_CHECKPOINT}: run `make quickstart` to build the tiny default model, "
            "or pass --checkpoint DIR (a Llama3MM or Llama 3 checkpoint)"
        )
    chat = DemoChat(load_model(checkpoint, lm_path=args.lm), checkpoint)
    log.info("loaded %s; uploads: %s", checkpoint, ", ".join(chat.modalities()) or "none")
    app = build_app(chat)
    app.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_FILE_SIZE)


__all__ = [
    "DemoChat",
    "InputError",
    "Media",
    "Settings",
    "build_app",
    "load_media",
    "load_model",
    "main",
    "make_examples",
]
