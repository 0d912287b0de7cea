"""Import Llama 3.2 Vision weights in HF `MllamaForConditionalGeneration` layout into a Llama3MM.

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

from adapters.vision import VisionAdapter, VisionAdapterConfig, mllama_adapter_to_ours, mllama_cross_attention_layers
from encoders.vision import VisionEncoder
from lm.checkpoint import _HF_TO_META, _rename, check_state_dict, hf_to_meta_rotary
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
            name = _rename(f"model.layers.{ours}.{key[len(layer_prefix) :]}", _HF_TO_META)
            if name is None:
                raise KeyError(f"unexpected Mllama self-attention weight {key}")
            if name.endswith("attention.wq.weight"):
                tensor = hf_to_meta_rotary(tensor, config.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = hf_to_meta_rotary(tensor, config.n_kv_heads)
            out[name] = tensor
    return out, embed[config.vocab_size :]


def from_mllama(
    source: str | Path | dict, hf_config: dict | Any | None = None, *, intermediate_layer_input: bool = True
):
    """A Llama3MM with the LM, vision encoder, adapter and extra embeddings of an HF Mllama checkpoint."""
    from llama3mm.model import Llama3MM

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

    mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter, num_extra_tokens=extra.shape[0])
    with torch.no_grad():
        mm.extra_embeddings.copy_(extra)
    return mm.to(lm.output.weight.dtype)  # the encoder and adapter were built in fp32


def _prefix_of(state_dict: dict, suffix: str) -> str:
    for key in state_dict:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"no key ending in {suffix!r}: not an HF MllamaForConditionalGeneration checkpoint")


__all__ = ["from_mllama", "mllama_lm_config", "mllama_lm_to_ours", "read_mllama"]
