"""Import Llama 3.2 Vision weights into a Llama3MM: HF `MllamaForConditionalGeneration` layout and Meta's.

Meta's layout (llama_models `CrossAttentionTransformer`: `text_model.*`, `vision_model.*`, params.json) already
uses our names: the self-attention layers, the cross-attention blocks (`cross_attention_layers.N`, run before the
layers of Meta's fusion schedule, which `adapters.vision.fusion_schedule` reproduces) and `learnable_embedding`.

HF interleaves the cross-attention layers with the self-attention layers in one list (for 11B: 40 layers, cross
at 3, 8, ..., 38); ours keep the self-attention layers as a plain `lm.Transformer` (32 layers) and put each
cross-attention block before the layer that follows it in HF's list. HF's embedding table has 8 rows past the
text vocabulary (<|image|> = 128256 first): they become `Llama3MM.extra_embeddings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapters.vision import (
    VisionAdapter,
    VisionAdapterConfig,
    meta_adapter_to_ours,
    mllama_adapter_to_ours,
    mllama_cross_attention_layers,
)
from encoders.vision import VisionEncoder
from llama3mm.parts import Llama3MMParts
from lm.checkpoint import check_state_dict, hf_to_meta_name, hf_to_meta_rotary
from lm.config import LMConfig
from lm.model import Transformer


def read_mllama(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, every tensor) of an HF Mllama checkpoint directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not an HF Mllama checkpoint")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return json.loads((directory / "config.json").read_text()), state


def mllama_lm_config(text_config: dict) -> LMConfig:
    """The LMConfig of an MllamaTextConfig dict: its self-attention layers only."""
    cross = text_config.get("cross_attention_layers") or []
    return LMConfig.from_hf_config({**text_config, "num_hidden_layers": text_config["num_hidden_layers"] - len(cross)})


def mllama_lm_to_ours(state_dict: dict, text_config: dict) -> tuple[dict, torch.Tensor]:
    """(Transformer state dict, extra embedding rows) from an Mllama state dict's text model and lm_head."""
    config = mllama_lm_config(text_config)
    prefix = _prefix_of(state_dict, "embed_tokens.weight")
    head = _prefix_of(state_dict, "lm_head.weight") + "lm_head.weight"
    cross = set(text_config.get("cross_attention_layers") or [])
    embed = state_dict[prefix + "embed_tokens.weight"]
    out = {
        "tok_embeddings.weight": embed[: config.vocab_size],
        "norm.weight": state_dict[prefix + "norm.weight"],
        "output.weight": state_dict[head],
    }
    self_layers = [i for i in range(text_config["num_hidden_layers"]) if i not in cross]
    for ours, theirs in enumerate(self_layers):
        layer_prefix = f"{prefix}layers.{theirs}."
        for key, tensor in state_dict.items():
            if not key.startswith(layer_prefix):
                continue
            name = hf_to_meta_name(f"model.layers.{ours}.{key[len(layer_prefix) :]}")
            if name is None:
                raise KeyError(f"unexpected Mllama self-attention weight {key}")
            if name.endswith("attention.wq.weight"):
                tensor = hf_to_meta_rotary(tensor, config.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = hf_to_meta_rotary(tensor, config.n_kv_heads)
            out[name] = tensor
    return out, embed[config.vocab_size :]


def mllama_parts(
    source: str | Path | dict, hf_config: dict | Any | None = None, *, intermediate_layer_input: bool = True
) -> Llama3MMParts:
    """The LM, vision encoder, adapter and extra embeddings of an HF Mllama checkpoint (a directory, or a state
    dict with its MllamaConfig)."""
    if isinstance(source, dict):
        if hf_config is None:
            raise ValueError("a state dict needs its MllamaConfig (hf_config)")
        state = source
    else:
        config_from_file, state = read_mllama(source)
        hf_config = hf_config or config_from_file
    config = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    text, vision = config["text_config"], config["vision_config"]
    lm_config = mllama_lm_config(text)
    image_token = config.get("image_token_index", lm_config.vocab_size)
    if image_token != lm_config.vocab_size:
        raise ValueError(
            f"image_token_index={image_token}: Llama3MM expects <|image|> right past the text vocabulary "
            f"({lm_config.vocab_size})"
        )

    lm_state, extra = mllama_lm_to_ours(state, text)
    with torch.device("meta"):
        lm = Transformer(lm_config)
    check_state_dict(lm, lm_state, source="Mllama text model")
    lm.load_state_dict(lm_state, assign=True, strict=True)

    encoder = VisionEncoder.from_mllama(state, vision, intermediate_layer_input=intermediate_layer_input)
    cross = text.get("cross_attention_layers") or []
    adapter_cfg = VisionAdapterConfig(
        vision_dim=encoder.cfg.output_dim,
        dim=lm_config.dim,
        n_heads=lm_config.n_heads,
        n_kv_heads=lm_config.n_kv_heads,
        ffn_hidden_dim=text["intermediate_size"],
        norm_eps=lm_config.norm_eps,
        layers=mllama_cross_attention_layers(cross),
    )
    adapter = VisionAdapter(adapter_cfg)
    adapter.load_state_dict(mllama_adapter_to_ours(state, cross), strict=True)

    return Llama3MMParts(lm, modules={"vision_encoder": encoder, "vision_adapter": adapter}, extra_embeddings=extra)


def meta_to_ours(state_dict: dict, params: dict) -> dict[str, Any]:
    """Split a Meta Llama 3.2 Vision state dict: {"lm_config", "lm", "adapter_config", "adapter", "extra",
    "vision" (Meta-named encoder tensors, or None when absent)}."""
    lm_config = LMConfig.from_meta_params(params)
    text = {k[len("text_model.") :]: v for k, v in state_dict.items() if k.startswith("text_model.")}
    if "learnable_embedding.weight" not in text:
        raise KeyError("not a Llama 3.2 Vision checkpoint in Meta's layout: no text_model.learnable_embedding.weight")
    lm_state = {k: v for k, v in text.items() if not k.startswith(("cross_attention_layers.", "learnable_embedding"))}
    adapter = meta_adapter_to_ours(state_dict)
    adapter_config = VisionAdapterConfig.from_lm(
        lm_config,
        vision_dim=adapter["vision_projection.weight"].shape[1],
        num_layers=params["vision_num_cross_attention_layers"],
    )
    vision = {k: v for k, v in state_dict.items() if k.startswith("vision_model.vision_encoder.")}
    return {
        "lm_config": lm_config,
        "lm": lm_state,
        "adapter_config": adapter_config,
        "adapter": adapter,
        "extra": text["learnable_embedding.weight"],
        "vision": vision or None,
    }


def meta_parts(source: str | Path | dict, params: dict | None = None) -> Llama3MMParts:
    """The parts of Meta's Llama 3.2 Vision layout: a directory (params.json + one consolidated.00.pth) or a
    state dict with its params. The encoder is Meta's ViT-H/14 at `vision_chunk_size` pixels per tile."""
    from encoders.vision import VisionEncoderConfig, load_converted, meta_vision_to_ours

    if isinstance(source, dict):
        if params is None:
            raise ValueError("a state dict needs its params.json contents (params)")
        state = source
    else:
        directory = Path(source)
        shards = sorted(directory.glob("consolidated.*.pth"))
        if len(shards) != 1 or not (directory / "params.json").is_file():
            raise ValueError(
                f"{directory}: expected params.json and exactly one consolidated.00.pth (model-parallel Meta "
                f"shards are not merged here), found {[p.name for p in shards]}"
            )
        params = params or json.loads((directory / "params.json").read_text())
        state = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    parts = meta_to_ours(state, params)
    with torch.device("meta"):
        lm = Transformer(parts["lm_config"])
    check_state_dict(lm, parts["lm"], source="Meta text model")
    lm.load_state_dict(parts["lm"], assign=True, strict=True)
    adapter = VisionAdapter(parts["adapter_config"])
    adapter.load_state_dict(parts["adapter"], strict=True)
    encoder = None
    if parts["vision"] is not None:
        cfg = VisionEncoderConfig.from_preset(
            "vit-h-14", image_size=params["vision_chunk_size"], max_num_tiles=params.get("vision_max_num_chunks", 4)
        )
        encoder = VisionEncoder(cfg)
        load_converted(encoder, meta_vision_to_ours(parts["vision"], cfg))
    modules = {"vision_encoder": encoder, "vision_adapter": adapter}
    return Llama3MMParts(lm, modules=modules, extra_embeddings=parts["extra"])


def _prefix_of(state_dict: dict, suffix: str) -> str:
    for key in state_dict:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"no key ending in {suffix!r}: not an HF MllamaForConditionalGeneration checkpoint")


__all__ = ["meta_parts", "meta_to_ours", "mllama_lm_config", "mllama_lm_to_ours", "mllama_parts", "read_mllama"]
