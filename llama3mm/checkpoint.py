"""Llama3MM checkpoints: the trained parts in small files beside a manifest that pins the frozen LM.

    DIR/llama3mm.json            manifest: the LM's path and sha256, each part's class and config class, and the
                                 prompt each media kind's adapter was trained with (Llama3MM.prompts)
    DIR/extra_embeddings/        the learnable special-token table
    DIR/vision_encoder/ ...      one directory per part (config.json + model.safetensors, encoders' layout,
                                 so DIR/vision_encoder loads with VisionEncoder.from_pretrained too)
    DIR/lm/                      only when the LM had no path of its own (e.g. imported from Mllama)

The LM is never copied when it has a path: adapters are small and the LM is shared. The path is recorded relative
to DIR when both lie in one tree (they can move together), and `read(..., lm_path=)` names it for a checkpoint that
moved alone. Its sha256 (of exactly the files its load reads) is checked on load, so adapters are never silently
attached to another LM. The manifest is data: its part names must be among PARTS and its classes the ones
PART_CLASSES allows for each part; nothing is imported by a name it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters.speech import SpeechAdapter, SpeechAdapterConfig
from adapters.video import VideoAdapter, VideoAdapterConfig
from adapters.vision import VisionAdapter, VisionAdapterConfig
from common.atomic import atomic_write_text
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from encoders.vision import VisionEncoder, VisionEncoderConfig, load_encoder, save_encoder
from llama3mm.parts import Llama3MMParts
from lm.checkpoint import checkpoint_files, detect_format, load_pretrained, save_pretrained

MANIFEST = "llama3mm.json"
PARTS = ("vision_encoder", "vision_adapter", "video_adapter", "speech_encoder", "speech_adapter")
# The only classes a manifest may name, per part: (module class, config class). A manifest is data; it never
# chooses what code runs beyond picking one of these.
PART_CLASSES: dict[str, tuple[type[torch.nn.Module], type]] = {
    "vision_encoder": (VisionEncoder, VisionEncoderConfig),
    "vision_adapter": (VisionAdapter, VisionAdapterConfig),
    "video_adapter": (VideoAdapter, VideoAdapterConfig),
    "speech_encoder": (SpeechEncoder, SpeechEncoderConfig),
    "speech_adapter": (SpeechAdapter, SpeechAdapterConfig),
}


def cache_dir() -> Path:
    """Where llama3-herd keeps its caches: LLAMA3MM_CACHE, else $XDG_CACHE_HOME/llama3-herd, else
    ~/.cache/llama3-herd (the XDG default, as pip, torch and HF use)."""
    if os.environ.get("LLAMA3MM_CACHE"):
        return Path(os.environ["LLAMA3MM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3-herd"


def lm_sha256(path: str | Path) -> str:
    """sha256 of an LM checkpoint: over the names and sha256s of the files its load reads, in name order.

    Hashing a large LM takes minutes, so each file's digest is cached (`cache_dir()/file_sha256.json`) under its
    path, size and modification time; a file rewritten in place gets a new modification time and is hashed again.
    """
    path = Path(path)
    files = checkpoint_files(path)  # exactly what load_pretrained reads: a stray file changes nothing
    cache_path = cache_dir() / "file_sha256.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = _file_sha256(file), True
        digest.update(f"{file.name}\0{cache[key]}\n".encode())
    if changed:
        cache = {k: v for k, v in cache.items() if Path(k.rsplit(":", 2)[0]).exists()}  # forget deleted files
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(cache))
        except OSError:  # a read-only home only costs the next load a re-hash
            pass
    return digest.hexdigest()


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save(mm: torch.nn.Module, directory: str | Path) -> Path:
    """Write a Llama3MM's parts and manifest to directory (the LM too when it has no path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if mm.lm_path is None:
        save_pretrained(mm.lm, directory / "lm", format="hf")
        lm_dir = directory / "lm"
    else:
        lm_dir = Path(mm.lm_path)
    parts = {name: (type(m), m.cfg, m.state_dict()) for name in PARTS if (m := getattr(mm, name)) is not None}
    return save_parts(directory, lm_dir, mm.prompts, mm.extra_embeddings.detach(), parts)


