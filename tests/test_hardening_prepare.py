"""data.prepare hardening: --overwrite replaces only a corpus it made, never its inputs; overlong documents are
refused (naming file and line) or skipped and counted, never read whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.prepare import DocumentLimit, main, prepare_text
from data.shards import DataError, read_manifest


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    return folder


def _prepare(inputs, output, **kwargs) -> dict:
    return prepare_text(inputs, output, workers=1, progress=False, **kwargs)


def test_overwrite_replaces_a_corpus_it_made(corpus, tmp_path):
    _prepare([corpus], tmp_path / "out")
    (tmp_path / "out.old").mkdir()  # the user's: moving the old corpus aside must not take this name
    (tmp_path / "out.old" / "keep.txt").write_text("mine")
    manifest = _prepare([corpus / "a.jsonl"], tmp_path / "out", overwrite=True)
    assert read_manifest(tmp_path / "out")["documents"] == manifest["documents"] == 5
    assert (tmp_path / "out.old" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "out.old"]  # nothing left aside


def test_overwrite_refuses_a_directory_holding_anything_else(corpus, tmp_path):
    _prepare([corpus], tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out/notes\.txt is not one of the files data\.prepare wrote"):
        _prepare([corpus], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match=r"home: --overwrite replaces only a directory data\.prepare made"):
        _prepare([corpus], tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").exists()


def test_overwrite_never_replaces_a_directory_holding_the_inputs(corpus, tmp_path, capsys):
    _prepare([corpus], corpus / "tokens")
    for output in (corpus, tmp_path):  # the inputs' folder and one above it
        with pytest.raises(DataError, match=f"{output}: holds the input {corpus / 'a.jsonl'}"):
            _prepare([corpus / "a.jsonl"], output, overwrite=True)
    assert main(["text", "--input", str(corpus / "a.jsonl"), "--output", str(corpus), "--overwrite", "--quiet"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert (corpus / "a.jsonl").is_file()


def test_an_overlong_jsonl_line_is_refused_naming_file_and_line_or_skipped_and_counted(corpus, tmp_path, capsys):
    path = corpus / "a.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"text": "x" * 5000}) + "\n" + json.dumps({"text": "after the long one"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:6: document longer than 1000 bytes"):
        _prepare([path], tmp_path / "out", limit=DocumentLimit(max_bytes=1000))
    manifest = _prepare([path], tmp_path / "out", limit=DocumentLimit(max_bytes=1000, skip=True))
    assert manifest["documents"] == 6 and manifest["skipped_long"] == 1
    assert manifest["inputs"][0]["skipped_long"] == 1
    args = ["text", "--input", str(path), "--output", str(tmp_path / "cli"), "--quiet", "--max-document-bytes", "1000"]
    assert main(args) == 2 and f"{path}:6: document longer" in capsys.readouterr().err
    assert main([*args, "--skip-long-documents"]) == 0
    assert "skipped 1 documents over 1000 bytes" in capsys.readouterr().out


def test_an_overlong_text_document_is_refused_or_skipped(corpus, tmp_path):
    big = corpus / "big.txt"
    big.write_text("word " * 400)
    (corpus / "small.txt").write_text("a small document")
    with pytest.raises(DataError, match=rf"{big}: document longer than 1000 bytes"):
        _prepare([big], tmp_path / "out", limit=DocumentLimit(max_bytes=1000))
    manifest = _prepare([corpus], tmp_path / "out", limit=DocumentLimit(max_bytes=1000, skip=True))
    assert manifest["documents"] == 6 and manifest["skipped_long"] == 1


def test_a_jsonl_line_is_read_at_most_to_the_limit(corpus, tmp_path, monkeypatch):
    """An overlong line (here 3 MB without a newline) is consumed in bounded reads, never as one string."""
    path = corpus / "a.jsonl"
    with path.open("a") as f:
        f.write('{"text": "' + "y" * 3_000_000)
    sizes = []

    class RecordingFile:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def readline(self, size=-1):
            line = self.file.readline(size)
            sizes.append(len(line))
            return line

    monkeypatch.setattr("data.prepare.open", lambda *a, **k: RecordingFile(open(*a, **k)), raising=False)
    manifest = _prepare([path], tmp_path / "out", limit=DocumentLimit(max_bytes=1000, skip=True))
    assert manifest["skipped_long"] == 1 and manifest["documents"] == 5
    assert sizes and max(sizes) <= 1 << 20  # read a chunk at a time, never the 3 MB line at once
