"""De-duplication as the paper does it (section 3.1.1), as datatrove pipeline steps.

Three passes, each split into stages that the executor runs one after the other, because each needs a global view:

URL de-duplication: keep, for each normalised URL, only its most recent version (latest ``date``).
    stages = url_dedup_stages(work_dir)
    [reader, stages.signature]  N tasks     writes (url hash, date, id hash, doc index) per task
    [stages.find]               finder_workers tasks (default 1)
    [reader, stages.filter, …]  N tasks     same reader and task count as the signature stage

Line de-duplication (ccNet-like): remove every line that appears more than ``max_repeats`` (6) times in its bucket
of ``bucket_size`` (30M) documents; a document's bucket is a hash of its id, so the result does not depend on the
number of tasks.
    stages = line_dedup_stages(work_dir, LineDedupConfig(expected_documents=...))
    [reader, stages.count]      N tasks     per task and bucket: sorted (line hash, count)
    [stages.merge]              any number of tasks (a task merges whole buckets)
    [reader, stages.filter, …]  any number of tasks

MinHash document de-duplication: datatrove's four MinHash stages, configured for this corpus (numbers kept, an
offline tokenizer).
    stages = minhash_stages(work_dir)
    [reader, stages.signature]  N tasks
    [stages.buckets]            bands tasks (or a multiple)
    [stages.cluster]            1 task
    [reader, stages.filter, …]  N tasks     same reader and task count as the signature stage
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolder, DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer
from xxhash import xxh64_intdigest

__all__ = [
    "LineDedupConfig",
    "LineDedupCount",
    "LineDedupFilter",
    "LineDedupMerge",
    "LineDedupStages",
    "MinhashStages",
    "RegexWordTokenizer",
    "UrlDedupFilter",
    "UrlDedupFind",
    "UrlDedupSignature",
    "UrlDedupStages",
    "doc_bucket",
    "line_dedup_stages",
    "minhash_config",
    "minhash_stages",
    "normalize_line",
    "normalize_url",
    "s_curve",
    "s_curve_threshold",
    "url_dedup_stages",
]


def _subfolder(base: DataFolderLike, name: str) -> DataFolder:
    folder = get_datafolder(base)
    return DataFolder(f"{folder.path.rstrip('/')}/{name}", fs=folder.fs)


def _read_array(folder: DataFolder, path: str, dtype: np.dtype) -> np.ndarray:
    with folder.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=dtype)


def _write_array(folder: DataFolder, path: str, array: np.ndarray) -> None:
    with folder.open(path, "wb") as f:
        f.write(np.ascontiguousarray(array).tobytes())


def _list(folder: DataFolder, subdirectory: str, suffix: str) -> list[str]:
    if not folder.exists(subdirectory):
        return []
    return [p for p in folder.list_files(subdirectory=subdirectory, recursive=False) if p.endswith(suffix)]


def _stem_number(path: str, suffix: str) -> int:
    return int(path.rsplit("/", 1)[-1].removesuffix(suffix))


class _DropByIndex:
    """Walks a task's documents against its sorted array of document indexes to drop."""

    def __init__(self, drops: np.ndarray):
        self.drops = np.unique(drops)
        self.next = 0

    def __call__(self, doc_idx: int) -> bool:
        while self.next < len(self.drops) and self.drops[self.next] < doc_idx:
            self.next += 1
        return self.next < len(self.drops) and self.drops[self.next] == doc_idx


# ---------------------------------------------------------------- URL de-duplication

# Tracking parameters change with the link a visitor followed, never the page served.
_TRACKING_PARAMS = frozenset({"fbclid", "gclid", "dclid", "msclkid", "mc_cid", "mc_eid", "yclid"})
_DEFAULT_PORTS = frozenset({80, 443})


def normalize_url(url: str) -> str:
    """The URL with scheme, www., default port, fragment, trailing slash and tracking parameters dropped."""
    url = url.strip()
    if "://" not in url and not url.startswith("//"):
        url = "//" + url  # "example.com/a" parses as a path otherwise
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    host = host.removeprefix("www.")
    try:
        port = parts.port
    except ValueError:  # a malformed port is part of what the page was fetched as: keep it verbatim
        port = None
        host = parts.netloc.rsplit("@", 1)[-1].lower().removeprefix("www.")
    if port is not None and port not in _DEFAULT_PORTS:
        host = f"{host}:{port}"
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not k.lower().startswith("utm_") and k.lower() not in _TRACKING_PARAMS
    ]
    path = parts.path.rstrip("/")
    return host + path + (f"?{urlencode(sorted(query))}" if query else "")