def save_parts(
    directory: str | Path,
    lm_dir: str | Path,
    prompts: Mapping[str, str],
    extra_embeddings: torch.Tensor,
    parts: Mapping[str, tuple[type, Any, Mapping[str, torch.Tensor]]],
) -> Path:
    """What `save` writes, from the LM's directory, the prompts, the extra-token table and each part's (class,
    config, state dict): a model sharded over ranks is written from its gathered tensors, never whole anywhere."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm_dir = Path(lm_dir).resolve()
    manifest = {
        "format": "llama3mm",
        "version": 1,
        "lm": {"path": _lm_reference(lm_dir, directory.resolve()), "sha256": lm_sha256(lm_dir)},
        "parts": {},
        "prompts": dict(prompts),
    }
    save_encoder({"weight": extra_embeddings}, {}, directory / "extra_embeddings")
    for name, (cls, cfg, state) in parts.items():
        if name not in PARTS:
            raise ValueError(f"{name!r} is not a Llama3MM part (one of {', '.join(PARTS)})")
        save_encoder(dict(state), cfg.to_dict(), directory / name)
        manifest["parts"][name] = {"class": _qualname(cls), "config_class": _qualname(type(cfg))}
    # Last, so a directory with a manifest always holds every part it names.
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    # A save over an earlier one (compose over the quickstart's model, say) leaves only the parts it names.
    for name in PARTS:
        if name not in manifest["parts"]:
            shutil.rmtree(directory / name, ignore_errors=True)
    return directory


def _lm_reference(lm_dir: Path, directory: Path) -> str:
    """How a manifest in `directory` names the LM: relative when both lie in one tree (they move together),
    absolute when they share only the filesystem root."""
    common = Path(os.path.commonpath([lm_dir, directory]))
    if common == Path(common.anchor):
        return str(lm_dir)
    return Path(os.path.relpath(lm_dir, directory)).as_posix()


def checkpoint_layout(directory: str | Path) -> str:
    """What a directory holds: "llama3mm" (a `save` manifest), "mllama" (HF Llama 3.2 Vision), "meta-vision"
    (Meta's Llama 3.2 Vision) or "lm" (anything else, read as a bare LM checkpoint)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return "llama3mm"
    config, params = directory / "config.json", directory / "params.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "mllama":
        return "mllama"
    if params.is_file() and "vision_chunk_size" in json.loads(params.read_text()):
        return "meta-vision"
    return "lm"


def read(directory: str | Path, *, lm_path: str | Path | None = None) -> Llama3MMParts:
    """The parts of what `save` wrote, its LM checked against the recorded sha256, or a bare LM checkpoint."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        detect_format(directory)  # a clear error when it is neither a Llama3MM nor an LM checkpoint
        return Llama3MMParts(load_pretrained(directory), lm_path=directory)
    manifest, parts, extra = load_parts(directory)
    recorded = manifest["lm"]
    # An explicit lm_path is the caller's (relative to the working directory); a recorded one is the checkpoint's.
    lm_dir = Path(lm_path) if lm_path is not None else directory / recorded["path"]
    if not lm_dir.is_dir():
        named = f"lm_path={lm_path}" if lm_path is not None else f"{manifest_path} names the LM {recorded['path']}"
        raise FileNotFoundError(
            f"{named}, and {lm_dir} is not a directory; pass lm_path= (demo: --lm) with the LM's directory"
        )
    actual = lm_sha256(lm_dir)
    if actual != recorded["sha256"]:
        raise ValueError(
            f"LM at {lm_dir} has sha256 {actual}, but the adapters in {directory} were trained on the LM "
            f"{recorded['path']} with sha256 {recorded['sha256']}: refusing to attach them to a different LM"
        )
    lm_ref = None if recorded["path"] == "lm" and lm_path is None else lm_dir.resolve()
    return Llama3MMParts(
        load_pretrained(lm_dir),
        modules=parts,
        extra_embeddings=extra,
        lm_path=lm_ref,
        prompts=dict(manifest.get("prompts") or {}),
    )


def load_parts(directory: str | Path) -> tuple[dict, dict[str, torch.nn.Module], torch.Tensor]:
    """A saved Llama3MM's manifest, its parts (name -> module) and extra-token table, without loading the LM."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a Llama3MM checkpoint")
    manifest = read_manifest(manifest_path)
    parts = {}
    for name, spec in manifest["parts"].items():
        cls, cfg_cls = _part_classes(manifest_path, name, spec)
        cfg_dict, state = load_encoder(directory / name)
        module = cls(cfg_cls.from_dict(cfg_dict))
        module.load_state_dict(state, strict=True)
        parts[name] = module
    _, extra = load_encoder(directory / "extra_embeddings")
    return manifest, parts, extra["weight"]


def read_manifest(manifest_path: str | Path) -> dict:
    """A Llama3MM manifest, its shape checked: format, an LM with a path and sha256, parts among PARTS."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise ValueError(f"{manifest_path}: not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "llama3mm":
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path} is not a Llama3MM manifest (format={found!r})")
    lm = manifest.get("lm")
    if not isinstance(lm, dict) or not all(isinstance(lm.get(key), str) for key in ("path", "sha256")):
        raise ValueError(f"{manifest_path}: key 'lm' must hold the LM's 'path' and 'sha256' as strings")
    parts = manifest.get("parts")
    if not isinstance(parts, dict):
        raise ValueError(f"{manifest_path}: key 'parts' must map part names to their classes")
    for name in parts:
        if name not in PARTS:  # also what keeps a part's folder inside the checkpoint directory
            raise ValueError(f"{manifest_path}: key 'parts.{name}' is not a known part (one of {', '.join(PARTS)})")
    return manifest


def _part_classes(manifest_path: Path, name: str, spec: object) -> tuple[type[torch.nn.Module], type]:
    """The (module, config) classes a manifest names for part `name`, if they are that part's allowed ones."""
    allowed = PART_CLASSES[name]
    named = (spec.get("class"), spec.get("config_class")) if isinstance(spec, dict) else (None, None)
    if named != tuple(_qualname(cls) for cls in allowed):
        raise ValueError(
            f"{manifest_path}: key 'parts.{name}' names classes {named}; a {name} must be "
            f"{_qualname(allowed[0])} with {_qualname(allowed[1])}"
        )
    return allowed


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


__all__ = [
    "MANIFEST",
    "cache_dir",
    "PARTS",
    "PART_CLASSES",
    "checkpoint_layout",
    "lm_sha256",
    "load_parts",
    "read",
    "read_manifest",
    "save",
    "save_parts",
]
