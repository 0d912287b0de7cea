"""Checkpoint formats: Meta's (params.json + consolidated.NN.pth) and HF's (config.json + *.safetensors).

Loading builds the model on the meta device and assigns the checkpoint's tensors into it, so a large
model never exists twice in memory: Meta shards are memory-mapped, safetensors are read one tensor at a
time. Every file is written under a temporary name and renamed into place, so an interrupted save never
leaves a truncated file where a good one was; once all are in, the layout files of an earlier save that this one
did not write (more shards, a stale index, the other layout's) are removed, so a load reads this save alone.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

# Re-exported: callers outside lm/ that still import them from here keep working.
from common.atomic import atomic_write, atomic_write_text, fsync_directory
from lm.config import LMConfig
from lm.model import Transformer

HF_SHARD_BYTES = 5 * 2**30
HF_SINGLE_FILE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# Every file either layout writes: a save removes those of them it did not write this time (and only those), so
# a directory never mixes two saves (shards of a save in more pieces, the other layout's files, a stale index).
_LAYOUT_FILE = re.compile(
    r"config\.json|params\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors"
    r"|consolidated\.\d{2,}\.pth"
)

# Meta parameter name -> HF parameter name ("{}" is the layer index).
_META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_HF_TO_META = {hf: meta for meta, hf in _META_TO_HF.items()}
# A score head (LMConfig.num_labels > 0) is HF's LlamaForSequenceClassification `score`, our `output`.
HF_SCORE_HEAD = "score.weight"
_HF_TO_META[HF_SCORE_HEAD] = "output.weight"


def _rename(name: str, table: dict[str, str]) -> str | None:
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    target = table.get(key)
    if target is None:
        return None
    return target.format(layer.group(1)) if layer else target


def hf_to_meta_name(hf_name: str) -> str | None:
    """Our (Meta) name of an HF Llama weight name such as `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    return _rename(hf_name, _HF_TO_META)


def meta_to_hf_name(name: str) -> str | None:
    """The HF Llama name of one of our (Meta) weight names such as `layers.3.attention.wq.weight`; None if unknown."""
    return _rename(name, _META_TO_HF)


def meta_to_hf_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Meta's interleaved rotary pairs to HF's rotate-half layout."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_hf_rotary`."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- detection and loading ------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """'meta' or 'hf', from the files in a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if (path / "params.json").exists() and sorted(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").exists() and sorted(path.glob("*.safetensors")):
        return "hf"
    raise ValueError(
        f"{path} is neither a Meta checkpoint (params.json + consolidated.NN.pth) "
        f"nor an HF checkpoint (config.json + *.safetensors); it holds: {sorted(p.name for p in path.iterdir())}"
    )


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files a load of this LM checkpoint directory reads (config and weights), in name order."""
    path = Path(path)
    if detect_format(path) == "meta":
        return sorted([path / "params.json", *_meta_shards(path)])
    # The index only chooses which shards load; their bytes are what the files listed here carry.
    return sorted([path / "config.json", *_hf_weight_files(path)])


def _meta_shards(path: Path) -> list[Path]:
    return sorted(path.glob("consolidated.*.pth"))


def _hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files an HF directory loads: its index's shards, else model.safetensors, else all."""
    index = path / HF_INDEX
    if index.exists():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from error
        outside = sorted(name for name in names if not isinstance(name, str) or Path(name).name != name)
        if outside:
            raise ValueError(f"{index}: weight_map names files outside the directory: {outside[:4]}")
        return sorted(path / name for name in names)
    if (path / HF_SINGLE_FILE).exists():
        return [path / HF_SINGLE_FILE]
    return sorted(path.glob("*.safetensors"))  # another exporter's naming: every file is the model


def load_config(path: str | os.PathLike) -> LMConfig:
    """The LMConfig of a Meta or HF checkpoint directory."""
    path = Path(path)
    if detect_format(path) == "meta":
        return LMConfig.from_meta_params(path / "params.json")
    return LMConfig.from_hf_config(path / "config.json")


def read_state_dict(path: str | os.PathLike) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """The config and the (memory-mapped, Meta-named) weights of a Meta or HF checkpoint directory, checked
    against the config; tied models get ``output.weight`` as the embedding table."""
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    if detect_format(path) == "meta":
        state = _read_meta(path, model)
    else:
        state = _read_hf(path, config)
    if "output.weight" not in state:
        config.tie_word_embeddings = True  # Llama 3.2 1B/3B: the output projection is the embedding matrix
    if config.tie_word_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    check_state_dict(model, state, source=str(path))
    return config, state


def load_pretrained(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_backend: str | None = None,
) -> Transformer:
    """Load a Meta or HF checkpoint directory into a Transformer (weights keep their dtype unless given)."""
    config, state = read_state_dict(path)
    if attn_backend is not None:
        config.attn_backend = attn_backend
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a KeyError/ValueError naming the key (and both shapes) where `state` does not fit `model`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise KeyError(f"{source}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise KeyError(f"{source}: unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)} in the checkpoint but the config "
                f"expects {tuple(expected[key].shape)}"
            )


