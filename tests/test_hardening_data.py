"""Bad data fails fast and names its file: token ids outside the vocabulary, media shards where nothing decodes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from data.loader import PackedLoader
from data.shards import DataError, Shard, read_manifest, write_token_source

VOCAB = 100


def take_tokens(loader: PackedLoader, batches: int) -> list[np.ndarray]:
    """The token rows of the first `batches` batches."""
    it = iter(loader)
    try:
        return [next(it).tokens.numpy() for _ in range(batches)]
    finally:
        it.close()


@pytest.fixture(scope="module")
def out_of_vocab(tmp_path_factory) -> Path:
    """Three documents; the middle one (key 000000001) holds id VOCAB + 7 at its token 2."""
    docs = [np.array([1, 2, 3]), np.array([4, 5, VOCAB + 7, 6]), np.array([7, 8])]
    directory = tmp_path_factory.mktemp("vocab") / "src"
    write_token_source(directory, docs, shard_tokens=1000)
    return directory


def test_token_id_outside_the_vocabulary_names_shard_and_document(out_of_vocab: Path) -> None:
    shard = out_of_vocab / read_manifest(out_of_vocab)["shards"][0]["file"]
    # Three batches of 5 tokens read all 9 tokens of the source, whatever the unit order.
    loader = PackedLoader(out_of_vocab, seq_len=4, batch_size=1, vocab_size=VOCAB)
    message = re.escape(
        f"shard {shard}: document 1 (key 000000001) holds token id 107 at token 2, outside the vocabulary of 100 ids"
    )
    with pytest.raises(DataError, match=message):
        take_tokens(loader, 3)
    # The id is an error under on_corrupt="skip" too: a checksummed shard holds it as written.
    with pytest.raises(DataError, match="token id 107"):
        take_tokens(PackedLoader(out_of_vocab, seq_len=4, batch_size=1, vocab_size=VOCAB, on_corrupt="skip"), 3)
    # From a DataLoader worker the error arrives with the same message.
    with pytest.raises(DataError, match=message):
        take_tokens(PackedLoader(out_of_vocab, seq_len=4, batch_size=1, vocab_size=VOCAB, num_workers=1), 3)


def test_ids_within_the_vocabulary_or_unchecked_read_as_before(out_of_vocab: Path) -> None:
    checked = take_tokens(PackedLoader(out_of_vocab, seq_len=4, batch_size=1, vocab_size=VOCAB + 8), 3)
    unchecked = take_tokens(PackedLoader(out_of_vocab, seq_len=4, batch_size=1), 3)
    assert all((a == b).all() for a, b in zip(checked, unchecked, strict=True))
    assert VOCAB + 7 in np.concatenate(unchecked)
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        PackedLoader(out_of_vocab, seq_len=4, batch_size=1, vocab_size=0)


def test_shard_key_reads_the_member_name(out_of_vocab: Path) -> None:
    record = read_manifest(out_of_vocab)["shards"][0]
    shard = Shard.open(out_of_vocab / record["file"], record)
    assert [shard.key(i) for i in range(len(shard))] == ["000000000", "000000001", "000000002"]
