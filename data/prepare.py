"""Tokenize text into webdataset token shards: `python -m data.prepare text --input FILES --output DIR`.

Inputs, by file name:
  *.jsonl            one document per line, from its `text` field
  *.parquet          one document per row, from its `text` column
  anything else      plain UTF-8 text, the whole file one document (the usual convention for .txt corpora)
An input argument may be a file, a directory (every file under it, recursively) or a glob (`**` allowed);
each argument's files are taken in sorted order. Every document is encoded as `<|begin_of_text|> text
<|end_of_text|>` (the manifest records this); documents that are empty or whitespace only are skipped and
counted. Output goes to a temporary directory renamed onto DIR at the end, so DIR is complete or absent.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from common.atomic import commit_directory
from data.shards import DataError, ShardSink, write_manifest

if TYPE_CHECKING:
    from lm.tokenizer import Tokenizer

__all__ = ["DataError", "iter_documents", "prepare_text", "resolve_inputs"]

DEFAULT_SHARD_TOKENS = 1 << 24
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


def iter_documents(path: Path) -> Iterator[str]:
    """Yield the documents of one input file; raises DataError naming the file (and line or row) when bad."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _iter_jsonl(path: Path) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no string `text` field")
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


def _iter_parquet(path: Path) -> Iterator[str]:
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
                row += 1
                yield text
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


def _chunks(files: list[Path], counts: dict[str, list[int]]) -> Iterator[list[str]]:
    """Non-empty documents in input order, in lists of _CHUNK_DOCS; tallies kept/skipped per file."""
    chunk: list[str] = []
    for path in files:
        tally = counts.setdefault(str(path), [0, 0])
        for text in iter_documents(path):
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
) -> dict:
    """Tokenize `inputs` into token shards and a manifest under `output`; returns the manifest."""
    from lm.tokenizer import Tokenizer

    files = resolve_inputs(inputs)
    output = Path(output)
    if output.exists() and not overwrite and any(output.iterdir()):
        raise DataError(f"{output}: output directory exists and is not empty (pass --overwrite to replace it)")
    tokenizer = Tokenizer(tokenizer_path)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)

    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts: dict[str, list[int]] = {}
    started = time.perf_counter()
    try:
        shards = _tokenize_into(staging, files, counts, tokenizer, shard_tokens, workers, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = _write_text_manifest(staging, shards, tokenizer, counts)
    output.parent.mkdir(parents=True, exist_ok=True)
    commit_directory(staging, output)
    manifest["seconds"] = time.perf_counter() - started
    return manifest


def _tokenize_into(
    staging: Path,
    files: list[Path],
    counts: dict[str, list[int]],
    tokenizer: Tokenizer,
    shard_tokens: int,
    workers: int,
    progress: bool,
) -> list[dict]:
    """Tokenize `files` in order into shards under `staging`, tallying each file's documents in `counts`."""
    global _worker_tokenizer
    pool = None
    try:
        chunks = _chunks(files, counts)
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
        # Relative to the inputs' common folder: the same data prepared from another place gives the same bytes.
        inputs=[
            {"path": _relative(path, root), "documents": c[0], "skipped_empty": c[1]} for path, c in counts.items()
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
    text.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
