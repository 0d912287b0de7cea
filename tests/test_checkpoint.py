"""Checkpoints in Meta's and HF's layouts, proven against transformers' LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from lm.checkpoint import detect_format, load_pretrained, save_pretrained
from lm.config import LMConfig

TOKENS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))


def hf_logits(path, tokens=TOKENS) -> torch.Tensor:
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("tied", [False, True])
def test_ours_to_hf_dir_to_hf_equals_ours(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    save_pretrained(model, tmp_path, format="hf")
    with torch.no_grad():
        ours = model(TOKENS)
    assert (ours - hf_logits(tmp_path)).abs().max() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_hf_dir_to_ours_equals_hf(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied).to_hf_config()
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    for p in hf.parameters():  # HF's init leaves norms at 1; randomize everything so no weight hides
        p.data.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_scaling == tiny_config().rope_scaling
    assert ours.config.tie_word_embeddings == tied and (ours.output.weight is ours.tok_embeddings.weight) == tied
    with torch.no_grad():
        expected = hf(TOKENS).logits
        assert (ours(TOKENS) - expected).abs().max() <= 1e-4


def test_hf_config_roundtrip_through_transformers(tmp_path):
    config = LMConfig.from_preset("llama3-8b")
    LlamaConfig(**config.to_hf_config()).save_pretrained(tmp_path)  # as transformers itself writes it
    again = LMConfig.from_hf_config(tmp_path / "config.json")
    for field in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "ffn_hidden_dim",
        "rope_theta",
        "rope_scaling",
        "vocab_size",
    ):
        assert getattr(again, field) == getattr(config, field), field


def test_sharded_hf_checkpoint_with_index(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path, format="hf", max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(TOKENS) - model(TOKENS)).abs().max() == 0
    assert (hf_logits(tmp_path) - model(TOKENS).detach()).abs().max() <= 1e-4


def test_meta_two_model_parallel_shards_equal_unsharded(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "mp1", format="meta")
    save_pretrained(model, tmp_path / "mp2", format="meta", model_parallel=2)
    assert sorted(p.name for p in (tmp_path / "mp2").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard = torch.load(tmp_path / "mp2" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel: split on the input dim
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # column-parallel: split on the output dim
    one, two = load_pretrained(tmp_path / "mp1"), load_pretrained(tmp_path / "mp2")
    with torch.no_grad():
        assert torch.equal(one(TOKENS), two(TOKENS))
        assert (one(TOKENS) - model(TOKENS)).abs().max() == 0


def test_meta_shards_with_replicated_kv_heads(tmp_path):
    """More model-parallel ranks than KV heads: Meta replicates each KV head; merging must not duplicate it."""
    model = tiny_model()  # 2 KV heads
    save_pretrained(model, tmp_path, format="meta", model_parallel=2)
    shards = [torch.load(tmp_path / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    split = []
    for shard in shards:  # re-split each of the 2 shards in 2, duplicating its single KV head
        for half in range(2):
            part = {}
            for key, value in shard.items():
                if key.endswith(("attention.wk.weight", "attention.wv.weight")) or key.endswith("norm.weight"):
                    part[key] = value.clone()
                elif key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                    part[key] = value.chunk(2, dim=1)[half].clone()
                else:
                    part[key] = value.chunk(2, dim=0)[half].clone()
            split.append(part)
    for i, part in enumerate(split):
        torch.save(part, tmp_path / f"consolidated.{i:02d}.pth")
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(TOKENS), model(TOKENS))


def test_meta_checkpoint_equals_hf_checkpoint(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "meta", format="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
    meta = load_pretrained(tmp_path / "meta")
    save_pretrained(meta, tmp_path / "hf", format="hf")
    assert (hf_logits(tmp_path / "hf") - model(TOKENS).detach()).abs().max() <= 1e-4


def test_load_in_bf16(tmp_path):
    save_pretrained(tiny_model(), tmp_path, format="hf")
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(TOKENS)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), hf_logits(tmp_path), atol=0.15, rtol=0.05)


def test_config_that_does_not_match_weights_names_key_and_shapes(tmp_path):
    save_pretrained(tiny_model(), tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    found = r"layers\.0\.feed_forward\.w\d\.weight has shape \((64, 192|192, 64)\) in the checkpoint"
    with pytest.raises(ValueError, match=found + r" but the config expects \((64, 256|256, 64)\)"):
        load_pretrained(tmp_path)


def test_missing_weight_is_named(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path, format="meta")
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del state["layers.1.ffn_norm.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(KeyError, match=r"layers\.1\.ffn_norm\.weight"):
        load_pretrained(tmp_path)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_pretrained(tmp_path / "no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Meta checkpoint"):
        detect_format(tmp_path / "empty")
    save_pretrained(tiny_model(), tmp_path / "hf", format="hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a crash or a partial copy
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(tmp_path / "hf")
    save_pretrained(tiny_model(), tmp_path / "meta", format="meta")
    shard = tmp_path / "meta" / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="consolidated.00.pth"):
        load_pretrained(tmp_path / "meta")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    good = tiny_model(seed=0)
    save_pretrained(good, tmp_path, format="hf")
    before = (tmp_path / "model.safetensors").read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_model(seed=1), tmp_path, format="hf")
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_meta_load_is_memory_mapped(tmp_path):
    save_pretrained(tiny_model(), tmp_path, format="meta")
    model = load_pretrained(tmp_path)
    # Assigned straight from the memory-mapped file: no second in-memory copy of the weights.
    address = model.layers["0"].feed_forward.w1.weight.data_ptr()
    regions = [line.split()[0].split("-") for line in open("/proc/self/maps") if "consolidated.00.pth" in line]
    assert any(int(start, 16) <= address < int(end, 16) for start, end in regions)


def test_init_writes_a_loadable_preset_checkpoint(tmp_path):
    from lm.init import main

    main(["--preset", "debug", "--out", str(tmp_path / "debug"), "--format", "meta", "--seed", "3"])
    model = load_pretrained(tmp_path / "debug")
    preset = LMConfig.from_preset("debug")
    assert model.config.dim == preset.dim and model.config.n_layers == preset.n_layers
    assert model.config.ffn_hidden_dim == preset.ffn_hidden_dim and model.config.rope_scaling == preset.rope_scaling
    main(["--preset", "debug", "--out", str(tmp_path / "again"), "--format", "meta", "--seed", "3"])
    again = load_pretrained(tmp_path / "again")  # the seed makes it reproducible
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_meta_checkpoint_without_output_ties_it(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    save_pretrained(model, tmp_path, format="meta")
    assert "output.weight" not in torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    loaded = load_pretrained(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
