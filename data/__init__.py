"""Data for pretraining: token shards, the packing loader, mixtures with annealing, the embedded default corpus.

`data.scenes` (the shared scene vocabulary) imports nothing from here, so media generators can use it alone.
"""

from data.default import DEFAULT_WEIGHTS, ensure_default_corpus
from data.loader import Batch, PackedLoader, merge_states
from data.mixture import Mixture, parse_weights
from data.prepare import prepare_text
from data.shards import DataError, read_manifest, write_token_source

__all__ = [
    "DEFAULT_WEIGHTS",
    "Batch",
    "DataError",
    "Mixture",
    "PackedLoader",
    "ensure_default_corpus",
    "merge_states",
    "parse_weights",
    "prepare_text",
    "read_manifest",
    "write_token_source",
]
