"""The curation pipeline: datatrove stages from raw documents to curated JSONL shards, and its report.

    python -m data.curate --input RAW --output DIR [--config configs/curate/default.toml] \
        [--executor local|slurm] [--tasks N] [--workers N] [--section.key=value ...]

The input is JSONL, Parquet, WARC (the main text of HTML pages) or plain-text files, read by data.curate.readers.
Stages (each one datatrove executor; a stage starts when the one before has finished):

1. URL de-duplication signatures; 2. the URLs' latest versions;
3. URL filter, block-listed domains, language ID, repeated n-grams, dirty words, token-distribution KL, PII ->
   ``work/filtered``;
4-6. line de-duplication (count per bucket, merge, filter) -> ``work/lines``;
7-10. MinHash de-duplication (signatures, buckets, clusters, filter) -> ``curated/``, JSONL shards that
   ``python -m data.prepare text --input DIR/curated`` takes as they are.

Every filter writes what it removes under ``removed/<step>/``; ``report.json`` gives the documents and bytes kept
and removed per step and reason, per language and domain, with timings, and (when the input says what each
document is, as the default raw corpus does) each step's precision and recall on the planted defects;
``funnel.png`` and ``scores.png`` draw them. datatrove's completion markers make an interrupted run resume: a
finished task is never redone.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from common.config import Fraction, PositiveInt, load_config
from data.curate.readers import OnBadLine, input_files, input_reader


@dataclass
class RunConfig:
    """Where and how the stages run."""

    executor: Literal["local", "slurm"] = "local"
    tasks: PositiveInt = 4
    workers: PositiveInt = 2
    # A JSONL input line that is not a JSON document: "fail" stops the run naming its file and line, "skip" skips
    # it and counts it per file in report.json's malformed_lines.
    on_bad_line: OnBadLine = "fail"
    # Slurm only: the partition, QOS and time limit of each stage's array job ("" = the cluster's default).
    partition: str = ""
    qos: str = ""
    time: str = "04:00:00"


@dataclass
class FilterConfig:
    """The filters' settings (per domain where the step takes a table)."""

    languages: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "it"])
    # lid.176 scores a one-line caption low (0.16-0.5 for clean English ones): the source's language is evidence.
    min_language_score: Fraction = 0.1
    # Drop a document whose detected language is clearly not its source's.
    drop_wrong_language: bool = True
    dirty_words_file: str = ""  # "" = data/curate/lists/dirty_words.txt
    blocked_domains_file: str = ""  # "" = data/curate/lists/blocked_domains.txt
    # Documents sampled from the input to estimate the corpus's token distribution for the KL filter.
    kl_reference_documents: PositiveInt = 2000
    # Trained quality and domain classifiers (python -m data.curate.classifiers); "" = no model-based filter.
    classifiers: str = ""
    quality_kind: Literal["ngram", "transformer"] = "ngram"  # fastText-style | the DistilRoBERTa stand-in
    quality_threshold: Fraction = 0.5
    # Code has its own pipeline in the paper: the web-text quality classifier judges the other domains.
    quality_domains: list[str] = field(default_factory=lambda: ["general", "math", "multilingual"])


@dataclass
class DedupConfig:
    """De-duplication settings."""

    line_max_repeats: PositiveInt = 6
    line_bucket_size: PositiveInt = 30_000_000
    line_skip_domains: list[str] = field(default_factory=lambda: ["code"])
    minhash_bands: PositiveInt = 14
    minhash_rows: PositiveInt = 8
    minhash_ngrams: PositiveInt = 5


