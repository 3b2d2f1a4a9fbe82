"""shm-embed-ingest: load files into a collection, through the sidecar's client directly.

    shm-embed-ingest PATH... --collection NAME

Each PATH is a file or a directory (walked, in name order). Formats, by
suffix: ``.txt`` and ``.md`` (the text as it is), ``.html``/``.htm`` (the
page's main text, as web search extracts it: :mod:`retrieval.websearch.extract`)
and ``.jsonl`` (one document per line: ``text``, and optionally ``id``,
``url``, ``metadata``). Other files in a walked directory are passed over;
another suffix named on the command line is a failure.

Documents go through the same store call as ``POST /collections/{name}/documents``
(:meth:`CollectionStore.upsert`: split into passages, embedded, written in
one transaction per batch), into the store the web service uses (the same
settings: ``SHM_EMBED_DATA_DIR`` or ``SHM_EMBED_COLLECTIONS_URL``). A missing
collection is created with the default options.

Resumable: each document's metadata keeps the SHA-256 of its content
(``content_sha256``); a document already stored under its id with the same
hash is skipped, so a run that stopped half-way is simply run again.

Exit status: 0 when every file was read and stored; 1 when any failed (each
is named at the end: unreadable, binary, a bad JSONL line with its number);
2 when nothing could start or the run stopped (no sidecar, bad arguments,
the store or the sidecar unavailable); 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import InvalidInput, RequestTooLarge, ShmEmbedError
from shm_protocol.logs import configure_logging

from .errors import CollectionNotFound

#: Suffixes read, and how.
TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl",)
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES

#: Documents per store write (one embed call, one transaction).
BATCH_DOCUMENTS = 32
#: Bytes looked at for a NUL to call a file binary (as git and grep do).
BINARY_SNIFF_BYTES = 8192
#: The metadata key that holds a document's content hash.
HASH_KEY = "content_sha256"

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports a SIGINT


@dataclass
class Failure:
    """A file (or a line of one) that could not be stored, and why."""

    path: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class SourceDocument:
    """One document read from a file, with where it came from (for failures)."""

    document: dict
    path: str
    line: int | None = None


@dataclass
class Summary:
    files: int = 0
    stored: int = 0
    skipped: int = 0
    passages: int = 0
    failures: list[Failure] = field(default_factory=list)


# --- finding and reading files -----------------------------------------------------
def readable(name: str) -> str:
    """A file system name as text that can be stored and printed: bytes that
    are not UTF-8 (kept by Python as lone surrogates) become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def find_files(paths: Iterable[str]) -> tuple[list[tuple[Path, str]], list[Failure]]:
    """(file, document id prefix) of every file to read, and the paths that
    cannot be. A file's id is its path relative to the directory named on
    the command line (a file named itself: its name)."""
    found: list[tuple[Path, str]] = []
    failures: list[Failure] = []
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                for name in sorted(names):
                    path = Path(folder, name)
                    if path.suffix.lower() in SUFFIXES:
                        found.append((path, readable(path.relative_to(root).as_posix())))
        elif root.suffix.lower() in SUFFIXES or not os.path.lexists(root):
            found.append((root, readable(root.name)))  # one that cannot be read fails when it is read
        else:
            failures.append(Failure(readable(str(root)), f"unsupported format (read: {', '.join(SUFFIXES)})"))
    return found, failures