def _read_meta(path: Path, model: Transformer) -> dict[str, torch.Tensor]:
    """Read consolidated.NN.pth shards (memory-mapped) and merge model-parallel splits."""
    files = _meta_shards(path)
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        except Exception as error:
            raise ValueError(f"cannot read Meta checkpoint shard {file}: {error}") from error
    if len(shards) == 1:
        return {k: v for k, v in shards[0].items() if k != "rope.freqs"}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    merged = {}
    for key in shards[0]:
        if key == "rope.freqs":  # Llama 2 checkpoints store the RoPE table; it is derived, not learned
            continue
        parts = []
        for file, shard in zip(files, shards, strict=True):
            if key not in shard:
                raise KeyError(f"{file}: missing {key} (present in {files[0].name})")
            parts.append(shard[key])
        merged[key] = _merge_parallel(key, parts, expected.get(key))
    return merged


def _merge_parallel(key: str, parts: list[torch.Tensor], full_shape: tuple[int, ...] | None) -> torch.Tensor:
    """Undo one model-parallel split: find the dimension it was split on from the expected full shape."""
    first = parts[0]
    if full_shape is None or tuple(first.shape) == full_shape:
        return first  # replicated (norms) or unknown key (reported by check_state_dict)
    for dim, (part_size, full_size) in enumerate(zip(first.shape, full_shape, strict=True)):
        if part_size == full_size:
            continue
        if (part_size * len(parts)) % full_size == 0 and full_size % part_size == 0:
            # With more model-parallel ranks than KV heads, each KV head is replicated on several ranks.
            replicas = part_size * len(parts) // full_size
            return torch.cat(parts[::replicas], dim=dim)
        break
    raise ValueError(
        f"{key}: {len(parts)} model-parallel shards of shape {tuple(first.shape)} cannot form the shape "
        f"{full_shape} that the config expects"
    )


def _read_hf(path: Path, config: LMConfig) -> dict[str, torch.Tensor]:
    """Read HF safetensors one tensor at a time, renaming to Meta names and undoing the rotary permutation."""
    from safetensors import safe_open

    state = {}
    for file in _hf_weight_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as error:
            raise ValueError(f"cannot read safetensors file {file}: {error}") from error
        with handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                name = hf_to_meta_name(hf_name)
                if name is None:
                    raise KeyError(f"{file}: unexpected weight {hf_name} for a Llama model")
                tensor = handle.get_tensor(hf_name)
                if name.endswith("attention.wq.weight"):
                    tensor = hf_to_meta_rotary(tensor, config.n_heads)
                elif name.endswith("attention.wk.weight"):
                    tensor = hf_to_meta_rotary(tensor, config.n_kv_heads)
                state[name] = tensor
    return state


