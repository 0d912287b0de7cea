"""Tokenize text into webdataset token shards: `python -m data.prepare text --input FILES --output DIR`.

Inputs, by file name:
  *.jsonl            one document per line, from its `text` field
  *.parquet          one document per row, from its `text` column
  anything else      plain UTF-8 text, the whole file one document (the usual convention for .txt corpora)
An input argument may be a file, a directory (every file under it, recursively) or a glob (`**` allowed);
each argument's files are taken in sorted order. Every document is encoded as `<|begin_of_text|> text
<|end_of_text|>` (the manifest records this); documents that are empty or whitespace only are skipped and
counted. A document (a JSONL line, a Parquet row, a text file) over --max-document-bytes (64 MiB) is an error
naming the file and line, or with --skip-long-documents skipped and counted; a JSONL line is never read whole
past that limit. Output goes to a temporary directory renamed onto DIR at the end, so DIR is complete or absent;
--overwrite replaces only a directory data.prepare made (its manifest.json and the shards it lists), never one
holding anything else or the inputs themselves.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from common.atomic import commit_directory
from data.shards import MANIFEST, DataError, ShardSink, read_manifest, write_manifest

if TYPE_CHECKING:
    from lm.tokenizer import Tokenizer

__all__ = ["DataError", "DocumentLimit", "iter_documents", "prepare_text", "resolve_inputs"]

DEFAULT_SHARD_TOKENS = 1 << 24
# A document is read, held and tokenized whole: past this it is a mistake (a file that is no corpus, a missing
# newline), not a document, and would take memory without bound.
DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20
_READ_CHUNK = 1 << 20
# Documents per task sent to a tokenizer worker: large enough to amortize pickling, small for a smooth bar.
_CHUNK_DOCS = 64


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, directories and globs into a list of files; raises DataError for one that matches nothing."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            if not found:
                raise DataError(f"{path}: directory holds no files")
            files.extend(found)
        elif glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{item}: no file matches this pattern")
            files.extend(found)
        else:
            raise DataError(f"{path}: no such file")
    if not files:
        raise DataError("no input files given")
    return files


def iter_documents(
    path: Path,
    *,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    skip_long: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield the documents of one input file; raises DataError naming the file (and line or row) when bad.

    A document over `max_document_bytes` is an error, or, given `skip_long`, reported to it (by its place) and
    left out."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        documents = _iter_jsonl(path, max_document_bytes)
    elif suffix == ".parquet":
        documents = _iter_parquet(path, max_document_bytes)
    else:
        documents = _iter_text(path, max_document_bytes)
    for where, text in documents:
        if text is not None:
            yield text
        elif skip_long is not None:
            skip_long(where)
        else:
            raise DataError(
                f"{where}: document longer than {max_document_bytes} bytes (raise --max-document-bytes, "
                "or pass --skip-long-documents to skip and count such documents)"
            )


# The readers below yield (place, text), text None for a document over the byte limit.


def _iter_text(path: Path, max_bytes: int) -> Iterator[tuple[str, str | None]]:
    try:
        if path.stat().st_size > max_bytes:
            yield str(path), None
            return
        yield str(path), path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _iter_jsonl(path: Path, max_bytes: int) -> Iterator[tuple[str, str | None]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        number = 0
        while line := f.readline(max_bytes + 1):
            number += 1
            if len(line) > max_bytes:
                while line and not line.endswith(b"\n"):  # the rest of the line, a chunk at a time
                    line = f.readline(_READ_CHUNK)
                yield f"{path}:{number}", None
                continue
            text = _jsonl_text(path, number, line)
            if text is not None:
                yield f"{path}:{number}", text


def _jsonl_text(path: Path, number: int, line: bytes) -> str | None:
    """The `text` of one JSONL line (None: a blank line, which is no document)."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
    if not decoded.strip():
        return None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: no string `text` field")
    return text


