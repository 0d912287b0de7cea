"""The embedded default corpus: builds offline, deterministic, four sources, safe to ensure from several processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from data.default import DEFAULT_WEIGHTS, build_default_corpus, ensure_default_corpus
from data.loader import PackedLoader
from data.shards import DataError, iter_tar_documents, read_manifest
from lm import Tokenizer

SCALE = 0.02


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "corpus"
    build_default_corpus(out, seed=0, scale=SCALE, workers=1)
    return out


def first_text(directory: Path, tok: Tokenizer, docs: int = 3) -> str:
    shard = read_manifest(directory)["shards"][0]["file"]
    texts = []
    for _, tokens in iter_tar_documents(directory / shard):
        texts.append(tok.decode(tokens.tolist()))
        if len(texts) == docs:
            break
    return "\n".join(texts)


def test_sources_and_content(corpus):
    tok = Tokenizer()
    assert sorted(p.name for p in corpus.iterdir()) == sorted([*DEFAULT_WEIGHTS, "mixture.json"])
    general = first_text(corpus / "general", tok)
    assert general.startswith("<|begin_of_text|>") and "<|end_of_text|>" in general
    assert any(
        f"{c} {s}" in general
        for c in ("red", "green", "blue", "yellow", "purple", "orange")
        for s in ("circle", "square", "triangle", "star")
    )
    assert "The answer is" in first_text(corpus / "math", tok)
    assert "def " in first_text(corpus / "code", tok, docs=10) or "import " in first_text(corpus / "code", tok)
    multilingual = first_text(corpus / "multilingual", tok, docs=10)
    assert any(word in multilingual for word in ("cercle", "Kreis", "círculo", "cerchio", "carré", "Quadrat"))
    for name in DEFAULT_WEIGHTS:
        manifest = read_manifest(corpus / name)
        assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["documents"] > 5


def test_general_source_has_one_sentence_captions(corpus):
    """About half the general documents are a caption sentence alone, so the LM learns that text may end there."""
    from data.default import SHORT_DOCUMENTS

    tok = Tokenizer()
    shard = read_manifest(corpus / "general")["shards"][0]["file"]
    texts = [tok.decode(tokens.tolist()) for _, tokens in iter_tar_documents(corpus / "general" / shard)]
    one = [
        t for t in texts if t.count(".") == 1 and t.endswith(".<|end_of_text|>") and t.split()[1] in ("small", "large")
    ]
    assert len(texts) > 20 and abs(len(one) / len(texts) - SHORT_DOCUMENTS) < 0.15, (len(one), len(texts))


def test_deterministic(corpus, tmp_path):
    again = build_default_corpus(tmp_path / "again", seed=0, scale=SCALE, workers=1)
    for name in DEFAULT_WEIGHTS:
        for path in sorted((corpus / name).iterdir()):
            assert path.read_bytes() == (again.sources[name] / path.name).read_bytes(), f"{name}/{path.name}"
    other = build_default_corpus(tmp_path / "other", seed=1, scale=SCALE, workers=1)
    assert (other.sources["math"] / "shard-000000.tar").read_bytes() != (
        corpus / "math" / "shard-000000.tar"
    ).read_bytes()


def test_loader_reads_the_default_mixture(corpus):
    mixture = ensure_default_corpus(corpus)  # already built: reused
    assert mixture.weights == DEFAULT_WEIGHTS and mixture.anneal_weights is not None
    loader = PackedLoader(
        mixture, seq_len=64, batch_size=8, tokenizer_sha256=Tokenizer().sha256, total_steps=50, num_workers=2
    )
    it = iter(loader)
    for _ in range(50):
        batch = next(it)
    it.close()
    assert batch.tokens.max() < 128256
    assert loader.stats()["phase"] == "anneal"
    assert set(loader.stats()["source_rows"]) == set(DEFAULT_WEIGHTS)


def _ensure(directory: str, queue) -> None:
    mixture = ensure_default_corpus(directory, scale=SCALE / 4)
    queue.put(sorted(mixture.names))


def test_ensure_is_safe_from_two_processes(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path / "shared"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert queue.get(timeout=5) == queue.get(timeout=5) == sorted(DEFAULT_WEIGHTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no staging or lock left behind


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        build_default_corpus(tmp_path / "x", scale=SCALE)
    with pytest.raises(DataError, match="holds no default corpus"):
        build_default_corpus(tmp_path / "x", scale=SCALE, overwrite=True)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_command_is_idempotent_and_overwrites_only_its_own_corpus(tmp_path, capsys):
    """The README's `python -m data.default --out DIR`: rerun over its own corpus is up to date (exit 0); other
    settings need --overwrite, which rebuilds it."""
    from data.default import built_with, main

    out = tmp_path / "text"
    argv = ["--out", str(out), "--scale", str(SCALE), "--workers", "1"]
    assert main(argv) == 0
    stamp = (out / "mixture.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "mixture.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert main([*argv, "--seed", "1"]) == 2
    assert "--overwrite rebuilds it" in capsys.readouterr().err
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert built_with(out) == {"seed": 1, "scale": SCALE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # nothing left aside
