"""The model on its own: presets, masks, backends, KV cache; every comparison against an independent path."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from lm.attention import attention_inputs, check_backend, document_positions, xformers_available
from lm.config import PRESETS, LMConfig
from lm.model import Transformer, rope_frequencies


@pytest.mark.parametrize(
    "name, billions",
    [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama3-405b", 405.85), ("llama3.2-1b", 1.24), ("llama3.2-3b", 3.21)],
)
def test_presets_match_published_sizes_and_hf(name, billions):
    config = LMConfig.from_preset(name)
    with torch.device("meta"):
        ours = Transformer(config)
        hf = LlamaForCausalLM(LlamaConfig(**config.to_hf_config()))
    ours_count = sum(p.numel() for p in ours.parameters())  # parameters() counts a tied weight once
    hf_count = sum(p.numel() for p in hf.parameters())
    assert ours_count == hf_count == config.num_params()
    assert abs(ours_count / 1e9 - billions) < 0.01


def test_preset_shapes_follow_table_3():
    c8, c70, c405 = (PRESETS[n] for n in ("llama3-8b", "llama3-70b", "llama3-405b"))
    assert (c8.n_layers, c8.dim, c8.ffn_hidden_dim, c8.n_heads, c8.n_kv_heads) == (32, 4096, 14336, 32, 8)
    assert (c70.n_layers, c70.dim, c70.ffn_hidden_dim, c70.n_heads, c70.n_kv_heads) == (80, 8192, 28672, 64, 8)
    assert (c405.n_layers, c405.dim, c405.ffn_hidden_dim, c405.n_heads, c405.n_kv_heads) == (126, 16384, 53248, 128, 8)
    assert all(c.vocab_size == 128256 and c.rope_theta == 500000.0 for c in (c8, c70, c405))


def test_flops_per_token_counts_matmuls_and_attention():
    config = PRESETS["llama3-8b"]
    matmul_params = config.num_params() - config.vocab_size * config.dim - (2 * config.n_layers + 1) * config.dim
    seq = 8192
    assert config.flops_per_token(seq) == 6 * matmul_params + 6 * config.n_layers * seq * config.dim
    # The paper's 405B budget: 3.8e25 FLOPs on 15.6T tokens is ~2.4e12 per token at seq 8K.
    per_token = PRESETS["llama3-405b"].flops_per_token(8192)
    assert 2.3e12 < per_token < 2.6e12


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        tiny_config(attn_backend="flash9")
    with pytest.raises(KeyError, match="llama3-7b"):
        LMConfig.from_preset("llama3-7b")


def test_rope_scaling_matches_meta_reference_loop():
    import math

    scaling = PRESETS["llama3-8b"].rope_scaling
    base = rope_frequencies(128, 500000.0, None)
    expected = []
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    for freq in base.tolist():  # Meta's apply_scaling, written as its loop
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            expected.append(freq)
        elif wavelen > low_wavelen:
            expected.append(freq / scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            expected.append((1 - smooth) * freq / scaling.factor + smooth * freq)
    torch.testing.assert_close(rope_frequencies(128, 500000.0, scaling), torch.tensor(expected), rtol=1e-6, atol=0)
    assert not torch.equal(rope_frequencies(128, 500000.0, scaling), base)


def test_document_positions_restart_per_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])
    assert torch.equal(document_positions(ids), expected)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_forward_equals_separate_documents(backend):
    model = tiny_model(attn_backend=backend)
    lengths = [7, 20, 1, 12]
    tokens = torch.randint(0, 512, (1, sum(lengths)))
    document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():  # flex_attention has no CPU backward
        packed = model(tokens, document_ids=document_ids)
        separate = torch.cat([model(part) for part in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_causal_and_document_masks():
    sdpa = tiny_model(attn_backend="sdpa")
    flex = tiny_model(attn_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randint(0, 512, (3, 48))
    document_ids = torch.tensor([[0] * 16 + [1] * 32, [0] * 48, [0] * 5 + [1] * 5 + [2] * 38])
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens), sdpa(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            flex(tokens, document_ids=document_ids), sdpa(tokens, document_ids=document_ids), atol=1e-5, rtol=1e-5
        )


def test_xformers_backend_is_refused_clearly_where_it_cannot_run():
    if xformers_available():
        check_backend("xformers")  # usable here: the GPU check compares it against SDPA
    else:
        with pytest.raises(RuntimeError, match="xformers"):
            Transformer(tiny_config(attn_backend="xformers"))


def test_kv_cache_decode_equals_full_forward(model):
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(batch=2, max_len=64)
        steps = [model(tokens[:, :10], start_pos=0)]
        for t in range(10, 30):
            steps.append(model(tokens[:, t : t + 1], start_pos=t))
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_unpadded_rows(model):
    prompts = [torch.randint(0, 512, (n,)) for n in (5, 12, 9)]
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        valid[row, width - len(prompt) :] = True
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        model.setup_cache(batch=3, max_len=32)
        attention = attention_inputs(
            model.config, 3, width, tokens.device, start_pos=0, key_valid=valid, positions=positions
        )
        batched = model(tokens, attention=attention)
        model.clear_cache()
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None])
            torch.testing.assert_close(batched[row, width - len(prompt) :], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()  # padding rows never turn into NaN


def test_meta_device_build_then_init():
    with torch.device("meta"):
        big = Transformer(LMConfig.from_preset("llama3-405b"))
    assert all(p.is_meta for p in big.parameters())
    with torch.device("meta"):
        small = Transformer(tiny_config())
    small.to_empty(device="cpu")
    small.init_weights()
    logits = small(torch.randint(0, 512, (1, 8)))
    assert torch.isfinite(logits).all() and logits.shape == (1, 8, 512)


def test_cache_overflow_and_missing_cache_are_errors(model):
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=0)
    model.setup_cache(batch=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache holds 8"):
        model(torch.zeros(1, 10, dtype=torch.long), start_pos=0)


def test_meta_params_of_released_models_give_the_presets():
    """llama-models' published architecture arguments, read as params.json, reproduce our presets."""
    from llama_models.sku_list import arch_args_1b, arch_args_3b, resolve_model

    llama31_8b = resolve_model("Llama3.1-8B").arch_args
    cases = [(llama31_8b, "llama3-8b"), (arch_args_1b(), "llama3.2-1b"), (arch_args_3b(), "llama3.2-3b")]
    for params, preset_name in cases:
        config, preset = LMConfig.from_meta_params(params), LMConfig.from_preset(preset_name)
        shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim", "vocab_size", "rope_theta")
        assert all(getattr(config, f) == getattr(preset, f) for f in shape), preset_name
        # The 3.2 small models use factor 32, which Meta's params.json leaves unsaid.
        assert config.rope_scaling == preset.rope_scaling, preset_name


def test_stages_that_drop_modules_compose_to_the_full_model(model):
    """Pipeline stages delete layers and the embedding/output ends; run in sequence they equal the whole."""
    import copy

    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm = first.output = None
    del last.layers["0"]
    last.tok_embeddings = None
    assert set(last.state_dict()) >= {"layers.1.attention.wq.weight", "output.weight"}  # keys keep their index
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), model(tokens), atol=1e-6, rtol=1e-6)