def _iter_parquet(path: Path, max_bytes: int) -> Iterator[tuple[str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        if "text" not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no `text` column (columns: {', '.join(parquet.schema_arrow.names)})")
        row = 0
        for batch in parquet.iter_batches(columns=["text"], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{path}: row {row}: `text` is {type(text).__name__}, not a string")
                # A character is at most 4 bytes: only long rows are worth encoding to measure.
                too_long = len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes
                yield f"{path}: row {row}", None if too_long else text
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file: {e}") from None


_worker_tokenizer = None


def _init_worker(tokenizer_path: str | None) -> None:
    global _worker_tokenizer
    from lm.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[bytes]:
    # bytes pickle far cheaper than lists of Python ints on the way back to the writer.
    return [
        np.asarray(_worker_tokenizer.encode(t, bos=True, eos=True), dtype="<u4").tobytes()  # type: ignore[union-attr]
        for t in texts
    ]


@dataclass(frozen=True)
class DocumentLimit:
    """The longest document `prepare_text` reads, in bytes, and whether a longer one is skipped (else an error)."""

    max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    skip: bool = False


def _chunks(files: list[Path], counts: dict[str, list[int]], limit: DocumentLimit) -> Iterator[list[str]]:
    """Non-empty documents in input order, in lists of _CHUNK_DOCS; tallies kept/empty/too long per file."""
    chunk: list[str] = []
    for path in files:
        tally = counts.setdefault(str(path), [0, 0, 0])

        def count_long(where: str, tally: list[int] = tally) -> None:
            """Count one document over the limit (the manifest reports them per input)."""
            tally[2] += 1

        documents = iter_documents(
            path, max_document_bytes=limit.max_bytes, skip_long=count_long if limit.skip else None
        )
        for text in documents:
            if not text.strip():
                tally[1] += 1
                continue
            tally[0] += 1
            chunk.append(text)
            if len(chunk) == _CHUNK_DOCS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _bounded_imap(pool, chunks: Iterator[list[str]], window: int) -> Iterator[list[bytes]]:
    """Ordered results with at most `window` chunks in flight: Pool.imap would read the whole input ahead."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare_text(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    limit: DocumentLimit = DocumentLimit(),
) -> dict:
    """Tokenize `inputs` into token shards and a manifest under `output`; returns the manifest."""
    from lm.tokenizer import Tokenizer

    files = resolve_inputs(inputs)
    output = Path(output)
    check_output(output, files, overwrite=overwrite)
    tokenizer = Tokenizer(tokenizer_path)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)

    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts: dict[str, list[int]] = {}
    started = time.perf_counter()
    try:
        shards = _tokenize_into(
            staging, _chunks(files, counts, limit), files, counts, tokenizer, shard_tokens, workers, progress
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = _write_text_manifest(staging, shards, tokenizer, counts)
    output.parent.mkdir(parents=True, exist_ok=True)
    commit_directory(staging, output)
    manifest["seconds"] = time.perf_counter() - started
    return manifest


def check_output(output: Path, files: list[Path], *, overwrite: bool) -> None:
    """Raise DataError unless `output` may take a new corpus: absent or empty, or (overwrite) one that
    data.prepare made, holding only its manifest.json and the shards it lists; never a folder of the inputs."""
    resolved = output.resolve()
    inside = [f for f in files if f.resolve().is_relative_to(resolved)]
    if inside:
        raise DataError(f"{output}: holds the input {inside[0]}; the output must be a directory apart from the inputs")
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory")
    entries = sorted(output.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DataError(f"{output}: output directory exists and is not empty (pass --overwrite to replace it)")
    try:
        manifest = read_manifest(output)
    except DataError as e:
        raise DataError(f"{output}: --overwrite replaces only a directory data.prepare made: {e}") from None
    ours = {MANIFEST, *(str(shard["file"]) for shard in manifest["shards"])}
    foreign = [entry for entry in entries if entry.name not in ours or not entry.is_file()]
    if foreign:
        raise DataError(
            f"{output}: --overwrite refuses to replace it: {foreign[0]} is not one of the files data.prepare "
            "wrote there (move it away first)"
        )


def _tokenize_into(
    staging: Path,
    chunks: Iterator[list[str]],
    files: list[Path],
    counts: dict[str, list[int]],
    tokenizer: Tokenizer,
    shard_tokens: int,
    workers: int,
    progress: bool,
) -> list[dict]:
    """Tokenize the `chunks` of `files` in order into shards under `staging` (`counts`: the chunks' tallies)."""
    global _worker_tokenizer
    pool = None
    try:
        _worker_tokenizer = tokenizer
        if workers > 1:
            if sys.platform == "linux":
                # Forked workers inherit the loaded tokenizer: no per-worker load of the 128K-rank BPE file.
                pool = mp.get_context("fork").Pool(workers)
            else:
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),))
            encoded = _bounded_imap(pool, chunks, 4 * workers)
        else:
            encoded = map(_encode_chunk, chunks)
        shards = _write_shards(encoded, staging, shard_tokens, files, counts, progress)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return shards


def _write_shards(
    encoded: Iterator[list[bytes]],
    staging: Path,
    shard_tokens: int,
    files: list[Path],
    counts: dict[str, list[int]],
    progress: bool,
) -> list[dict]:
    """Write the encoded documents as shards under `staging`, with a progress bar over the files."""
    sink: ShardSink | None = None
    bar = tqdm(total=len(files), unit="file", desc="tokenize", disable=not progress, dynamic_ncols=True)
    seen_files = 0
    for docs in encoded:
        for data in docs:
            if sink is None:
                sink = ShardSink(staging, shard_tokens)
            sink.write(np.frombuffer(data, dtype="<u4"))
        # Files are consumed in order, so the tally dict's size is the number of files begun.
        bar.update(len(counts) - seen_files)
        seen_files = len(counts)
    bar.update(len(files) - seen_files)
    bar.close()
    if sink is None:
        raise DataError(
            f"empty input: no non-empty document in {', '.join(str(f) for f in files[:5])}"
            + (" ..." if len(files) > 5 else "")
        )
    return sink.close()


def _write_text_manifest(staging: Path, shards: list, tokenizer: Tokenizer, counts: dict[str, list[int]]) -> dict:
    """The manifest of a prepared text corpus, written into `staging`."""
    root = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in counts]))
    return write_manifest(
        staging,
        shards,
        tokenizer={
            "file": tokenizer.path.name,
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.n_words,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
        },
        bos=True,
        eos=True,
        input_bytes=sum(Path(f).stat().st_size for f in counts),
        skipped_empty=sum(c[1] for c in counts.values()),
        skipped_long=sum(c[2] for c in counts.values()),
        # Relative to the inputs' common folder: the same data prepared from another place gives the same bytes.
        inputs=[
            {"path": _relative(path, root), "documents": c[0], "skipped_empty": c[1], "skipped_long": c[2]}
            for path, c in counts.items()
        ],
    )


def _relative(path: str, root: Path) -> str:
    return Path(path).resolve().relative_to(root).as_posix()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    text = commands.add_parser("text", help="plain text, JSONL (`text` field) or Parquet (`text` column)")
    text.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    text.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    text.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the Llama 3 tokenizer)")
    text.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    text.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    text.add_argument("--overwrite", action="store_true", help="replace an output directory data.prepare made")
    text.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="longest document (JSONL line, Parquet row, text file) read (default 64 MiB)",
    )
    text.add_argument(
        "--skip-long-documents", action="store_true", help="skip and count longer documents instead of stopping"
    )
    text.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_text(
            args.input,
            args.output,
            tokenizer_path=args.tokenizer,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
            limit=DocumentLimit(args.max_document_bytes, args.skip_long_documents),
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    mb = manifest["input_bytes"] / 1e6
    print(
        f"{manifest['documents']} documents, {manifest['tokens']} tokens in {len(manifest['shards'])} shards "
        f"-> {args.output} ({mb:.1f} MB of input in {manifest['seconds']:.1f} s)"
    )
    if manifest["skipped_long"]:
        print(f"skipped {manifest['skipped_long']} documents over {args.max_document_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
