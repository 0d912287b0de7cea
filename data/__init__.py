"""Data for pretraining: token shards, the packing loader, mixtures with annealing, the embedded default corpus.

Names resolve lazily (PEP 562) so that `data.scenes` and `python -m data.synthetic` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_WEIGHTS": "data.default",
    "ensure_default_corpus": "data.default",
    "Batch": "data.loader",
    "PackedLoader": "data.loader",
    "merge_states": "data.loader",
    "Mixture": "data.mixture",
    "parse_weights": "data.mixture",
    "prepare_text": "data.prepare",
    "DataError": "data.shards",
    "read_manifest": "data.shards",
    "write_token_source": "data.shards",
    "MediaSamples": "data.media",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
