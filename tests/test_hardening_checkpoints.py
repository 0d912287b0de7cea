"""Checkpoint hardening: re-saves leave no stale files, manifests and DCP metadata are trusted no further than
they must be, a damaged newest training checkpoint is skipped on resume."""

from __future__ import annotations

import torch
from conftest import tiny_model

from llama3mm.checkpoint import lm_sha256
from lm.checkpoint import load_pretrained, save_pretrained


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- 1. a re-save leaves no stale shards or index ----------------------------------------------------------------


def test_hf_resave_in_one_file_removes_the_earlier_shards_and_index(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "hf"
    save_pretrained(first, out, format="hf", max_shard_bytes=150_000)
    old_shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(old_shards) >= 3 and (out / "model.safetensors.index.json").exists()
    (out / "README.md").write_text("kept: not a layout file")

    save_pretrained(second, out, format="hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert _same_weights(load_pretrained(out), second)
    # The LM's digest covers exactly what loads: the same as a clean save of the second model.
    save_pretrained(second, tmp_path / "clean", format="hf")
    assert lm_sha256(out) == lm_sha256(tmp_path / "clean")


def test_meta_resave_with_fewer_model_parallel_shards_removes_the_extra_ones(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "meta"
    save_pretrained(first, out, format="meta", model_parallel=2)
    assert (out / "consolidated.01.pth").exists()
    save_pretrained(second, out, format="meta", model_parallel=1)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert _same_weights(load_pretrained(out), second)


def test_a_save_in_the_other_layout_replaces_the_earlier_one(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = tmp_path / "lm"
    save_pretrained(first, out, format="meta")
    save_pretrained(second, out, format="hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _same_weights(load_pretrained(out), second)