# ---- saving -----------------------------------------------------------------------------------------


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    format: str = "hf",
    model_parallel: int = 1,
    max_shard_bytes: int = HF_SHARD_BYTES,
) -> Path:
    """Write `model` as an HF (config.json + safetensors) or Meta (params.json + consolidated.NN.pth) dir."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "hf":
        written = _save_hf(state, config, path, max_shard_bytes)
    elif format == "meta":
        written = _save_meta(state, config, path, model_parallel)
    else:
        raise ValueError(f"format={format!r}; expected 'hf' or 'meta'")
    _remove_stale_files(path, keep=written)
    return path


def _remove_stale_files(path: Path, keep: set[str]) -> None:
    """Delete the layout files in `path` that the save just committed did not write (an earlier save's)."""
    for file in path.iterdir():
        if file.name not in keep and _LAYOUT_FILE.fullmatch(file.name) and file.is_file():
            file.unlink()
    fsync_directory(path)


def _save_hf(state: dict[str, torch.Tensor], config: LMConfig, path: Path, max_shard_bytes: int) -> set[str]:
    from safetensors.torch import save_file

    hf_state = {}
    for name, tensor in state.items():
        if name == "output.weight" and config.tie_word_embeddings:
            continue  # HF re-ties lm_head to embed_tokens from tie_word_embeddings
        if name.endswith("attention.wq.weight"):
            tensor = meta_to_hf_rotary(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = meta_to_hf_rotary(tensor, config.n_kv_heads)
        hf_name = HF_SCORE_HEAD if name == "output.weight" and config.num_labels else meta_to_hf_name(name)
        hf_state[hf_name] = tensor.contiguous()
    shards = list(_split_by_size(hf_state, max_shard_bytes))
    dtype = next(iter(hf_state.values())).dtype
    weight_map = {}
    for i, shard in enumerate(shards):
        name = HF_SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in hf_state.values())}, "weight_map": weight_map}
        atomic_write_text(path / HF_INDEX, json.dumps(index, indent=2))
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2))
    return {"config.json", *weight_map.values(), *([HF_INDEX] if len(shards) > 1 else [])}


def _save_meta(state: dict[str, torch.Tensor], config: LMConfig, path: Path, model_parallel: int) -> set[str]:
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    for rank in range(model_parallel):
        shard = {}
        for name, tensor in state.items():
            dim = _meta_split_dim(name)
            if dim is None or model_parallel == 1:
                shard[name] = tensor  # replicated: the whole tensor is what every rank holds
                continue
            if tensor.shape[dim] % model_parallel:
                raise ValueError(f"{name}: size {tensor.shape[dim]} on dim {dim} does not split {model_parallel} ways")
            shard[name] = tensor.chunk(model_parallel, dim=dim)[rank].clone()
        atomic_write(path / f"consolidated.{rank:02d}.pth", lambda tmp, shard=shard: torch.save(shard, tmp))
    atomic_write_text(path / "params.json", json.dumps(config.to_meta_params(), indent=2))
    return {"params.json", *(f"consolidated.{rank:02d}.pth" for rank in range(model_parallel))}


def _meta_split_dim(name: str) -> int | None:
    """The dimension Meta's model-parallel layers split a weight on (None: replicated)."""
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # row-parallel
    if name.endswith("norm.weight"):
        return None
    return 0  # column-parallel projections, vocabulary-parallel embeddings and output


def _split_by_size(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for name, tensor in state.items():
        if shard and size + tensor.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        yield shard


__all__ = [
    "check_state_dict",
    "checkpoint_files",
    "detect_format",
    "hf_to_meta_name",
    "hf_to_meta_rotary",
    "load_config",
    "load_pretrained",
    "read_state_dict",
    "meta_to_hf_name",
    "meta_to_hf_rotary",
    "save_pretrained",
]
