"""The default raw corpus: the default corpus's clean documents with labelled defects planted in known proportions.

    python -m data.curate.raw --out runs/data/raw [--documents 2000] [--seed 0]

Writes ``raw-NNNNN.jsonl`` shards (one document a line: ``text``, ``id``, ``metadata``) in datatrove's JSONL
layout. Each
document's metadata says where it comes from (``url``, ``date``, ``domain``: general, math, code or multilingual,
``language``: the language its source is in) and what it is (``planted``: "" for a clean document, else the defect).
Because every planted document records what it is, each curation step's precision and recall is measured, not
guessed. The defects (``PLANTED``, the share of documents each one is planted in):

- ``exact_duplicate``: a copy of a clean document under another URL;
- ``near_duplicate``: a copy with a set share of its words replaced (``metadata.edit_fraction``);
- ``url_copy``: an older version of a clean document at the same URL, lightly edited, with an earlier date;
- ``boilerplate``: a clean document with site boilerplate lines (navigation, cookie banner) that recur across many
  documents (``metadata.boilerplate_lines``); only those lines are the defect;
- ``spam``: keyword-stuffed text, the same phrases over and over;
- ``dirty_words``: a clean document salted with the placeholder dirty words of ``lists/dirty_words.txt``;
- ``outlier_tokens``: base64 or hex dumps;
- ``word_salad``: the corpus's words in random order;
- ``wrong_language``: a document in another of the corpus's languages than its source's;
- ``pii``: a clean document carrying planted e-mail addresses, IP addresses and phone numbers
  (``metadata.pii``); only those strings are the defect;
- ``blocked_domain``: a clean-looking document from a block-listed domain (``lists/blocked_domains.txt``);
- ``mixed_domain``: general text with a math problem or a piece of code inside (``metadata.mixed_in``), which the
  domain tagger should not call plain general text.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from data import default
from data.curate.filters import BLOCKED_DOMAINS_FILE, DIRTY_WORDS_FILE, read_list

# The list files, read once per process (every planted document draws from them).
_listed = functools.cache(read_list)
RAW_FILE = "raw-{shard:05d}.jsonl"
DOMAIN_SHARES = {"general": 0.5, "math": 0.25, "code": 0.1, "multilingual": 0.15}
HOSTS = {"general": "scenes.example", "math": "math.example", "code": "code.example", "multilingual": "world.example"}
PLANTED = {
    "exact_duplicate": 0.03,
    "near_duplicate": 0.06,
    "url_copy": 0.03,
    "boilerplate": 0.06,
    "spam": 0.02,
    "dirty_words": 0.02,
    "outlier_tokens": 0.02,
    "word_salad": 0.02,
    "wrong_language": 0.02,
    "pii": 0.03,
    "blocked_domain": 0.02,
    "mixed_domain": 0.02,
}
NEAR_DUPLICATE_EDITS = (0.02, 0.05, 0.1, 0.2, 0.4)
BOILERPLATE = (
    "Home | About us | Contact | Privacy policy",
    "We use cookies to improve your experience. Accept all cookies",
    "Subscribe to our newsletter for weekly updates",
    "Copyright 2024 Example Media. All rights reserved.",
    "Share on Facebook | Share on X | Share by e-mail",
)
SPAM_PHRASES = ("best cheap deals", "buy now", "free shipping", "limited offer", "click here", "top discount")


def _date(rng: random.Random, start: str = "2023-01-01", days: int = 600) -> str:
    return (datetime.date.fromisoformat(start) + datetime.timedelta(days=rng.randrange(days))).isoformat()


def _code_texts(count: int, rng: random.Random) -> list[str]:
    """``count`` pieces of standard-library source of a size a document has, each cut at a function boundary, from
    files in an order of the seed's (so corpora of two seeds, a classifier's training and test sets, share little)."""
    texts = []
    # The encodings package is generated codec tables that are near-duplicates of one another: not clean documents.
    files = [path for path in default.stdlib_files(40_000_000) if "encodings" not in path.parts]
    rng.shuffle(files)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        while text and len(texts) < count:
            cut = text.find("\ndef ", 6000)
            piece, text = (text[:cut], text[cut + 1 :]) if cut > 0 else (text[:8000], "")
            texts.append(piece)
        if len(texts) == count:
            return texts
    raise ValueError(f"the standard library holds fewer than {count} code documents: ask for fewer documents")


# A clean line may recur this often in the raw corpus: past it the paper's line de-duplication (more than 6 copies
# in a bucket) would rightly remove it, so a generated document that would repeat a line more is not called clean.
CLEAN_LINE_REPEATS = 3


def clean_documents(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` clean documents of the four sources, in the shares of ``DOMAIN_SHARES``: distinct documents whose
    lines recur at most ``CLEAN_LINE_REPEATS`` times (the default corpus's small world repeats short captions and
    questions; a raw web corpus's clean part does not)."""
    counts = {domain: int(count * share) for domain, share in DOMAIN_SHARES.items()}
    counts["general"] += count - sum(counts.values())
    code = iter(_code_texts(2 * counts["code"], rng))  # twice as many: a piece equal to an earlier one is skipped
    docs, seen_lines, seen_texts = [], Counter(), set()
    for domain, n in counts.items():
        made = 0
        while made < n:
            language = rng.choice(default.LANGUAGES) if domain == "multilingual" else "en"
            if domain == "code":
                text = next(code)
            elif domain == "multilingual":
                text = default._multilingual(rng, language)
            else:
                text = (default._general if domain == "general" else default._math)(rng)
            lines = [line.strip() for line in text.split("\n") if line.strip()]
            if text in seen_texts or (
                domain != "code" and any(seen_lines[line] >= CLEAN_LINE_REPEATS for line in lines)
            ):
                continue
            seen_texts.add(text)
            seen_lines.update(lines)
            docs.append(_doc(text, domain, language, rng))
            made += 1
    return docs


