"""The speech adapter: Conformer features -> conv (kernel 3, stride 2) -> one rotary transformer layer -> LM width.

The paper (Section 8.2): the adapter downsamples the encoder's 40 ms frames to 80 ms per token with a 1-D
convolution, adds context with one rotary transformer layer (latent 3072, FFN 4096 at full size) and maps to the
language model's embedding width with a linear layer. Its outputs do not go through cross-attention: they REPLACE
the embeddings of the `<|audio|>` placeholder tokens (`Tokenizer.audio_id`) of the LM input, so the frozen LM
reads speech as token embeddings.

Token count of a clip of n samples at 16 kHz (`num_audio_tokens`): log-mel frames f = n // 160 + 1 (10 ms hop,
centred windows), encoder steps e = ceil(f / 4) (stride-4 stacking: 40 ms), adapter tokens ceil(e / 2) (the
convolution pads one step on each side, so every encoder step is covered: 80 ms). A prompt holds a run of exactly
that many placeholders per clip, in the order of the clips (`expand_audio_placeholders` builds it from one
placeholder per clip).

Padding: log-mel features are computed per clip (torchaudio's centred windows would otherwise read the zeros of a
padded batch), padded steps are zeroed before the convolution and masked as keys in attention, so a padded batch
gives exactly the outputs of its clips alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from encoders.speech import (
    WIN_LENGTH,
    FeedForward,
    RotaryAttention,
    SpeechEncoder,
    SpeechEncoderConfig,
    audio_to_features,
    lengths_to_mask,
    num_feature_frames,
)

ENCODER_STRIDE = 4  # log-mel frames per encoder step (SpeechEncoderConfig.stride)
ADAPTER_STRIDE = 2  # encoder steps per adapter token
# torchaudio's centred windows reflect-pad half a window on each side, which needs more samples than that.
MIN_SAMPLES = WIN_LENGTH // 2 + 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_audio_tokens(
    num_samples: int, encoder_stride: int = ENCODER_STRIDE, adapter_stride: int = ADAPTER_STRIDE
) -> int:
    """Placeholder tokens a clip of num_samples (16 kHz) occupies: ceil(ceil((n // 160 + 1) / 4) / 2), 80 ms each."""
    if num_samples < MIN_SAMPLES:
        raise ValueError(f"an audio clip needs at least {MIN_SAMPLES} samples at 16 kHz, got num_samples={num_samples}")
    return _ceil_div(_ceil_div(num_feature_frames(num_samples), encoder_stride), adapter_stride)


def expand_audio_placeholders(ids: list[int], audio_id: int, tokens_per_clip: list[int]) -> list[int]:
    """Replace the k-th single `audio_id` in ids by a run of tokens_per_clip[k] placeholders (one per clip)."""
    found = sum(1 for t in ids if t == audio_id)
    if found != len(tokens_per_clip):
        raise ValueError(
            f"the prompt holds {found} <|audio|> placeholders (id {audio_id}) for {len(tokens_per_clip)} clips"
        )
    clips = iter(tokens_per_clip)
    out: list[int] = []
    for t in ids:
        out.extend([audio_id] * next(clips) if t == audio_id else [t])
    return out


@dataclass
class SpeechAdapterConfig:
    """Shape of the speech adapter; the paper's is encoder 1536 -> latent 3072 (FFN 4096) -> the LM width."""

    encoder_dim: int = 1536
    lm_dim: int = 4096
    dim: int = 3072
    heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 3
    conv_stride: int = ADAPTER_STRIDE
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"speech adapter dim {self.dim} is not divisible by heads={self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"speech adapter conv_kernel must be odd (same-style padding), got {self.conv_kernel}")

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpeechAdapterConfig:
        """Inverse of to_dict; an unknown key is an error naming it."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown speech adapter config keys {sorted(unknown)}")
        return cls(**d)


class SpeechAdapter(nn.Module):
    """Encoder hidden states [B, T, encoder_dim] -> LM-width embeddings [B, ceil(T / 2), lm_dim]."""

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(
            cfg.encoder_dim, cfg.dim, cfg.conv_kernel, stride=cfg.conv_stride, padding=cfg.conv_kernel // 2
        )
        # The encoder's rotary attention and FFN blocks, at the adapter's width: one pre-norm transformer layer.
        layer_cfg = SpeechEncoderConfig(
            dim=cfg.dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps
        )
        self.attention = RotaryAttention(layer_cfg)
        self.feed_forward = FeedForward(layer_cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.lm_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder step counts [B] -> adapter token counts [B] (ceil(T / stride) with same-style padding)."""
        return (lengths + self.cfg.conv_stride - 1) // self.cfg.conv_stride

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, encoder_dim], lengths [B] -> (embeddings [B, T', lm_dim], zero past each length; lengths)."""
        mask = lengths_to_mask(lengths, hidden.shape[1])[..., None].to(hidden.dtype)
        # Zero padding so the strided convolution sees exactly what it sees on a clip alone (its own zero padding).
        x = self.conv((hidden * mask).transpose(1, 2)).transpose(1, 2)
        out_lengths = self.output_lengths(lengths)
        valid = lengths_to_mask(out_lengths, x.shape[1])
        x = x * valid[..., None].to(x.dtype)
        x = x + self.attention(x, valid[:, None, None, :])
        x = x + self.feed_forward(x)
        return self.output(self.norm(x)) * valid[..., None].to(x.dtype), out_lengths


def waveforms_to_features(
    audio: torch.Tensor, audio_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded 16 kHz waveforms [B, L] (+ sample counts [B]) -> log-mel [B, T, 80] and frame counts [B], per clip."""
    if audio.dim() == 1:
        audio = audio[None]
    if audio_lengths is None:
        audio_lengths = torch.full((audio.shape[0],), audio.shape[1])
    if audio_lengths.shape != (audio.shape[0],):
        raise ValueError(f"audio_lengths has shape {tuple(audio_lengths.shape)}; expected ({audio.shape[0]},)")
    if int(audio_lengths.min()) < MIN_SAMPLES or int(audio_lengths.max()) > audio.shape[1]:
        raise ValueError(
            f"audio_lengths {audio_lengths.tolist()} must lie in [{MIN_SAMPLES}, {audio.shape[1]}] "
            f"(at least {MIN_SAMPLES} samples at 16 kHz per clip, at most the padded length)"
        )
    clips = [audio[i, :n] for i, n in enumerate(audio_lengths.tolist())]
    features, frames = audio_to_features(clips)
    return features.to(audio.device), frames.to(audio.device)


def encode_audio(
    encoder: SpeechEncoder, adapter: SpeechAdapter, audio: torch.Tensor, audio_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms [B, L] at 16 kHz (+ sample counts [B]) -> adapter embeddings [B, N, lm_dim] and token counts [B]."""
    param = next(adapter.parameters())
    features, frames = waveforms_to_features(audio, audio_lengths)
    hidden, steps = encoder(features.to(param.device, param.dtype), frames.to(param.device))
    return adapter(hidden, steps)


def scatter_audio_embeddings(
    embeddings: torch.Tensor, tokens: torch.Tensor, audio_id: int, audio_embeddings: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Put clip k's first lengths[k] adapter outputs at the k-th run of `audio_id` placeholders (row-major order).

    embeddings [B, S, dim] (the LM input), tokens [B, S], audio_embeddings [K, N, dim], lengths [K]. Returns a new
    tensor (autograd flows into audio_embeddings); every other position is left as it was. A placeholder count
    that disagrees with the clips, or a clip's run split across rows or by other tokens, is an error.
    """
    rows, cols = torch.nonzero(tokens == audio_id, as_tuple=True)
    expected = int(lengths.sum())
    if rows.numel() != expected:
        raise ValueError(
            f"the tokens hold {rows.numel()} <|audio|> placeholders (id {audio_id}) but the clips need {expected} "
            f"({lengths.tolist()} tokens each; see adapters.speech.num_audio_tokens)"
        )
    if expected == 0:
        return embeddings
    clip = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths).to(rows.device)
    starts = torch.cumsum(lengths, 0).to(rows.device) - lengths.to(rows.device)
    offset = torch.arange(expected, device=rows.device) - starts[clip]
    first = starts[clip]  # index (into rows/cols) of each placeholder's clip's first placeholder
    contiguous = (rows == rows[first]) & (cols == cols[first] + offset)
    if not bool(contiguous.all()):
        raise ValueError(
            f"each clip needs one unbroken run of <|audio|> placeholders in one row; clip "
            f"{int(clip[~contiguous][0])} is split (placeholders per clip: {lengths.tolist()})"
        )
    valid = lengths_to_mask(lengths.to(audio_embeddings.device), audio_embeddings.shape[1])
    values = audio_embeddings[valid].to(embeddings.dtype)
    return embeddings.index_put((rows, cols), values)


__all__ = [
    "SpeechAdapter",
    "SpeechAdapterConfig",
    "encode_audio",
    "expand_audio_placeholders",
    "num_audio_tokens",
    "scatter_audio_embeddings",
    "waveforms_to_features",
]
