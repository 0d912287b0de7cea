"""The curation report: what each step kept and removed, and why, measured on the planted defects where known.

``write_report(source, out)`` reads the run's datatrove stats (``logs/<stage>/stats.json``), the documents each
filter removed (``removed/<step>/``) and the curated ones (``curated/``), and writes ``report.json``, ``funnel.png``
(documents left after each step) and ``scores.png`` (the filters' score distributions with their thresholds).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

# Planted defects that make a whole document bad (duplicates are scored as groups, boilerplate and PII per line).
BAD_DOCUMENTS = ("url_copy", "blocked_domain", "wrong_language", "spam", "dirty_words", "outlier_tokens", "word_salad")
DUPLICATES = ("exact_duplicate", "near_duplicate")
REMOVING_STEPS = ("url_dedup", "blocked_domains", "language", "repeated_ngrams", "dirty_words", "token_kl", "quality")


def read_documents(folder: Path) -> list[dict[str, Any]]:
    """Every JSONL document under ``folder`` (none when it does not exist)."""
    docs = []
    for path in sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []:
        with open(path, encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f if line.strip())
    return docs


def _stage_stats(out: Path) -> dict[str, list[dict]]:
    stats = {}
    for path in sorted((out / "logs").glob("*/stats.json")):
        stats[path.parent.name] = json.loads(path.read_text())
    return stats


def _reasons(stats: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Each step's datatrove counters of dropped documents, by reason."""
    reasons = {}
    for stage in stats.values():
        for step in stage:
            # A plain count in the local executor's stats.json, a summary ({"total": ...}) in merge_stats's (Slurm).
            counts = {k: v["total"] if isinstance(v, dict) else v for k, v in step.get("stats", {}).items()}
            dropped = {k: v for k, v in counts.items() if k.startswith("dropped")}
            if dropped:
                reasons[step["name"]] = dropped
    return reasons


def _timings(stats: dict[str, list[dict]]) -> dict[str, float]:
    """Seconds spent in each step, summed over tasks, by step name."""
    seconds: Counter = Counter()
    for stage in stats.values():
        for step in stage:
            spent = step.get("time_stats", 0.0)  # a summary dict, or a plain number for steps that did no work
            seconds[step["name"]] += spent.get("total", 0.0) if isinstance(spent, dict) else float(spent)
    return {name: round(value, 3) for name, value in seconds.items()}


def _planted_scores(source_docs: list[dict], removed: dict[str, list[dict]], curated: list[dict]) -> dict:
    """Recall of each planted defect (and the steps that caught it), precision of each step, the clean documents
    each step lost, and the duplicate groups, boilerplate lines and PII left."""
    planted = Counter(d["metadata"].get("planted") or "clean" for d in source_docs)
    result: dict[str, Any] = {"planted": dict(planted), "recall": {}, "precision": {}, "clean_removed": {}}
    for kind in BAD_DOCUMENTS:
        if planted[kind]:
            caught = {step: sum(d["metadata"].get("planted") == kind for d in docs) for step, docs in removed.items()}
            caught = {step: n for step, n in caught.items() if n}
            result["recall"][kind] = {"recall": sum(caught.values()) / planted[kind], "caught_by": caught}
    groups = _duplicate_groups(source_docs)
    for step, docs in removed.items():
        if docs:  # a removed copy, or a removed original of a planted copy, is a duplicate rightly removed
            right = sum(bool(d["metadata"].get("planted")) or d["metadata"]["url"] in groups for d in docs)
            result["precision"][step] = right / len(docs)
    clean_by_domain = Counter(d["metadata"]["domain"] for d in source_docs if not d["metadata"].get("planted"))
    for step, docs in removed.items():
        lost = Counter(
            d["metadata"]["domain"]
            for d in docs
            if not d["metadata"].get("planted") and d["metadata"]["url"] not in groups
        )
        result["clean_removed"][step] = {
            domain: {"removed": lost[domain], "share": lost[domain] / count}
            for domain, count in clean_by_domain.items()
        }
    result["duplicates"] = _duplicate_scores(groups, {d["id"] for d in curated})
    tagged = [d for d in curated if "domain_mixed" in d["metadata"]]
    if tagged:  # the domain tagger on general text with math or code inside, and on clean documents
        mixed = [d["metadata"]["domain_mixed"] for d in tagged if d["metadata"].get("planted") == "mixed_domain"]
        clean = Counter(d["metadata"]["domain"] for d in tagged if not d["metadata"].get("planted"))
        flagged = Counter(
            d["metadata"]["domain"]
            for d in tagged
            if not d["metadata"].get("planted") and d["metadata"]["domain_mixed"]
        )
        result["mixed_domain"] = {
            "planted_kept": len(mixed),
            "flagged": sum(mixed) / max(len(mixed), 1),
            "clean_flagged": {domain: flagged[domain] / count for domain, count in clean.items()},
        }
    result["line_dedup"] = _line_scores(source_docs, curated)
    result["pii"] = _pii_scores(source_docs, curated)
    return result