def _date_number(value: object) -> int:
    """YYYYMMDD of an ISO date (a datetime's date part); 0, the oldest, where it is missing or malformed."""
    try:
        day = date.fromisoformat(str(value)[:10])
    except ValueError:
        return 0
    return day.year * 10_000 + day.month * 100 + day.day


_URL_SIG = np.dtype([("url", "<u8"), ("date", "<u4"), ("tie", "<u8"), ("doc", "<u4")])
_DOC_IDX = np.dtype("<u4")


class UrlDedupSignature(PipelineStep):
    """URL dedup stage 1: per task, (normalised-URL hash, date, id hash, doc index) of each document with a url."""

    type = "🫂 - DEDUP"
    name = "🔗 URL dedup signature"

    def __init__(self, output_folder: DataFolderLike, finder_workers: int = 1):
        super().__init__()
        if finder_workers < 1:
            raise ValueError("finder_workers must be >= 1")
        self.output_folder = get_datafolder(output_folder)
        self.finder_workers = finder_workers

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        """Write this task's signatures, one file per finder bucket (a last step: yields nothing)."""
        rows = []
        for doc_idx, doc in enumerate(data):
            self.stat_update(StatHints.total)
            url = doc.metadata.get("url")
            if not url:
                self.stat_update("no_url")
                continue
            with self.track_time():
                key = xxh64_intdigest(normalize_url(url))
                rows.append((key, _date_number(doc.metadata.get("date")), xxh64_intdigest(str(doc.id)), doc_idx))
        sigs = np.array(rows, dtype=_URL_SIG)
        finder = sigs["url"] % np.uint64(self.finder_workers)
        for bucket in range(self.finder_workers):
            _write_array(self.output_folder, f"{bucket:04d}/{rank:05d}.urlsig", sigs[finder == bucket])


class UrlDedupFind(PipelineStep):
    """URL dedup stage 2: for each URL keep the latest date (ties: smallest id hash), list the others to drop."""

    type = "🫂 - DEDUP"
    name = "🔗 URL dedup find"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, finder_workers: int = 1):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.output_folder = get_datafolder(output_folder)
        self.finder_workers = finder_workers

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        """Write, for each signature task, the indexes of its documents superseded by a later version."""
        if world_size != self.finder_workers:
            raise ValueError(f"run this stage with tasks={self.finder_workers} (finder_workers), not {world_size}")
        files = _list(self.input_folder, f"{rank:04d}", ".urlsig")
        parts = [_read_array(self.input_folder, f, _URL_SIG) for f in files]
        ranks = [
            np.full(len(p), _stem_number(f, ".urlsig"), dtype=np.uint32) for f, p in zip(files, parts, strict=True)
        ]
        if not sum(map(len, parts)):  # no document had a URL
            return
        sigs, task = np.concatenate(parts), np.concatenate(ranks)
        with self.track_time():
            # The latest date comes first; the id hash then the position break ties the same way for any layout.
            order = np.lexsort((sigs["doc"], task, sigs["tie"], np.iinfo(np.uint32).max - sigs["date"], sigs["url"]))
            urls = sigs["url"][order]
            superseded = order[np.concatenate(([False], urls[1:] == urls[:-1]))]
        self.stat_update("urls", value=len(urls) - len(superseded))
        self.stat_update("superseded", value=len(superseded))
        for task_rank in np.unique(task[superseded]):
            drops = np.sort(sigs["doc"][superseded][task[superseded] == task_rank]).astype(_DOC_IDX)
            _write_array(self.output_folder, f"{int(task_rank):05d}/{rank:04d}.urldrop", drops)


class UrlDedupFilter(PipelineStep):
    """URL dedup stage 3: drop the documents stage 2 listed for this task (run with stage 1's reader and tasks)."""

    type = "🫂 - DEDUP"
    name = "🔗 URL dedup filter"

    def __init__(self, input_folder: DataFolderLike, exclusion_writer: DiskWriter | None = None):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield the documents that are the latest version of their URL (and those without a url)."""
        files = _list(self.input_folder, f"{rank:05d}", ".urldrop")
        drops = [_read_array(self.input_folder, f, _DOC_IDX) for f in files]
        is_dropped = _DropByIndex(np.concatenate(drops) if drops else np.array([], dtype=_DOC_IDX))
        with self.exclusion_writer or contextlib.nullcontext() as excluded:
            for doc_idx, doc in enumerate(data):
                self.stat_update(StatHints.total)
                if is_dropped(doc_idx):
                    self.stat_update(StatHints.dropped)
                    if excluded:
                        excluded.write(doc, rank)
                    continue
                self.stat_update(StatHints.forwarded)
                yield doc


class UrlDedupStages(NamedTuple):
    """The three URL dedup stages: run [reader, signature], [find], [reader, filter, writer]."""

    signature: UrlDedupSignature
    find: UrlDedupFind
    filter: UrlDedupFilter


def url_dedup_stages(
    work_dir: DataFolderLike, finder_workers: int = 1, exclusion_writer: DiskWriter | None = None
) -> UrlDedupStages:
    """URL dedup's stages sharing `work_dir` (find runs with tasks=finder_workers)."""
    sigs, drops = _subfolder(work_dir, "url_sigs"), _subfolder(work_dir, "url_drops")
    return UrlDedupStages(
        UrlDedupSignature(sigs, finder_workers),
        UrlDedupFind(sigs, drops, finder_workers),
        UrlDedupFilter(drops, exclusion_writer),
    )


