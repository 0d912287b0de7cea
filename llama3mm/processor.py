"""Text and media -> Llama3MM inputs, one path for generation and training.

Text may hold "<|image|>" markers: each becomes the model's image token (the first id past the text vocabulary),
never the text tokenizer's own <|image|> (128011). Images go through `encoders.tiling` (Mllama's preprocessing)
at the vision encoder's tile size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llama3mm.model import Llama3MM

IMAGE_MARKER = "<|image|>"


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
        """Token ids of text whose "<|image|>" markers become image tokens."""
        ids = [self.tokenizer.bos_id] if bos else []
        for k, part in enumerate(text.split(IMAGE_MARKER)):
            if k:
                ids.append(self.image_token_id)
            if part:
                ids.extend(self.tokenizer.encode(part, bos=False, eos=False))
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
        return fmt.encode_dialog_prompt(messages), carried

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
    ) -> dict[str, torch.Tensor]:
        """A training batch: tokens [B, S] right-padded with `pad_id` (default the tokenizer's), lengths [B],
        and the image tensors of `tile` when images are given (row b's k-th image token is its image k)."""
        rows = [self.encode_text(t, bos=bos) if isinstance(t, str) else [int(x) for x in t] for t in texts]
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
        return batch

    def prompt_inputs(
        self,
        prompt: str | Sequence[int] | Sequence[Mapping[str, Any]],
        images: Sequence[Any] | None = None,
        video: Any = None,
        audio: Any = None,
    ) -> dict[str, Any]:
        """One generation prompt (text, ids, or chat messages) and its media -> `encode_media` keyword inputs
        with `tokens` [1, S]. A text prompt without "<|image|>" gets the images' tokens after <|begin_of_text|>."""
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
        inputs: dict[str, Any] = {"tokens": torch.tensor([ids], device=self.mm.lm.output.weight.device)}
        if images:
            device = inputs["tokens"].device
            inputs.update({k: v.to(device) for k, v in self.tile([images]).items()})
        if video is not None:
            inputs["video"] = video
        if audio is not None:
            inputs["audio"] = audio
        return inputs


def _check_count(tokens: int, images: int, where: str) -> None:
    if tokens != images:
        raise ValueError(f"{where} holds {tokens} <|image|> tokens but {images} images were given")


__all__ = ["IMAGE_MARKER", "Processor"]
