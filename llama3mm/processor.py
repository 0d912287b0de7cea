"""Text and media -> Llama3MM inputs, one path for generation and training.

Text may hold "<|image|>" markers: each becomes the model's image token (the first id past the text vocabulary),
never the text tokenizer's own <|image|> (128011). Images go through `encoders.tiling` (Mllama's preprocessing)
at the vision encoder's tile size.

Audio: "<|audio|>" markers (and chat `{"type": "audio"}` items, which the tokenizer writes as its `audio_id`)
become the model's `audio_token_id`, one marker per clip, expanded to a run of `adapters.speech.num_audio_tokens`
placeholders (80 ms each) whose embeddings the speech adapter replaces. A prompt without markers gets its clips'
runs after <|begin_of_text|>. Video needs no token: every text position of a row sees its clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from adapters.speech import num_audio_tokens

if TYPE_CHECKING:
    from llama3mm.model import Llama3MM

IMAGE_MARKER = "<|image|>"
AUDIO_MARKER = "<|audio|>"
# What an adapter is asked by default, by media kind (train/adapter.py trains with these unless told otherwise;
# a checkpoint records the prompt it used in Llama3MM.prompts). The audio placeholders come last, so the speech
# adapter's final output sits where the transcript's first token is predicted.
DEFAULT_PROMPTS = {
    "image": "Describe the image.",
    "video": "Describe the video.",
    "audio": f"Transcribe the audio: {AUDIO_MARKER}",
}


class Processor:
    """Builds token and image tensors for a Llama3MM (`mm.processor`)."""

    def __init__(self, mm: Llama3MM):
        self.mm = mm
        self.image_token_id = mm.image_token_id

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.mm.tokenizer

    def encode_text(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of text whose "<|image|>" / "<|audio|>" markers become image / audio tokens."""
        ids = [self.tokenizer.bos_id] if bos else []
        for k, part in enumerate(text.split(IMAGE_MARKER)):
            if k:
                ids.append(self.image_token_id)
            for j, piece in enumerate(part.split(AUDIO_MARKER)):
                if j:
                    ids.append(self.mm.audio_token_id)
                if piece:
                    ids.extend(self.tokenizer.encode(piece, bos=False, eos=False))
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[Any]]:
        """Chat-format prompt ids (ending with the assistant header) and the images carried by content items."""
        from lm.tokenizer import ChatFormat

        carried = [
            item["image"]
            for message in messages
            if not isinstance(message["content"], str)
            for item in message["content"]
            if isinstance(item, Mapping) and item.get("type") == "image" and "image" in item
        ]
        fmt = ChatFormat(self.tokenizer, image_token_id=self.image_token_id)
        audio_id = self.tokenizer.audio_id
        ids = [self.mm.audio_token_id if t == audio_id else t for t in fmt.encode_dialog_prompt(messages)]
        return ids, carried

    def tile(self, images_per_row: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """Images per row (PIL or uint8 [3, H, W]) -> images [B, I, T, 3, S, S], aspect_ratio_ids [B, I],
        tile_mask [B, I, T]; rows with fewer images are padded with id-0 images that no text sees."""
        from encoders.tiling import tile_image

        encoder = self.mm.vision_encoder
        if encoder is None:
            raise ValueError("this Llama3MM has no vision encoder: it cannot take images")
        size, max_tiles = encoder.cfg.image_size, encoder.cfg.max_num_tiles
        num_images = max(1, max((len(row) for row in images_per_row), default=0))
        batch = len(images_per_row)
        pixels = torch.zeros(batch, num_images, max_tiles, 3, size, size)
        ids = torch.zeros(batch, num_images, dtype=torch.long)
        mask = torch.zeros(batch, num_images, max_tiles, dtype=torch.bool)
        for b, row in enumerate(images_per_row):
            for i, image in enumerate(row):
                tiled = tile_image(image, size, max_tiles)
                pixels[b, i], ids[b, i], mask[b, i] = tiled.pixel_values, tiled.aspect_ratio_id, tiled.tile_mask.bool()
        return {"images": pixels, "aspect_ratio_ids": ids, "tile_mask": mask}

    def __call__(
        self,
        texts: Sequence[str | Sequence[int]],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        pad_id: int | None = None,
        bos: bool = True,
        audio: torch.Tensor | Sequence[Any] | None = None,
        audio_lengths: torch.Tensor | None = None,
        video: Any = None,
    ) -> dict[str, torch.Tensor]:
        """A training batch: tokens [B, S] right-padded with `pad_id` (default the tokenizer's), lengths [B],
        and the image tensors of `tile` when images are given (row b's k-th image token is its image k).

        audio: one clip per row (padded 16 kHz waveforms [B, L] with `audio_lengths` [B], as data.media collates
        them, or a list of 1-D waveforms, None for a row without one): each row's marker is expanded to its clip's
        placeholders; the batch gets `audio` and `audio_lengths` of the rows that have a clip. video: passed on.
        """
        rows = [self.encode_text(t, bos=bos) if isinstance(t, str) else [int(x) for x in t] for t in texts]
        if audio is not None:
            clips = _audio_clips(audio, audio_lengths, len(rows))
            for b, clip in enumerate(clips):
                counts = [] if clip is None else [self.audio_tokens(len(clip))]
                rows[b] = self._place_audio(rows[b], counts, f"row {b}")
        if images is not None:
            if len(images) != len(rows):
                raise ValueError(f"{len(rows)} texts but images for {len(images)} rows")
            for b, (row, imgs) in enumerate(zip(rows, images, strict=True)):
                _check_count(row.count(self.image_token_id), len(imgs), f"row {b}")
        if pad_id is None:
            pad_id = self.tokenizer.pad_id
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch = {"tokens": tokens, "lengths": lengths}
        if images is not None:
            batch.update(self.tile(images))
        if audio is not None:
            real = [clip for clip in clips if clip is not None]
            if real:
                batch["audio_lengths"] = torch.tensor([len(clip) for clip in real])
                batch["audio"] = torch.nn.utils.rnn.pad_sequence(real, batch_first=True)
        if video is not None:
            batch["video"] = video
        return batch

    def audio_tokens(self, num_samples: int) -> int:
        """Placeholders a 16 kHz clip of num_samples takes, with this model's encoder and adapter strides."""
        encoder, adapter = self.mm.speech_encoder, self.mm.speech_adapter
        if encoder is None or adapter is None:
            raise ValueError("this Llama3MM has no speech encoder/adapter: it cannot take audio")
        return num_audio_tokens(num_samples, encoder.cfg.stride, adapter.cfg.conv_stride)

    def _place_audio(self, ids: list[int], counts: list[int], where: str) -> list[int]:
        """One marker per clip expanded to its run of placeholders (runs already expanded are kept; no marker:
        the runs go after <|begin_of_text|>)."""
        from adapters.speech import expand_audio_placeholders

        audio_id = self.mm.audio_token_id
        found = ids.count(audio_id)
        if found == 0 and counts:
            start = 1 if ids[:1] == [self.tokenizer.bos_id] else 0
            return ids[:start] + [audio_id] * sum(counts) + ids[start:]
        if found == sum(counts):
            return ids
        if found != len(counts):
            raise ValueError(f"{where} holds {found} <|audio|> tokens but {len(counts)} audio clips were given")
        return expand_audio_placeholders(ids, audio_id, counts)

    def prompt_inputs(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, Any]],
        images: Sequence[Any] | None = None,
        video: Any = None,
        audio: Any = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """One generation prompt (text, ids, or chat messages) and its media -> `encode_media` keyword inputs
        with `tokens` [1, S]. A text prompt without "<|image|>" gets the images' tokens after <|begin_of_text|>.

        audio: a file path, a 1-D 16 kHz waveform, or a list of them (clips in the order of the prompt's markers).
        video: a file path (read with encoders.video.load_video, up to 64 frames) or uint8 frames [F, 3, H, W].
        device: where the tokens and image tensors go (default: the LM's; training builds rows on the host).
        """
        images = list(images or [])
        if isinstance(prompt, str):
            ids = self.encode_text(prompt)
            if images and IMAGE_MARKER not in prompt:
                ids = ids[:1] + [self.image_token_id] * len(images) + ids[1:]
        elif len(prompt) and isinstance(prompt[0], Mapping):
            ids, carried = self.encode_chat(prompt)
            images = carried + images
        else:
            ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if not ids:
            raise ValueError("empty prompt")
        _check_count(ids.count(self.image_token_id), len(images), "the prompt")
        device = self.mm.lm.output.weight.device if device is None else device
        inputs: dict[str, Any] = {"tokens": torch.tensor([ids], device=device)}
        if images:
            inputs.update({k: v.to(device) for k, v in self.tile([images]).items()})
        if audio is not None:
            clips = _audio_clips(audio if isinstance(audio, (list, tuple)) else [audio], None, None)
            ids = self._place_audio(ids, [self.audio_tokens(len(clip)) for clip in clips], "the prompt")
            inputs["tokens"] = torch.tensor([ids], device=inputs["tokens"].device)
            inputs["audio"] = clips
        if video is not None:
            inputs["video"] = [_video_frames(video)]
        return inputs


