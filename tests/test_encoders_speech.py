"""Speech front end and Conformer: audio loading/resampling, log-mel, length math, padding invariance, size."""

import math

import numpy as np
import pytest
import soundfile
import torch

from encoders.speech import (
    AudioDecodeError,
    SpeechEncoder,
    SpeechEncoderConfig,
    audio_to_features,
    load_audio,
    log_mel,
    num_feature_frames,
)


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(spectrum.argmax()) * rate / wave.shape[0]


def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    """A 44.1 kHz stereo WAV comes back mono at 16 kHz, same duration, same pitch; FLAC reads too."""
    left, right = _tone(440, 44100, 0.5), _tone(440, 44100, 0.5)
    path = tmp_path / "tone.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 8000) <= 1
    assert abs(_peak_hz(wave, 16000) - 440) < 4
    flac = tmp_path / "tone.flac"
    soundfile.write(flac, _tone(1000, 16000, 0.25), 16000)
    assert abs(_peak_hz(load_audio(flac), 16000) - 1000) < 8


def test_unreadable_audio_errors_name_the_file(tmp_path):
    """A corrupt file and a missing file both raise errors that name the path."""
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file" * 4)
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        load_audio(bad)
    with pytest.raises(FileNotFoundError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")


def test_log_mel_shape_and_pitch():
    """25 ms / 10 ms framing gives samples // 160 + 1 frames of 80 bins; a 1 kHz tone lights the 1 kHz bin."""
    import torchaudio.functional as AF

    wave = torch.from_numpy(_tone(1000, 16000, 1.0))
    feats = log_mel(wave)
    assert feats.shape == (num_feature_frames(16000), 80) == (101, 80)
    assert torch.isfinite(feats).all() and feats.min() >= math.log(1e-6) - 1e-4
    # The mel bin whose filter responds most to 1 kHz (HTK scale, as MelSpectrogram uses).
    fb = AF.melscale_fbanks(201, 0.0, 8000.0, 80, 16000)  # [freq bins, mels]
    assert int(feats[10:-10].mean(0).argmax()) == int(fb[round(1000 / 8000 * 200)].argmax())
    # Resampling first: the same tone given at 8 kHz lands in the same bin.
    feats8 = log_mel(torch.from_numpy(_tone(1000, 8000, 1.0)), sample_rate=8000)
    assert int(feats8[10:-10].mean(0).argmax()) == int(feats[10:-10].mean(0).argmax())


def test_stacking_length_math():
    """Stride-4 stacking: ceil(T / 4) steps of 320 values, lengths rounded up; output width is dim."""
    cfg = SpeechEncoderConfig.from_preset("tiny")
    enc = SpeechEncoder(cfg)
    feats, lengths = torch.randn(3, 37, 80), torch.tensor([37, 20, 9])
    stacked, step_lengths = enc.stack_frames(feats, lengths)
    assert stacked.shape == (3, 10, 320) and step_lengths.tolist() == [10, 5, 3]
    hidden, out_lengths = enc(feats, lengths)
    assert hidden.shape == (3, 10, cfg.dim) and out_lengths.tolist() == [10, 5, 3]
    assert hidden[1, 5:].abs().sum() == 0 and hidden[2, 3:].abs().sum() == 0


def test_padded_batch_equals_items_alone():
    """Each item of a padded batch (garbage in the padding) equals the item encoded alone, in train mode."""
    torch.manual_seed(0)
    enc = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny")).train()  # dropout 0: train mode is deterministic
    lengths = torch.tensor([41, 23, 6])
    batch = torch.randn(3, 41, 80) * 3 + 1  # padding keeps random values: the mask must hide them
    hidden, out_lengths = enc(batch, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, alone_len = enc(batch[i : i + 1, :n], lengths[i : i + 1])
        assert alone_len.item() == out_lengths[i].item()
        torch.testing.assert_close(hidden[i, : alone_len.item()], alone[0], atol=1e-5, rtol=1e-5)


def test_audio_to_features_batches_files(tmp_path):
    """Files of different lengths become one padded log-mel batch with their lengths."""
    paths = []
    for i, seconds in enumerate((0.3, 0.55)):
        paths.append(tmp_path / f"a{i}.wav")
        soundfile.write(paths[-1], _tone(300 + 200 * i, 22050, seconds), 22050)
    feats, lengths = audio_to_features(paths)
    assert feats.shape == (2, lengths.max().item(), 80)
    assert lengths.tolist() == [num_feature_frames(round(s * 16000)) for s in (0.3, 0.55)]


def test_conformer_1b_parameter_count():
    """The paper's Conformer (24 x 1536, FFN 4096, kernel 7, 24 heads) has about 1B parameters."""
    with torch.device("meta"):
        enc = SpeechEncoder(SpeechEncoderConfig.from_preset("conformer-1b"))
    total = sum(p.numel() for p in enc.parameters())
    assert 0.95e9 < total < 1.05e9, total


def test_save_and_load_pretrained(tmp_path):
    """save_pretrained / from_pretrained round-trip the config and the weights."""
    enc = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny")).eval()
    enc.save_pretrained(tmp_path / "speech")
    again = SpeechEncoder.from_pretrained(tmp_path / "speech").eval()
    feats = torch.randn(1, 17, 80)
    assert again.cfg == enc.cfg
    assert torch.equal(again(feats)[0], enc(feats)[0])
