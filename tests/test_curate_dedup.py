"""De-duplication stages (data/curate/dedup.py) run by datatrove's LocalPipelineExecutor on small JSONL corpora."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import TextNormConfig

from data import default
from data.curate.dedup import (
    LineDedupConfig,
    RegexWordTokenizer,
    doc_bucket,
    line_dedup_stages,
    minhash_config,
    minhash_stages,
    normalize_url,
    s_curve,
    s_curve_threshold,
    url_dedup_stages,
)

BOILERPLATE = (
    "Subscribe to our newsletter for weekly updates.",
    "Copyright 2024 Example Media Group. All rights reserved.",
    "We use cookies to improve your experience. Accept cookies to continue.",
    "Share this article: Facebook | Twitter | Email",
    "Read more stories like this on our homepage.",
)


# ---------------------------------------------------------------- helpers


def write_jsonl(folder: Path, docs: list[dict], files: int) -> None:
    """`docs` spread round-robin over `files` JSONL files (the reader shards by file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        with open(folder / f"part{i:02d}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs[i::files]:
                f.write(json.dumps(doc) + "\n")


def read_jsonl(folder: Path) -> dict[str, dict]:
    """Output documents by id."""
    docs = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            doc["metadata"].pop("file_path", None)  # the reader's source file differs between layouts
            docs[doc["id"]] = doc
    return docs


def run(stages: list[tuple[list, int]], logs: Path, workers: int = 1) -> None:
    """Run (pipeline, tasks) stages one after the other, as the curate command does."""
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs / f"{i}")).run()


def reader(folder: Path) -> JsonlReader:
    """A reader of the test corpus."""
    return JsonlReader(str(folder))


def writer(folder: Path) -> JsonlWriter:
    """A plain-JSONL writer, one file per task."""
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)


def general_text(rng: random.Random) -> str:
    """A clean general document of several scene paragraphs (the default corpus's long general documents)."""
    return "\n\n".join(default._describe(rng) for _ in range(rng.randint(2, 4)))


def math_text(rng: random.Random) -> str:
    """A clean math document of a few arithmetic problems."""
    return "\n\n".join(default.arithmetic_problem(rng) for _ in range(rng.randint(2, 4)))


def doc(doc_id: str, text: str, **metadata) -> dict:
    """A raw document in the curate metadata contract."""
    return {"id": doc_id, "text": text, "metadata": {"domain": "general", "language": "en", "planted": ""} | metadata}


# ---------------------------------------------------------------- URL de-duplication


def test_normalize_url_variants():
    same = [
        "https://www.Example.com:443/news/a/?utm_source=x&b=2&a=1#top",
        "http://example.com/news/a?a=1&b=2",
        "example.com/news/a/?b=2&a=1&utm_medium=mail&fbclid=123",
        "HTTP://WWW.EXAMPLE.COM:80/news/a?a=1&b=2",
    ]
    assert {normalize_url(u) for u in same} == {"example.com/news/a?a=1&b=2"}
    different = ["https://example.com/news/A", "https://example.com:8080/news/a", "https://example.com/news/a?page=2"]
    assert len({normalize_url(u) for u in [same[0], *different]}) == 4


def _url_variant(rng: random.Random, host: str, path: str, query: list[tuple[str, str]]) -> str:
    """One of the many spellings of the same page."""
    query = query + [("utm_source", rng.choice(["mail", "feed"]))] * rng.randint(0, 1)
    rng.shuffle(query)
    host = ("www." if rng.random() < 0.5 else "") + (host.upper() if rng.random() < 0.3 else host)
    port = rng.choice(["", "", ":443", ":80"])
    slash = "/" if rng.random() < 0.5 else ""
    fragment = "#comments" if rng.random() < 0.3 else ""
    qs = "&".join(f"{k}={v}" for k, v in query)
    return f"{rng.choice(['http', 'https'])}://{host}{port}{path}{slash}{'?' + qs if qs else ''}{fragment}"


