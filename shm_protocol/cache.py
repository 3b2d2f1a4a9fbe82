"""The worker's side of the host-wide embedding cache: look texts up before
tokenizing them, read entries without locks, count hits and misses.

Only the sidecar writes entries (:mod:`sidecar.cache_writer`); the segment,
its entries and the order of writes and reads are specified in
:mod:`shm_protocol.layout`'s docstring ("Embedding cache segment"). NOTE: a
reader trusts nothing it reads: an entry counts only if its version is even
and unchanged across the copy, its key, epoch, model and width are the
request's, and its checksum holds; anything else is a miss.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import xxhash
from loguru import logger

from .errors import LayoutMismatch, SidecarUnavailable
from .layout import (
    CACHE_CHECK_SEED,
    CACHE_CHECKSUM_SEED,
    CACHE_HEADER_DTYPE,
    CACHE_KEY_DTYPE,
    CACHE_MATCH_FIELDS,
    CACHE_RING_DTYPE,
    CacheGeometry,
    ModelEntry,
    cache_key_material,
    cache_view,
    check_cache_prefix,
)
from .segments import Names, Segment

_MASK64 = (1 << 64) - 1
#: A key as 64-bit words (hash_lo, hash_hi, check, length): how keys travel
#: in numpy, since copying structured records costs 10x more.
KEY_WORDS = CACHE_KEY_DTYPE.itemsize // 8
_NO_KEYS = np.zeros((0, KEY_WORDS), np.uint64)
_STRUCT_CODES = {np.dtype("<u8"): "Q", np.dtype("<u4"): "I"}

#: The sidecar-written counters of the header, as stats show them.
CACHE_COUNTERS = ("inserts", "evictions", "bytes")


def match_struct(entry_dtype: np.dtype) -> tuple[int, struct.Struct]:
    """(offset, struct) of the entry bytes a reader compares with its
    request (CACHE_MATCH_FIELDS), derived from the entry's dtype."""
    start = pos = int(entry_dtype.fields[CACHE_MATCH_FIELDS[0]][1])
    fmt = "<"
    for name in CACHE_MATCH_FIELDS:
        ftype, offset = entry_dtype.fields[name][:2]
        if offset != pos:
            raise LayoutMismatch(f"cache entry field {name} is not contiguous with the fields before it")
        parts = [ftype.fields[n][0] for n in ftype.names] if ftype.names else [ftype]
        fmt += "".join(_STRUCT_CODES[p] for p in parts)
        pos += ftype.itemsize
    packed = struct.Struct(fmt)
    if packed.size != pos - start:
        raise LayoutMismatch("cache entry match fields are padded")
    return start, packed


def text_key(prefix: bytes, text: str) -> tuple[int, int, int, int]:
    """(hash_lo, hash_hi, check, length) of ``text`` after the request's key prefix."""
    data = prefix + text.encode("utf-8", "surrogatepass")
    digest = xxhash.xxh3_128_intdigest(data)
    return digest & _MASK64, digest >> 64, xxhash.xxh64_intdigest(data, CACHE_CHECK_SEED), len(data)


@dataclass
class CacheLookup:
    """What a request's lookup found. The hits' vectors are already in the
    caller's array and their token counts in ``lengths``; ``missing``
    (indices into the request) and their ``texts`` still need the sidecar,
    with their ``keys`` (one row of KEY_WORDS words each) for the slot."""

    missing: list[int]
    texts: list[str]
    keys: np.ndarray
    lengths: np.ndarray  # int64, tokens of each text of the request (0 for a miss, until the caller fills it)



