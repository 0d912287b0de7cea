"""data.prepare: text / JSONL / Parquet -> token shards and manifest; determinism; bad input names the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.prepare import main, prepare_text
from data.shards import DataError, iter_tar_documents, read_manifest
from lm import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("A small red circle above a blue square.\n\nSecond paragraph, same document.")
    (folder / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"document {i}: " + "word " * i, "id": i}) for i in range(40)) + "\n\n"
    )
    (folder / "empty.txt").write_text("  \n")
    pq.write_table(
        pa.table({"text": [f"parquet row {i} ünïcödé" for i in range(25)], "n": list(range(25))}), folder / "c.parquet"
    )
    return folder


def documents(directory: Path) -> list[list[int]]:
    out = []
    for shard in read_manifest(directory)["shards"]:
        out.extend(tokens.tolist() for _, tokens in iter_tar_documents(directory / shard["file"]))
    return out


def test_prepare_all_formats(inputs, tmp_path, tok):
    manifest = prepare_text([inputs], tmp_path / "out", shard_tokens=300, workers=2, progress=False)
    expected = [inputs.joinpath("a.txt").read_text()]
    expected += [f"document {i}: " + "word " * i for i in range(40)]
    expected += [f"parquet row {i} ünïcödé" for i in range(25)]
    docs = documents(tmp_path / "out")
    assert docs == [tok.encode(t, bos=True, eos=True) for t in expected]
    assert manifest["documents"] == 66 and manifest["skipped_empty"] == 1
    assert manifest["tokens"] == sum(map(len, docs))
    assert manifest["bos"] and manifest["eos"]
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert len(manifest["shards"]) > 2
    for shard in manifest["shards"]:
        assert shard["tokens"] >= 300 or shard is manifest["shards"][-1]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["shards"] == manifest["shards"]
    # Stock webdataset reads the shards: one sample per document, tokens as raw little-endian uint32.
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(tmp_path / "out" / manifest["shards"][0]["file"]), shardshuffle=False)))
    assert np.frombuffer(first["u32"], "<u4").tolist() == docs[0]


def test_byte_identical_output(inputs, tmp_path):
    prepare_text([inputs], tmp_path / "one", shard_tokens=200, workers=2, progress=False)
    prepare_text([str(inputs / "*")], tmp_path / "two", shard_tokens=200, workers=1, progress=False)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_bad_inputs_name_the_file(inputs, tmp_path):
    with pytest.raises(DataError, match="missing.txt: no such file"):
        prepare_text([inputs / "missing.txt"], tmp_path / "o1", progress=False)
    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: no file matches"):
        prepare_text([str(inputs / "nothing-*.jsonl")], tmp_path / "o2", progress=False)
    with pytest.raises(DataError, match="empty input"):
        prepare_text([inputs / "empty.txt"], tmp_path / "o3", progress=False)
    bad = inputs / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string `text` field"):
        prepare_text([bad], tmp_path / "o4", progress=False, workers=2)
    broken = inputs / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: unreadable Parquet"):
        prepare_text([broken], tmp_path / "o5", progress=False)
    nocol = inputs / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(DataError, match=r"nocol\.parquet: no `text` column"):
        prepare_text([nocol], tmp_path / "o6", progress=False)
    # A failed run leaves no output directory behind.
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    assert not list(tmp_path.glob(".o*"))


def test_cli_exit_codes(inputs, tmp_path, capsys):
    assert main(["text", "--input", str(inputs / "a.txt"), "--output", str(tmp_path / "ok"), "--quiet"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["text", "--input", str(inputs / "nope.txt"), "--output", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope.txt: no such file" in err and "Traceback" not in err
    # Refuses to overwrite a non-empty directory unless told to.
    assert main(["text", "--input", str(inputs / "a.txt"), "--output", str(tmp_path / "ok"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_module_entry_point(inputs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data.prepare", "text", "--input", str(inputs / "zzz.txt"), "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "zzz.txt" in result.stderr and "Traceback" not in result.stderr