def url_corpus(seed: int = 0) -> tuple[list[dict], set[str]]:
    """Pages crawled 1-4 times under varied URL spellings, plus url-less documents; and the ids to keep."""
    rng = random.Random(seed)
    docs, keep = [], set()
    for page in range(60):
        versions = rng.randint(1, 4)
        days = rng.sample(range(1000), versions)
        query = [("id", str(page))] if page % 3 == 0 else []
        ids = []
        for v, day in enumerate(days):
            url = _url_variant(rng, f"site{page % 7}.org", f"/p/{page}", list(query))
            when = (date(2022, 1, 1) + timedelta(days=day)).isoformat()
            ids.append((day, f"page{page}-v{v}"))
            docs.append(doc(ids[-1][1], general_text(rng), url=url, date=when, planted="url_copy" if v else ""))
        keep.add(max(ids)[1])
    # Same page, same date: one is kept, the same one whatever the layout.
    docs += [doc(f"tie-{i}", general_text(rng), url="https://tie.org/x", date="2023-05-05") for i in range(2)]
    # Distinct pages although close in spelling; and documents without a url.
    docs += [doc("case", "Upper case path.", url="https://site0.org/P/0", date="2020-01-01")]
    docs += [doc("port", "Other port.", url="https://site0.org:8080/p/0", date="2020-01-01")]
    docs += [doc(f"nourl-{i}", general_text(rng)) for i in range(5)]
    keep |= {"case", "port"} | {f"nourl-{i}" for i in range(5)}
    rng.shuffle(docs)
    return docs, keep


def url_dedup(tmp_path: Path, name: str, tasks: int, workers: int, finders: int) -> dict[str, dict]:
    """URL-dedup tmp_path/raw with `tasks` tasks and `finders` finder tasks; the output by id."""
    stages = url_dedup_stages(str(tmp_path / name / "work"), finder_workers=finders)
    out = tmp_path / name / "out"
    raw = tmp_path / "raw"
    plan = [([reader(raw), stages.signature], tasks), ([stages.find], finders)]
    run([*plan, ([reader(raw), stages.filter, writer(out)], tasks)], tmp_path / name / "logs", workers)
    return read_jsonl(out)


def test_url_dedup_keeps_latest_version_any_layout(tmp_path):
    docs, keep = url_corpus()
    write_jsonl(tmp_path / "raw", docs, files=4)
    one = url_dedup(tmp_path, "one", tasks=1, workers=1, finders=1)
    many = url_dedup(tmp_path, "many", tasks=3, workers=2, finders=2)
    assert one == many
    ties = {i for i in one if i.startswith("tie-")}
    assert len(ties) == 1
    assert set(one) - ties == keep


