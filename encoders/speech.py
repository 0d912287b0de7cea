"""The speech encoder: 80-dim log-mel features, stride-4 stacking to 40 ms frames, a rotary Conformer.

Features: torchaudio.transforms.MelSpectrogram (HTK mel scale, Hann window of 25 ms = 400 samples, 10 ms hop,
power spectrum) then natural log with a floor of 1e-6, at 16 kHz. Kaldi's fbank would add dithering,
pre-emphasis and a Povey window; the plain mel power spectrum is deterministic, which the tests rely on.

The Conformer (Gulati et al. 2020) block: half-step macaron FFN, rotary multi-head self-attention, convolution
module, half-step FFN, final LayerNorm. torchaudio's Conformer has no rotary attention (the paper's encoder
uses it), hence our own blocks. The convolution module normalises with LayerNorm rather than BatchNorm so that
a padded batch gives exactly the results of its items alone, in training as in eval; padded frames are zeroed
before every depthwise convolution so they cannot leak into real frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
N_MELS = 80
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
LOG_FLOOR = 1e-6


class AudioDecodeError(ValueError):
    """An audio file that could not be read; the message names the file."""


def load_audio(path: str | Path, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a WAV/FLAC/OGG file as a mono float32 waveform [samples] at target_rate (averaging channels)."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError depending on the damage
        raise AudioDecodeError(f"cannot decode audio file {path}: {e}") from e
    if data.shape[0] == 0:
        raise AudioDecodeError(f"audio file {path} holds no samples")
    return resample(torch.from_numpy(data).mean(dim=1), rate, target_rate)


def resample(waveform: torch.Tensor, orig_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling (torchaudio's windowed sinc); a no-op when the rates match."""
    if orig_rate == target_rate:
        return waveform
    import torchaudio.functional as AF

    return AF.resample(waveform, orig_rate, target_rate)


_MEL_CACHE: dict = {}


def log_mel(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono waveform [samples] (or [B, samples]) -> log-mel features [frames, 80] ([B, frames, 80]).

    frames = samples // 160 + 1 (centred windows). Other rates are resampled to 16 kHz first.
    """
    import torchaudio

    waveform = resample(waveform.float(), sample_rate, SAMPLE_RATE)
    key = (waveform.device, waveform.dtype)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=WIN_LENGTH, win_length=WIN_LENGTH, hop_length=HOP_LENGTH, n_mels=N_MELS
        ).to(waveform.device)
    mel = _MEL_CACHE[key](waveform)  # [..., 80, frames]
    return mel.clamp(min=LOG_FLOOR).log().transpose(-1, -2)


def num_feature_frames(num_samples: int) -> int:
    """Number of log_mel frames for a 16 kHz waveform of num_samples."""
    return num_samples // HOP_LENGTH + 1


@dataclass
class SpeechEncoderConfig:
    """Shape of the Conformer speech encoder."""

    n_mels: int = N_MELS
    stride: int = 4  # frames stacked into one 40 ms step
    dim: int = 1536
    layers: int = 24
    heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def stacked_dim(self) -> int:
        """Width of a stacked input step (stride x n_mels)."""
        return self.stride * self.n_mels

    @classmethod
    def from_preset(cls, name: str, **overrides) -> SpeechEncoderConfig:
        """Named shapes: 'conformer-1b' (the paper's ~1B encoder) and 'tiny' (tests, CPU training)."""
        presets = {
            "conformer-1b": cls(),
            "tiny": cls(dim=64, layers=2, heads=4, ffn_dim=128, conv_kernel=7),
        }
        if name not in presets:
            raise ValueError(f"unknown speech preset {name!r}; choose from {sorted(presets)}")
        return replace(presets[name], **overrides)

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpeechEncoderConfig:
        """Inverse of to_dict."""
        return cls(**d)


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def normalize_features(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean/variance normalisation over real frames; padded frames become 0."""
    mask = lengths_to_mask(lengths, features.shape[1])[..., None].to(features.dtype)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (features * mask).sum(1, keepdim=True) / count
    var = ((features - mean).square() * mask).sum(1, keepdim=True) / count
    return (features - mean) * torch.rsqrt(var + 1e-5) * mask


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on [B, heads, T, head_dim] (half-split pairing), positions 0..T-1."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class FeedForward(nn.Module):
    """Pre-norm Swish FFN used twice per block (macaron), each with a half-step residual."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, T, dim] (the branch, without residual)."""
        return self.dropout(self.w2(self.dropout(F.silu(self.w1(self.norm(x))))))


class RotaryAttention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions; padded keys are masked out."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by {cfg.heads} heads")
        self.heads, self.theta = cfg.heads, cfg.rope_theta
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], key_mask [B, 1, 1, T] (True = real) -> [B, T, dim]."""
        b, t, d = x.shape
        q, k, v = self.wqkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=self.p if self.training else 0.0)
        return self.dropout(self.wo(y.transpose(1, 2).reshape(b, t, d)))


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv (kernel k, same padding), LayerNorm, Swish, pointwise conv."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pointwise_in = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.depthwise = nn.Conv1d(cfg.dim, cfg.dim, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=cfg.dim)
        self.conv_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pointwise_out = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], frame_mask [B, T, 1] float -> [B, T, dim]."""
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1) * frame_mask  # padding must not enter the conv
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        y = self.pointwise_out(F.silu(self.conv_norm(y)))
        return self.dropout(y)


