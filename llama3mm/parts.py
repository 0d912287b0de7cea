"""What a Llama3MM is built from, as the checkpoint reader and the Llama 3.2 Vision importers return it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lm.model import Transformer


@dataclass
class Llama3MMParts:
    """The LM, the optional parts by name (`llama3mm.checkpoint.PARTS`), the extra-token table (None: a fresh
    random one), where the LM lives and the prompt each media kind's adapter was trained with."""

    lm: Transformer
    modules: dict[str, nn.Module] = field(default_factory=dict)
    extra_embeddings: torch.Tensor | None = None
    lm_path: str | Path | None = None
    prompts: dict[str, str] = field(default_factory=dict)


__all__ = ["Llama3MMParts"]