def read_file(path: Path, doc_id: str, max_bytes: int) -> tuple[Iterable[SourceDocument], list[Failure]]:
    """The documents in ``path`` (its id ``doc_id``; a JSONL line's own id or
    ``doc_id:line``), and what in it could not be read. A text or page over
    ``max_bytes`` (what one request body may hold) fails unread; a JSONL
    file is read a line at a time (its documents come lazily, and its
    failures are complete once they have all been taken), a line over
    ``max_bytes`` failing, so memory stays bounded whatever the file's size."""
    name = readable(str(path))
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end
            return [], [Failure(name, "unreadable: not a regular file")]
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            handle = open(path, "rb")
        elif info.st_size > max_bytes:
            return [], [Failure(name, f"{info.st_size} bytes, over the limit of {max_bytes} for one document "
                                      "(SHM_EMBED_MAX_BODY_BYTES)")]
        else:
            with open(path, "rb") as handle:
                data = handle.read(max_bytes + 1)
    except OSError as exc:
        return [], [Failure(name, f"unreadable: {exc.strerror or exc}")]
    if suffix in JSONL_SUFFIXES:
        failures: list[Failure] = []
        return read_jsonl(handle, name, doc_id, max_bytes, failures), failures
    if len(data) > max_bytes:  # grew since the stat
        return [], [Failure(name, f"over the limit of {max_bytes} bytes for one document (SHM_EMBED_MAX_BODY_BYTES)")]
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return [], [Failure(name, "binary file (NUL bytes)")]
    if suffix in HTML_SUFFIXES:
        from .websearch.extract import extract

        title, text = extract(data)
        if not text.strip():
            return [], [Failure(name, "no main text in the page")]
        meta = {"path": name, "title": title} if title else {"path": name}
        return [SourceDocument({"id": doc_id, "text": text, "metadata": meta}, name)], []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [Failure(name, f"binary file (not UTF-8 text at byte {exc.start})")]
    if not text.strip():
        return [], [Failure(name, "empty file")]
    return [SourceDocument({"id": doc_id, "text": text, "metadata": {"path": name}}, name)], []


def _lines(handle, max_bytes: int) -> Iterator[bytes | None]:
    """The lines of binary ``handle`` (without their end), each read with at
    most ``max_bytes`` + 1 bytes held; None for a line over ``max_bytes``
    (the rest of it is skipped unkept)."""
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = handle.readline(max_bytes + 1)
            yield None
            continue
        yield line.rstrip(b"\r\n")


def read_jsonl(handle, name: str, doc_id: str, max_bytes: int, failures: list[Failure]) -> Iterator[SourceDocument]:
    """One document per non-blank line of binary ``handle`` (closed at the
    end): an object with ``text`` (a non-empty string) and optionally
    ``id``, ``url``, ``metadata`` (an object). What fails goes to ``failures``."""
    with handle:
        if b"\x00" in handle.read(BINARY_SNIFF_BYTES):
            failures.append(Failure(name, "binary file (NUL bytes)"))
            return
        handle.seek(0)
        for number, raw_line in enumerate(_lines(handle, max_bytes), 1):
            if raw_line is None:
                failures.append(Failure(name, f"line over the limit of {max_bytes} bytes for one document "
                                              "(SHM_EMBED_MAX_BODY_BYTES)", number))
                continue
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                failures.append(Failure(name, f"not UTF-8 text at byte {exc.start} of the line", number))
                continue
            if not line.strip():
                continue
            document, reason = _jsonl_document(line, doc_id, number, name)
            if reason:
                failures.append(Failure(name, reason, number))
            else:
                yield SourceDocument(document, name, number)


def _jsonl_document(line: str, doc_id: str, number: int, name: str) -> tuple[dict | None, str | None]:
    """The document of one JSONL line, or why it is none."""
    try:
        raw = json.loads(line)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(raw, dict):
        return None, "not a JSON object"
    unknown = set(raw) - {"id", "text", "url", "metadata"}
    if unknown:
        return None, f"unknown fields {', '.join(sorted(unknown))} (accepted: id, text, url, metadata)"
    if not isinstance(raw.get("text"), str) or not raw["text"].strip():
        return None, "'text' must be a non-empty string"
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return None, "'metadata' must be an object"
    document = {"id": raw.get("id", f"{doc_id}:{number}"), "text": raw["text"],
                "metadata": {**(metadata or {}), "path": name}}
    if raw.get("url") is not None:
        document["url"] = raw["url"]
    return document, None


