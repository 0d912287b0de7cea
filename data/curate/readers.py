"""The curation pipeline's input: which files a path holds, and the datatrove reader of each format.

JSONL (``text``, ``id``, ``metadata``; a line that cannot be read is an error naming its file and line, or skipped
and counted), Parquet, plain-text files (each one document) and WARC files (an HTML response's main text extracted
with Trafilatura, a WET conversion record's text as it is). A document without ``metadata.domain`` is taken as
general web text.
"""

from __future__ import annotations

from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import orjson
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import JsonlReader, ParquetReader, WarcReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.warc import process_record
from datatrove.utils.logging import logger

# (format, glob under a folder), in order of preference: a folder is read as the first format it holds files of.
FORMATS = (("jsonl", "**/*.jsonl*"), ("parquet", "**/*.parquet"), ("warc", "**/*.warc*"), ("text", "**/*.txt"))
OnBadLine = Literal["fail", "skip"]


class MalformedInputError(ValueError):
    """An input line that is not a JSON document, under ``run.on_bad_line = "fail"``."""


def input_layout(path: Path) -> tuple[str, str, str]:
    """(folder, glob pattern, format) of the input: a file (JSONL unless its name says otherwise), or every file of
    the first format in FORMATS found under a folder."""
    if path.is_file():
        kind = next((kind for kind, pattern in FORMATS if fnmatch(path.name, pattern.removeprefix("**/"))), "jsonl")
        return str(path.parent), path.name, kind
    for kind, pattern in FORMATS:
        if any(path.glob(pattern)):
            return str(path), pattern, kind
    return str(path), "**/*.jsonl*", "jsonl"


def input_files(path: Path) -> list[Path]:
    """The input files a reader of ``path`` reads."""
    folder, pattern, _ = input_layout(path)
    return sorted(Path(folder).glob(pattern))


def input_reader(path: Path, on_bad_line: OnBadLine = "fail") -> BaseDiskReader:
    """A datatrove reader of the input under ``path``; ``on_bad_line``: what a malformed JSONL line does."""
    folder, pattern, kind = input_layout(path)
    options: dict[str, Any] = {"glob_pattern": pattern, "recursive": True, "default_metadata": {"domain": "general"}}
    if kind == "jsonl":
        return CountingJsonlReader(folder, on_bad_line=on_bad_line, **options)
    reader = {"parquet": ParquetReader, "warc": WarcTextReader, "text": TextFileReader}[kind]
    return reader(folder, **options)


def parse_jsonl_line(line: bytes, text_key: str = "text") -> dict[str, Any]:
    """The JSON object of one input line; ValueError saying what is wrong when it is not a document."""
    try:
        data = orjson.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get(text_key), str):
        raise ValueError(f"no {text_key!r} string")
    return data


class CountingJsonlReader(JsonlReader):
    """datatrove's JSONL reader, except that a line it cannot read is not dropped with a warning: it stops the run
    naming its file and line (``on_bad_line="fail"``) or is skipped and counted per file in ``malformed``.

    Lines are decoded one by one, so a stray undecodable byte costs its line, not the rest of the file.
    Blank lines (a trailing newline's) are no documents and no errors.
    """

    def __init__(self, data_folder: Any, on_bad_line: OnBadLine = "fail", **kwargs: Any) -> None:
        super().__init__(data_folder, **kwargs)
        self.on_bad_line = on_bad_line
        self.malformed: Counter[str] = Counter()

    def read_file(self, filepath: str) -> DocumentsPipeline:
        """The documents of one JSONL file (compressed or not)."""
        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        data = parse_jsonl_line(line, self.text_key)
                    except ValueError as e:
                        self.bad_line(filepath, index + 1, str(e))
                        continue
                    document = self.get_document_from_dict(data, filepath, index)
                if document:
                    yield document

    def bad_line(self, filepath: str, line_number: int, reason: str) -> None:
        """Fail naming the file and line, or count the line as malformed and go on."""
        where = f"{self.data_folder.resolve_paths(filepath)}:{line_number}"
        if self.on_bad_line == "fail":
            raise MalformedInputError(f"{where}: {reason} (--run.on_bad_line=skip skips and counts such lines)")
        logger.warning(f"{where}: {reason}: skipped")
        self.stat_update("malformed_lines", unit="line")
        self.malformed[self.data_folder.resolve_paths(filepath)] += 1


class TextFileReader(BaseDiskReader):
    """One document per UTF-8 text file (the usual convention for .txt corpora, as data.prepare reads them), named
    by its path."""

    name = "🗒 Text"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        """The file's whole text as one document."""
        with self.data_folder.open(filepath, "r", encoding="utf-8") as f:
            text = f.read()
        document = self.get_document_from_dict({"text": text, "id": filepath}, filepath, 0)
        if document:
            yield document


class WarcTextReader(WarcReader):
    """datatrove's WARC reader, yielding text: the main text of an HTML response (datatrove's Trafilatura extractor:
    navigation, footers and markup left out) and a WET conversion record's text as it is, each with its
    ``metadata.url`` and ``metadata.date``.

    The text is extracted as it is read, not by a later step, so that every reader of the input (the stages, the KL
    reference, the report) sees the same documents.
    """

    def __init__(self, data_folder: Any, **kwargs: Any) -> None:
        super().__init__(data_folder, **kwargs)
        self.extractor = Trafilatura(favour_precision=True)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        """The text documents of one WARC (or WET) file; request, metadata and non-text records are passed over."""
        from warcio.archiveiterator import ArchiveIterator

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for index, record in enumerate(ArchiveIterator(f)):
                with self.track_time():
                    data = process_record(record)
                    if data and record.rec_type == "response":
                        data["text"] = self.extractor.extract(data["text"]) or ""
                    document = self.get_document_from_dict(data, filepath, index) if data else None
                if document:
                    yield document
