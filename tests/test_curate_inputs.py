"""`python -m data.curate`'s input formats beyond JSONL: WARC files (HTML pages' main text, WET text records) go
through the whole pipeline with their URLs; a malformed JSONL line stops the run naming its file and line, or is
skipped and counted per file in report.json."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys

import pytest

from data.curate.pipeline import load_curate_config, run_pipeline
from data.curate.readers import CountingJsonlReader, MalformedInputError, input_files, input_reader
from data.curate.report import read_documents
from data.default import source_document

EMAIL = "anna.smith@mail.example"
NAV, FOOTER = "Home | Archive | About us", "Copyright 2024 The Shapes Gazette"


def html_page(text: str) -> bytes:
    """A web page holding ``text`` as paragraphs, inside navigation and a footer that extraction should drop."""
    paragraphs = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
    return (
        f"<!DOCTYPE html><html><head><title>Shapes</title></head><body><nav>{NAV}</nav>"
        f"<main><article>{paragraphs}</article></main><footer>{FOOTER}</footer></body></html>"
    ).encode()


def write_warc(path, records: list[tuple[str, str, str, str]]) -> None:
    """A gzipped WARC of (kind, url, date, text) records: ``html`` a response with an HTTP header and an HTML page,
    ``wet`` a WET conversion record of plain text, ``request`` the crawler's request (no document)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for kind, url, date, text in records:
            headers = {"WARC-Date": date}
            if kind == "html":
                http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
                headers["WARC-Identified-Payload-Type"] = "text/html"
                record = writer.create_warc_record(
                    url, "response", payload=io.BytesIO(html_page(text)), http_headers=http, warc_headers_dict=headers
                )
            elif kind == "wet":
                headers["WARC-Identified-Payload-Type"] = "text/plain"
                record = writer.create_warc_record(
                    url, "conversion", payload=io.BytesIO(text.encode()), warc_headers_dict=headers
                )
            else:
                http = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.org")], is_http_request=True)
                record = writer.create_warc_record(
                    url, "request", payload=io.BytesIO(b""), http_headers=http, warc_headers_dict=headers
                )
            writer.write_record(record)


def test_warc_pages_are_curated_with_their_urls(tmp_path):
    """HTML responses and WET text records arrive as documents with their URLs and dates; of two captures of one
    URL the latest is kept; the e-mail address is replaced; the page's navigation and footer are not text."""
    rng = random.Random(5)
    # A page of three scene descriptions: on a page of one sentence, Trafilatura keeps the navigation as text too.
    texts = ["\n\n".join(source_document("general", rng) for _ in range(3)) for _ in range(6)]
    texts[1] += f"\n\nWrite to {EMAIL} for more."
    urls = [f"https://shapes.example/{i}" for i in range(6)]
    records = [
        ("request", urls[0], "2024-03-01T00:00:00Z", ""),
        ("html", urls[0], "2024-03-01T00:00:00Z", texts[0]),
        ("html", urls[1], "2024-03-01T00:00:00Z", texts[1]),
        ("wet", urls[2], "2024-03-01T00:00:00Z", texts[2]),
        ("html", urls[3], "2024-03-01T00:00:00Z", texts[3]),
        ("wet", urls[4], "2024-03-01T00:00:00Z", texts[4]),
        # The same page crawled again later: URL de-duplication keeps this capture, not the first.
        ("html", urls[0], "2024-06-01T00:00:00Z", texts[5]),
    ]
    (tmp_path / "in").mkdir()
    write_warc(tmp_path / "in" / "crawl-00000.warc.gz", records)
    assert [p.name for p in input_files(tmp_path / "in")] == ["crawl-00000.warc.gz"]
    report = run_pipeline(tmp_path / "in", tmp_path / "out", load_curate_config(None, ["--run.tasks=2"]))
    assert report["input_documents"] == 6  # the request record is no document
    curated = {d["metadata"]["url"]: d for d in read_documents(tmp_path / "out" / "curated")}
    assert sorted(curated) == urls[:5]
    assert curated[urls[0]]["text"].startswith(texts[5].split("\n")[0])  # the later capture
    assert curated[urls[0]]["metadata"]["date"].startswith("2024-06-01")
    assert [d["metadata"]["url"] for d in read_documents(tmp_path / "out" / "removed" / "url_dedup")] == [urls[0]]
    assert curated[urls[2]]["text"] == texts[2]  # a WET record's text as it is
    assert texts[3].split("\n\n")[1] in curated[urls[3]]["text"]
    assert all(NAV not in d["text"] and FOOTER not in d["text"] and "<p>" not in d["text"] for d in curated.values())
    assert EMAIL not in curated[urls[1]]["text"] and "email@example.com" in curated[urls[1]]["text"]


def write_jsonl_with_bad_lines(folder) -> list[str]:
    """Two JSONL files of default-corpus documents, one with four lines that are no documents; returns the texts."""
    rng = random.Random(7)
    texts = [source_document("general", rng) for _ in range(6)]
    folder.mkdir()
    lines = [json.dumps({"id": f"a{i}", "text": t}).encode() for i, t in enumerate(texts[:3])]
    bad = [b'{"id": "cut", "text": "The circle is', b'["a", "list"]', b'{"id": "x", "text": "caf\xe9"}', b'{"id": 1}']
    (folder / "a.jsonl").write_bytes(b"\n".join([lines[0], bad[0], lines[1], bad[1], bad[2], b"", lines[2], bad[3]]))
    good = [json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(texts[3:])]
    (folder / "b.jsonl").write_text("".join(good))
    return texts


def test_a_malformed_line_fails_naming_its_file_and_line(tmp_path):
    write_jsonl_with_bad_lines(tmp_path / "in")
    with pytest.raises(MalformedInputError, match=r"in/a\.jsonl:2: not JSON"):
        list(input_reader(tmp_path / "in")())
    command = [sys.executable, "-m", "data.curate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("python -m data.curate: error: ")
    assert f"{tmp_path / 'in' / 'a.jsonl'}:2: not JSON" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "out" / "curated").exists()


def test_malformed_lines_are_skipped_and_counted_per_file(tmp_path):
    texts = write_jsonl_with_bad_lines(tmp_path / "in")
    reader = input_reader(tmp_path / "in", on_bad_line="skip")
    assert isinstance(reader, CountingJsonlReader)
    assert [d.text for d in reader()] == texts  # the blank line is no document and no error
    config = load_curate_config(None, ["--run.on_bad_line=skip", "--run.tasks=2"])
    report = run_pipeline(tmp_path / "in", tmp_path / "out", config)
    assert report["malformed_lines"] == {str(tmp_path / "in" / "a.jsonl"): 4}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["malformed_lines"] == report["malformed_lines"]
    assert report["input_documents"] == 6
    assert {d["id"] for d in read_documents(tmp_path / "out" / "curated")} == {"a0", "a1", "a2", "b0", "b1", "b2"}