# ---------------------------------------------------------------- line de-duplication

_WHITESPACE = re.compile(r"\s+")
_LINE_COUNT = np.dtype([("hash", "<u8"), ("count", "<u4")])
_LINE_HASH = np.dtype("<u8")


def normalize_line(line: str) -> str:
    """A line as counted: stripped, whitespace runs made one space (case, digits and punctuation kept)."""
    return _WHITESPACE.sub(" ", line.strip())


def doc_bucket(doc_id: str, num_buckets: int) -> int:
    """The line-dedup bucket of a document: a hash of its id, so the same whatever the task layout."""
    return xxh64_intdigest(f"bucket:{doc_id}") % num_buckets


@dataclass(frozen=True)
class LineDedupConfig:
    """Line dedup settings; buckets = ceil(expected_documents / bucket_size), 1 when expected_documents is None.

    The paper removes lines seen more than 6 times in each bucket of 30M documents. Code is skipped by default: the
    paper applies this to web text, code has its own pipeline, and dropping every common line (`return None`,
    `else:`) would break programs.
    """

    max_repeats: int = 6
    bucket_size: int = 30_000_000
    expected_documents: int | None = None
    skip_domains: tuple[str, ...] = ("code",)

    @property
    def num_buckets(self) -> int:
        """How many buckets the documents are spread over."""
        if not self.expected_documents:
            return 1
        return max(1, math.ceil(self.expected_documents / self.bucket_size))

    def applies(self, doc: Document) -> bool:
        """Whether this document's lines are counted and filtered."""
        return doc.metadata.get("domain") not in self.skip_domains

    def line_hashes(self, text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The text's lines, the hashes of their normalised forms, and which are non-empty (the counted ones)."""
        lines = text.split("\n")
        normal = [normalize_line(line) for line in lines]
        hashes = np.fromiter((xxh64_intdigest(n) if n else 0 for n in normal), dtype=np.uint64, count=len(lines))
        return lines, hashes, np.fromiter((bool(n) for n in normal), dtype=bool, count=len(lines))


def _without(lines: list[str], remove: np.ndarray) -> str:
    """The text without the removed lines, and without the blank lines they leave at the ends or doubled."""
    kept: list[str] = []
    gap = False  # a line was removed since the last non-blank line kept
    for line, drop in zip(lines, remove, strict=True):
        if drop:
            gap = True
            continue
        blank = not line.strip()
        if blank and gap and (not kept or not kept[-1].strip()):
            continue
        kept.append(line)
        gap = gap and blank
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept)


class LineDedupCount(PipelineStep):
    """Line dedup stage 1: per task and bucket, the sorted (line hash, occurrences) of the non-empty lines."""

    type = "🫂 - DEDUP"
    name = "📜 line dedup count"

    def __init__(self, output_folder: DataFolderLike, config: LineDedupConfig | None = None):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.config = config or LineDedupConfig()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        """Write this task's line counts, one file per bucket it saw documents of (a last step)."""
        per_bucket: dict[int, list[np.ndarray]] = {}
        for doc in data:
            self.stat_update(StatHints.total)
            if not self.config.applies(doc):
                self.stat_update("skipped_domain")
                continue
            with self.track_time():
                _, hashes, counted = self.config.line_hashes(doc.text)
                per_bucket.setdefault(doc_bucket(doc.id, self.config.num_buckets), []).append(hashes[counted])
        for bucket, chunks in per_bucket.items():
            hashes, counts = np.unique(np.concatenate(chunks), return_counts=True)
            rows = np.empty(len(hashes), dtype=_LINE_COUNT)
            rows["hash"], rows["count"] = hashes, counts
            _write_array(self.output_folder, f"{bucket:05d}/{rank:05d}.linecount", rows)


