"""Llama3MM: a frozen Llama 3 LM with image (and video, speech) adapters, as the paper composes them.

The LM is an unmodified `lm.Transformer`: Llama3MM runs it with `embeddings=` (token embeddings, the extra
special tokens from a small learnable table) and `layer_hook=` (the cross-attention blocks before their layers),
so its KV cache, masks and generation code are the LM's own. Media is encoded once per sequence into a
`MediaState` (the cross-attention keys/values of every block and the text->media mask), which generation keeps
for every decode step.

Interface for the other modalities (video, speech): `encode_media` returns a `MediaState`; a modality adds its
cross-attention blocks as one more `CrossAttentionInputs` in `MediaState.cross`, or its embeddings through
`MediaState.embed` (a function (tokens, h) -> h applied after the token lookup).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.speech import encode_audio, scatter_audio_embeddings
from adapters.video import encode_frames
from adapters.vision import MediaAttentionMask, VisionAdapter, cross_attention_mask
from llama3mm import checkpoint, mllama
from llama3mm.parts import Llama3MMParts
from lm.generate import IncrementalDecoder, SamplingConfig, stream_generate
from lm.model import Transformer

# Llama 3.2 Vision's learnable table: 8 ids past the text vocabulary, <|image|> the first (HF Mllama, Meta).
NUM_EXTRA_TOKENS = 8


@dataclass
class CrossAttentionInputs:
    """One set of cross-attention blocks with their media keys/values (per LM layer name) and mask."""

    blocks: dict[str, nn.Module]
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    mask: MediaAttentionMask


@dataclass
class MediaState:
    """Media of a batch, encoded once: cross-attention inputs and embedding overrides."""

    cross: list[CrossAttentionInputs] = field(default_factory=list)
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


class Llama3MM(nn.Module):
    """A frozen `lm.Transformer` plus optional image, video and speech parts (None = modality absent)."""

    def __init__(
        self,
        lm: Transformer,
        *,
        vision_encoder: nn.Module | None = None,
        vision_adapter: VisionAdapter | None = None,
        video_adapter: nn.Module | None = None,
        speech_encoder: nn.Module | None = None,
        speech_adapter: nn.Module | None = None,
        num_extra_tokens: int = NUM_EXTRA_TOKENS,
        lm_path: str | Path | None = None,
        tokenizer: Any = None,
        prompts: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if vision_encoder is not None and vision_adapter is None:
            raise ValueError("a vision_encoder needs a vision_adapter to reach the LM")
        if vision_adapter is not None and vision_adapter.cfg.dim != lm.config.dim:
            raise ValueError(f"vision adapter width {vision_adapter.cfg.dim} != LM width {lm.config.dim}")
        if vision_adapter is not None and max(vision_adapter.cfg.layers, default=-1) >= lm.config.n_layers:
            raise ValueError(f"vision adapter layers {vision_adapter.cfg.layers} exceed the LM's {lm.config.n_layers}")
        if video_adapter is not None and video_adapter.cfg.dim != lm.config.dim:
            raise ValueError(f"video adapter width {video_adapter.cfg.dim} != LM width {lm.config.dim}")
        if video_adapter is not None and max(video_adapter.cfg.layers) >= lm.config.n_layers:
            raise ValueError(f"video adapter layers {video_adapter.cfg.layers} exceed the LM's {lm.config.n_layers}")
        if speech_adapter is not None and speech_adapter.cfg.lm_dim != lm.config.dim:
            raise ValueError(f"speech adapter lm_dim {speech_adapter.cfg.lm_dim} != LM width {lm.config.dim}")
        if speech_encoder is not None and speech_adapter is not None:
            if speech_encoder.cfg.dim != speech_adapter.cfg.encoder_dim:
                raise ValueError(
                    f"speech adapter encoder_dim {speech_adapter.cfg.encoder_dim} != speech encoder dim "
                    f"{speech_encoder.cfg.dim}"
                )
        self.lm = lm
        self.lm.requires_grad_(False)
        self.lm.eval()
        weight = lm.tok_embeddings.weight
        table = torch.empty(num_extra_tokens, lm.config.dim, dtype=weight.dtype, device=weight.device)
        # Same scale as the frozen table, so a new token's embedding looks like a text token's to the LM.
        self.extra_embeddings = nn.Parameter(table.normal_(0.0, float(weight.detach().float().std())))
        if vision_encoder is not None and isinstance(getattr(vision_encoder, "proj", None), nn.Parameter):
            # The CLIP projection serves contrastive pretraining only; the tiled forward never reaches it, so it
            # would get no gradient: frozen, it also gets no optimizer state.
            vision_encoder.proj.requires_grad_(False)
        self.vision_encoder = vision_encoder
        self.vision_adapter = vision_adapter
        self.video_adapter = video_adapter
        self.speech_encoder = speech_encoder
        self.speech_adapter = speech_adapter
        self.lm_path = None if lm_path is None else str(lm_path)
        self._tokenizer = tokenizer
        # Media kind ("image", "video", "audio") -> the prompt its adapter was trained with by train/adapter.py.
        # Adapters on a base LM answer only that prompt; empty for chat-tuned imports (Llama 3.2 Vision).
        self.prompts = dict(prompts or {})
        self._warned_chat = False

    # ---- ids and parts --------------------------------------------------------------------------------------

    @property
    def config(self):
        """The LM's config."""
        return self.lm.config

    @property
    def image_token_id(self) -> int:
        """<|image|>: the first id past the text vocabulary (128256 for Llama 3), as Llama 3.2 Vision feeds it."""
        return self.lm.config.vocab_size

    @property
    def audio_token_id(self) -> int:
        """<|audio|> placeholder: the second id past the text vocabulary (128257), an extra token like <|image|>.

        The LM can never emit it, and the processor maps the tokenizer's `audio_id` (chat items) to it; its
        embedding is always replaced by the speech adapter's outputs.
        """
        return self.lm.config.vocab_size + 1

    @property
    def tokenizer(self):
        """The Llama 3 tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from lm.tokenizer import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    @property
    def processor(self):
        """Text + media -> model inputs (tokens, image tiles), shared by generation and training."""
        from llama3mm.processor import Processor

        return Processor(self)

    def train(self, mode: bool = True) -> Llama3MM:
        """Train mode for the adapters and encoders; the LM always stays in eval mode."""
        super().train(mode)
        self.lm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that learn: everything outside the LM that requires grad (freeze an encoder to exclude it)."""
        return [p for name, p in self.named_parameters() if not name.startswith("lm.") and p.requires_grad]

    # ---- forward --------------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, S, dim]: the frozen table below the vocabulary size, the learnable one above."""
        vocab = self.lm.config.vocab_size
        extra = tokens >= vocab
        h = self.lm.tok_embeddings(tokens.clamp(max=vocab - 1))
        if bool(extra.any()):
            if int(tokens.max()) >= vocab + self.extra_embeddings.shape[0]:
                raise ValueError(
                    f"token id {int(tokens.max())} is past the text vocabulary ({vocab}) and the "
                    f"{self.extra_embeddings.shape[0]} extra tokens"
                )
            new = self.extra_embeddings[(tokens - vocab).clamp(min=0)].to(h.dtype)
            h = torch.where(extra[..., None], new, h)
        return h

    def encode_images(
        self, images: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image tiles [B, I, T, 3, S, S] -> media tokens [B, I * T * N, dim] (encoder, then projection)."""
        if self.vision_encoder is None or self.vision_adapter is None:
            raise ValueError("this Llama3MM has no vision encoder/adapter: it cannot take images")
        b, i = images.shape[:2]
        flat_mask = None
        if tile_mask is not None:
            # An image with no real tile (batch padding) would be all padding to the encoder, whose attention
            # rows would then be empty (NaN): give it one tile, as HF's processor does. No text sees it.
            flat_mask = tile_mask.flatten(0, 1).clone()
            flat_mask[:, 0] = True
        features = self.vision_encoder(images.flatten(0, 1), aspect_ratio_ids.flatten(), flat_mask)
        return self.vision_adapter.project(features.unflatten(0, (b, i)))

    def encode_media(
        self,
        tokens: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
        video: Any = None,
        audio: Any = None,
        audio_lengths: torch.Tensor | None = None,
    ) -> MediaState:
        """Encode the media of a batch once: cross-attention keys/values and masks for `tokens` [B, S]."""
        state = MediaState()
        if images is not None:
            images, aspect_ratio_ids, tile_mask = _image_inputs(images, aspect_ratio_ids, tile_mask, self)
            media = self.encode_images(images, aspect_ratio_ids, tile_mask)
            # Id 0 is a padding image (a row with fewer images than the batch's most): no text may see it.
            tiles = cross_attention_mask(tokens, self.image_token_id, tile_mask & (aspect_ratio_ids > 0)[..., None])
            mask = MediaAttentionMask.from_tiles(tiles, media.shape[1] // (tiles.shape[2] * tiles.shape[3]))
            adapter = self.vision_adapter
            state.cross.append(CrossAttentionInputs(adapter.block_for_layer(), adapter.media_kv(media), mask))
        if video is not None:
            # Before the image entry: a video block runs before the image block of the same LM layer.
            state.cross.insert(0, self.encode_video(video))
        if audio is not None:
            state.embed = self.audio_embedding_override(tokens, audio, audio_lengths)
        return state

    def encode_video(self, video: Any) -> CrossAttentionInputs:
        """uint8 clips [B, F, 3, H, W] (or a list of [F_i, 3, H, W], None = no clip) -> the video blocks' inputs.

        Frames go through the frozen image encoder and image projection, then the temporal aggregator; every text
        position of a row sees all of its clip's latents (see adapters.video).
        """
        if self.video_adapter is None or self.vision_encoder is None or self.vision_adapter is None:
            raise ValueError("video needs a video_adapter beside the vision_encoder and vision_adapter it reuses")
        frames, counts = encode_frames(self.vision_encoder, self.vision_adapter, video)
        latents, mask = self.video_adapter(frames, counts)
        adapter = self.video_adapter
        return CrossAttentionInputs(adapter.block_for_layer(), adapter.media_kv(latents), mask)

    def audio_embedding_override(
        self, tokens: torch.Tensor, audio: Any, audio_lengths: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Encode clips (padded 16 kHz waveforms [K, L] with sample counts [K], or a list of 1-D waveforms) and
        return the `MediaState.embed` that puts clip k's adapter outputs on the k-th run of <|audio|> placeholders
        of `tokens` (row-major). It acts on the prompt's own tokens only, so the placeholders are replaced once, in
        the prefill; decode steps pass through.
        """
        if self.speech_encoder is None or self.speech_adapter is None:
            raise ValueError("audio needs both speech_encoder and speech_adapter")
        if isinstance(audio, (list, tuple)):
            if audio_lengths is not None:
                raise ValueError("audio_lengths goes with a padded [K, L] audio tensor, not with a list of clips")
            audio_lengths = torch.tensor([len(clip) for clip in audio])
            audio = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(clip).float() for clip in audio], batch_first=True)
        embeddings, counts = encode_audio(self.speech_encoder, self.speech_adapter, audio, audio_lengths)
        audio_id, prompt = self.audio_token_id, tokens

        def embed(tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            if tokens.shape != prompt.shape or not torch.equal(tokens, prompt):
                return h
            return scatter_audio_embeddings(h, tokens, audio_id, embeddings, counts)

        return embed

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
        video: Any = None,
        audio: Any = None,
        audio_lengths: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> torch.Tensor:
        """Logits [B, S, vocab] of `tokens` [B, S] with their media; `lm_kwargs` go to `lm.Transformer.forward`
        (e.g. `output=` a fused loss, or "hidden").

        images [B, I, T, 3, S, S] (or [B, T, 3, S, S]: one image per row), aspect_ratio_ids [B, I] (or [B]),
        tile_mask [B, I, T] (derived from the ids when absent). The k-th <|image|> of a row is its image k.
        video: uint8 frames [B, F, 3, H, W] or a list of [F_i, 3, H, W] (None: no clip); every text position of
        row b sees clip b. audio: padded 16 kHz waveforms [K, L] with `audio_lengths` [K] (or a list of 1-D
        waveforms); clip k replaces the k-th run of `audio_token_id` placeholders, row-major, each run
        `adapters.speech.num_audio_tokens(samples)` long (`processor` builds such runs).
        """
        state = self.encode_media(
            tokens,
            images=images,
            aspect_ratio_ids=aspect_ratio_ids,
            tile_mask=tile_mask,
            video=video,
            audio=audio,
            audio_lengths=audio_lengths,
        )
        return self.forward_with_media(tokens, state, **lm_kwargs)

    def forward_with_media(self, tokens: torch.Tensor, state: MediaState, **lm_kwargs) -> torch.Tensor:
        """The LM over `tokens` with already encoded media (a decode step reuses the state of its prompt)."""
        h = self.embed(tokens)
        if state.embed is not None:
            h = state.embed(tokens, h)
        hook = None
        if state.cross:
            attention = lm_kwargs.get("attention")
            start = (attention.start_pos if attention is not None else lm_kwargs.get("start_pos")) or 0
            length = tokens.shape[1]
            layers = [(inputs, inputs.mask.rows_at(start, length)) for inputs in state.cross]

            def hook(name: str, h: torch.Tensor) -> torch.Tensor:
                for inputs, mask in layers:
                    block = inputs.blocks.get(name)
                    if block is not None:
                        # Adapters may train in fp32 beside a bf16 LM: run each block in its own dtype.
                        dtype = block.gate_attn.dtype
                        h = block(h.to(dtype), inputs.kv[name], mask).to(h.dtype)
                return h

        vocab = self.lm.config.vocab_size
        return self.lm(tokens.clamp(max=vocab - 1), embeddings=h, layer_hook=hook, **lm_kwargs)

    # ---- generation -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_tokens(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        images: Sequence[Any] | None = None,
        video: Any = None,
        audio: Any = None,
        *,
        sampling: SamplingConfig | None = None,
        **settings: Any,
    ) -> Iterator[int]:
        """Yield new token ids for one prompt (text, token ids or chat messages) with its media; `settings` are
        SamplingConfig's fields over `sampling` (stop_tokens default: the tokenizer's).

        The media's cross-attention keys/values are computed once; the text KV cache and sampling are lm's.
        """
        sampling = SamplingConfig.of(sampling, **settings)
        inputs = self.processor.prompt_inputs(prompt, images=images, video=video, audio=audio)
        tokens = inputs.pop("tokens")
        state = self.encode_media(tokens, **inputs)
        if sampling.stop_tokens is None:
            sampling = SamplingConfig.of(sampling, stop_tokens=self.tokenizer.stop_tokens)
        yield from stream_generate(_WithMedia(self, state), None, tokens[0].tolist(), sampling=sampling)

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        images: Sequence[Any] | None = None,
        video: Any = None,
        audio: Any = None,
        *,
        sampling: SamplingConfig | None = None,
        stream: bool = False,
        **settings: Any,
    ) -> str | Iterator[str]:
        """The text generated for a prompt (text with optional "<|image|>" markers, token ids, or chat messages)
        and its media (PIL images or uint8 [3, H, W] tensors); stream=True yields text pieces as they come.
        `settings` are SamplingConfig's fields (max_new_tokens, temperature, top_p, top_k, seed) over `sampling`.

        A text prompt without "<|image|>" gets one image token per image after <|begin_of_text|>.
        """
        ids = self.generate_tokens(prompt, images, video, audio, sampling=SamplingConfig.of(sampling, **settings))
        pieces = _decode_stream(self.tokenizer, ids)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: Sequence[dict],
        images: Sequence[Any] | None = None,
        video: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to a dialog; `{"type": "image"}` content items take `images` in order
        (an item may also carry its own `"image"`). `kwargs` are `generate`'s (sampling settings, stream)."""
        if self.prompts and not self._warned_chat:
            # Adapters trained with completion prompts sit on a base LM, which ends a chat turn at once.
            warnings.warn(
                f"this model's adapters were trained on a base LM with completion prompts {self.prompts}, not the "
                "chat format: expect empty or poor chat replies; use generate(mm.prompts[kind], images=...) instead",
                stacklevel=2,
            )
            self._warned_chat = True
        return self.generate(list(messages), images, video, audio, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Adapters, encoders and the extra embeddings as small files + llama3mm.json naming the LM (path and
        sha256). An LM without a known path (e.g. imported from Mllama) is written to `directory/lm`."""
        return checkpoint.save(self, directory)

    @classmethod
    def from_parts(cls, parts: Llama3MMParts) -> Llama3MM:
        """The model of what a checkpoint reader or importer returned."""
        mm = cls(parts.lm, lm_path=parts.lm_path, prompts=parts.prompts, **parts.modules, **_extra_rows(parts))
        if parts.extra_embeddings is not None:
            with torch.no_grad():
                mm.extra_embeddings.copy_(parts.extra_embeddings)
        return mm

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        lm_path: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Llama3MM:
        """Load a save_pretrained directory, a Llama 3.2 Vision checkpoint (HF Mllama or Meta layout, imported by
        from_mllama / from_meta) or a bare LM checkpoint. A saved model's LM (the recorded path, resolved against
        `directory` when relative, or `lm_path`, for a checkpoint moved away from its LM) must hash to the
        recorded sha256. On CUDA the default dtype is bf16, fp32 elsewhere."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        layout = checkpoint.checkpoint_layout(directory)
        if layout == "mllama":
            mm = cls.from_mllama(directory)
        elif layout == "meta-vision":
            mm = cls.from_meta(directory)
        else:
            mm = cls.from_parts(checkpoint.read(directory, lm_path=lm_path))
        return mm.to(device=device, dtype=dtype)

    @classmethod
    def from_mllama(
        cls,
        source: str | Path | dict,
        hf_config: dict | Any | None = None,
        *,
        intermediate_layer_input: bool = True,
    ) -> Llama3MM:
        """Import Llama 3.2 Vision weights in HF MllamaForConditionalGeneration layout: a directory
        (config.json + *.safetensors) or a state dict with its MllamaConfig (object or dict).

        intermediate_layer_input: Meta's meaning of the encoder's intermediate layer indices (the released
        weights were trained with it); False reproduces transformers 5.x bit for bit (see encoders.vision).
        """
        parts = mllama.mllama_parts(source, hf_config, intermediate_layer_input=intermediate_layer_input)
        return cls.from_parts(parts).to(parts.lm.output.weight.dtype)  # the encoder and adapter were built in fp32

    @classmethod
    def from_meta(cls, source: str | Path | dict, params: dict | None = None) -> Llama3MM:
        """Import Llama 3.2 Vision weights in Meta's layout (llama_models): a directory (params.json +
        consolidated.00.pth) or a state dict with its params. Without `vision_model.vision_encoder.*` tensors
        the model has no encoder (media tokens can still be given through `MediaState`)."""
        parts = mllama.meta_parts(source, params)
        return cls.from_parts(parts).to(parts.lm.output.weight.dtype)


