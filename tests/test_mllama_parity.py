"""Llama 3.2 Vision in HF Mllama layout loads into Llama3MM with logits equal to transformers' Mllama."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.tiling import tile_images
from llama3mm import Llama3MM

VOCAB = 200  # <|image|> is VOCAB, the first id past the text vocabulary, as 128256 is for Llama 3
TILE = 28


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[1, 4],  # between self layers: ours are 4 self layers with blocks before 1 and 3
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=128,
            pad_token_id=VOCAB - 1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
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
        ),
        image_token_index=VOCAB,
    )
    model = MllamaForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:  # gates included: at 0 they would hide the cross-attention and the vision extensions
                p.normal_(0, 0.2 if "gate" in name or "embedding" in name else 0.08)
    directory = tmp_path_factory.mktemp("mllama")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def ours(hf_model_dir):
    # transformers 5 keeps the *output* of each intermediate vision layer (see encoders.vision).
    return Llama3MM.from_mllama(hf_model_dir[1], intermediate_layer_input=False).eval()


def _images(*sizes):
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _hf_inputs(tokens: list[int], images, hf_config):
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    pixels, ids, mask = tile_images(images, TILE, 4)
    spans = get_cross_attention_token_mask(tokens, hf_config.image_token_index)
    cross = convert_sparse_cross_attention_mask_to_dense([spans], [mask.sum(-1).tolist()], 4, len(tokens))
    return {
        "input_ids": torch.tensor([tokens]),
        "pixel_values": pixels[None],
        "aspect_ratio_ids": ids[None],
        "aspect_ratio_mask": mask[None],
        "cross_attention_mask": torch.from_numpy(cross),
    }


def test_image_prompt_logits_equal_mllama(hf_model_dir, ours):
    """Two images (a 1x3 and a 2x2 grid) each opened by its <|image|>: logits equal HF's (fp32, 1e-4)."""
    hf, _ = hf_model_dir
    # The image token comes first: HF lets text before any image attend to images uniformly where Meta (and
    # we) zero those rows (adapters.vision docstring), so only prompts without such rows are comparable.
    tokens = [VOCAB, 5, 17, 33, 9, VOCAB, 41, 7, 99, 12, 3]
    inputs = _hf_inputs(tokens, _images((30, 80), (60, 50)), hf.config)
    with torch.no_grad():
        ref = hf(**inputs).logits
        out = ours(inputs["input_ids"], inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    assert out.shape == ref.shape == (1, len(tokens), VOCAB)
    assert (out - ref).abs().max() <= 1e-4
    # The images matter: the same prompt with other images gives other logits.
    other = _hf_inputs(tokens, _images((80, 30), (50, 60))[::-1], hf.config)
    with torch.no_grad():
        changed = ours(other["input_ids"], other["pixel_values"], other["aspect_ratio_ids"])
    assert (changed - out).abs().max() > 1e-2


def test_text_prompt_logits_equal_mllama(hf_model_dir, ours):
    """A text-only prompt skips the cross-attention layers in both: logits equal HF's."""
    hf, _ = hf_model_dir
    tokens = torch.tensor([[1, 8, 150, 23, 4, 77, 61]])
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        out = ours(tokens)
    assert (out - ref).abs().max() <= 1e-4


def test_import_maps_layers_and_extra_embeddings(hf_model_dir, ours):
    """HF's interleaved layer list splits into 4 frozen self-attention layers and blocks before layers 1 and 3;
    the 8 embedding rows past the vocabulary become the learnable table."""
    hf, _ = hf_model_dir
    assert ours.lm.config.n_layers == 4 and ours.vision_adapter.cfg.layers == (1, 3)
    table = hf.model.language_model.embed_tokens.weight
    assert torch.equal(ours.extra_embeddings.detach(), table[VOCAB:])
    assert torch.equal(ours.lm.tok_embeddings.weight, table[:VOCAB])


def test_meta_layout_logits_equal_llama_models_reference():
    """Meta's layout imports and equals llama_models' CrossAttentionTransformerText on projected image tokens,
    including Meta's rule for text before the first image (rows zeroed) and a run of two image tokens."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.chat_format import create_vision_mask
    from test_encoders_vision import _meta_reference

    from adapters.vision import MediaAttentionMask, cross_attention_mask
    from llama3mm import CrossAttentionInputs, MediaState

    meta = _meta_reference()
    params = dict(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        multiple_of=32,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=10000.0,
        use_scaled_rope=False,
        vision_num_cross_attention_layers=2,
    )
    torch.manual_seed(0)
    ref = meta.CrossAttentionTransformerText(ModelArgs(max_seq_len=32, max_batch_size=1, **params)).eval()
    projection = torch.nn.Linear(96, 64)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    ref.setup_cache(1, "cpu", torch.float32)
    state = {f"text_model.{k}": v for k, v in ref.state_dict().items()}
    state.update({f"vision_model.vision_projection.{k}": v for k, v in projection.state_dict().items()})
    ours = Llama3MM.from_meta(state, params).eval()
    assert ours.vision_adapter.cfg.layers == tuple(ref.fusion_schedule) == (1, 3)

    tokens = [1, 5, VOCAB, 7, 8, VOCAB, VOCAB, 9, 10, 11, 12]  # text before any image; a run of two images
    tiles_per_image = [2, 4, 1]
    media = torch.randn(1, 3, 4, 5, 64)  # [B, images, tiles, tokens per tile, dim], already projected
    tile_mask = torch.arange(4) < torch.tensor(tiles_per_image)[:, None]
    with torch.no_grad():
        padded = meta._pad_masks([create_vision_mask(tokens, VOCAB)], [tiles_per_image], len(tokens), 4)
        xattn_mask, rows = ref._get_xattn_mask(len(tokens), "cpu", torch.float32, media, padded)
        caches = torch.stack([b.compute_xattn_kv_cache(media.view(1, -1, 64)) for b in ref.cross_attention_layers])
        ids = torch.tensor([tokens])
        expected = ref(torch.arange(len(tokens)), ref.get_partially_trainable_embedding(ids), xattn_mask, rows, caches)

        adapter = ours.vision_adapter
        mask = MediaAttentionMask.from_tiles(cross_attention_mask(ids, VOCAB, tile_mask[None]), 5)
        inputs = CrossAttentionInputs(adapter.block_for_layer(), adapter.media_kv(media.view(1, -1, 64)), mask)
        out = ours.forward_with_media(ids, MediaState(cross=[inputs]))
    assert (out - expected).abs().max() <= 1e-4
    with torch.no_grad():
        lm_alone = ours.lm(ids.clamp(max=VOCAB - 1), embeddings=ours.embed(ids))
    assert torch.equal(out[:, :2], lm_alone[:, :2])  # before the first image: exactly the frozen LM
    assert (out[:, 2:] - lm_alone[:, 2:]).abs().amax(-1).min() > 1e-3


def test_imported_model_saves_with_its_lm_and_reloads(hf_model_dir, ours, tmp_path, monkeypatch):
    """An imported model has no LM path: save_pretrained writes the LM beside the parts (manifest path "lm")
    and from_pretrained restores the same logits."""
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    hf, _ = hf_model_dir
    tokens = [VOCAB, 5, 17, 33, 9]
    inputs = _hf_inputs(tokens, _images((30, 80)), hf.config)
    args = inputs["input_ids"], inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "llama3mm.json").read_text())["lm"]["path"] == "lm"
    loaded = Llama3MM.from_pretrained(tmp_path, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(*args), ours(*args))


def test_from_pretrained_recognises_an_mllama_directory(hf_model_dir):
    """Llama3MM.from_pretrained (what the demo's --checkpoint calls) imports an HF Mllama directory as
    from_mllama does: the same parts and the same logits on an image prompt."""
    hf, directory = hf_model_dir
    loaded = Llama3MM.from_pretrained(directory, device="cpu").eval()
    imported = Llama3MM.from_mllama(directory).eval()
    tokens = [VOCAB, 5, 17, 33, 9]
    inputs = _hf_inputs(tokens, _images((30, 80)), hf.config)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    with torch.no_grad():
        assert torch.equal(loaded(*args), imported(*args))
    assert loaded.vision_encoder is not None and loaded.prompts == {}