class ConformerBlock(nn.Module):
    """x + FFN/2, + MHSA, + Conv, + FFN/2, then LayerNorm."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.ffn1 = FeedForward(cfg)
        self.attn = RotaryAttention(cfg)
        self.conv = ConvModule(cfg)
        self.ffn2 = FeedForward(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> [B, T, dim]."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn(x, key_mask)
        x = x + self.conv(x, frame_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class SpeechEncoder(nn.Module):
    """Log-mel [B, T, 80] -> normalise, stack 4 frames, project -> Conformer -> [B, ceil(T/4), dim]."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.stacked_dim, cfg.dim)
        self.layers = nn.ModuleDict({str(i): ConformerBlock(cfg) for i in range(cfg.layers)})

    def stack_frames(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, 80] log-mel -> (normalised stacked steps [B, ceil(T/4), 320], step lengths ceil(len/4))."""
        s = self.cfg.stride
        x = normalize_features(features, lengths)
        x = F.pad(x, (0, 0, 0, (-x.shape[1]) % s))
        return x.reshape(x.shape[0], -1, s * x.shape[2]), (lengths + s - 1) // s

    def encode_stacked(self, stacked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Stacked steps [B, T', 320] with lengths [B] -> hidden [B, T', dim]; padded steps are zero."""
        mask = lengths_to_mask(lengths, stacked.shape[1])
        key_mask, frame_mask = mask[:, None, None, :], mask[..., None].to(stacked.dtype)
        x = self.input_proj(stacked) * frame_mask
        for layer in self.layers.values():
            x = layer(x, key_mask, frame_mask)
        return x * frame_mask

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (SpeechEncoderConfig) and model.safetensors."""
        from encoders.vision import save_encoder

        save_encoder(self, self.cfg.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SpeechEncoder:
        """Load what save_pretrained wrote."""
        from encoders.vision import load_encoder

        cfg, sd = load_encoder(directory)
        model = cls(SpeechEncoderConfig.from_dict(cfg))
        model.load_state_dict(sd)
        return model

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel [B, T, 80] and lengths [B] (default: all T) -> (hidden [B, ceil(T/4), dim], out_lengths [B])."""
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], device=features.device)
        stacked, out_lengths = self.stack_frames(features, lengths)
        return self.encode_stacked(stacked, out_lengths), out_lengths


def audio_to_features(paths_or_waves: list, sample_rate: int = SAMPLE_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """Files or 1-D waveforms -> padded log-mel batch [B, T, 80] and lengths [B] (for SpeechEncoder.forward)."""
    feats = [log_mel(load_audio(p) if isinstance(p, (str, Path)) else p, sample_rate) for p in paths_or_waves]
    lengths = torch.tensor([f.shape[0] for f in feats])
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths
