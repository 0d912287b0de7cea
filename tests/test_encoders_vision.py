"""Image encoder and tiling against their peers: transformers Mllama, Meta's llama_models reference, open_clip."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from encoders.tiling import CLIP_MEAN, CLIP_STD, supported_aspect_ratios, tile_images
from encoders.vision import (
    VisionEncoder,
    VisionEncoderConfig,
    load_converted,
    meta_vision_to_ours,
    mllama_vision_to_ours,
)

TILE = 56


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_processor(tile: int):
    from transformers import MllamaImageProcessor

    # The released Llama 3.2 preprocessor settings: CLIP statistics, bilinear, 4 tiles.
    return MllamaImageProcessor(
        size={"height": tile, "width": tile}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), max_image_tiles=4
    )


def _randomise(model: nn.Module, std: float = 0.3) -> None:
    # Random values everywhere, gates included: zero gates would hide the tile and global paths from the test.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import MllamaVisionConfig, MllamaVisionModel

    cfg = MllamaVisionConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_global_layers=2,
        attention_heads=4,
        intermediate_size=64,
        vision_output_dim=96,
        image_size=TILE,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[1, 3],
    )
    model = MllamaVisionModel(cfg).eval()
    _randomise(model)
    return model


def test_tiling_equals_mllama_image_processor():
    """Pixel tiles, aspect-ratio ids and tile masks equal MllamaImageProcessor's for several aspect ratios."""
    images = [
        _image(40, 130, 0),
        _image(150, 60, 1),
        _image(70, 70, 2),
        _image(300, 500, 3),
        _image(20, 20, 4),
        _image(56, 112, 5),
    ]
    ref = _hf_processor(TILE)(images=[[im] for im in images], return_tensors="pt")
    pixels, ids, mask = tile_images(images, tile_size=TILE, max_num_tiles=4)
    assert ids.tolist() == ref["aspect_ratio_ids"][:, 0].tolist()
    assert len(set(ids.tolist())) == 5  # five different grids exercised, upscaled and downscaled
    assert torch.equal(mask, ref["aspect_ratio_mask"][:, 0])
    # Same uint8 resize; only the order of rescale and normalise differs (float rounding, ~1e-7).
    torch.testing.assert_close(pixels, ref["pixel_values"][:, 0], atol=1e-5, rtol=0)


def test_features_equal_hf_mllama_vision_model(hf_model):
    """Non-square image with padding tiles: our features equal transformers' MllamaVisionModel (fp32, 1e-4)."""
    images = [_image(45, 120, 5), _image(140, 60, 6)]  # grids 1x3 and 3x1 (one padding tile each)
    inputs = _hf_processor(TILE)(images=[[im] for im in images], return_tensors="pt")
    assert inputs["aspect_ratio_mask"][:, 0].sum(-1).tolist() == [3, 3]
    cfg = VisionEncoderConfig.from_mllama(hf_model.config, intermediate_layer_input=False, embed_dim=16)
    ours = VisionEncoder(cfg).eval()
    load_converted(ours, mllama_vision_to_ours(hf_model.state_dict(), cfg))
    with torch.no_grad():
        ref = hf_model(**{k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
        out = ours(inputs["pixel_values"][:, 0], inputs["aspect_ratio_ids"][:, 0])
    ref = ref.last_hidden_state[:, 0]
    assert out.shape == ref.shape == (2, 4, 17, 32 * 3)
    assert (out - ref).abs().max() <= 1e-4
    # The padding tile matters (real tokens attend to it): the mask from ids equals the explicit mask.
    with torch.no_grad():
        explicit = ours(
            inputs["pixel_values"][:, 0], inputs["aspect_ratio_ids"][:, 0], inputs["aspect_ratio_mask"][:, 0]
        )
    assert torch.equal(out, explicit)


def test_meta_intermediate_semantics_is_hf_index_minus_one(hf_model):
    """Meta keeps the input of layer i, transformers 5 the output: ours with Meta semantics = HF at i - 1."""
    from transformers import MllamaVisionModel

    shifted_cfg = hf_model.config.__class__(**{**hf_model.config.to_dict(), "intermediate_layers_indices": [0, 2]})
    shifted = MllamaVisionModel(shifted_cfg).eval()
    shifted.load_state_dict(hf_model.state_dict())
    cfg = VisionEncoderConfig.from_mllama(hf_model.config, intermediate_layer_input=True, embed_dim=16)
    assert cfg.intermediate_layers == (1, 3)
    ours = VisionEncoder(cfg).eval()
    load_converted(ours, mllama_vision_to_ours(hf_model.state_dict(), cfg))
    inputs = _hf_processor(TILE)(images=[[_image(100, 100, 7)]], return_tensors="pt")
    with torch.no_grad():
        ref = shifted(**{k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
        out = ours(inputs["pixel_values"][:, 0], inputs["aspect_ratio_ids"][:, 0])
    assert (out - ref.last_hidden_state[:, 0]).abs().max() <= 1e-4


def _meta_reference():
    """Meta's llama_models VisionEncoder, runnable in one process: fairscale's parallel layers become plain ones."""

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, **_):
            super().__init__(in_features, out_features, bias=bias)

    class Embedding(nn.Embedding):
        def __init__(self, num, dim, **_):
            super().__init__(num, dim)

    init = types.SimpleNamespace(
        get_model_parallel_world_size=lambda: 1,
        get_model_parallel_rank=lambda: 0,
        get_model_parallel_group=lambda: None,
    )
    layers = types.SimpleNamespace(
        ColumnParallelLinear=Linear, RowParallelLinear=Linear, VocabParallelEmbedding=Embedding
    )
    stubs = {
        "fairscale": types.ModuleType("fairscale"),
        "fairscale.nn": types.ModuleType("fairscale.nn"),
        "fairscale.nn.model_parallel": types.ModuleType("fairscale.nn.model_parallel"),
        "fairscale.nn.model_parallel.initialize": init,
        "fairscale.nn.model_parallel.layers": layers,
    }
    stubs["fairscale.nn.model_parallel"].initialize = init
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        from llama_models.llama3.multimodal import model as meta
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    # One model-parallel rank: the collectives are identities.
    meta.reduce_from_tensor_model_parallel_region = lambda x: x
    meta.gather_from_tensor_model_parallel_region = lambda x: x
    return meta


def test_features_equal_meta_reference_encoder():
    """Meta layout converts and our features (Meta semantics) equal llama_models' VisionEncoder on padded tiles."""
    meta = _meta_reference()
    torch.manual_seed(0)
    ref = meta.VisionEncoder(
        max_num_tiles=4, image_size=TILE, patch_size=14, width=32, layers=4, heads=4, n_global_layers=2,
        global_model=True, return_intermediate=[1, 3],
    ).eval()  # fmt: skip
    _randomise(ref)
    sd = {f"vision_model.vision_encoder.{k}": v for k, v in ref.state_dict().items()}
    cfg = VisionEncoderConfig(
        image_size=TILE,
        patch_size=14,
        width=32,
        layers=4,
        heads=4,
        embed_dim=16,
        intermediate_layers=(1, 3),
        global_layers=2,
    )
    ours = VisionEncoder(cfg).eval()
    load_converted(ours, meta_vision_to_ours(sd, cfg))
    pixels, ids, _ = tile_images([_image(45, 120, 8), _image(110, 100, 9)], tile_size=TILE)
    grids = torch.tensor([supported_aspect_ratios(4)[i - 1] for i in ids.tolist()])  # Meta takes (h, w) per image
    with torch.no_grad():
        expected = ref(pixels.clone(), grids)[:, 0]
        out = ours(pixels, ids)
    assert (out - expected).abs().max() <= 1e-4


def _tiny_open_clip():
    import open_clip

    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1}
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def test_open_clip_checkpoint_loads_and_pools_like_encode_image(tmp_path):
    """An open_clip CLIP file loads with no trunk key missing; encode_pooled equals open_clip's encode_image."""
    clip = _tiny_open_clip()
    path = tmp_path / "open_clip.pt"
    torch.save(clip.state_dict(), path)
    cfg = VisionEncoderConfig(
        image_size=32,
        patch_size=8,
        width=64,
        layers=2,
        heads=4,
        embed_dim=24,
        intermediate_layers=(0,),
        global_layers=1,
    )
    ours = VisionEncoder(cfg, pretrained=path).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_pooled(images), clip.encode_image(images), atol=1e-5, rtol=1e-5)
    # The keys that are ours alone (Llama 3.2 extensions) are exactly the ones the checkpoint lacks.
    left = VisionEncoder(cfg).load_open_clip(path)
    assert {k.split(".")[0] for k in left} == set(VisionEncoder.OURS_ONLY)


def test_vit_h_14_keys_and_parameter_counts():
    """open_clip ViT-H-14's visual keys/shapes are our trunk's; the paper encoder has ~850M params (630M trunk)."""
    import open_clip

    with torch.device("meta"):
        clip = open_clip.create_model("ViT-H-14", device="meta")
        ours224 = VisionEncoder(VisionEncoderConfig.from_preset("vit-h-14", image_size=224))
        paper = VisionEncoder(VisionEncoderConfig.from_preset("vit-h-14"))
    visual = {k[len("visual.") :]: v.shape for k, v in clip.state_dict().items() if k.startswith("visual.")}
    trunk = {k: v.shape for k, v in ours224.state_dict().items() if not k.startswith(VisionEncoder.OURS_ONLY)}
    assert visual == trunk
    # The full-size state dict goes through load_open_clip (224 -> 448 grid resize included): only our keys left.
    left = paper.load_open_clip(clip.state_dict())
    assert {k.split(".")[0] for k in left} == set(VisionEncoder.OURS_ONLY)
    total = sum(p.numel() for p in paper.parameters())
    assert 620e6 < paper.trunk_parameters() < 640e6, paper.trunk_parameters()
    assert 820e6 < total < 880e6, total
    assert paper.cfg.output_dim == 7680


def test_open_clip_224_checkpoint_resizes_into_448_tiles():
    """A 224 px positional embedding is interpolated to the 448 px grid on load (class row kept)."""
    cfg = VisionEncoderConfig.from_preset("tiny")  # 64 px tiles, 8x8 grid
    src = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=32))
    sd = {f"visual.{k}": v for k, v in src.state_dict().items() if not k.startswith(VisionEncoder.OURS_ONLY)}
    ours = VisionEncoder(cfg)
    ours.load_open_clip(sd)
    assert ours.positional_embedding.shape == (65, 64)
    torch.testing.assert_close(ours.positional_embedding[0], src.positional_embedding[0])
    # Corners of an align_corners interpolation are the old corners.
    torch.testing.assert_close(ours.positional_embedding[1], src.positional_embedding[1])
    torch.testing.assert_close(ours.positional_embedding[-1], src.positional_embedding[-1])


def test_tiny_preset_shapes_and_gradients():
    """Tiny preset: shapes, a 2x2 image, and gradients reach the trunk and the (zero-gated) extensions' gates."""
    cfg = VisionEncoderConfig.from_preset("tiny")
    enc = VisionEncoder(cfg)
    pixels, ids, _ = tile_images([_image(90, 100, 10)], tile_size=cfg.image_size)
    feats = enc(pixels, ids)
    assert feats.shape == (1, 4, 65, 64 * 3)
    feats.square().mean().backward()
    assert enc.conv1.weight.grad.abs().sum() > 0
    assert enc.global_transformer.resblocks[0].gate_attn.grad.abs().sum() > 0
    assert enc.positional_gate.grad is not None


def test_checkpoint_directories_round_trip(hf_model, tmp_path):
    """An HF Mllama directory loads via from_mllama; our save_pretrained/from_pretrained round-trips exactly."""
    hf_model.save_pretrained(tmp_path / "hf")
    ours = VisionEncoder.from_mllama(tmp_path / "hf", intermediate_layer_input=False).eval()
    inputs = _hf_processor(TILE)(images=[[_image(60, 150, 11)]], return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(**{k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
        out = ours(inputs["pixel_values"][:, 0], inputs["aspect_ratio_ids"][:, 0])
    assert (out - ref.last_hidden_state[:, 0]).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    again = VisionEncoder.from_pretrained(tmp_path / "ours").eval()
    assert again.cfg == ours.cfg
    with torch.no_grad():
        assert torch.equal(again(inputs["pixel_values"][:, 0], inputs["aspect_ratio_ids"][:, 0]), out)


def test_square_transform_for_clip_pretraining():
    """The single-tile CLIP transform gives a CLIP-normalised [3, S, S] tensor from any PIL image."""
    from encoders.tiling import square_transform

    x = square_transform(64)(_image(50, 90, 12).convert("L"))
    assert x.shape == (3, 64, 64)
    white = square_transform(64)(Image.new("RGB", (80, 70), (255, 255, 255)))
    torch.testing.assert_close(white[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


def test_too_few_tiles_for_the_aspect_ratio_is_an_error():
    """Tiles fewer than the aspect ratio id needs (2x2 needs 4) raise instead of silently misreading."""
    enc = VisionEncoder(VisionEncoderConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="need more than the 2 tiles"):
        enc(torch.zeros(1, 2, 3, 64, 64), torch.tensor([6]))


def test_blocks_are_called_as_modules():
    """Every trunk and global block runs through its own __call__ (forward hooks fire), so FSDP can wrap each."""
    enc = VisionEncoder(VisionEncoderConfig.from_preset("tiny"))
    calls = []
    blocks = list(enc.transformer.resblocks) + list(enc.global_transformer.resblocks)
    for b in blocks:
        b.register_forward_hook(lambda mod, args, out: calls.append(mod))
    enc(torch.zeros(1, 1, 3, 64, 64), torch.tensor([1]))
    assert calls == blocks
    calls.clear()
    enc.encode_pooled(torch.zeros(1, 3, 64, 64))
    assert calls == list(enc.transformer.resblocks)