def _doc(text: str, domain: str, language: str, rng: random.Random, **extra: Any) -> dict[str, Any]:
    metadata = {"url": "", "date": _date(rng), "domain": domain, "language": language, "planted": ""}
    metadata.update(extra)
    return {"text": text, "metadata": metadata}


def _edit_words(text: str, fraction: float, rng: random.Random) -> str:
    """``text`` with ``fraction`` of its words replaced by words of the corpus's vocabulary."""
    words = text.split(" ")
    vocabulary = [*default.scenes.COLOURS, *default.scenes.SHAPES, "large", "small", "above", "below"]
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(vocabulary)
    return " ".join(words)


def _salt(text: str, words: list[str], rng: random.Random) -> str:
    """``text`` with ``words`` inserted at random places."""
    tokens = text.split(" ")
    for word in words:
        tokens.insert(rng.randrange(len(tokens) + 1), word)
    return " ".join(tokens)


def _pii(rng: random.Random) -> list[str]:
    """An e-mail address, a public IP address and a phone number, made up."""
    name = rng.choice(("anna", "ben", "carla", "david", "eva")) + str(rng.randrange(100))
    email = f"{name}@{rng.choice(('mail.example', 'inbox.test', 'post.example'))}"
    ip = f"{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    phone = rng.choice(
        (
            f"+1 ({rng.randint(200, 989)}) {rng.randint(200, 989)}-{rng.randint(1000, 9999)}",
            f"+33 6 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
            f"+49 30 {rng.randint(1000000, 9999999)}",
            f"({rng.randint(200, 989)}) {rng.randint(200, 989)}-{rng.randint(1000, 9999)}",
        )
    )
    return [email, ip, phone]


# Defects planted into a document of their own (a carrier, never one of the clean documents): a carrier that
# copied a clean document would also be that document's duplicate, and de-duplication would rightly remove one.
CARRIED = ("boilerplate", "dirty_words", "pii", "blocked_domain", "mixed_domain")


