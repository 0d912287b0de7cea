"""Token shards on disk: webdataset tar files of uint32 token arrays, one document per sample, plus a manifest.

Layout of a prepared source directory:

    DIR/manifest.json        shards with their document/token counts and sha256, totals, tokenizer hash
    DIR/shard-000000.tar     members `<doc index, 9 digits>.u32`: the document's token ids, raw little-endian uint32

Raw uint32 is exact for the 128K vocabulary (ids do not fit 16 bits) and carries no per-sample header; read a
sample back with `np.frombuffer(sample["u32"], "<u4")`. Tars are written with a fixed mtime, owner and mode,
so identical input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MANIFEST",
    "DataError",
    "Shard",
    "ShardSink",
    "check_tokenizer",
    "file_sha256",
    "read_manifest",
    "write_manifest",
    "write_token_source",
]

MANIFEST = "manifest.json"
FORMAT = "llama3-herd/tokens"
FORMAT_VERSION = 1
SAMPLE_EXT = "u32"
SHARD_PATTERN = "shard-%06d.tar"
_BLOCK = 512


class DataError(ValueError):
    """Bad data input: the message names the file (and line or shard) at fault."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ShardSink:
    """Writes token documents into numbered tar shards via `webdataset.ShardWriter` and records their stats."""

    def __init__(self, directory: str | os.PathLike[str], shard_tokens: int) -> None:
        """Write into `directory`; a shard is closed once it holds at least `shard_tokens` tokens."""
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.shards: list[dict] = []
        self._docs = 0
        self._tokens = 0
        # Imported here: reading shards needs only the standard library, so training runs where webdataset is absent.
        import webdataset as wds

        self._writer = wds.ShardWriter(
            str(self.directory / SHARD_PATTERN),
            maxcount=1 << 62,
            # ShardWriter counts payload bytes; 4 bytes per token.
            maxsize=4 * shard_tokens,
            post=self._finished,
            verbose=0,
            # Everything that would otherwise vary between runs or machines is pinned.
            mtime=0,
            user="data",
            group="data",
            mode=0o444,
            encoder=False,
        )
        self._next_doc = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids)."""
        data = np.ascontiguousarray(tokens, dtype="<u4").tobytes()
        before = self._writer.fname
        self._writer.write({"__key__": f"{self._next_doc:09d}", SAMPLE_EXT: data})
        if self._writer.fname != before:
            # ShardWriter opened a new shard before this sample; the counts restart with it.
            self._docs, self._tokens = 0, 0
        self._next_doc += 1
        self._docs += 1
        self._tokens += len(data) // 4

    def _finished(self, fname: str) -> None:
        path = Path(fname)
        self.shards.append(
            {
                "file": path.name,
                "documents": self._docs,
                "tokens": self._tokens,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )

    def close(self) -> list[dict]:
        """Close the last shard and return the per-shard records for the manifest."""
        self._writer.close()
        return self.shards


def write_manifest(directory: str | os.PathLike[str], shards: list[dict], **fields) -> dict:
    """Write `directory/manifest.json` for `shards` (ShardSink records) with totals and extra `fields`."""
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sample": {"extension": SAMPLE_EXT, "dtype": "<u4", "layout": "one document per sample"},
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        **fields,
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def write_token_source(
    directory: str | os.PathLike[str], documents: Iterable[np.ndarray], shard_tokens: int, **fields
) -> dict:
    """Write already-tokenized documents as shards plus manifest into `directory` (created); returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sink = None
    for doc in documents:
        sink = sink or ShardSink(directory, shard_tokens)
        sink.write(doc)
    if sink is None:
        raise DataError(f"{directory}: no documents to write")
    return write_manifest(directory, sink.close(), **fields)


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    """Load and validate `directory/manifest.json`; raises DataError naming the file on any problem."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (prepare the data with `python -m data.prepare text ...`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a token-shard manifest (format {manifest.get('format')!r}, want {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')}, this code reads {FORMAT_VERSION}")
    shards = manifest.get("shards")
    if not shards or any(not isinstance(s, dict) or "file" not in s or "documents" not in s for s in shards):
        raise DataError(f"{path}: manifest lists no shards or malformed shard records")
    return manifest


def check_tokenizer(manifest: dict, directory: str | os.PathLike[str], tokenizer_sha256: str | None) -> None:
    """Raise DataError when the shards were tokenized by another tokenizer than the one training uses."""
    if tokenizer_sha256 is None:
        return
    theirs = manifest.get("tokenizer", {}).get("sha256")
    if theirs != tokenizer_sha256:
        raise DataError(
            f"{Path(directory) / MANIFEST}: shards were tokenized with tokenizer sha256 {theirs}, "
            f"but training uses {tokenizer_sha256}; re-run data.prepare with the training tokenizer"
        )


@dataclass
class Shard:
    """A shard opened for reading: the mapped file and each document's byte offset and token count."""

    path: Path
    offsets: np.ndarray  # int64 [docs], byte offset of each document's tokens
    lengths: np.ndarray  # int64 [docs], tokens per document
    _map: mmap.mmap | bytes

    @classmethod
    def open(cls, path: str | os.PathLike[str], record: dict, verify: bool = True) -> Shard:
        """Map `path` and index its members; raises DataError naming the shard if it is missing or corrupt."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"shard {path}: cannot read: {e.strerror or e}") from None
        if "bytes" in record and size != record["bytes"]:
            raise DataError(f"shard {path}: corrupt or truncated ({size} bytes, manifest says {record['bytes']})")
        if verify and "sha256" in record and file_sha256(path) != record["sha256"]:
            raise DataError(f"shard {path}: corrupt (sha256 differs from the manifest)")
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        offsets, lengths = _index_tar(data, path)
        if len(offsets) != record["documents"]:
            raise DataError(f"shard {path}: corrupt ({len(offsets)} documents, manifest says {record['documents']})")
        return cls(path, offsets, lengths, data)

    def __len__(self) -> int:
        return len(self.offsets)

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index`, a read-only uint32 view into the mapped file."""
        return np.frombuffer(self._map, dtype="<u4", count=int(self.lengths[index]), offset=int(self.offsets[index]))

    def key(self, index: int) -> str:
        """The webdataset key of document `index`: its member name without the extension, for error messages."""
        # Read back from the member's tar header, just before its data: the index keeps no names, since only
        # errors need them.
        header = int(self.offsets[index]) - _BLOCK
        name = bytes(self._map[header : header + 100]).rstrip(b"\0").decode(errors="replace")
        return name.rsplit(".", 1)[0]