def content_hash(document: dict) -> str:
    """SHA-256 of what a document stores (text, url, metadata but the hash itself)."""
    meta = {k: v for k, v in document.get("metadata", {}).items() if k != HASH_KEY}
    canonical = json.dumps([document["text"], document.get("url"), meta], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", errors="surrogatepass")).hexdigest()


# --- storing -------------------------------------------------------------------------
class Ingester:
    """Stores documents in ``collection`` in batches through ``store.upsert``,
    skipping those already stored with the same content hash."""

    def __init__(self, store, collection: str, summary: Summary):
        self.store = store
        self.collection = collection
        self.summary = summary
        self.pending: list[SourceDocument] = []
        self.seen: set[str] = set()  # every id of this run: a later document with one of them fails

    def add(self, docs: Iterable[SourceDocument]) -> None:
        for source in docs:
            source.document["metadata"][HASH_KEY] = content_hash(source.document)
            self.pending.append(source)
            if len(self.pending) >= BATCH_DOCUMENTS:
                self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        unique = self._unique_ids(batch)  # first: a repeated id fails on every run, stored or not
        fresh = [s for s in unique if not self._stored(s.document)]
        self.summary.skipped += len(unique) - len(fresh)
        if fresh:
            self._write(fresh)

    def _stored(self, document: dict) -> bool:
        """Whether the collection holds this document with the same content."""
        doc_id = document["id"]
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
            return False  # the store's check names it
        try:
            stored = self.store.get_document(self.collection, str(doc_id))
        except CollectionNotFound:
            return False
        return stored["metadata"].get(HASH_KEY) == document["metadata"][HASH_KEY]

    def _unique_ids(self, batch: list[SourceDocument]) -> list[SourceDocument]:
        """A run stores an id once: a later document with the same id (in this
        batch or an earlier one, a JSONL line or a file) fails, named, rather
        than replacing the first."""
        out = []
        for source in batch:
            key = str(source.document["id"])
            if key in self.seen:
                self.summary.failures.append(Failure(source.path, f"id {key!r} appears twice", source.line))
            else:
                self.seen.add(key)
                out.append(source)
        return out

    def _write(self, batch: list[SourceDocument]) -> None:
        try:
            result = self.store.upsert(self.collection, [s.document for s in batch])
        except (InvalidInput, RequestTooLarge) as exc:  # about the documents, not the service
            if len(batch) == 1:
                self.summary.failures.append(Failure(batch[0].path, str(exc), batch[0].line))
                return
            for source in batch:  # find the documents the store refuses; store the rest
                self._write([source])
            return
        self.summary.stored += len(result["ids"])
        self.summary.passages += result["passages"]


def ingest(paths: list[str], store, collection: str, *, progress: bool = True,
           max_document_bytes: int | None = None) -> Summary:
    """Read ``paths`` into ``collection`` (created when missing) and say what
    happened. ``max_document_bytes``: a document's size at most (None: the
    settings' SHM_EMBED_MAX_BODY_BYTES, what one request body may hold)."""
    if max_document_bytes is None:
        max_document_bytes = Settings.from_env().max_body_bytes
    store.create(collection)
    summary = Summary()
    files, summary.failures = find_files(paths)
    summary.files = len(files)
    ingester = Ingester(store, collection, summary)
    with _progress(progress) as bar:
        task = bar.add_task("ingesting", total=len(files))
        for path, doc_id in files:
            docs, failures = read_file(path, doc_id, max_document_bytes)
            ingester.add(docs)  # first: a JSONL file's failures are known once its documents are taken
            summary.failures.extend(failures)
            bar.advance(task)
        ingester.flush()
    return summary


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} files/s" if task.speed else "- files/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled)


def _iter_report(summary: Summary) -> Iterator[str]:
    yield (f"{summary.files} files: stored {summary.stored} documents ({summary.passages} passages), "
           f"skipped {summary.skipped} already stored, failed {len(summary.failures)}")
    for failure in summary.failures:
        yield f"failed: {failure}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shm-embed-ingest", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to load")
    ap.add_argument("--collection", required=True, help="the collection to load them into (created if missing)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway off a terminal)")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings, component="ingest")

    from shm_protocol.client import EmbeddingClient

    from .collections.store import CollectionStore

    try:
        client = EmbeddingClient.connect(settings)
    except ShmEmbedError as exc:
        print(f"shm-embed-ingest: no sidecar to embed with: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        store = CollectionStore.from_settings(settings, client)
        try:
            summary = ingest(args.paths, store, args.collection,
                             progress=not args.no_progress and sys.stderr.isatty(),
                             max_document_bytes=settings.max_body_bytes)
        finally:
            store.close()
    except ShmEmbedError as exc:
        logger.error("ingest stopped: {}", exc)
        print(f"shm-embed-ingest: stopped: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("shm-embed-ingest: interrupted; what was stored stays, and a new run skips it", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()
    for line in _iter_report(summary):
        print(line)
    return EXIT_FAILED if summary.failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