def _plant(kind: str, clean: list[dict[str, Any]], carriers: list[dict[str, Any]], rng: random.Random) -> dict:
    """One planted document of ``kind``: a copy of a clean document (duplicates), a carrier with the defect added,
    or text of its own."""
    # Web boilerplate and word salad belong to prose: code has its own pipeline (line dedup skips it).
    prose = kind in ("word_salad", "boilerplate")
    pool = carriers if kind in CARRIED else clean
    candidates = [i for i, d in enumerate(pool) if not prose or d["metadata"]["domain"] != "code"]
    if kind == "mixed_domain":
        candidates = [i for i, d in enumerate(pool) if d["metadata"]["domain"] == "general"]
    index = rng.choice(candidates)
    source = pool.pop(index) if kind in CARRIED else pool[index]
    meta = source["metadata"]
    if kind == "exact_duplicate":
        return _doc(source["text"], meta["domain"], meta["language"], rng, duplicate_of=meta["url"])
    if kind == "near_duplicate":
        edit = rng.choice(NEAR_DUPLICATE_EDITS)
        text = _edit_words(source["text"], edit, rng)
        return _doc(text, meta["domain"], meta["language"], rng, duplicate_of=meta["url"], edit_fraction=edit)
    if kind == "url_copy":
        older = (datetime.date.fromisoformat(meta["date"]) - datetime.timedelta(days=rng.randint(1, 300))).isoformat()
        doc = _doc(_edit_words(source["text"], 0.02, rng), meta["domain"], meta["language"], rng)
        doc["metadata"].update(url=meta["url"], date=older)
        return doc
    if kind == "boilerplate":
        lines = rng.sample(BOILERPLATE, rng.randint(2, 4))
        text = "\n".join([lines[0], source["text"], *lines[1:]])
        return _doc(text, meta["domain"], meta["language"], rng, boilerplate_lines=lines)
    if kind == "spam":
        phrases = rng.sample(SPAM_PHRASES, 3)
        text = " ".join(rng.choice(phrases) for _ in range(rng.randint(60, 120))) + "."
        return _doc(text, "general", "en", rng)
    if kind == "dirty_words":
        words = [rng.choice(_listed(DIRTY_WORDS_FILE)) for _ in range(rng.randint(3, 8))]
        return _doc(_salt(source["text"], words, rng), meta["domain"], meta["language"], rng)
    if kind == "outlier_tokens":
        blob = rng.randbytes(rng.randint(600, 2000))
        text = base64.b64encode(blob).decode() if rng.random() < 0.5 else blob.hex(" ", 2)
        return _doc(text, rng.choice(("general", "code")), "en", rng)
    if kind == "word_salad":
        words = " ".join(d["text"] for d in rng.sample(clean, 3)).split()
        rng.shuffle(words)
        return _doc(" ".join(words[:200]), "general", "en", rng)
    if kind == "wrong_language":
        language = rng.choice(default.LANGUAGES)
        text = default._multilingual(rng, language).split("\n")
        text = " ".join(line.split(": ", 1)[-1] for line in text)  # no "English:" line to give it away
        return _doc(text, "general", "en", rng, actual_language=language)
    if kind == "pii":
        strings = _pii(rng)
        text = f"{source['text']}\nContact: {strings[0]}, server {strings[1]}, phone {strings[2]}."
        return _doc(text, meta["domain"], meta["language"], rng, pii=strings)
    if kind == "mixed_domain":  # math or code in general text: the domain tagger's case (their own pipelines)
        mixed = rng.choice(("math", "code"))
        codes = [d["text"] for d in clean if d["metadata"]["domain"] == "code"]
        inserted = default.word_problem(rng) if mixed == "math" else rng.choice(codes)[:600].rsplit("\n", 1)[0]
        text = f"{source['text']}\n\n{inserted}"
        return _doc(text, "general", "en", rng, mixed_in=mixed)
    if kind == "blocked_domain":
        doc = _doc(source["text"], meta["domain"], meta["language"], rng)
        doc["metadata"]["url"] = f"https://{rng.choice(_listed(BLOCKED_DOMAINS_FILE))}/page/{rng.randrange(10**6)}"
        return doc
    raise ValueError(f"unknown planted defect {kind!r}; have {sorted(PLANTED)}")


def make_raw_corpus(documents: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """The clean documents and the planted ones, shuffled, each with an id, a URL and a date."""
    rng = random.Random(f"raw:{seed}")
    planted_counts = {kind: max(1, round(share * documents)) for kind, share in PLANTED.items()}
    clean_count = documents - sum(planted_counts.values())
    carried = sum(planted_counts[kind] for kind in CARRIED)
    # Carriers come from the same stream, so they are distinct from every clean document and from each other.
    pool = clean_documents(clean_count + 2 * carried, rng)
    rng.shuffle(pool)
    clean, carriers = pool[:clean_count], pool[clean_count:]
    for i, doc in enumerate(clean):
        doc["metadata"]["url"] = f"https://{HOSTS[doc['metadata']['domain']]}/doc/{i}"
    planted = []
    for kind, count in planted_counts.items():
        for _ in range(count):
            doc = _plant(kind, clean, carriers, rng)
            doc["metadata"]["planted"] = kind
            planted.append(doc)
    docs = clean + planted
    rng.shuffle(docs)
    for i, doc in enumerate(docs):
        doc["id"] = f"raw-{seed}-{i:07d}"
        if not doc["metadata"]["url"]:
            host = HOSTS[doc["metadata"]["domain"]]
            doc["metadata"]["url"] = f"https://{host}/item/{i}"
    return docs


def write_raw_corpus(out: str | Path, documents: int = 2000, seed: int = 0, shards: int = 8) -> Path:
    """Write the default raw corpus to ``out`` as ``shards`` JSONL files (each atomically; several files let
    datatrove's tasks share the reading); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_raw_corpus(documents, seed)
    for shard in range(shards):
        part = rows[shard::shards]
        text = "".join(json.dumps({"text": d["text"], "id": d["id"], "metadata": d["metadata"]}) + "\n" for d in part)
        atomic_write_text(out / RAW_FILE.format(shard=shard), text)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: write the default raw corpus."""
    parser = argparse.ArgumentParser(prog="python -m data.curate.raw", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/data/raw")
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_raw_corpus(args.out, args.documents, args.seed)
    print(f"wrote {args.documents} documents under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
