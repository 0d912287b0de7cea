"""Llama 3.2 Vision in HF Mllama layout loads into Llama3MM with logits equal to transformers' Mllama."""

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.tiling import tile_images
from llama3mm import Llama3MM

VOCAB = 200  # <|image|> is VOCAB, the first id past the text vocabulary, as 128256 is for Llama 3
TILE = 28


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