def _extra_rows(parts: Llama3MMParts) -> dict[str, int]:
    """`num_extra_tokens` of the recorded table; none (the default count) when the table is to be drawn fresh."""
    if parts.extra_embeddings is None:
        return {}
    return {"num_extra_tokens": parts.extra_embeddings.shape[0]}


class _WithMedia(nn.Module):
    """The composed model with its media bound, shaped like an `lm.Transformer` for lm.generate's decode loop."""

    def __init__(self, mm: Llama3MM, state: MediaState):
        super().__init__()
        self.mm, self.state = mm, state
        self.config, self.output = mm.lm.config, mm.lm.output

    def setup_cache(self, batch: int, max_len: int) -> None:
        self.mm.lm.setup_cache(batch, max_len)

    def clear_cache(self) -> None:
        self.mm.lm.clear_cache()

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.mm.forward_with_media(tokens, self.state, **kwargs)


def _image_inputs(
    images: torch.Tensor, aspect_ratio_ids: torch.Tensor | None, tile_mask: torch.Tensor | None, mm: Llama3MM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise image inputs to [B, I, T, 3, S, S], [B, I], bool [B, I, T]."""
    from encoders.tiling import num_tiles_for_ids

    if aspect_ratio_ids is None:
        raise ValueError("images need their aspect_ratio_ids (see encoders.tiling.tile_images)")
    if images.dim() == 5:  # one image per row
        images = images[:, None]
        aspect_ratio_ids = aspect_ratio_ids.reshape(-1, 1)
        tile_mask = None if tile_mask is None else tile_mask[:, None]
    if images.dim() != 6 or aspect_ratio_ids.shape != images.shape[:2]:
        raise ValueError(
            f"images {tuple(images.shape)} and aspect_ratio_ids {tuple(aspect_ratio_ids.shape)}: expected "
            "[B, I, T, 3, S, S] and [B, I]"
        )
    if tile_mask is None:
        counts = num_tiles_for_ids(aspect_ratio_ids, mm.vision_encoder.cfg.max_num_tiles)
        tile_mask = torch.arange(images.shape[2], device=images.device) < counts[..., None]
    return images, aspect_ratio_ids, tile_mask.bool()


def _decode_stream(tokenizer: Any, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces of a token stream, never splitting a multi-byte character."""
    decoder = IncrementalDecoder(tokenizer)
    for token in ids:
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


__all__ = ["CrossAttentionInputs", "Llama3MM", "MediaState"]
