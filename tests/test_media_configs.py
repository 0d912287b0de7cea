"""The paper-scale encoder and adapter configs load through the entries' own config loader and build (on the meta
device, from their presets: no checkpoint is read) the paper's shapes: a frozen Llama 3.1 8B / 70B, cross-attention
before every 4th LM layer, the ViT-H/14 with Llama 3.2 Vision's tiles, video layers before every 4th image layer, the
1B Conformer and the paper's speech adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.config import LMConfig
from train.config import load_config

SIZES = {"8b": "llama3-8b", "70b": "llama3-70b"}


def adapter_model(modality: str, size: str):
    """The config and the stage's model (meta device) of configs/adapter/{modality}_llama3_{size}.toml."""
    from train.adapter import AdapterJobConfig, planned_model

    cfg = load_config(AdapterJobConfig, f"configs/adapter/{modality}_llama3_{size}.toml", [])
    return cfg, planned_model(cfg, modality)


def check_lm(mm, size: str) -> None:
    """The frozen LM has the preset's shape, in bf16, and nothing of it trains."""
    want = LMConfig.from_preset(SIZES[size])
    got = mm.lm.config
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim"):
        assert getattr(got, key) == getattr(want, key), key
    assert {p.dtype for p in mm.lm.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in mm.lm.parameters())


def check_vit_h14(encoder) -> None:
    """open_clip's ViT-H/14 trunk with Llama 3.2 Vision's tiling: 560 px tiles, at most 4, 8 gated global layers."""
    assert (encoder.width, encoder.layers, encoder.heads, encoder.patch_size) == (1280, 32, 16, 14)
    assert (encoder.image_size, encoder.max_num_tiles, encoder.global_layers) == (560, 4, 8)
    assert encoder.intermediate_layers == (3, 7, 15, 23, 30) and encoder.output_dim == 7680


@pytest.mark.parametrize("size", list(SIZES))
def test_vision_stage_configs(size):
    cfg, mm = adapter_model("vision", size)
    check_lm(mm, size)
    check_vit_h14(mm.vision_encoder.cfg)
    layers = mm.lm.config.n_layers
    # Before every 4th LM layer, ending at the last: 3, 7, ..., 31 (8B) or ..., 79 (70B), as Llama 3.2 11B / 90B.
    assert mm.vision_adapter.cfg.layers == tuple(range(3, layers, 4))
    assert len(mm.vision_adapter.cfg.layers) == {"8b": 8, "70b": 20}[size]
    assert cfg.model.train_encoder and all(p.requires_grad for p in mm.vision_adapter.parameters())
    assert any(p.requires_grad for p in mm.vision_encoder.parameters())
    assert (cfg.train.batch_size, cfg.optim.weight_decay, cfg.optim.decay) == (16384, 0.01, "cosine")
    assert cfg.plan.tiles == 4


@pytest.mark.parametrize("size", list(SIZES))
def test_video_stage_configs(size):
    cfg, mm = adapter_model("video", size)
    check_lm(mm, size)
    check_vit_h14(mm.vision_encoder.cfg)
    image_layers = mm.vision_adapter.cfg.layers
    # Before every 4th image cross-attention layer, counted from the top (the last image layer has one).
    assert mm.video_adapter.cfg.layers == image_layers[3::4]
    assert mm.video_adapter.cfg.frames_per_group == 32 and cfg.plan.frames == 64
    trained = {n.split(".")[0] for n, p in mm.named_parameters() if p.requires_grad}
    assert trained == {"video_adapter"}  # the vision stage's parts stay frozen


@pytest.mark.parametrize("size", list(SIZES))
def test_speech_stage_configs(size):
    cfg, mm = adapter_model("speech", size)
    check_lm(mm, size)
    encoder, adapter = mm.speech_encoder.cfg, mm.speech_adapter.cfg
    assert (encoder.dim, encoder.layers, encoder.heads, encoder.ffn_dim, encoder.conv_kernel) == (1536, 24, 24, 4096, 7)
    assert (adapter.encoder_dim, adapter.dim, adapter.ffn_dim, adapter.lm_dim) == (1536, 3072, 4096, mm.lm.config.dim)
    assert (adapter.conv_kernel, adapter.conv_stride) == (3, 2)
    # Paper: "about 100M parameters" for the adapter.
    assert 80e6 < sum(p.numel() for p in mm.speech_adapter.parameters()) < 120e6
    assert cfg.plan.audio_seconds == 60


def test_encoder_configs():
    """The ViT-H/14 CLIP config (open_clip's ViT-H-14 text tower) and the 1B Conformer BEST-RQ config."""
    from train.encoder import EncoderJobConfig, build_speech, build_vision

    vision = load_config(EncoderJobConfig, "configs/encoder/vision_vit_h14.toml", [])
    with torch.device("meta"):
        clip, vcfg, tcfg = build_vision(vision)
    check_vit_h14(vcfg)
    assert (tcfg.width, tcfg.layers, tcfg.context_length) == (1024, 24, 77)
    # The open_clip checkpoint path is the user's to give; the config says where it goes.
    assert vision.vision.pretrained == ""

    speech = load_config(EncoderJobConfig, "configs/encoder/speech_conformer_1b.toml", [])
    with torch.device("meta"):
        bestrq, scfg, rq = build_speech(speech)
    assert (scfg.dim, scfg.layers) == (1536, 24)
    assert 0.9e9 < sum(p.numel() for p in bestrq.encoder.parameters()) < 1.1e9  # "1B parameters"
    assert (rq["num_codebooks"], rq["codebook_size"]) == (16, 8192)


def test_every_paper_scale_config_names_its_sources():
    """Every value of the [model], [train], [optim] and [plan] sections of a paper-scale config says where it comes
    from (the paper, Llama 3.2, open_clip, or ours): a comment on its line or just above it."""
    paths = sorted(Path("configs/adapter").glob("*_llama3_*.toml"))
    paths += [Path("configs/encoder/vision_vit_h14.toml"), Path("configs/encoder/speech_conformer_1b.toml")]
    assert len(paths) == 8
    for path in paths:
        section, previous, bare = "", "", []
        for line in path.read_text().splitlines():
            if line.startswith("["):
                section = line.strip("[]").split(".")[0]
            elif "=" in line and not line.startswith("#") and section in ("model", "train", "optim", "plan"):
                if "#" not in line and not previous.startswith("#"):
                    bare.append(line)
            previous = line
        assert not bare, f"{path}: values without a source: {bare}"
        assert "Sources:" in path.read_text(), path