@dataclass
class CurateConfig:
    """Root config of ``python -m data.curate``."""

    run: RunConfig = field(default_factory=RunConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def load_curate_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurateConfig:
    """The config of a TOML file (sections run, filters, dedup) with ``--section.key=value`` overrides applied."""
    return load_config(CurateConfig, path, list(overrides))


def _writer(folder: Path, per_shard: bool = False) -> Any:
    """A JSONL writer (uncompressed: data.prepare reads it as it is), one file per task or per input shard."""
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(
        str(folder), output_filename="${shard}.jsonl" if per_shard else "${rank}.jsonl", compression=None
    )


def shard_tagger() -> Any:
    """A step naming each document's input file in ``metadata["shard"]`` (the writers' per-shard file name)."""
    from datatrove.pipeline.base import PipelineStep

    class ShardTag(PipelineStep):
        """Keeps, through every stage, which input file a document came from."""

        name = "🏷 Shard"

        def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
            for doc in data:
                name = Path(doc.metadata.get("file_path", "input")).name
                doc.metadata.setdefault("shard", name.split(".")[0])
                yield doc

    return ShardTag()


def build_stages(source: Path, out: Path, config: CurateConfig) -> list[tuple[str, list, int]]:
    """The stages in order, each as (name, datatrove pipeline, tasks)."""
    from data.curate import dedup, filters

    tasks, work, removed = config.run.tasks, out / "work", out / "removed"
    f, d = config.filters, config.dedup
    url = dedup.url_dedup_stages(str(work / "url"), exclusion_writer=_writer(removed / "url_dedup"))
    lines = dedup.line_dedup_stages(
        str(work / "lines"),
        dedup.LineDedupConfig(
            max_repeats=d.line_max_repeats, bucket_size=d.line_bucket_size, skip_domains=tuple(d.line_skip_domains)
        ),
    )
    minhash = dedup.minhash_stages(
        str(work / "minhash"),
        dedup.minhash_config(bands=d.minhash_bands, rows=d.minhash_rows, n_grams=d.minhash_ngrams),
        exclusion_writer=_writer(removed / "minhash"),
    )
    steps = [
        url.filter,
        filters.BlockedDomainFilter(
            f.blocked_domains_file or filters.BLOCKED_DOMAINS_FILE,
            exclusion_writer=_writer(removed / "blocked_domains"),
        ),
        filters.LanguageIDFilter(
            languages=f.languages,
            min_score=f.min_language_score,
            drop_mismatched=f.drop_wrong_language,
            exclusion_writer=_writer(removed / "language"),
        ),
        filters.RepeatedNGramFilter(exclusion_writer=_writer(removed / "repeated_ngrams")),
        filters.DirtyWordsFilter(
            f.dirty_words_file or filters.DIRTY_WORDS_FILE, exclusion_writer=_writer(removed / "dirty_words")
        ),
        filters.TokenKLFilter(work / "token_distribution.npz", exclusion_writer=_writer(removed / "token_kl")),
        *_classifier_steps(f, removed),
        # One replacement each: datatrove cycles through several in the order a task meets them, which would make
        # a document's text depend on the number of tasks.
        filters.PIIRedactor(
            email_replacement="email@example.com", ip_replacement="22.214.171.124", phone_replacement="+1 201 555 0100"
        ),
    ]
    read = lambda: input_reader(source, config.run.on_bad_line)  # noqa: E731 - each stage needs its own reader
    # Every file after the filters holds one input shard's documents in input order, and MinHash runs one task per
    # shard: datatrove keeps the first copy of a cluster by (task, position), which then names the same document
    # whatever the number of tasks before.
    shards = max(1, len(input_files(source)))
    return [
        ("url_signature", [read(), url.signature], tasks),
        ("url_find", [url.find], 1),
        ("filter", [read(), shard_tagger(), *steps, _writer(work / "filtered", per_shard=True)], tasks),
        ("line_count", [input_reader(work / "filtered"), lines.count], tasks),
        ("line_merge", [lines.merge], 1),
        (
            "line_filter",
            [input_reader(work / "filtered"), lines.filter, _writer(work / "lines", per_shard=True)],
            tasks,
        ),
        ("minhash_signature", [input_reader(work / "lines"), minhash.signature], shards),
        ("minhash_buckets", [minhash.buckets], d.minhash_bands),
        ("minhash_cluster", [minhash.cluster], 1),
        ("minhash_filter", [input_reader(work / "lines"), minhash.filter, _writer(out / "curated", True)], shards),
    ]


def _classifier_steps(f: FilterConfig, removed: Path) -> list:
    """The model-based quality filter and the domain tagger, when trained classifiers are given."""
    if not f.classifiers:
        return []
    from data.curate.classifiers import DomainClassifierTagger, QualityClassifierFilter

    return [
        QualityClassifierFilter(
            f.classifiers,
            f.quality_kind,
            f.quality_threshold,
            domains=f.quality_domains,
            exclusion_writer=_writer(removed / "quality"),
        ),
        DomainClassifierTagger(f.classifiers, f.quality_kind),
    ]


def _thresholds(config: CurateConfig) -> dict[str, list[float]]:
    """The limits each score is judged against (per domain where they differ), for the report's plot."""
    from data.curate.filters import DEFAULT_MAX_BIGRAM_KL, DEFAULT_MAX_BYTE_KL, DEFAULT_MAX_KL

    def distinct(table: dict[str, float | None]) -> list[float]:
        return sorted({value for value in table.values() if value is not None})

    f = config.filters
    return {
        "token_kl": distinct(DEFAULT_MAX_KL),
        "token_bigram_kl": distinct(DEFAULT_MAX_BIGRAM_KL),
        "byte_kl": distinct(DEFAULT_MAX_BYTE_KL),
        "language_score": [f.min_language_score],
        f"quality_{f.quality_kind}": [f.quality_threshold],
    }


def fit_kl_reference(source: Path, out: Path, config: CurateConfig) -> Path:
    """The corpus's token distribution, estimated from the input's first ``filters.kl_reference_documents``."""
    from itertools import islice

    from data.curate.filters import fit_token_distribution

    path = out / "work" / "token_distribution.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        documents = input_reader(source, config.run.on_bad_line)()
        fit_token_distribution(islice(documents, config.filters.kl_reference_documents), path)
    return path


def _executor(name: str, pipeline: list, tasks: int, config: CurateConfig, out: Path, depends: Any) -> Any:
    logs = str(out / "logs" / name)
    if config.run.executor == "slurm":
        return CurateSlurmExecutor(
            pipeline=pipeline,
            tasks=tasks,
            time=config.run.time,
            partition=config.run.partition,
            qos=config.run.qos,
            job_name=f"curate_{name}",
            logging_dir=logs,
            depends=depends,
            # A job's shell need not have this environment activated: datatrove's launch_pickled_pipeline and
            # merge_stats are console scripts beside this interpreter.
            env_command=f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        )
    workers = min(config.run.workers, tasks)
    return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=logs, depends=depends)


class CurateSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, leaving the partition to the cluster's default when none is named (datatrove
    would write a bare ``#SBATCH --partition``, which sbatch refuses)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        """datatrove's sbatch directives, less an empty partition."""
        args = super().get_sbatch_args(max_array)
        if not self.partition:
            del args["partition"]
        return args


def run_pipeline(source: str | Path, out: str | Path, config: CurateConfig) -> dict[str, Any] | None:
    """Run every stage (resuming finished tasks); returns the report (None when the stages went to Slurm)."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"--input {source}: no such file or directory")
    fit_kl_reference(source, out, config)
    previous = None
    for name, pipeline, tasks in build_stages(source, out, config):
        previous = _executor(name, pipeline, tasks, config, out, previous)
        if config.run.executor == "local":
            previous.run()
    if config.run.executor == "slurm":
        previous.run()  # submits the whole chain: each stage's job depends on the one before
        return None
    from data.curate.report import write_report

    return write_report(input_reader(source, config.run.on_bad_line), out, _thresholds(config))