class LineDedupMerge(PipelineStep):
    """Line dedup stage 2: sum each bucket's counts over tasks, list the lines seen more than max_repeats times."""

    type = "🫂 - DEDUP"
    name = "📜 line dedup merge"

    def __init__(
        self, input_folder: DataFolderLike, output_folder: DataFolderLike, config: LineDedupConfig | None = None
    ):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.output_folder = get_datafolder(output_folder)
        self.config = config or LineDedupConfig()

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        """Merge buckets rank, rank + world_size, ... and write their frequent lines."""
        for bucket in range(rank, self.config.num_buckets, world_size):
            files = _list(self.input_folder, f"{bucket:05d}", ".linecount")
            rows = [_read_array(self.input_folder, f, _LINE_COUNT) for f in files]
            with self.track_time():
                rows = np.concatenate(rows) if rows else np.array([], dtype=_LINE_COUNT)
                hashes, where = np.unique(rows["hash"], return_inverse=True)
                totals = np.bincount(where, weights=rows["count"], minlength=len(hashes))
                frequent = hashes[totals > self.config.max_repeats].astype(_LINE_HASH)
            self.stat_update("distinct_lines", value=len(hashes))
            self.stat_update("frequent_lines", value=len(frequent))
            # Written even when empty: the filter tells "merged, nothing to remove" from "not merged".
            _write_array(self.output_folder, f"{bucket:05d}.lines", frequent)