class CacheReader:
    """A worker's mapping of the cache segment of one sidecar epoch,
    counting its lookups in the counters of its ring."""

    def __init__(self, segment: Segment, geometry: CacheGeometry, epoch: int, ring: int):
        self._segment = segment
        self.geometry = geometry
        self.epoch = epoch
        self.ring = ring
        self.header, rings, self._ref, entries = cache_view(segment.mm, geometry)
        self._rings = rings
        dtype = geometry.entry_dtype
        self._tags = entries["key"]["hash_lo"]  # (n_buckets, ways): a strided view
        self._versions = entries["version"]
        self._raw = entries.view(np.uint8).reshape(geometry.n_buckets, geometry.ways, dtype.itemsize)
        self._match_at, self._match = match_struct(dtype)
        self._match_end = self._match_at + self._match.size
        self._checksum_at = int(dtype.fields["checksum"][1])
        self._covered_at = int(dtype.fields["key"][1])
        self._tokens_at = int(dtype.fields["n_tokens"][1])
        self._vector_at = int(dtype.fields["vector"][1])
        self._hits = rings["hits"][ring: ring + 1]
        self._misses = rings["misses"][ring: ring + 1]
        # Threads of one process share the ring's counters: a read-modify-write under a lock.
        self._count_lock = threading.Lock()

    @classmethod
    def attach(cls, names: Names, epoch: int, ring: int) -> CacheReader | None:
        """The namespace's cache for ``epoch``, or None when it has none (the
        sidecar runs with SHM_EMBED_CACHE_MB=0), it is of another epoch or
        layout, or this ring has no counters in it: the client then sends
        every text to the sidecar."""
        try:
            segment = Segment.attach(names.cache)
        except SidecarUnavailable:
            return None
        except (OSError, ValueError) as exc:  # e.g. an empty file under the name: no cache, still a client
            logger.warning("embedding cache not used: {} cannot be mapped ({})", names.cache, exc)
            return None
        try:
            check_cache_prefix(segment.mm, names.cache)
            header = np.frombuffer(segment.mm, dtype=CACHE_HEADER_DTYPE, count=1)[0]
            geometry = CacheGeometry.from_header(header)
            found_epoch = int(header["epoch"])
            del header
            if found_epoch != epoch:
                raise LayoutMismatch(f"{names.cache}: epoch {found_epoch:x}, the sidecar's is {epoch:x}")
            if not 0 < geometry.n_buckets or geometry.ways < 1 or len(segment.mm) < geometry.total_bytes:
                raise LayoutMismatch(f"{names.cache}: {len(segment.mm)} bytes, its header asks for more")
            if ring >= geometry.n_rings:
                raise LayoutMismatch(f"{names.cache}: no counters for ring {ring}")
            return cls(segment, geometry, epoch, ring)
        except (LayoutMismatch, ValueError, KeyError) as exc:
            logger.warning("embedding cache not used: {}", exc)
            segment.close()
            return None

    def close(self) -> None:
        """Drop the views and unmap; a thread still inside a lookup keeps
        the mapping alive through its own references until it returns."""
        self.header = self._rings = self._ref = self._tags = self._versions = self._raw = None
        self._hits = self._misses = None
        self._segment.close()

    # -- lookups ----------------------------------------------------------------------
    def lookup(self, texts: list[str], out: np.ndarray, model: ModelEntry, prompt: str | None,
               policy: str) -> CacheLookup:
        """Look each text up (``prompt`` before it, as the sidecar would see
        it); write each hit's vector into ``out[i, :model.dim]``. The rest is
        returned as missing, with the keys the sidecar stores their vectors under.
        ``policy``: the request's long-input policy (shm_protocol.long_inputs)."""
        prefix = cache_key_material(model.name, self.epoch, prompt, policy)
        expected_tail = (self.epoch, model.index, model.dim)
        lengths = np.zeros(len(texts), np.int64)
        missing, keys = [], []
        for i, text in enumerate(texts):
            key = text_key(prefix, text)
            n_tokens = self._find(key, expected_tail, model.dim, out[i])
            if n_tokens < 0:
                missing.append(i)
                keys.append(key)
            else:
                lengths[i] = n_tokens
        hits = len(texts) - len(missing)
        with self._count_lock:
            try:
                self._hits[0] += hits
                self._misses[0] += len(missing)
            except TypeError:  # closed meanwhile
                pass
        return CacheLookup(missing, [texts[i] for i in missing],
                           np.array(keys, dtype=np.uint64) if keys else _NO_KEYS, lengths)

    def _find(self, key: tuple, tail: tuple, dim: int, dest: np.ndarray) -> int:
        """The entry's token count after copying its vector into ``dest``, or -1 (a miss)."""
        tags, versions, raw = self._tags, self._versions, self._raw
        if tags is None:
            return -1
        lo = key[0]
        bucket = lo % self.geometry.n_buckets
        row = tags[bucket].tolist()
        if lo not in row:
            return -1
        way = row.index(lo)
        before = int(versions[bucket, way])
        if before == 0 or before & 1:
            return -1  # never written, or being written
        entry = raw[bucket, way].tobytes()
        if int(versions[bucket, way]) != before:
            return -1  # rewritten while we copied it
        if entry[self._match_at: self._match_end] != self._match.pack(*key, *tail):
            return -1
        checksum = int.from_bytes(entry[self._checksum_at: self._checksum_at + 8], "little")
        if xxhash.xxh64_intdigest(memoryview(entry)[self._covered_at:], CACHE_CHECKSUM_SEED) != checksum:
            return -1
        dest[:dim] = np.frombuffer(entry, dtype="<f4", count=dim, offset=self._vector_at)
        ref = self._ref
        if ref is not None and not ref[bucket, way]:
            ref[bucket, way] = 1  # one byte, only when clear: hits on a hot entry write nothing
        return int.from_bytes(entry[self._tokens_at: self._tokens_at + 4], "little")

    def stats(self) -> dict:
        return cache_stats(self.header, self._rings, self.geometry)


def cache_stats(header: np.ndarray, rings: np.ndarray, geometry: CacheGeometry) -> dict:
    """The cache's counters: workers' hits and misses (summed over rings),
    the sidecar's inserts, evictions and bytes in use, and its capacity."""
    hits = int(rings["hits"].sum())
    misses = int(rings["misses"].sum())
    entries = geometry.n_buckets * geometry.ways
    return {
        "enabled": True,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        **{k: int(header[k]) for k in CACHE_COUNTERS},
        "capacity_entries": entries,
        "capacity_bytes": entries * geometry.entry_dtype.itemsize,
    }


def read_cache_stats(names: Names) -> dict:
    """The namespace's cache counters, attaching read-only for the moment
    (the stats CLI and /metrics); ``{"enabled": False}`` without a cache."""
    try:
        segment = Segment.attach(names.cache, readonly=True)
    except SidecarUnavailable:
        return {"enabled": False}
    except (OSError, ValueError) as exc:
        return {"enabled": False, "error": str(exc)}
    try:
        check_cache_prefix(segment.mm, names.cache)
        header = np.frombuffer(segment.mm, dtype=CACHE_HEADER_DTYPE, count=1)[0]
        geometry = CacheGeometry.from_header(header)
        if len(segment.mm) < geometry.total_bytes:
            raise LayoutMismatch(f"{names.cache}: {len(segment.mm)} bytes, its header asks for more")
        rings = np.frombuffer(segment.mm, dtype=CACHE_RING_DTYPE, count=geometry.n_rings,
                              offset=geometry.rings_offset)
        stats = cache_stats(header, rings, geometry)
        del header, rings
        return stats
    except (LayoutMismatch, ValueError) as exc:
        return {"enabled": False, "error": str(exc)}
    finally:
        segment.close()