def _duplicate_groups(source_docs: list[dict]) -> dict[str, list[dict]]:
    """Each planted duplicate's group, keyed by its original's URL: the original first, then its copies."""
    by_url = {d["metadata"]["url"]: d for d in source_docs if not d["metadata"].get("planted")}
    groups: dict[str, list[dict]] = {}
    for doc in source_docs:
        original = doc["metadata"].get("duplicate_of")
        if doc["metadata"].get("planted") in DUPLICATES and original in by_url:
            groups.setdefault(original, [by_url[original]]).append(doc)
    return groups


def _duplicate_scores(groups: dict[str, list[dict]], kept: set[str]) -> dict[str, Any]:
    """The share of (original, copy) pairs left with at most one document, for exact copies and per edit share."""
    outcome: dict[str, list[bool]] = {}
    for members in groups.values():
        for copy in members[1:]:
            kind = copy["metadata"]["planted"]
            key = kind if kind == "exact_duplicate" else f"near_duplicate@{copy['metadata']['edit_fraction']}"
            outcome.setdefault(key, []).append(sum(m["id"] in kept for m in (members[0], copy)) <= 1)
    return {key: {"pairs": len(v), "deduplicated": sum(v) / len(v)} for key, v in sorted(outcome.items())}


def _line_scores(source_docs: list[dict], curated: list[dict]) -> dict[str, Any]:
    """Planted boilerplate lines gone from the curated documents, and clean lines lost, among the documents kept."""
    kept = {d["id"]: d["text"] for d in curated}
    planted_lines = planted_left = clean_lines = clean_left = 0
    for doc in source_docs:
        if doc["id"] not in kept:
            continue
        final = {line.strip() for line in kept[doc["id"]].split("\n")}
        boilerplate = set(doc["metadata"].get("boilerplate_lines") or ())
        for line in (line.strip() for line in doc["text"].split("\n") if line.strip()):
            if line in boilerplate:
                planted_lines += 1
                planted_left += line in final
            elif doc["metadata"].get("planted") in ("", "boilerplate", "pii"):
                clean_lines += 1
                clean_left += line in final or doc["metadata"].get("planted") == "pii"
    return {
        "boilerplate_lines": planted_lines,
        "boilerplate_removed": (planted_lines - planted_left) / max(planted_lines, 1),
        "clean_lines": clean_lines,
        "clean_removed": (clean_lines - clean_left) / max(clean_lines, 1),
    }


def _pii_scores(source_docs: list[dict], curated: list[dict]) -> dict[str, Any]:
    """How many planted e-mails, IP addresses and phone numbers are left in the curated documents."""
    kept = {d["id"]: d["text"] for d in curated}
    planted = left = 0
    for doc in source_docs:
        for value in doc["metadata"].get("pii") or ():
            if doc["id"] in kept:
                planted += 1
                left += value in kept[doc["id"]]
    return {"planted_in_kept_documents": planted, "left": left}