def test_resume_skips_completed_tasks(tmp_path):
    docs, _ = url_corpus(seed=1)
    write_jsonl(tmp_path / "raw", docs, files=3)
    first = url_dedup(tmp_path, "run", tasks=3, workers=1, finders=1)
    outputs = sorted((tmp_path / "run" / "out").glob("*.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in outputs]
    assert len(list((tmp_path / "run" / "logs" / "2" / "completions").iterdir())) == 3
    # A rerun finds every task complete: nothing is rewritten, not even from a changed input.
    write_jsonl(tmp_path / "raw", docs[:5], files=3)
    assert url_dedup(tmp_path, "run", tasks=3, workers=1, finders=1) == first
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    # Losing one task's marker and output reruns that task alone.
    write_jsonl(tmp_path / "raw", docs, files=3)
    (tmp_path / "run" / "logs" / "2" / "completions" / "00001").unlink()
    outputs[1].unlink()
    assert url_dedup(tmp_path, "run", tasks=3, workers=1, finders=1) == first
    assert [p.stat().st_mtime_ns for p in (outputs[0], outputs[2])] == [stamps[0], stamps[2]]


# ---------------------------------------------------------------- line de-duplication


def ids_in_bucket(bucket: int, buckets: int, count: int, prefix: str) -> list[str]:
    """`count` document ids that fall in `bucket`."""
    ids = (f"{prefix}-{i}" for i in range(10_000))
    return [i for i in ids if doc_bucket(i, buckets) == bucket][:count]


def line_dedup(tmp_path: Path, name: str, config: LineDedupConfig, tasks: int, workers: int) -> dict[str, dict]:
    """Line-dedup tmp_path/raw; the output by id."""
    stages = line_dedup_stages(str(tmp_path / name / "work"), config)
    out, raw = tmp_path / name / "out", tmp_path / "raw"
    plan = [([reader(raw), stages.count], tasks), ([stages.merge], min(tasks, config.num_buckets))]
    run([*plan, ([reader(raw), stages.filter, writer(out)], tasks)], tmp_path / name / "logs", workers)
    return read_jsonl(out)


def test_line_dedup_rule(tmp_path):
    config = LineDedupConfig(bucket_size=50, expected_documents=100)  # two buckets
    assert config.num_buckets == 2 and config.max_repeats == 6
    b0, b1 = ids_in_bucket(0, 2, 30, "a"), ids_in_bucket(1, 2, 30, "b")
    six, seven, split = "This line repeats six times.", "This line repeats seven times.", "Four per bucket."
    docs = [doc(i, f"Own line {i}.\n{six}\n\n   \n{seven}") for i in b0[:6]]
    docs += [doc(b0[6], f"  This line   repeats seven times.  \nOwn line {b0[6]}.")]  # same once normalised
    docs += [doc(b1[0], seven)]  # bucket 1: seven is rare there
    docs += [doc(i, f"{split}\nOwn line {i}.") for i in b0[7:11] + b1[1:5]]
    docs += [doc(i, f"{seven}\n\n{seven}") for i in b0[11:12]]  # left empty: dropped
    code = "def f():\n    return None\n"
    docs += [doc(i, code, domain="code") for i in b0[12:22]]  # code is not line-deduplicated
    write_jsonl(tmp_path / "raw", docs, files=2)
    out = line_dedup(tmp_path, "run", config, tasks=2, workers=1)
    assert b0[11] not in out and len(out) == len(docs) - 1
    for i in b0[:6]:
        assert out[i]["text"] == f"Own line {i}.\n{six}" and out[i]["metadata"]["lines_removed"] == 1
    assert out[b0[6]]["text"] == f"Own line {b0[6]}." and out[b1[0]]["text"] == seven
    assert all(out[i]["text"] == f"{split}\nOwn line {i}." for i in b0[7:11] + b1[1:5])
    assert all(out[i]["text"] == code and "lines_removed" not in out[i]["metadata"] for i in b0[12:22])


def boilerplate_corpus(count: int = 400, seed: int = 0) -> tuple[list[dict], int]:
    """Clean general and math documents, 40% with boilerplate lines planted; and the clean line count."""
    rng = random.Random(seed)
    docs, clean_lines = [], 0
    for i in range(count):
        domain = "general" if i % 2 else "math"
        text = general_text(rng) if domain == "general" else math_text(rng)
        clean_lines += sum(1 for line in text.split("\n") if line.strip())
        planted = ""
        if rng.random() < 0.4:
            planted = "boilerplate"
            head, tail = rng.sample(BOILERPLATE, rng.randint(0, 2)), rng.sample(BOILERPLATE, rng.randint(1, 2))
            text = "\n".join([*head, text, *tail])
        docs.append(doc(f"doc-{i}", text, domain=domain, planted=planted))
    return docs, clean_lines


def test_line_dedup_removes_boilerplate_not_clean_lines_any_layout(tmp_path):
    docs, clean_lines = boilerplate_corpus()
    write_jsonl(tmp_path / "raw", docs, files=4)
    config = LineDedupConfig(bucket_size=200, expected_documents=len(docs))
    one = line_dedup(tmp_path, "one", config, tasks=1, workers=1)
    many = line_dedup(tmp_path, "many", config, tasks=3, workers=2)
    assert one == many and len(one) == len(docs)
    lines = [line for d in one.values() for line in d["text"].split("\n") if line.strip()]
    planted = sum(1 for d in docs for line in d["text"].split("\n") if line in BOILERPLATE)
    boilerplate_left = sum(1 for line in lines if line in BOILERPLATE)
    clean_removed = clean_lines - (len(lines) - boilerplate_left)
    print(f"\nboilerplate removed {planted - boilerplate_left}/{planted}, clean removed {clean_removed}/{clean_lines}")
    assert planted > 200 and boilerplate_left <= 0.01 * planted
    assert 0 <= clean_removed <= 0.01 * clean_lines
    assert sum(d["metadata"]["lines_removed"] for d in one.values()) == planted - boilerplate_left + clean_removed


# ---------------------------------------------------------------- MinHash de-duplication


def test_s_curve():
    assert s_curve(0.0, 14, 8) == 0.0 and s_curve(1.0, 14, 8) == 1.0
    assert s_curve(0.8, 14, 8) == pytest.approx(0.9235, abs=1e-4)
    assert s_curve_threshold(14, 8) == pytest.approx(0.719, abs=1e-3)
    assert np.all(np.diff(s_curve(np.linspace(0, 1, 11), 14, 8)) >= 0)


def minhash(tmp_path: Path, name: str, config=None, tasks: int = 2) -> set[str]:
    """MinHash-dedup tmp_path/raw; the ids kept."""
    stages = minhash_stages(str(tmp_path / name / "work"), config)
    out, raw = tmp_path / name / "out", tmp_path / "raw"
    plan = [([reader(raw), stages.signature], tasks), ([stages.buckets], stages.buckets.config.num_buckets)]
    plan += [([stages.cluster], 1), ([reader(raw), stages.filter, writer(out)], tasks)]
    run(plan, tmp_path / name / "logs")
    return set(read_jsonl(out))


def shingle_set(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams, to aim an edit at a similarity (the measured one uses datatrove's own shingles)."""
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def similar_pair(rng: random.Random, target: float) -> tuple[str, str]:
    """Two documents of random words whose 5-gram Jaccard similarity is just under `target`."""
    word = lambda: "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=8))
    a = [word() for _ in range(rng.randint(120, 240))]
    b, base = list(a), shingle_set(a)
    for position in rng.sample(range(len(a)), len(a)):
        shingles = shingle_set(b)
        if len(base & shingles) / len(base | shingles) <= target:
            break
        if rng.random() < 0.8:
            b[position] = word()
        else:  # appended words move the similarity in finer steps than substitutions
            b.append(word())
    return " ".join(a), " ".join(b)


def test_minhash_recall_follows_s_curve(tmp_path):
    config = minhash_config()
    bands, rows = config.num_buckets, config.hashes_per_bucket
    rng = random.Random(0)
    shingler = MinhashDedupSignature(str(tmp_path / "unused"), config, language=RegexWordTokenizer())
    pairs, docs = [], []
    for p in range(1400):
        a, b = similar_pair(rng, rng.uniform(0.35, 1.0))
        sa, sb = (set(shingler.get_shingles(t).ravel().tolist()) for t in (a, b))
        pairs.append(len(sa & sb) / len(sa | sb))
        docs += [doc(f"p{p}a", a), doc(f"p{p}b", b)]
    write_jsonl(tmp_path / "raw", docs, files=2)
    kept = minhash(tmp_path, "run", config)
    caught = np.array([(f"p{p}a" in kept) + (f"p{p}b" in kept) for p in range(len(pairs))])
    assert set(caught.tolist()) <= {1, 2}  # a pair never loses both documents
    similarity, caught = np.array(pairs), caught == 1
    print(f"\n{bands} bands x {rows} rows, 5-grams\n  Jaccard   pairs  recall  S-curve")
    for low in np.arange(0.3, 1.0, 0.1):
        in_bin = (similarity >= low) & (similarity < low + 0.1 if low < 0.85 else similarity <= 1.0)
        expected = float(np.mean(s_curve(similarity[in_bin], bands, rows))) if in_bin.any() else float("nan")
        recall = float(caught[in_bin].mean()) if in_bin.any() else float("nan")
        print(f"  {low:.1f}-{low + 0.1:.1f}  {int(in_bin.sum()):5d}  {recall:6.3f}  {expected:6.3f}")
        if in_bin.sum() >= 50:
            assert abs(recall - expected) <= 0.1, (low, recall, expected)


def clean_corpus(seed: int = 0) -> list[dict]:
    """Distinct clean documents: one-problem arithmetic ones (differing only in numbers), the default corpus's math
    documents (word and arithmetic problems), long general ones."""
    rng = random.Random(seed)
    texts = {default.arithmetic_problem(rng): "math" for _ in range(300)}
    texts |= {default._math(rng): "math" for _ in range(200)}
    texts |= {general_text(rng): "general" for _ in range(150)}
    return [doc(f"clean-{i}", text, domain=domain) for i, (text, domain) in enumerate(texts.items())]


def test_minhash_keeps_clean_documents_and_their_numbers(tmp_path):
    rng = random.Random(1)
    clean = clean_corpus()
    near = []
    for original in rng.sample([d for d in clean if d["metadata"]["domain"] == "general"], 40):
        words = original["text"].split(" ")
        words[rng.randrange(len(words))] = "zebra"  # one word changed: a near duplicate
        near.append(doc(original["id"] + "-copy", " ".join(words), planted="near_duplicate"))
    write_jsonl(tmp_path / "raw", clean + near, files=2)
    kept = minhash(tmp_path, "ours")
    copied = {d["id"].removesuffix("-copy") for d in near}
    assert {d["id"] for d in clean if d["id"] not in copied} <= kept  # no clean document removed
    assert all((i in kept) + (f"{i}-copy" in kept) == 1 for i in copied)  # each near duplicate caught
    # datatrove's default text normalisation turns every digit run into 0: problems then look identical.
    numbers_normalised = dataclasses.replace(minhash_config(), norm_config=TextNormConfig())
    kept_default = minhash(tmp_path, "default", numbers_normalised)
    arithmetic = [d["id"] for d in clean if d["text"].startswith("Question: What is") and "\n\n" not in d["text"]]
    lost = sum(1 for i in arithmetic if i not in kept_default)
    print(f"\nnumbers normalised: {lost}/{len(arithmetic)} one-problem arithmetic documents removed; ours: 0")
    assert lost > 0.9 * len(arithmetic) - 4  # all but one per operation (4 operations)


def test_minhash_deduplicates_within_each_language(tmp_path):
    """Copies in one language are near-duplicates; the same text labelled with another language is not (the
    paper de-duplicates within each language), and copies of a caption too short for a 5-gram still meet."""
    rng = random.Random(5)
    text = general_text(rng)
    docs = [
        doc("en-a", text),
        doc("en-b", text),
        doc("fr-a", text, language="fr"),
        doc("short-a", "A red circle."),
        doc("short-b", "A red circle."),
        doc("short-c", "A blue circle."),
    ]
    write_jsonl(tmp_path / "in", docs, files=2)
    stages = minhash_stages(str(tmp_path / "work"), minhash_config())
    run(
        [
            ([reader(tmp_path / "in"), stages.signature], 2),
            ([stages.buckets], minhash_config().num_buckets),
            ([stages.cluster], 1),
            ([reader(tmp_path / "in"), stages.filter, writer(tmp_path / "out")], 2),
        ],
        tmp_path / "logs",
    )
    kept = set(read_jsonl(tmp_path / "out"))
    assert "fr-a" in kept and "short-c" in kept
    assert len(kept & {"en-a", "en-b"}) == 1 and len(kept & {"short-a", "short-b"}) == 1
