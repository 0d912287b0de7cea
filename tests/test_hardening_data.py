"""Bad data fails fast and names its file: token ids outside the vocabulary, media shards where nothing decodes."""

from __future__ import annotations

import io
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from data.loader import PackedLoader
from data.media import CorruptSampleError, MediaSamples
from data.shards import DataError, Shard, read_manifest, write_token_source
from data.synthetic import ShardWriter

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


# ---------------------------------------------------------------------------------------------- media shards

# Each corrupt shard warns once; these tests are about what comes after.
ignore_corrupt_warnings = pytest.mark.filterwarnings("ignore::data.media.CorruptSampleWarning")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(directory: Path, images: dict[str, bytes], shard_size: int = 1000) -> Path:
    """Image samples {key: bytes} (b"" = not an image) as train-NNNNNN.tar shards of `shard_size` samples."""
    with ShardWriter(directory, "train", shard_size) as writer:
        for key, data in images.items():
            writer.write(key, {"png": data or b"not a png", "txt": key.encode()})
    return directory


def bound_decodes(samples: MediaSamples, limit: int) -> list[str]:
    """Make `samples` fail the test after `limit` decode tries, so a stream that loops forever cannot hang it;
    returns the keys tried."""
    tried: list[str] = []
    decode = samples._decode

    def counted(entry):
        tried.append(entry.key)
        if len(tried) > limit:
            raise AssertionError(f"still decoding after {limit} tries: the stream would loop forever")
        return decode(entry)

    samples._decode = counted
    return tried


@ignore_corrupt_warnings
def test_media_where_nothing_decodes_is_an_error_naming_the_shards(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": b"", "b": b"", "c": b""}, shard_size=2)
    samples = MediaSamples(tmp_path, kind="image", on_corrupt="skip")
    tried = bound_decodes(samples, 100)
    with pytest.raises(CorruptSampleError) as caught:
        next(iter(samples))
    message = str(caught.value)
    assert message.startswith("none of the 3 image samples decodes, in shard(s) ")
    assert str(tmp_path / "train-000000.tar") in message and str(tmp_path / "train-000001.tar") in message
    assert "cannot decode image" in message and len(tried) == 3  # one pass, not 100 tries
    # A finite stream raises too, rather than ending with no sample at all.
    finite = MediaSamples(tmp_path, kind="image", on_corrupt="skip", epochs=1)
    with pytest.raises(CorruptSampleError, match="none of the 3 image samples decodes"):
        list(finite)


@ignore_corrupt_warnings
def test_media_gives_up_after_max_consecutive_corrupt(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": _png(), **{k: b"" for k in "bcdefg"}})
    samples = MediaSamples(tmp_path, kind="image", shuffle=False, max_consecutive_corrupt=4)
    tried = bound_decodes(samples, 100)
    it = iter(samples)
    assert next(it)["key"] == "a"
    with pytest.raises(CorruptSampleError, match=r"^4 image samples in a row failed to decode .*train-000000\.tar"):
        next(it)
    assert tried == list("abcde")
    # Fewer in a row than the limit, with a sample that decodes in between: skipped, as before.
    lenient = MediaSamples(tmp_path, kind="image", shuffle=False, max_consecutive_corrupt=7)
    assert [s["key"] for s in islice(iter(lenient), 3)] == ["a", "a", "a"]
    assert lenient.stats()["skipped"] == 12
    with pytest.raises(ValueError, match="max_consecutive_corrupt must be at least 1"):
        MediaSamples(tmp_path, kind="image", max_consecutive_corrupt=0)


@ignore_corrupt_warnings
def test_media_where_nothing_decodes_stops_every_rank(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": b"", "b": b"", "c": b""})
    for rank in range(2):
        samples = MediaSamples(tmp_path, kind="image", rank=rank, world_size=2, max_consecutive_corrupt=5)
        tried = bound_decodes(samples, 100)
        with pytest.raises(CorruptSampleError, match=r"train-000000\.tar"):
            next(iter(samples))
        assert len(tried) <= 5