def _funnel(total: int, removed: dict[str, list[dict]], line_dropped: int, kept: int) -> list[dict[str, Any]]:
    """Documents left after each step, in pipeline order."""
    rows, left = [{"step": "input", "documents": total}], total
    for step in REMOVING_STEPS:
        left -= len(removed.get(step, []))
        rows.append({"step": step, "removed": len(removed.get(step, [])), "documents": left})
    left -= line_dropped
    rows.append({"step": "line_dedup", "removed": line_dropped, "documents": left})
    rows.append({"step": "minhash", "removed": len(removed.get("minhash", [])), "documents": kept})
    return rows


def plot_report(
    report: dict[str, Any], scores: dict[str, list[float]], out: Path, thresholds: dict[str, list[float]]
) -> None:
    """funnel.png and scores.png (each score's distribution over the documents the filters saw, its thresholds
    drawn as lines: one per domain where they differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    funnel = report["funnel"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([row["step"] for row in funnel][::-1], [row["documents"] for row in funnel][::-1], color="tab:blue")
    for i, row in enumerate(funnel[::-1]):
        ax.text(row["documents"], i, f" {row['documents']}", va="center", fontsize=8)
    ax.set_xlabel("documents left")
    ax.set_title("Curation funnel")
    fig.tight_layout()
    fig.savefig(out / "funnel.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, max(len(scores), 1), figsize=(4 * max(len(scores), 1), 3.2))
    for ax, (name, values) in zip(list(getattr(axes, "flat", [axes])), scores.items(), strict=False):
        ax.hist(values, bins=40, color="tab:gray")
        for limit in thresholds.get(name, ()):
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)


SCORE_KEYS = (
    "token_kl",
    "token_bigram_kl",
    "byte_kl",
    "dup_ngram_frac",
    "language_score",
    "quality_ngram",
    "quality_transformer",
)


def write_report(source: Any, out: str | Path, thresholds: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Write ``report.json``, ``funnel.png`` and ``scores.png`` under ``out`` for the input read by the datatrove
    reader ``source`` (``thresholds``: the lines to draw on each score's histogram); returns the report."""
    out = Path(out)
    source_docs = [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in source()]
    removed = {step: read_documents(out / "removed" / step) for step in (*REMOVING_STEPS, "minhash")}
    curated = read_documents(out / "curated")
    after_lines = read_documents(out / "work" / "lines")
    after_filters = len(read_documents(out / "work" / "filtered"))
    stats = _stage_stats(out)
    report: dict[str, Any] = {
        "input_documents": len(source_docs),
        "input_bytes": sum(len(d["text"].encode()) for d in source_docs),
        # Input lines skipped as malformed (run.on_bad_line = "skip"), per file: counted by the JSONL reader as it
        # read them just now; other formats have no lines to skip.
        "malformed_lines": dict(sorted(getattr(source, "malformed", {}).items())),
        "curated_documents": len(curated),
        "curated_bytes": sum(len(d["text"].encode()) for d in curated),
        "funnel": _funnel(len(source_docs), removed, after_filters - len(after_lines), len(curated)),
        "removed_bytes": {step: sum(len(d["text"].encode()) for d in docs) for step, docs in removed.items()},
        "reasons": _reasons(stats),
        "curated_by_language": dict(Counter(d["metadata"].get("language", "?") for d in curated)),
        "curated_by_domain": dict(Counter(d["metadata"].get("domain", "?") for d in curated)),
        "seconds_per_step": _timings(stats),
    }
    if any("planted" in d["metadata"] for d in source_docs):
        report["planted"] = _planted_scores(source_docs, removed, curated)
    everything = [*after_lines, *(d for docs in removed.values() for d in docs)]
    scores = {
        key: [float(d["metadata"][key]) for d in everything if isinstance(d["metadata"].get(key), (int, float))]
        for key in SCORE_KEYS
    }
    plot_report(report, {k: v for k, v in scores.items() if v}, out, thresholds or {})
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