def _index_tar(data: mmap.mmap | bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and token counts of the `.u32` members of a tar written by ShardSink."""
    # A hand-rolled header walk: tarfile builds a TarInfo per member, ~20x slower, and we need only offsets.
    offsets: list[int] = []
    lengths: list[int] = []
    pos, end = 0, len(data)
    while pos + _BLOCK <= end:
        header = data[pos : pos + _BLOCK]
        if header[0] == 0:  # end-of-archive blocks
            return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        if header[257:262] != b"ustar":
            raise DataError(f"shard {path}: corrupt tar header at byte {pos}")
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DataError(f"shard {path}: corrupt tar header at byte {pos}") from None
        name = header[:100].rstrip(b"\0")
        start = pos + _BLOCK
        if start + size > end:
            raise DataError(f"shard {path}: truncated (member {name.decode(errors='replace')} runs past the end)")
        if name.endswith(b"." + SAMPLE_EXT.encode()):
            if size % 4:
                raise DataError(f"shard {path}: corrupt (member {name.decode(errors='replace')} is not uint32)")
            offsets.append(start)
            lengths.append(size // 4)
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    raise DataError(f"shard {path}: truncated (no end-of-archive marker)")


def iter_tar_documents(path: str | os.PathLike[str]) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (key, tokens) from a shard with the standard library's tarfile: a reference reader for tests."""
    with tarfile.open(path) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            yield member.name.rsplit(".", 1)[0], np.frombuffer(data, dtype="<u4")