class LineDedupFilter(PipelineStep):
    """Line dedup stage 3: remove the frequent lines, record `lines_removed`, drop documents left empty."""

    type = "🫂 - DEDUP"
    name = "📜 line dedup filter"

    def __init__(
        self,
        input_folder: DataFolderLike,
        config: LineDedupConfig | None = None,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.config = config or LineDedupConfig()
        self.exclusion_writer = exclusion_writer

    def _frequent(self) -> list[np.ndarray]:
        frequent = []
        for bucket in range(self.config.num_buckets):
            if not self.input_folder.exists(f"{bucket:05d}.lines"):
                raise FileNotFoundError(f"{self.input_folder.path}/{bucket:05d}.lines: run the merge stage first")
            frequent.append(_read_array(self.input_folder, f"{bucket:05d}.lines", _LINE_HASH))
        return frequent

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield documents without their frequent lines."""
        frequent = self._frequent()
        with self.exclusion_writer or contextlib.nullcontext() as excluded:
            for doc in data:
                self.stat_update(StatHints.total)
                if not self.config.applies(doc):
                    self.stat_update(StatHints.forwarded)
                    yield doc
                    continue
                with self.track_time():
                    lines, hashes, counted = self.config.line_hashes(doc.text)
                    table = frequent[doc_bucket(doc.id, self.config.num_buckets)]
                    at = np.minimum(np.searchsorted(table, hashes), max(len(table) - 1, 0))
                    remove = counted & (table[at] == hashes) if len(table) else np.zeros(len(lines), dtype=bool)
                    removed = int(remove.sum())
                    if removed:
                        doc.text = _without(lines, remove)
                    doc.metadata["lines_removed"] = removed
                self.stat_update("lines_removed", value=removed)
                if not doc.text.strip():
                    self.stat_update(StatHints.dropped)
                    if excluded:
                        excluded.write(doc, rank)
                    continue
                self.stat_update(StatHints.forwarded)
                yield doc


class LineDedupStages(NamedTuple):
    """The three line dedup stages: run [reader, count], [merge], [reader, filter, writer]."""

    count: LineDedupCount
    merge: LineDedupMerge
    filter: LineDedupFilter


def line_dedup_stages(
    work_dir: DataFolderLike, config: LineDedupConfig | None = None, exclusion_writer: DiskWriter | None = None
) -> LineDedupStages:
    """Line dedup's stages sharing `work_dir` and one config."""
    config = config or LineDedupConfig()
    counts, lines = _subfolder(work_dir, "line_counts"), _subfolder(work_dir, "frequent_lines")
    return LineDedupStages(
        LineDedupCount(counts, config),
        LineDedupMerge(counts, lines, config),
        LineDedupFilter(lines, config, exclusion_writer),
    )


# ---------------------------------------------------------------- MinHash de-duplication


class RegexWordTokenizer(WordTokenizer):
    """Offline tokenizer (no NLTK data): words are runs of Unicode letters and digits, other symbols stand alone;
    sentences end at . ! ? followed by whitespace, or at a newline."""

    _WORD = re.compile(r"\w+|[^\w\s]")
    _SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")

    def __init__(self, language: str | None = None):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        """The words of `text`."""
        return self._WORD.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each non-empty sentence, surrounding whitespace excluded."""
        spans, start = [], 0
        for brk in [*self._SENTENCE_BREAK.finditer(text), None]:
            end = brk.start() if brk else len(text)
            piece = text[start:end]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                spans.append((start + lead, start + len(piece.rstrip())))
            start = brk.end() if brk else len(text)
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        """The sentences of `text`."""
        return [text[a:b] for a, b in self.span_tokenize(text)]


def minhash_config(bands: int = 14, rows: int = 8, n_grams: int = 5, seed: int = 1) -> MinhashConfig:
    """MinHash settings for this corpus: `bands` × `rows` hashes over `n_grams`-word shingles, numbers kept.

    14 × 8 over 5-grams (datatrove's and FineWeb's choice) puts the S-curve's midpoint at (1/14)^(1/8) ≈ 0.72:
    a pair at Jaccard 0.8 is caught with p = 0.92, at 0.9 with p = 0.9996, at 0.5 with p = 0.05, at 0.3 with
    p = 0.0009. This corpus is templated (scene sentences, word problems), so a lower threshold such as 20 × 5
    (midpoint 0.55) would start merging distinct documents that share their template. Digits are not normalised:
    datatrove's default makes "What is 12 + 7?" and "What is 31 + 4?" the same text, and every arithmetic problem
    of one operation a duplicate of the others.
    """
    return MinhashConfig(
        n_grams=n_grams,
        num_buckets=bands,
        hashes_per_bucket=rows,
        seed=seed,
        norm_config=TextNormConfig(norm_numbers=False),
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )


def s_curve(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that LSH with `bands` bands of `rows` rows pairs two documents of Jaccard `similarity`."""
    value = 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands
    return float(value) if value.ndim == 0 else value


def s_curve_threshold(bands: int, rows: int) -> float:
    """The similarity near the S-curve's steepest point, (1/bands)^(1/rows)."""
    return (1.0 / bands) ** (1.0 / rows)


class ShortAwareMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature, with two changes. A document of fewer words than an n-gram is one shingle,
    its whole normalised text: datatrove gives it none, so copies of a short caption would never meet. And with
    ``per_language`` (the paper's de-duplication within each language) every shingle is salted with the document's
    ``metadata["language"]``, so documents of different languages never share a bucket."""

    def __init__(self, *args: Any, per_language: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_language = per_language
        self._salt = np.uint64(0)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> Any:
        """datatrove's signature pass over ``data``, each document's shingles salted with its language."""

        def salted(docs: DocumentsPipeline) -> DocumentsPipeline:
            for doc in docs:
                # datatrove takes each document's shingles right after drawing it from this generator.
                language = str(doc.metadata.get("language", "")) if self.per_language else ""
                self._salt = np.uint64(xxh64_intdigest(language) if language else 0)
                yield doc

        return super().run(salted(data), rank, world_size)

    def get_shingles(self, text: str) -> np.ndarray:
        """The hashed n-grams of ``text``, or the hash of its whole normalised text when it is shorter."""
        shingles = super().get_shingles(text)
        if not len(shingles):
            words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
            if not words:
                return shingles
            shingles = np.array([[self._hash_func(" ".join(words))]], dtype=np.uint64)
        return shingles ^ self._salt


class MinhashStages(NamedTuple):
    """The four MinHash stages: run [reader, signature], [buckets], [cluster], [reader, filter, writer]."""

    signature: ShortAwareMinhashSignature
    buckets: MinhashDedupBuckets
    cluster: MinhashDedupCluster
    filter: MinhashDedupFilter


def minhash_stages(
    work_dir: DataFolderLike,
    config: MinhashConfig | None = None,
    tokenizer: WordTokenizer | None = None,
    exclusion_writer: DiskWriter | None = None,
) -> MinhashStages:
    """datatrove's MinHash stages sharing `work_dir`; buckets runs with tasks=config.num_buckets, cluster with 1."""
    config = config or minhash_config()
    sigs, buckets, remove = (
        _subfolder(work_dir, name) for name in ("minhash_sigs", "minhash_buckets", "minhash_remove")
    )
    return MinhashStages(
        ShortAwareMinhashSignature(sigs, config, language=tokenizer or RegexWordTokenizer()),
        MinhashDedupBuckets(sigs, buckets, config=config),
        MinhashDedupCluster(buckets, remove, config=config),
        MinhashDedupFilter(remove, exclusion_writer=exclusion_writer),
    )
