"""The embedding cache's structure on a real shared-memory segment: the
sidecar's writer and a worker's reader, without a sidecar process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shm_protocol.cache import KEY_WORDS, CacheReader, read_cache_stats, text_key
from shm_protocol.config import Settings
from shm_protocol.layout import (
    CACHE_KEY_DTYPE,
    CACHE_WAYS,
    CacheGeometry,
    ModelEntry,
    ModelKind,
    cache_key_material,
)
from shm_protocol.segments import Names, unlink_namespace
from sidecar.cache_writer import CacheWriter
from tests.helpers import new_namespace

DIM = 16
EPOCH = 0x1234_5678_9ABC_DEF1
MODEL = ModelEntry(0, "tiny", ModelKind.EMBED, DIM, 128, 1000)
OTHER = ModelEntry(1, "other", ModelKind.EMBED, DIM, 128, 1000)


@pytest.fixture
def cache():
    names = Names(new_namespace())
    settings = Settings.from_env({}, namespace=names.namespace, cache_mb=1)
    writer = CacheWriter.create(names, settings, n_rings=2, dim=DIM, epoch=EPOCH)
    reader = CacheReader.attach(names, EPOCH, ring=1)
    yield writer, reader, names
    reader.close()
    writer.close()
    unlink_namespace(names)
    assert names.dev_shm_entries() == []


def vector_of(text: str) -> np.ndarray:
    return np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM).astype(np.float32)


def insert(writer: CacheWriter, text: str, model: ModelEntry = MODEL, prompt=None, policy="truncate",
           epoch: int = EPOCH, n_tokens: int = 7) -> bool:
    key = np.array(text_key(cache_key_material(model.name, epoch, prompt, policy), text), np.uint64)
    return writer.store(key, model.index, model.dim, n_tokens, vector_of(text))


def lookup(reader: CacheReader, texts, model: ModelEntry = MODEL, prompt=None, policy="truncate"):
    out = np.zeros((len(texts), model.dim), np.float32)
    found = reader.lookup(list(texts), out, model, prompt, policy)
    return found, out


def test_insert_then_lookup_gives_the_vector_and_tokens_and_counts(cache):
    writer, reader, names = cache
    assert insert(writer, "hello")
    assert not insert(writer, "hello")  # already there: one entry
    found, out = lookup(reader, ["hello", "absent"])
    assert found.missing == [1] and found.texts == ["absent"]
    assert np.array_equal(out[0], vector_of("hello"))
    assert found.lengths.tolist() == [7, 0]
    assert found.keys.shape == (1, KEY_WORDS) and found.keys[0, CACHE_KEY_DTYPE.names.index("length")] > 0
    stats = read_cache_stats(names)
    assert (stats["hits"], stats["misses"], stats["inserts"], stats["evictions"]) == (1, 1, 1, 0)
    assert stats["bytes"] == writer.geometry.entry_dtype.itemsize
    assert stats == reader.stats()


def test_the_key_covers_model_prompt_long_input_policy_and_epoch(cache):
    writer, reader, _ = cache
    insert(writer, "text")
    assert lookup(reader, ["text"], model=OTHER)[0].missing == [0]
    assert lookup(reader, ["text"], prompt="query: ")[0].missing == [0]
    assert lookup(reader, ["text"], policy="truncate_left")[0].missing == [0]
    insert(writer, "old epoch", epoch=EPOCH + 2)  # an entry stamped with this epoch, keyed with another
    assert lookup(reader, ["old epoch"])[0].missing == [0]
    assert lookup(reader, ["text"])[0].missing == []


def test_a_reader_of_another_epoch_gets_no_cache(cache):
    _, _, names = cache
    assert CacheReader.attach(names, EPOCH + 2, ring=0) is None
    assert CacheReader.attach(names, EPOCH, ring=5) is None  # no counters for that ring


def test_clock_evicts_within_the_bucket_and_keeps_referenced_entries(cache):
    writer, reader, names = cache
    writer.geometry = CacheGeometry(1, DIM, 2)  # every key in bucket 0 (the views are wider; bucket 0 is theirs)
    reader.geometry = writer.geometry
    texts = [f"t{i}" for i in range(CACHE_WAYS)]
    for t in texts:
        insert(writer, t)
    assert lookup(reader, texts)[0].missing == []
    # Every entry was hit (reference bit set): the hand clears them all and evicts where it started.
    assert lookup(reader, texts[1:])[0].missing == []
    insert(writer, "new")
    found, _ = lookup(reader, texts + ["new"])
    assert len(found.missing) == 1 and found.missing[0] < CACHE_WAYS
    # The entries the hand passed have clear bits now; one hit sets t-one's again.
    survivor = CACHE_WAYS - 1 if found.missing[0] != CACHE_WAYS - 1 else 0
    lookup(reader, [texts[survivor]])
    insert(writer, "newer")
    assert lookup(reader, [texts[survivor], "newer"])[0].missing == []
    assert read_cache_stats(names)["evictions"] == 2


def test_a_torn_or_damaged_entry_is_a_miss_never_a_wrong_vector(cache):
    writer, reader, _ = cache
    insert(writer, "victim")
    tag = text_key(cache_key_material("tiny", EPOCH, None, "truncate"), "victim")[0]
    bucket = tag % writer.geometry.n_buckets
    way = writer._tags[bucket].tolist().index(tag)
    versions = writer._versions
    good = int(versions[bucket, way])
    versions[bucket, way] = good + 1  # a write in progress (odd)
    assert lookup(reader, ["victim"])[0].missing == [0]
    versions[bucket, way] = good
    writer._raw[bucket, way, -1] ^= 0xFF  # one flipped byte in the vector's padding or tail
    assert lookup(reader, ["victim"])[0].missing == [0]
    writer._raw[bucket, way, -1] ^= 0xFF
    assert lookup(reader, ["victim"])[0].missing == []
    vec_at = writer.geometry.entry_dtype.fields["vector"][1]
    writer._raw[bucket, way, vec_at] ^= 0x01  # the vector itself
    found, out = lookup(reader, ["victim"])
    assert found.missing == [0] and not out.any()


def test_random_bytes_everywhere_give_misses_only(cache):
    writer, reader, _ = cache
    texts = [f"text {i}" for i in range(200)]
    for t in texts:
        insert(writer, t)
    rng = np.random.default_rng(7)
    raw = writer._raw
    flat = raw.reshape(-1)
    for _ in range(2000):  # scattered bytes, then whole entries
        flat[rng.integers(len(flat))] = rng.integers(256)
    raw[: raw.shape[0] // 2] = rng.integers(0, 256, raw[: raw.shape[0] // 2].shape, dtype=np.uint8)
    found, out = lookup(reader, texts)
    hits = sorted(set(range(len(texts))) - set(found.missing))
    for i in hits:
        assert np.array_equal(out[i], vector_of(texts[i]))
    assert len(found.missing) > 0


def test_geometry_fits_the_budget_and_refuses_a_tiny_one():
    geometry = CacheGeometry.for_budget(2**20, 384, 16)
    assert geometry.total_bytes <= 2**20
    assert geometry.n_buckets * geometry.ways >= 2**20 // geometry.entry_dtype.itemsize - 2 * CACHE_WAYS
    from shm_protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="SHM_EMBED_CACHE_MB"):
        CacheGeometry.for_budget(1000, 384, 16)


def test_cache_off_creates_nothing():
    names = Names(new_namespace())
    settings = Settings.from_env({}, namespace=names.namespace, cache_mb=0)
    assert CacheWriter.create(names, settings, n_rings=2, dim=DIM, epoch=EPOCH) is None
    assert read_cache_stats(names) == {"enabled": False}
    assert names.dev_shm_entries() == []


def test_an_empty_or_foreign_segment_under_the_name_is_no_cache():
    import posix_ipc

    names = Names(new_namespace())
    for size in (0, 4096):
        shm = posix_ipc.SharedMemory(names.cache, posix_ipc.O_CREX, size=size)
        if size:
            os.write(shm.fd, os.urandom(size))
        shm.close_fd()
        try:
            assert CacheReader.attach(names, EPOCH, ring=0) is None
            assert read_cache_stats(names)["enabled"] is False
        finally:
            posix_ipc.unlink_shared_memory(names.cache)
