"""A snapshot generation's files: checksums, the verification cache, read
leases that hold off an in-place writer, and the checks of a generation's
structure (retrieval/collections/snapshot_files.py, retrieval.collections.snapshot_index.Snapshot)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest

from retrieval.collections import snapshot_files
from retrieval.collections.snapshot_disk import write_snapshot
from retrieval.collections.snapshot_files import (
    FORMAT,
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    SnapshotChanging,
    SnapshotFile,
    SnapshotUnusable,
    file_record,
    read_verified,
    verify,
)
from retrieval.collections.snapshot_index import Snapshot


def _file(tmp_path, data: bytes = bytes(range(256)) * 64):
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, file_record(path)


def _check(path, record) -> None:
    f = SnapshotFile(path)
    try:
        verify(f.fd, path, record)
    finally:
        f.close()


def test_a_damaged_or_truncated_file_fails_its_checksum(tmp_path):
    path, record = _file(tmp_path)
    _check(path, record)
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotUnusable, match="checksum"):
        _check(path, record)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(SnapshotUnusable, match="holds 100 bytes"):
        _check(path, record)
    f = SnapshotFile(path)
    with pytest.raises(SnapshotUnusable, match="checksum"):
        read_verified(f.fd, path, dict(record, size=100))
    f.close()


def test_a_verified_file_changed_in_place_is_verified_again(tmp_path, monkeypatch):
    """The cache of verified files is keyed on their identity: a change at the
    same size (ctime, mtime) is read again, not taken from the cache."""
    monkeypatch.setattr(snapshot_files, "RACY_S", -1.0)  # cache even a file changed just now
    path, record = _file(tmp_path)
    _check(path, record)
    _check(path, record)  # from the cache
    with open(path, "r+b") as f:  # same size, same inode, other bytes
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(SnapshotUnusable, match="checksum"):
        _check(path, record)


def test_a_lease_holds_off_an_in_place_writer_until_let_go(tmp_path):
    path, _ = _file(tmp_path)
    snapshot_file = SnapshotFile(path)
    assert snapshot_file.leased and snapshot_file.intact()
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'r+b').truncate(0)"])
    try:
        deadline = time.monotonic() + 10
        while snapshot_file.intact():  # the kernel marks the lease as breaking while the writer waits
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert writer.poll() is None and path.stat().st_size == 16384  # still held off
        snapshot_file.close()
        assert writer.wait(10) == 0 and path.stat().st_size == 0  # let go: the writer went on
    finally:
        writer.kill()
        writer.wait()
    with open(path, "ab"):  # open for writing: no lease now, and the file is refused for the moment
        with pytest.raises(SnapshotChanging):
            SnapshotFile(path)


def _generation(tmp_path, n: int = 500, dim: int = 8):
    vecs = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(vecs)
    meta = {"format": FORMAT, "generation": 1, "cid": 3, "created": 1.0, "dim": dim, "seq": n, "kind": "flat",
            "nlist": 0, "ntotal": n, "trained_at": 0}
    return write_snapshot(tmp_path, 1, index, np.arange(n) * 2, meta), vecs


def test_a_generation_s_structure_must_match_its_metadata(tmp_path):
    gen, vecs = _generation(tmp_path)
    snap = Snapshot(gen, cid=3, dim=8, created=1.0)
    assert snap.intact() and snap.index.ntotal == 500
    snap.release()
    assert not snap.intact() and snap.index is None
    meta = json.loads((gen / META_FILE).read_text())
    assert set(meta["files"]) == {INDEX_FILE, IDS_FILE}
    (gen / META_FILE).write_text(json.dumps(dict(meta, kind="ivf", nlist=4)))
    with pytest.raises(SnapshotUnusable, match="its index is a IndexFlatIP, its metadata says ivf"):
        Snapshot(gen, cid=3, dim=8, created=1.0)
    (gen / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with pytest.raises(SnapshotUnusable, match="no size and xxh3_128"):
        Snapshot(gen, cid=3, dim=8, created=1.0)
    (gen / META_FILE).write_text(json.dumps(dict(meta, format=2)))
    with pytest.raises(SnapshotUnusable, match="format"):
        Snapshot(gen, cid=3, dim=8, created=1.0)
    stray = tmp_path / "g000000000002"
    stray.write_text("not a generation")
    with pytest.raises(SnapshotUnusable, match="is a file"):
        Snapshot(stray, cid=3, dim=8, created=1.0)


def test_without_leases_a_generation_is_read_privately_and_checked_as_read(tmp_path, monkeypatch):
    """Where the system grants no lease, nothing may be mapped (a truncation would
    kill the process): the files are read into memory, checked as they are read."""
    gen, vecs = _generation(tmp_path)
    monkeypatch.setattr(SnapshotFile, "_lease", lambda self: False)
    snap = Snapshot(gen, cid=3, dim=8, created=1.0)
    assert not isinstance(snap.ids, np.memmap) and snap.intact()
    scores, rows = snap.index.search(vecs[7:8], 1)
    assert rows[0][0] == 7 and snap.ids[rows[0][0]] == 14
    snap.release()
    ids = np.load(gen / IDS_FILE)
    np.save(gen / IDS_FILE, ids[::-1])
    with pytest.raises(SnapshotUnusable, match="checksum"):
        Snapshot(gen, cid=3, dim=8, created=1.0)