def _audio_clips(audio: Any, audio_lengths: torch.Tensor | None, rows: int | None) -> list[torch.Tensor | None]:
    """Audio as 1-D float waveforms: files are read with encoders.speech.load_audio (16 kHz, mono)."""
    from pathlib import Path

    from encoders.speech import load_audio

    if isinstance(audio, torch.Tensor) and audio.dim() == 2:
        lengths = audio_lengths.tolist() if audio_lengths is not None else [audio.shape[1]] * audio.shape[0]
        clips: list = [audio[b, :n] for b, n in enumerate(lengths)]
    else:
        if audio_lengths is not None:
            raise ValueError("audio_lengths goes with a padded [B, L] audio tensor, not with a list of clips")
        clips = [
            None if clip is None else load_audio(clip) if isinstance(clip, (str, Path)) else torch.as_tensor(clip)
            for clip in audio
        ]
    if rows is not None and len(clips) != rows:
        raise ValueError(f"{rows} texts but audio for {len(clips)} rows")
    for k, clip in enumerate(clips):
        if clip is not None and clip.dim() != 1:
            raise ValueError(f"audio clip {k} has shape {tuple(clip.shape)}; expected a 1-D 16 kHz waveform")
    return [None if clip is None else clip.float() for clip in clips]


def _video_frames(video: Any) -> torch.Tensor:
    """A video file (up to 64 frames, encoders.video.load_video) or uint8 frames [F, 3, H, W] -> [F, 3, H, W]."""
    from pathlib import Path

    if isinstance(video, (str, Path)):
        from encoders.video import load_video

        return load_video(video).permute(0, 3, 1, 2)
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(
            f"video must be a file path or uint8 frames [F, 3, H, W], got {getattr(video, 'shape', video)}"
        )
    return video


def _check_count(tokens: int, images: int, where: str) -> None:
    if tokens != images:
        raise ValueError(f"{where} holds {tokens} <|image|> tokens but {images} images were given")


__all__ = ["AUDIO_MARKER", "DEFAULT_PROMPTS", "IMAGE_MARKER", "Processor"]
