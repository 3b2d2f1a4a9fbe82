"""shm-embed-ingest (retrieval/ingest.py) run as a process against a tiny
sidecar: a few hundred small files of every format, some that cannot be
read, loaded into the SQLite store the web service would use; run again,
everything is skipped; and a search finds what was loaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from retrieval.collections.store import CollectionStore
from tests.helpers import REPO, client_for

TEXT_FILES, MARKDOWN_FILES, HTML_FILES = 240, 30, 30
JSONL_LINES = 20
BAD_JSONL_LINE = 7


def _words(i: int) -> str:
    vocabulary = "alpha beta gamma delta ring slot vector model batch token queue worker".split()
    return " ".join(vocabulary[(i * k + 3) % len(vocabulary)] for k in range(1, 25)) + f" number {i}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(TEXT_FILES):
        folder = root / f"part{i % 4}"
        folder.mkdir(exist_ok=True)
        (folder / f"note{i}.txt").write_text(f"Plain note {i}. {_words(i)}\n")
    for i in range(MARKDOWN_FILES):
        (root / f"page{i}.md").write_text(f"# Heading {i}\n\n{_words(1000 + i)}\n")
    (root / "html").mkdir()
    for i in range(HTML_FILES):
        (root / "html" / f"site{i}.html").write_text(
            f"<html><head><title>Site {i}</title><script>var x = 1;</script></head><body>"
            f"<nav><a href='/'>home</a></nav><main><p>{_words(2000 + i)}</p></main></body></html>")
    lines = []
    for i in range(1, JSONL_LINES + 1):
        if i == BAD_JSONL_LINE:
            lines.append('{"id": "broken", "text": ')  # cut short
        else:
            lines.append(json.dumps({"id": f"rec-{i}", "text": f"Record {i}. {_words(3000 + i)}",
                                     "url": f"https://example.org/{i}", "metadata": {"n": i}}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    (root / "blob.txt").write_bytes(bytes(range(256)) * 4)  # NUL bytes: binary
    os.symlink(root / "nowhere.txt", root / "dangling.txt")  # unreadable even as root
    os.mkfifo(root / "pipe.md")  # reading it would block: refused unread
    (root / "ignored.csv").write_text("a,b\n")  # not a format it reads: passed over in a walked folder
    return root


def _run(corpus, env, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retrieval.ingest", str(corpus), "--collection", "notes"],
                          env={**env, "SHM_EMBED_DATA_DIR": str(data_dir), "SHM_EMBED_LOG_LEVEL": "WARNING"},
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _summary(result) -> dict:
    found = re.search(r"(\d+) files: stored (\d+) documents \((\d+) passages\), skipped (\d+) already stored, "
                      r"failed (\d+)", result.stdout)
    assert found, f"no summary in:\n{result.stdout}\n{result.stderr}"
    return dict(zip(("files", "stored", "passages", "skipped", "failed"), map(int, found.groups()), strict=True))


def test_ingest_loads_a_folder_names_each_failure_and_skips_what_it_stored(tiny_sidecar, corpus, tmp_path):
    documents = TEXT_FILES + MARKDOWN_FILES + HTML_FILES + JSONL_LINES - 1
    data_dir = tmp_path / "data"

    first = _run(corpus, tiny_sidecar.env, data_dir)
    assert first.returncode == 1, first.stderr
    summary = _summary(first)
    assert summary["stored"] == documents and summary["skipped"] == 0 and summary["failed"] == 4
    assert summary["passages"] >= documents
    failed = [line for line in first.stdout.splitlines() if line.startswith("failed: ")]
    assert any("dangling.txt: unreadable" in line for line in failed), failed
    assert any("blob.txt: binary file" in line for line in failed), failed
    assert any(f"records.jsonl:{BAD_JSONL_LINE}: not JSON" in line for line in failed), failed
    assert any("pipe.md: unreadable: not a regular file" in line for line in failed), failed
    assert len(failed) == 4

    again = _run(corpus, tiny_sidecar.env, data_dir)
    assert again.returncode == 1, again.stderr
    summary = _summary(again)
    assert (summary["stored"], summary["skipped"], summary["failed"]) == (0, documents, 4)

    client = client_for(tiny_sidecar)
    store = CollectionStore(data_dir, client)
    try:
        assert store.info("notes")["documents"] == documents
        html = store.get_document("notes", "html/site4.html")
        assert "var x" not in html["text"] and "home" not in html["text"]  # the page's main text only
        assert html["metadata"]["title"] == "Site 4"
        record = store.get_document("notes", "rec-3")
        assert record["url"] == "https://example.org/3" and record["metadata"]["n"] == 3
        query = (corpus / "part1" / "note17.txt").read_text()
        hits = store.search("notes", query, top_k=3)
        assert hits[0]["id"] == "part1/note17.txt", hits
    finally:
        store.close()
        client.close()


def test_ingest_changed_file_is_stored_again_and_bad_arguments_exit_2(tiny_sidecar, tmp_path):
    data_dir = tmp_path / "data"
    note = tmp_path / "single.md"
    note.write_text("first version of the note")
    assert _summary(_run(note, tiny_sidecar.env, data_dir))["stored"] == 1
    note.write_text("second version of the note")
    result = _run(note, tiny_sidecar.env, data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (_summary(result)["stored"], _summary(result)["skipped"]) == (1, 0)

    no_sidecar = {**tiny_sidecar.env, "SHM_EMBED_NAMESPACE": "shm-embed-test-none"}
    result = _run(note, no_sidecar, data_dir)
    assert result.returncode == 2 and "no sidecar" in result.stderr


def test_ingest_names_an_id_seen_in_an_earlier_batch_and_survives_odd_file_names(tiny_sidecar, tmp_path):
    """Ids are unique over the whole run, not only within one store write:
    a JSONL line that repeats an earlier batch's id (or a file's own id)
    fails, named, instead of overwriting the first document. A file name
    that is not UTF-8 is stored under a readable id, not a crash."""
    from retrieval.ingest import BATCH_DOCUMENTS, ingest

    root = tmp_path / "docs"
    root.mkdir()
    lines = [json.dumps({"id": f"r{i}", "text": f"record {i} {_words(i)}"}) for i in range(BATCH_DOCUMENTS + 4)]
    lines.append(json.dumps({"id": "r0", "text": "a second record r0 that must not replace the first"}))
    lines.append(json.dumps({"id": "note.txt", "text": "a record named as the file beside it"}))  # the file's id
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "note.txt").write_text("the note file itself")
    (root / os.fsdecode(b"caf\xe9.txt")).write_text("a file whose name is Latin-1, not UTF-8")
    client = client_for(tiny_sidecar)
    store = CollectionStore(tmp_path / "data", client)
    try:
        summary = ingest([str(root)], store, "dups", progress=False)
        reasons = [str(f) for f in summary.failures]
        assert any("a.jsonl:" + str(len(lines) - 1) in r and "'r0' appears twice" in r for r in reasons), reasons
        assert any("'note.txt' appears twice" in r for r in reasons), reasons
        assert len(reasons) == 2, reasons
        assert store.get_document("dups", "r0")["text"].startswith("record 0 ")
        # a.jsonl comes first in name order: its line keeps the id, the file note.txt fails
        assert store.get_document("dups", "note.txt")["text"] == "a record named as the file beside it"
        assert any(r.endswith("note.txt: id 'note.txt' appears twice") for r in reasons), reasons
        assert summary.stored == BATCH_DOCUMENTS + 4 + 2
        odd = store.get_document("dups", "caf\ufffd.txt")  # the odd byte as U+FFFD
        assert odd["text"] == "a file whose name is Latin-1, not UTF-8"
        again = ingest([str(root)], store, "dups", progress=False)
        assert (again.stored, again.skipped, len(again.failures)) == (0, summary.stored, 2)
        assert store.get_document("dups", "r0")["text"].startswith("record 0 "), "a rerun keeps the first too"
    finally:
        store.close()
        client.close()


def test_ingest_bounds_what_it_holds_a_file_or_line_over_the_document_limit_fails_named(tiny_sidecar, tmp_path):
    """A text over the limit of one document fails unread; a JSONL file is
    read a line at a time: a line over the limit, or not UTF-8, fails with
    its number and the lines after it are stored."""
    from retrieval.ingest import ingest

    limit = 2000
    root = tmp_path / "big"
    root.mkdir()
    (root / "huge.txt").write_text("word " * 1000)  # 5000 bytes
    (root / "small.md").write_text("a small note")
    lines = [json.dumps({"id": "first", "text": "the first record"}).encode(),
             json.dumps({"id": "long", "text": "word " * 1000}).encode(),
             b'{"id": "latin", "text": "caf\xe9"}',
             json.dumps({"id": "last", "text": "the record after them"}).encode()]
    (root / "lines.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    client = client_for(tiny_sidecar)
    store = CollectionStore(tmp_path / "data", client)
    try:
        summary = ingest([str(root)], store, "big", progress=False, max_document_bytes=limit)
        reasons = sorted(str(f) for f in summary.failures)
        assert len(reasons) == 3, reasons
        assert "huge.txt: 5000 bytes, over the limit of 2000" in reasons[0], reasons
        assert "lines.jsonl:2: line over the limit of 2000 bytes" in reasons[1], reasons
        assert "lines.jsonl:3: not UTF-8 text" in reasons[2], reasons
        assert summary.stored == 3
        assert store.get_document("big", "last")["text"] == "the record after them"
        assert store.get_document("big", "small.md")["text"] == "a small note"
    finally:
        store.close()
        client.close()
