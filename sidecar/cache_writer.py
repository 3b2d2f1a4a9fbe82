"""The sidecar's side of the host-wide embedding cache: it creates the
segment for its epoch and stores each answered text's vector under the key
its worker sent in the slot.

The segment, its entries and the order of writes are specified in
:mod:`shm_protocol.layout`'s docstring ("Embedding cache segment"); the
workers' lookups are :mod:`shm_protocol.cache`. Only this class writes
entries, from the batching loop's thread alone, so no two writers race.
"""

from __future__ import annotations

import numpy as np
import xxhash
from loguru import logger

from shm_protocol.cache import KEY_WORDS
from shm_protocol.config import Settings
from shm_protocol.layout import CACHE_CHECKSUM_SEED, CACHE_KEY_DTYPE, CACHE_MAGIC, CacheGeometry, cache_view
from shm_protocol.segments import Names, Segment

#: Which word of a key is which (CACHE_KEY_DTYPE's fields, in order).
_LO_WORD, _LENGTH_WORD = CACHE_KEY_DTYPE.names.index("hash_lo"), CACHE_KEY_DTYPE.names.index("length")

#: Versions wrap below this (odd ones, plus one, stay within 64 bits).
_VERSION_WRAP = 1 << 63


class CacheWriter:
    """The cache segment of one sidecar epoch, and the CLOCK hands of its buckets."""

    def __init__(self, segment: Segment, geometry: CacheGeometry, epoch: int):
        self._segment = segment
        self.geometry = geometry
        self.epoch = epoch
        self.header, _, self._ref, entries = cache_view(segment.mm, geometry)
        dtype = geometry.entry_dtype
        self._entry_bytes = dtype.itemsize
        self._tags = entries["key"]["hash_lo"]
        self._versions = entries["version"]
        self._raw = entries.view(np.uint8).reshape(geometry.n_buckets, geometry.ways, dtype.itemsize)
        self._hands = np.zeros(geometry.n_buckets, np.uint8)  # this process's own: nobody else moves them
        # One entry is put together here (checksum included), then copied in
        # between the two version stores.
        self._scratch = np.zeros(1, dtype)
        self._scratch_bytes = self._scratch.view(np.uint8)
        self._body_at = int(dtype.fields["checksum"][1])  # everything after the version
        self._covered_at = self._key_at = int(dtype.fields["key"][1])
        self._key_end = self._key_at + CACHE_KEY_DTYPE.itemsize
        counters = self.header
        self._inserts = counters["inserts"].reshape(1)
        self._evictions = counters["evictions"].reshape(1)
        self._bytes = counters["bytes"].reshape(1)

    @classmethod
    def create(cls, names: Names, settings: Settings, *, n_rings: int, dim: int, epoch: int) -> CacheWriter | None:
        """A new, empty cache segment of SHM_EMBED_CACHE_MB for vectors of
        ``dim`` floats and ``epoch``; None when the setting is 0. The caller
        has unlinked any stale one (the namespace's objects are reaped together)."""
        if settings.cache_mb <= 0 or dim <= 0:
            return None
        geometry = CacheGeometry.for_budget(settings.cache_mb * 2**20, dim, n_rings)
        segment = Segment.create(names.cache, geometry.total_bytes, mode=settings.ipc_mode, group=settings.group)
        header = cache_view(segment.mm, geometry)[0]
        geometry.write_header(header)
        header["epoch"] = epoch
        header["magic"] = CACHE_MAGIC  # NOTE: last, as in the control segment
        del header
        logger.info("embedding cache {}: {:,} entries of {} floats in {:.1f} MiB", names.cache,
                    geometry.n_buckets * geometry.ways, dim, geometry.total_bytes / 2**20)
        return cls(segment, geometry, epoch)

    def close(self) -> None:
        """Unmap (the namespace's unlink removes the name)."""
        self.header = self._ref = self._tags = self._versions = self._raw = None
        self._inserts = self._evictions = self._bytes = None
        self._segment.close()

    def keys_of(self, slot_keys: np.ndarray) -> np.ndarray | None:
        """A private copy of a taken slot's keys (``cache_keys[:n_texts]``)
        as rows of 64-bit words, or None when its worker asked for nothing
        to be cached (every length zero)."""
        words = slot_keys.view(np.uint64).reshape(len(slot_keys), KEY_WORDS)
        if not words[:, _LENGTH_WORD].any():
            return None
        return words.copy()

    def store(self, key: np.ndarray, model: int, dim: int, n_tokens: int, vector: np.ndarray) -> bool:
        """Store ``vector`` (the first ``dim`` floats of model ``model``'s
        answer) under ``key`` (KEY_WORDS words); False when the key asks for
        no caching or is there already. NOTE: version odd, entry, version even."""
        if not int(key[_LENGTH_WORD]) or dim > self.geometry.dim:
            return False
        lo = int(key[_LO_WORD])
        bucket = lo % self.geometry.n_buckets
        tags = self._tags[bucket].tolist()
        key_bytes = key.view(np.uint8)
        if lo in tags and np.array_equal(self._raw[bucket, tags.index(lo), self._key_at: self._key_end], key_bytes):
            way, evicted = tags.index(lo), False
            if self._intact(bucket, way):
                return False  # two workers missed the same text at once: one entry is enough
            self._bytes[0] -= self._entry_bytes  # damaged (bytes written into the segment): rewritten in place
        else:
            way, evicted = self._victim(bucket)
        rec = self._scratch
        self._scratch_bytes[self._key_at: self._key_end] = key_bytes
        rec["epoch"][0] = self.epoch
        rec["model"][0] = model
        rec["dim"][0] = dim
        rec["n_tokens"][0] = n_tokens
        rec["vector"][0, :dim] = vector[:dim]
        rec["vector"][0, dim:] = 0
        body = self._scratch_bytes
        rec["checksum"][0] = xxhash.xxh64_intdigest(body[self._covered_at:].data, CACHE_CHECKSUM_SEED)
        # Below 2**63, so that the even one after it fits too (a version
        # written by someone else may be anything).
        odd = ((int(self._versions[bucket, way]) + 1) | 1) % _VERSION_WRAP
        self._versions[bucket, way] = odd
        self._raw[bucket, way, self._body_at:] = body[self._body_at:]
        self._versions[bucket, way] = odd + 1
        self._ref[bucket, way] = 0
        self._inserts[0] += 1
        if evicted:
            self._evictions[0] += 1
        else:
            self._bytes[0] += self._entry_bytes
        return True

    def _intact(self, bucket: int, way: int) -> bool:
        """Whether an entry reads back as a reader would accept it (even
        version, checksum holds)."""
        version = int(self._versions[bucket, way])
        entry = self._raw[bucket, way]
        checksum = int(entry[self._body_at: self._covered_at].view("<u8")[0])
        return bool(version and not version & 1 and xxhash.xxh64_intdigest(
            entry[self._covered_at:].tobytes(), CACHE_CHECKSUM_SEED) == checksum)

    def _victim(self, bucket: int) -> tuple[int, bool]:
        """The way to write in ``bucket`` and whether it evicts an entry: an
        empty one, else CLOCK (the first entry past the hand whose reference
        bit is clear; bits it passes are cleared, so it ends within two turns)."""
        versions = self._versions[bucket].tolist()
        if 0 in versions:
            return versions.index(0), False
        ways = self.geometry.ways
        ref = self._ref[bucket]
        hand = int(self._hands[bucket]) % ways
        for _ in range(2 * ways):
            if ref[hand]:
                ref[hand] = 0
                hand = (hand + 1) % ways
                continue
            break
        self._hands[bucket] = (hand + 1) % ways
        return hand, True
