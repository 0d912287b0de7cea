"""Model-based quality filtering and domain classification of pre-training data curation (the paper, 3.1.2).

The paper scores documents with fastText and with DistilRoBERTa, both trained on Llama 2's judgements, and uses
the same machinery for domain classifiers that send code and math to their own pipelines. Here, in plain PyTorch:

- ``NGramClassifier`` (kind ``"ngram"``): fastText's supervised model. Hashed word unigrams and bigrams and byte
  3- to 5-grams go into an ``nn.EmbeddingBag`` (mean), then a linear layer and a softmax over the labels; plain SGD.
- ``TransformerClassifier`` (kind ``"transformer"``): the stand-in for DistilRoBERTa, a two-layer transformer (dim
  64) on a document's first 128 Llama 3 tokens, mean-pooled (``units="bytes"``: on UTF-8 bytes instead).

Both read a document's head (4,000 characters, 128 tokens), as the paper's DistilRoBERTa reads 512 tokens: a few
dirty words deep in a long file go unseen (the dirty-words filter is the step for those). Both train in seconds on
two CPU cores, one thread each (see ``_threads``). Teacher labels come from the default raw corpus
(data/curate/raw.py) or from any scorer:

- quality (``QUALITY_LABELS``): clean documents are ``"high"``; spam, word salad, outlier tokens (base64 and hex
  dumps) and dirty words (``LOW_QUALITY_DEFECTS``) are ``"low"``. The other planted defects are left out of training:
  duplicates, URL copies and blocked-domain documents are clean text (de-duplication and the block list handle
  them), boilerplate and PII are a few lines on clean text (line de-duplication and the PII redactor handle them),
  and a wrong-language document is good text in another language (language ID handles it).
- ``scorer_labels``: the hook for an LM judge. Any ``text -> P(high quality)`` callable labels the documents, as the
  paper's Llama 2 prompt does.
- domain (``DOMAIN_LABELS``): ``metadata["domain"]`` of the clean documents.

``train_classifiers`` writes ``quality_<kind>/`` and ``domain_<kind>/`` (``model.safetensors`` and ``config.json``)
and ``classifiers.json``. The datatrove steps: ``QualityClassifierFilter`` writes ``metadata["quality_<kind>"]``
(P(high)) and drops documents under its threshold; ``DomainClassifierTagger`` writes ``metadata["domain_predicted"]``
and ``metadata["domain_predicted_prob"]`` and never drops. Both load their model in the worker, on first use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.batching import batched
from datatrove.utils.typeshelper import StatHints
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic import atomic_write_text, commit_directory
from data.curate.filters import N_BYTES, DomainFilter, PerDomain, load_tokenizer, per_domain

__all__ = [
    "DOMAIN_LABELS",
    "HIGH",
    "KINDS",
    "LOW",
    "LOW_QUALITY_DEFECTS",
    "QUALITY_LABELS",
    "DomainClassifierTagger",
    "FitConfig",
    "NGramClassifier",
    "QualityClassifierFilter",
    "TextClassifier",
    "TransformerClassifier",
    "load_classifier",
    "ngram_features",
    "planted_domain_label",
    "planted_quality_label",
    "roc_auc",
    "scorer_labels",
    "teacher_examples",
    "train_classifier",
    "train_classifiers",
]

FORMAT = "llama3-herd text classifier v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SUMMARY_FILE = "classifiers.json"

HIGH, LOW = "high", "low"
QUALITY_LABELS = (LOW, HIGH)
LOW_QUALITY_DEFECTS = ("spam", "word_salad", "outlier_tokens", "dirty_words")
DOMAIN_LABELS = ("general", "math", "code", "multilingual")

# ---------------------------------------------------------------- teacher labels


def _text_and_metadata(doc: Document | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(doc, Document):
        return doc.text, doc.metadata
    return doc["text"], doc.get("metadata") or {}


def planted_quality_label(doc: Document | Mapping[str, Any]) -> str | None:
    """The quality label: "high" if clean, "low" if a planted quality defect, None otherwise (not trained on)."""
    planted = _text_and_metadata(doc)[1].get("planted")
    if planted == "":
        return HIGH
    return LOW if planted in LOW_QUALITY_DEFECTS else None


def planted_domain_label(doc: Document | Mapping[str, Any]) -> str | None:
    """A clean document's metadata["domain"]; None for planted documents, whose domain may not match their text."""
    metadata = _text_and_metadata(doc)[1]
    domain = metadata.get("domain")
    return domain if metadata.get("planted") == "" and domain in DOMAIN_LABELS else None


def scorer_labels(
    texts: Iterable[str], scorer: Callable[[str], float], threshold: float = 0.5, margin: float = 0.0
) -> list[str | None]:
    """Quality labels from a `scorer` giving P(high quality) of a text (an LM judge's "yes" probability).

    At `threshold` + `margin` or more a text is "high", under `threshold` - `margin` "low", in between None: the
    judge is unsure, and an unsure label teaches the student noise.
    """
    labels: list[str | None] = []
    for text in texts:
        p = float(scorer(text))
        labels.append(HIGH if p >= threshold + margin else LOW if p < threshold - margin else None)
    return labels


def teacher_examples(
    docs: Iterable[Document | Mapping[str, Any]], label: Callable[[Document | Mapping[str, Any]], str | None]
) -> tuple[list[str], list[str]]:
    """(texts, labels) of the documents `label` labels (None: left out)."""
    texts, labels = [], []
    for doc in docs:
        value = label(doc)
        if value is not None:
            texts.append(_text_and_metadata(doc)[0])
            labels.append(value)
    return texts, labels


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the Mann-Whitney U statistic, normalised."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.sort(np.asarray(negative, dtype=np.float64))
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs positives and negatives")
    below, not_above = np.searchsorted(neg, pos, side="left"), np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(pos) * len(neg)))


# ---------------------------------------------------------------- the classifiers


@dataclass(frozen=True)
class FitConfig:
    """How a classifier trains: epochs, peak learning rate, optimizer ("sgd" or "adamw"), batch size, weight decay."""

    epochs: int
    lr: float
    optimizer: str = "adamw"
    batch_size: int = 32
    weight_decay: float = 0.0


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` (None: unchanged) inside the block, restored after it."""
    # These models' matrices are too small for several threads to pay, and a thread team on a core that another
    # process holds spins: on two shared cores a training step ran 30 times slower with two threads than with one.
    # Parallelism belongs to datatrove's tasks.
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TextClassifier(nn.Module):
    """A document classifier over `labels`: featurize, logits of a batch, fit, predict, save and load."""

    kind: str = ""

    def __init__(self, labels: Sequence[str], **config: Any) -> None:
        super().__init__()
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise ValueError(f"labels must be at least two distinct names, got {labels!r}")
        self.labels = tuple(labels)
        self.config = config

    def featurize(self, text: str) -> Any:
        """The model's input for `text` (computed once per document, before batching)."""
        raise NotImplementedError

    def logits(self, features: Sequence[Any]) -> torch.Tensor:
        """Logits (batch, labels) of a batch of featurized documents."""
        raise NotImplementedError

    def length(self, features: Any) -> int:
        """The size of a featurized document (predict_proba batches documents of similar sizes)."""
        return len(features)

    def fit(
        self, texts: Sequence[str], labels: Sequence[str], config: FitConfig, seed: int = 0, threads: int | None = 1
    ) -> dict[str, Any]:
        """Train on (texts, labels) with classes weighted equally; returns the training statistics."""
        unknown = set(labels) - set(self.labels)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not among this classifier's {self.labels}")
        with _threads(threads):
            start = time.perf_counter()
            features = [self.featurize(t) for t in texts]
            y = torch.tensor([self.labels.index(label) for label in labels])
            counts = torch.bincount(y, minlength=len(self.labels)).float()
            # Balanced classes: 10% of defects would otherwise be cheap to get wrong, and they are the point.
            weight = counts.sum() / (len(self.labels) * counts.clamp(min=1))
            losses = self._train(features, y, weight, config, torch.Generator().manual_seed(seed))
        return {
            "examples": dict(sorted(Counter(labels).items())),
            **dataclasses.asdict(config),
            "final_loss": round(float(np.mean(losses[-10:])), 5),
            "seconds": round(time.perf_counter() - start, 2),
        }

    def _train(
        self, features: list[Any], y: torch.Tensor, weight: torch.Tensor, config: FitConfig, generator: torch.Generator
    ) -> list[float]:
        if config.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=config.lr)
        elif config.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            raise ValueError(f"optimizer={config.optimizer!r}: choose sgd or adamw")
        steps = config.epochs * math.ceil(len(features) / config.batch_size)
        # fastText's schedule: the learning rate decays linearly to 0.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
        self.train()
        losses = []
        for _ in range(config.epochs):
            for batch in torch.randperm(len(features), generator=generator).split(config.batch_size):
                loss = F.cross_entropy(self.logits([features[i] for i in batch.tolist()]), y[batch], weight=weight)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
        self.eval()
        return losses

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64, threads: int | None = 1) -> np.ndarray:
        """Probabilities (documents, labels), columns in the order of `labels`."""
        features = [self.featurize(t) for t in texts]
        # Batches of similar lengths pad little; the order is restored below.
        order = sorted(range(len(features)), key=lambda i: self.length(features[i]))
        probs = np.zeros((len(features), len(self.labels)), dtype=np.float32)
        with _threads(threads):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                probs[chunk] = F.softmax(self.logits([features[i] for i in chunk]), dim=-1).numpy()
        return probs

    def score(self, texts: Sequence[str], label: str) -> np.ndarray:
        """P(`label`) of each text."""
        return self.predict_proba(texts)[:, self.labels.index(label)]

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely label of each text."""
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def save(self, path: str | os.PathLike[str], trained: Mapping[str, Any] | None = None) -> Path:
        """Write `path`/model.safetensors and `path`/config.json (kind, labels, config, `trained`), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, staging / WEIGHTS_FILE)
        meta = {"format": FORMAT, "kind": self.kind, "labels": list(self.labels), "config": self.config}
        (staging / CONFIG_FILE).write_text(json.dumps({**meta, "trained": dict(trained or {})}, indent=2) + "\n")
        commit_directory(staging, path)
        return path


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output, so `% buckets` uses all of them."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_TOKEN = re.compile(r"\w+|[^\w\s]")
_PRIME = np.uint64(1_000_003)


def _salt(family: str) -> np.uint64:
    """A constant per feature family, so that a word, a bigram and a byte n-gram with equal raw hashes land apart."""
    return np.uint64(zlib.crc32(family.encode()) * 0x9E3779B1)


def _buckets(hashes: list[np.ndarray], buckets: int) -> np.ndarray:
    if not hashes:
        return np.zeros(0, dtype=np.int64)
    return (_mix64(np.concatenate(hashes)) % np.uint64(buckets)).astype(np.int64)


def ngram_features(
    text: str, buckets: int, max_chars: int, word_ngrams: int = 2, char_ngrams: Sequence[int] = (3, 4, 5)
) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids of `text`'s head: (lower-cased word 1- to `word_ngrams`-grams, byte `char_ngrams`-grams).

    Hashes are CRC32 of words and polynomial rolling hashes over bytes, all in numpy: stable across processes (unlike
    Python's salted ``hash``) and fast on the long documents code has.
    """
    text = text[:max_chars]
    words = _TOKEN.findall(text.lower())
    word_hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    word_parts, byte_parts = [], []
    with np.errstate(over="ignore"):  # the polynomial hashes wrap modulo 2**64 on purpose
        grams = word_hashes
        for n in range(1, word_ngrams + 1):
            if n > 1:
                grams = grams[:-1] * _PRIME + word_hashes[n - 1 :]
            word_parts.append(grams ^ _salt(f"w{n}"))
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint64)
        for n in char_ngrams:
            count = len(raw) - n + 1
            if count > 0:
                grams = np.full(count, n, dtype=np.uint64)  # n as the seed: a 3-gram and a 4-gram hash apart
                for k in range(n):
                    grams = grams * _PRIME + raw[k : k + count]
                byte_parts.append(grams ^ _salt("c"))
        return _buckets(word_parts, buckets), _buckets(byte_parts, buckets)


class NGramClassifier(TextClassifier):
    """fastText's supervised classifier: mean embeddings of hashed n-gram features, a linear layer, a softmax.

    Word n-grams and byte n-grams are averaged apart and the two means concatenated: bytes outnumber words ten to
    one, and in a single mean a few planted words weigh less (on the default raw corpus, one mean: held-out recall
    0.962 at 0.5 and 3 clean documents lost; two: 0.971 and 1).
    """

    kind = "ngram"

    def __init__(
        self,
        labels: Sequence[str],
        buckets: int = 2**17,
        dim: int = 16,
        max_chars: int = 4000,
        word_ngrams: int = 2,
        char_ngrams: Sequence[int] = (3, 4, 5),
    ) -> None:
        config = {"buckets": buckets, "dim": dim, "max_chars": max_chars, "word_ngrams": word_ngrams}
        super().__init__(labels, **config, char_ngrams=list(char_ngrams))
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.head = nn.Linear(2 * dim, len(self.labels))
        # fastText's initialisation: small uniform inputs, a zero output layer.
        nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def featurize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Hashed (word n-gram, byte n-gram) bucket ids (see ngram_features)."""
        c = self.config
        return ngram_features(text, c["buckets"], c["max_chars"], c["word_ngrams"], c["char_ngrams"])

    def length(self, features: tuple[np.ndarray, np.ndarray]) -> int:
        """Word and byte n-grams together."""
        return len(features[0]) + len(features[1])

    def _mean(self, bags: Sequence[np.ndarray]) -> torch.Tensor:
        offsets = torch.tensor(np.cumsum([0, *(len(b) for b in bags[:-1])]), dtype=torch.long)
        return self.embedding(torch.from_numpy(np.concatenate(bags)), offsets)

    def logits(self, features: Sequence[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """The word and byte n-gram means through the linear layer (an empty bag's mean is zeros)."""
        words, raw = zip(*features, strict=True)
        return self.head(torch.cat([self._mean(words), self._mean(raw)], dim=-1))


class TransformerClassifier(TextClassifier):
    """A small pre-norm transformer over a document's first Llama 3 tokens (or bytes), mean-pooled, a linear head.

    `units="tokens"`: the Llama 3 tokenizer's ids, folded into `buckets` embedding rows (id % buckets; the 128K-row
    table would be 8M parameters, mostly untrained). `units="bytes"`: UTF-8 bytes, `patch` of them to a position.
    Measured on the default raw corpus, tokens learn word salad from 40 examples (held-out word-salad AUC 0.998
    against 0.966 for bytes, both 4 epochs, ~11 s): shuffled words are plain in token order, blurred in byte patches.
    """

    kind = "transformer"

    def __init__(
        self,
        labels: Sequence[str],
        units: str = "tokens",
        max_positions: int = 128,
        patch: int = 8,
        buckets: int = 32768,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        tokenizer_sha256: str | None = None,
    ) -> None:
        """`max_positions`: tokens, or patches of `patch` bytes, read from a document's head."""
        if units not in ("tokens", "bytes"):
            raise ValueError(f"units={units!r}: choose tokens or bytes")
        if units == "tokens" and tokenizer_sha256 is None:
            tokenizer_sha256 = load_tokenizer(None).sha256  # a model remembers which tokenizer it was trained on
        config = {"units": units, "max_positions": max_positions, "patch": patch, "buckets": buckets, "dim": dim}
        super().__init__(labels, **config, layers=layers, heads=heads, tokenizer_sha256=tokenizer_sha256)
        self.pad = buckets if units == "tokens" else N_BYTES
        self.group = 1 if units == "tokens" else patch  # ids per position
        width = dim if units == "tokens" else 16
        self.embedding = nn.Embedding(self.pad + 1, width, padding_idx=self.pad)
        # Bytes: a patch's byte embeddings side by side make one position (1,024 bytes are 128 positions).
        self.project = nn.Linear(self.group * width, dim)
        self.position = nn.Parameter(torch.randn(max_positions, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(self.labels))

    def featurize(self, text: str) -> np.ndarray:
        """The first tokens (as embedding rows) or bytes of `text`."""
        c = self.config
        if c["units"] == "bytes":
            raw = text.encode("utf-8", errors="replace")[: c["max_positions"] * c["patch"]]
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        tokenizer = load_tokenizer(None)
        if tokenizer.sha256 != c["tokenizer_sha256"]:
            raise ValueError(f"this classifier was trained with another tokenizer than {tokenizer.path}")
        # A token is rarely over 8 characters: cutting first spares tokenizing all of a 100K-character file.
        ids = tokenizer.encode(text[: 8 * c["max_positions"]], bos=False, eos=False)[: c["max_positions"]]
        return np.asarray(ids, dtype=np.int64) % c["buckets"]

    def logits(self, features: Sequence[np.ndarray]) -> torch.Tensor:
        """Embeddings plus positions, the encoder with padded positions masked, the mean of the real positions."""
        positions = max(1, math.ceil(max(len(f) for f in features) / self.group))
        ids = torch.full((len(features), positions * self.group), self.pad, dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, : len(f)] = torch.from_numpy(f)
        x = self.project(self.embedding(ids).view(len(features), positions, -1))
        pad = (ids.view(len(features), positions, self.group) == self.pad).all(dim=-1)
        pad[:, 0] = False  # an empty document keeps one (padding) position: no attention row is all masked
        x = self.encoder(x + self.position[:positions], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head(self.norm((x * keep).sum(dim=1) / keep.sum(dim=1)))


KINDS: dict[str, type[TextClassifier]] = {"ngram": NGramClassifier, "transformer": TransformerClassifier}
# Measured on the default raw corpus (2,000 documents) to train in seconds on two CPU cores. The n-gram model takes
# fastText's plain SGD (the learning rate is fastText's 0.1-1 per document times the batch of 32): it measured better
# than AdamW (held-out AUC 0.992 against 0.988, recall at 0.5 0.958 against 0.917), as Adam moves every bucket a hash
# touched, a base64 dump's thousands of random n-grams included, by about the learning rate.
FIT: dict[str, FitConfig] = {
    "ngram": FitConfig(epochs=16, lr=40.0, optimizer="sgd"),
    "transformer": FitConfig(epochs=4, lr=3e-3, optimizer="adamw", weight_decay=0.01),
}
# Sources are far apart (captions, worked problems, code, translations): fewer epochs do.
DOMAIN_EPOCHS = {"ngram": 4, "transformer": 2}


def load_classifier(path: str | os.PathLike[str]) -> TextClassifier:
    """A classifier that `TextClassifier.save` wrote: safetensors weights (no pickle) and its JSON config."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ValueError(f"{path}: not a classifier of {FORMAT!r} (kinds {sorted(KINDS)})")
    model = KINDS[meta["kind"]](meta["labels"], **meta["config"])
    model.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
    return model.eval()


def train_classifier(
    kind: str,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    seed: int = 0,
    fit: FitConfig | None = None,
    **config: Any,
) -> tuple[TextClassifier, dict[str, Any]]:
    """A `kind` classifier over `label_names` (model `config`) fit on (texts, labels), and the fit statistics."""
    # The caller's global RNG is left as it was; the seed alone decides the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KINDS[kind](label_names, **config)
        stats = model.fit(texts, labels, fit or FIT[kind], seed=seed)
    return model, stats


def train_classifiers(
    raw_docs: Sequence[Document | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    kinds: Sequence[str] = ("ngram", "transformer"),
    quality_scorer: Callable[[str], float] | None = None,
) -> dict[str, Any]:
    """Train quality and domain classifiers of each of `kinds` on `raw_docs`' teacher labels into `out_dir`.

    Quality labels are the planted ones (planted_quality_label) unless a `quality_scorer` (text -> P(high), an LM
    judge) is given, which then labels every document (scorer_labels); domain labels are the clean documents' sources.
    Writes `out_dir`/{quality,domain}_<kind>/ and `out_dir`/classifiers.json, the summary returned.
    """
    out_dir = Path(out_dir)
    if quality_scorer is None:
        quality = teacher_examples(raw_docs, planted_quality_label)
    else:
        texts = [_text_and_metadata(doc)[0] for doc in raw_docs]
        pairs = [(t, label) for t, label in zip(texts, scorer_labels(texts, quality_scorer), strict=True) if label]
        quality = ([t for t, _ in pairs], [label for _, label in pairs])
    tasks = {
        "quality": (quality, QUALITY_LABELS, "planted" if quality_scorer is None else "scorer"),
        "domain": (teacher_examples(raw_docs, planted_domain_label), DOMAIN_LABELS, "planted"),
    }
    summary: dict[str, Any] = {"seed": seed, "documents": len(raw_docs), "models": {}}
    for task, ((texts, labels), names, teacher) in tasks.items():
        missing = set(names) - set(labels)
        if missing:
            raise ValueError(f"{task} classifier: no teacher examples of {sorted(missing)}")
        for kind in kinds:
            fit = dataclasses.replace(FIT[kind], epochs=DOMAIN_EPOCHS[kind]) if task == "domain" else FIT[kind]
            model, stats = train_classifier(kind, texts, labels, names, seed, fit)
            stats = {"teacher": teacher, "seed": seed, **stats}
            model.save(out_dir / f"{task}_{kind}", trained=stats)
            summary["models"][f"{task}_{kind}"] = stats
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- datatrove steps


def _model_path(model_dir: str | os.PathLike[str], task: str, kind: str, labels: Sequence[str]) -> Path:
    """`model_dir` itself when it holds a model, else train_classifiers' `task`_`kind` under it; checked to be a
    `kind` classifier over `labels`, here rather than in a worker."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {sorted(KINDS)}")
    path = Path(model_dir)
    path = path if (path / CONFIG_FILE).is_file() else path / f"{task}_{kind}"
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no classifier (train_classifiers writes one)")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("kind") != kind or set(meta.get("labels", ())) != set(labels):
        raise ValueError(f"{path}: a {meta.get('kind')} classifier over {meta.get('labels')}, not a {task} {kind} one")
    return path


class _LazyModel:
    """Mixin of the steps: the model loads on first use, in the worker, and is never pickled with the step."""

    model_path: Path
    _model: TextClassifier | None

    def model(self) -> TextClassifier:
        """The classifier, loaded on first call."""
        if self._model is None:
            self._model = load_classifier(self.model_path)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}


class QualityClassifierFilter(_LazyModel, DomainFilter):
    """Score P(high quality) into metadata["quality_<kind>"]; drop documents under `threshold` (per domain)."""

    name = "🎓 Quality classifier"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        kind: str = "ngram",
        threshold: PerDomain[float | None] = 0.5,
        domains: Sequence[str] | None = None,
        exclusion_writer: DiskWriter | None = None,
        batch_size: int = 64,
    ) -> None:
        """`model_dir`: train_classifiers' output (or one model's directory); a None threshold only scores."""
        super().__init__(domains, exclusion_writer, batch_size)
        self.kind = kind
        self.model_path = _model_path(model_dir, "quality", kind, QUALITY_LABELS)
        self.threshold = threshold
        self.key = f"quality_{kind}"
        self._model = None

    def _decide(self, doc: Document, score: float) -> bool | tuple[bool, str]:
        doc.metadata[self.key] = round(score, 5)
        threshold = per_domain(self.threshold, doc.metadata.get("domain"))
        return True if threshold is None or score >= threshold else (False, self.key)

    def judge(self, doc: Document) -> bool | tuple[bool, str]:
        """Score one document; drop it under the threshold."""
        return self._decide(doc, float(self.model().score([doc.text], HIGH)[0]))

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        """Score the batch's documents of `domains` together (a forward pass per batch, not per document)."""
        results: list[bool | tuple[bool, str]] = [True] * len(batch)
        judged = [i for i, doc in enumerate(batch) if self.applies(doc)]
        if len(judged) < len(batch):
            self.stat_update("other_domain", value=len(batch) - len(judged))
        if judged:
            scores = self.model().score([batch[i].text for i in judged], HIGH)
            for i, score in zip(judged, scores, strict=True):
                results[i] = self._decide(batch[i], float(score))
        return results


class DomainClassifierTagger(_LazyModel, PipelineStep):
    """Write the predicted source into metadata["domain_predicted"] and its probability; never drops a document."""

    name = "🏷️ Domain classifier"
    type = "🏷️ - TAGGER"

    def __init__(self, model_dir: str | os.PathLike[str], kind: str = "ngram", batch_size: int = 64) -> None:
        """`model_dir`: train_classifiers' output (or one model's directory)."""
        super().__init__()
        self.kind = kind
        self.model_path = _model_path(model_dir, "domain", kind, DOMAIN_LABELS)
        self.batch_size = batch_size
        self._model = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Tag the documents batch by batch, counting each predicted domain; then each paragraph, so that math or
        code inside general text (which the paper routes to their own pipelines) is seen: the whole-document
        prediction reads only the document's start."""
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                model = self.model()
                probs = model.predict_proba([doc.text for doc in batch], self.batch_size)
                paragraphs = [_paragraphs(doc.text) for doc in batch]
                flat = [p for doc_paragraphs in paragraphs for p in doc_paragraphs]
                paragraph_probs = model.predict_proba(flat, self.batch_size) if flat else np.zeros((0, 1))
            start = 0
            for doc, row, doc_paragraphs in zip(batch, probs, paragraphs, strict=True):
                best = int(row.argmax())
                doc.metadata["domain_predicted"] = model.labels[best]
                doc.metadata["domain_predicted_prob"] = round(float(row[best]), 5)
                rows = paragraph_probs[start : start + len(doc_paragraphs)]
                start += len(doc_paragraphs)
                confident = {model.labels[int(r.argmax())] for r in rows if r.max() >= PARAGRAPH_CONFIDENCE}
                doc.metadata["domain_paragraphs"] = sorted(confident)
                doc.metadata["domain_mixed"] = len(confident) > 1
                self.stat_update(StatHints.total, f"predicted_{model.labels[best]}")
                if len(confident) > 1:
                    self.stat_update("mixed")
                yield doc


# A paragraph's domain counts when the tagger gives it this probability; shorter paragraphs are not judged.
PARAGRAPH_CONFIDENCE = 0.9
PARAGRAPH_CHARS = 80


def _paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of ``text`` long enough to classify."""
    return [p for p in text.split("\n\n") if len(p.strip()) >= PARAGRAPH_CHARS]


def main(argv: list[str] | None = None) -> int:
    """Command line: train the quality and domain classifiers on a raw corpus's teacher labels."""
    import argparse

    from datatrove.pipeline.readers import JsonlReader

    parser = argparse.ArgumentParser(prog="python -m data.curate.classifiers", description=main.__doc__)
    parser.add_argument("--raw", required=True, help="a folder of JSONL whose metadata labels its documents (planted)")
    parser.add_argument("--out", required=True, help="where the models and classifiers.json are written")
    parser.add_argument("--kinds", default="ngram,transformer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    docs = list(JsonlReader(args.raw, glob_pattern="**/*.jsonl*", recursive=True)())
    summary = train_classifiers(docs, args.out, seed=args.seed, kinds=args.kinds.split(","))
    print(f"trained {', '.join(summary['models'])} on {len(docs)} documents -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
