"""The binary layout of shm-embed's shared memory. This docstring is the spec.

Every offset and size used by the worker client, the sidecar and the stats
reader is derived from the numpy structured dtypes below; nobody retypes a
constant. All integers are little-endian.

Objects of one deployment (``NS`` is the namespace, default ``shm-embed``)::

    /NS-ctl              control segment  (header + ring table)
    /NS-data             data segment     (rings of slots)
    /NS-bell             doorbell semaphore: counting, posted once per READY slot
    /NS-s<RING>-<SLOT>   one semaphore per slot: posted by the sidecar when done
    /NS-lock             empty segment; the live sidecar holds a lock on it for
                         its whole life (one sidecar per namespace)
    /NS-cache            embedding cache segment (absent when SHM_EMBED_CACHE_MB=0)

Control segment::

    +--------------------------------------------------------------+  0
    | HEADER_DTYPE                                                 |
    |   magic[8] "SHMEMBED" | version u32 | header_bytes u32 |     |
    |   layout_hash u64 (names, types and order of every field)    |
    |   layout: n_rings, slots_per_ring, max_texts, max_tokens,    |
    |           dim, max_seq_length, vocab_size, slot_bytes (u32)  |
    |           (dim, max_seq_length, vocab_size: the largest of   |
    |           any served model; they size the slots)             |
    |   device[32], n_models u32                                   |
    |   models: MODEL_DTYPE x MAX_MODELS, the first n_models used: |
    |     name[128], kind u32 (ModelKind), dim u32 (vector size,   |
    |     scores per pair for a reranker, labels for a             |
    |     classifier), max_seq_length,                             |
    |     vocab_size, type_vocab_size (0: the model takes no       |
    |     segment ids), activation u32 (Activation of scores),     |
    |     flags u32 (ModelFlag), tokenizer_path[512], dtype[16],   |
    |     stats: MODEL_STATS_DTYPE                                 |
    |     Model 0 is the default.                                  |
    |   liveness: sidecar_pid i32, state u32, epoch u64,           |
    |           heartbeat_ns u64 (CLOCK_MONOTONIC), started_ns u64 |
    |           (wall clock), max_batch_tokens, max_batch_texts,   |
    |           loop_ns u64, loop_deadline_ns u64 (monotonic),     |
    |           bell_gen u32, wait_policy u32,                     |
    |           takeover_pid i32 (a successor asking for the       |
    |           namespace; 0: none)                                |
    |   stats: STATS_DTYPE (counters and histograms, sidecar-only) |
    +--------------------------------------------------------------+  CTL header itemsize
    | RING_DTYPE x n_rings: owner_pid i32, leases u64,             |
    |                       claimed_ns u64, inflight u32,          |
    |                       busy_ns u64, busy_at_ns u64            |
    +--------------------------------------------------------------+

Data segment: ``n_rings x slots_per_ring`` slots of ``slot_dtype(...)``,
each padded to a multiple of 64 bytes (a cache line)::

    +------ slot ----------------------------------------------------------+
    | state u32 | error u32 | n_texts u32 | n_tokens u32 | seq u64 (gen.) |
    | submit_ns u64 | queue_ns u64 | compute_ns u64 | eta_ns u64         |
    | batch_texts u32 | cancel u64 | model u32 (index into the models)  |
    | offsets u32[max_texts + 1]   text i is tokens[offsets[i]:offsets[i+1]]
    | segments u32[max_texts]      a pair's second segment starts at token |
    |                              segments[i] of text i (0: one segment)  |
    | cache_keys CACHE_KEY_DTYPE[max_texts]  text i's cache key; all zero: |
    |                              not to be cached (see the cache below)  |
    | tokens  i32[max_tokens]      ragged token ids, no padding            |
    | out     f32[max_texts, dim]  one vector (or a pair's scores, the     |
    |                              model's dim of them) per text           |
    +----------------------------------------------------------------------+

A slot serves one model: the sidecar batches slots of the same model
together, oldest first across models. A reranker's "texts" are (query,
document) pairs tokenized by the worker as pairs (``[CLS] q [SEP] d [SEP]``
for BERT); ``segments`` says where the document's tokens start, which gives
the segment (token type) ids; ``out[i, 0]`` is the pair's raw score (logit),
to which the reader applies the model's ``activation``. A classifier's
texts are single texts, or pairs sent as a reranker's are (``segments``
nonzero); ``out[i, :dim]`` are text i's raw logits, one per label in the
order of its config.json's ``id2label``, and the reader applies the
activation (softmax over the row, or sigmoid for a multi-label model).

Slot states (``SlotState``) and who may write each transition::

    FREE --worker--> CLAIMED --worker--> READY --sidecar--> BUSY
    BUSY --sidecar--> DONE | ERROR --worker--> FREE

Each transition has exactly one writer, so no compare-and-swap is needed.
Only the sidecar's reaper, in its batching thread between batches (so no slot
is BUSY), resets the slots of a ring whose owner died or gave it up while
slots were still in the sidecar's hands; Gunicorn's ``child_exit`` only marks
such a ring ORPHANED.

Leases, generations and liveness (the rules every reader and writer keeps):

* **Lease.** A worker claims a ring with ``owner_pid == 0`` under the
  ring-table lock (an open-file-description lock on the control segment: the
  kernel drops it when its holder dies, and two clients of one process
  exclude each other). A ring is handed to a new holder only when none of its
  slots is CLAIMED, READY or BUSY: a client that closes with slots still in
  the sidecar's hands marks its ring ORPHANED instead of free, and the reaper
  frees it between batches. A client keeps its ring across a stall of the
  same sidecar (same ``epoch``); a new epoch means a new lease.
* **Load.** The owner of a ring publishes how busy it is in its row
  (``inflight``, ``busy_ns``, ``busy_at_ns``; reset when it claims the ring)
  for the Gunicorn master, which adds and retires workers from it
  (web/scaling.py). The three stores are not one atomic write: a reader
  takes them as an estimate and clamps what it derives.
* **Generation.** ``seq`` is the request's generation, unique per client.
  The sidecar reads it when it takes the slot and publishes only if the slot
  is still BUSY with that generation; the waiter accepts DONE/ERROR only with
  its own. A late answer can never land in a newer request.
* **Liveness.** The heartbeat thread proves the process runs; ``loop_ns`` and
  ``loop_deadline_ns`` prove the batching loop does: the loop promises to
  show progress again before the deadline (longer while a model call of
  known cost runs). A sidecar whose state is not READY (or unknown), whose
  pid is dead, whose heartbeat is stale or whose loop is past its deadline is
  unavailable: workers fail fast, ``/ready`` answers 503, the stats CLI exits
  1 and systemd's watchdog stops being fed.
* **Cancellation.** A waiter that gives up (its timeout, or a stalled
  sidecar) writes its generation into ``cancel``; the sidecar, taking the
  slot, answers it CANCELLED instead of running the model on it, so the
  backlog a stall leaves behind is only the work someone still waits for.
* **Takeover.** A new sidecar (new models or new code) takes the namespace
  over from a serving one without failing a request. NOTE: the order is
  important here.

  1. The successor loads its models first, holding nothing; a load that
     fails ends it there and the serving sidecar never hears of it.
  2. It takes the takeover lock (``/NS-next``, one successor at a time),
     checks the serving sidecar is READY and alive, writes its pid into
     ``takeover_pid`` and posts the doorbell.
  3. The serving sidecar, between batches, sees a ``takeover_pid`` that is a
     live process and sets ``state = DRAINING``: it takes no new slot that
     its waiter has not yet made READY (workers do not submit to a sidecar
     that is not READY), answers every slot it holds (CLAIMED ones get
     ``DRAIN_CLAIMED_WAIT_S`` to become READY; later ones are answered
     SHUTDOWN), then sets ``state = HANDED_OVER``, unlinks its objects and
     releases the namespace lock. It waits (bounded) until the successor
     serves, then exits; if the successor dies before it serves (and no
     service manager may have made it the main process), the old sidecar
     creates the namespace again under a new epoch and serves on. A ``takeover_pid`` whose process is dead is cleared
     and ignored (the sidecar keeps serving), and a takeover lock nobody
     holds is unlinked. A successor stopped (SIGTERM) before the handover
     withdraws: it lets go of the takeover lock but lives on, and a sidecar
     that finds the lock free at the end of its drain clears
     ``takeover_pid`` and goes back to READY; the successor waits to see
     READY (it exits) or HANDED_OVER (the check came first: it takes over).
  4. The successor takes the namespace lock, creates the segments afresh
     (its layout may differ: other models, other sizes) with a new
     ``epoch``, and sets READY.
  5. A worker that finds its sidecar DRAINING or HANDED_OVER with a live
     ``takeover_pid`` (before a submit, or a slot answered SHUTDOWN, or a
     slot nobody will answer) waits for the new epoch (at most
     ``timeout_s``), attaches to it and runs the request again there from
     the start (re-tokenized: the new models may tokenize otherwise). A
     request never mixes answers of two epochs.

* **Fairness.** The sidecar stamps when it first saw each READY slot (its own
  clock, not the worker-written ``submit_ns``); rings take turns in a batch,
  oldest first.

Order of writes and reads. NOTE: the order is important here; the semaphore
post/wait is the memory barrier that publishes everything written before it.

* Worker submit: write ``tokens``, ``offsets``, ``segments``, ``model``,
  ``n_texts``, ``n_tokens``, ``seq``, ``submit_ns``; then ``state = READY``;
  then post the doorbell.
* Sidecar: drain the doorbell, *then* scan states (a post that comes after
  the drain wakes the next scan, so no READY slot is missed). The drain is
  bounded; a doorbell holding more posts than all slots could owe was
  written to by someone: the sidecar unlinks it, creates a new one under the
  same name and bumps ``bell_gen``; workers reopen the doorbell when they see
  a new ``bell_gen`` before they post. Then take the oldest slot's model and
  the ready slots of that model; set BUSY; validate (against that model's
  entry: token limit, vocabulary, whether it takes pairs); run the model;
  write ``out``, ``error``, timings; then
  ``state = DONE`` (or ``ERROR``); then post the slot's semaphore.
* Sidecar, on taking a slot: ``eta_ns`` = when it expects the batch done
  (from its running estimate of compute time per padded token), or
  ``ETA_PARK`` when the batch holds more slots than there are spare cores
  for their waiters to spin on.
* Waiting policy (``wait_policy``): under SPIN (a model that leaves the CPU
  free: CUDA, synthetic) the sidecar polls the doorbell for a while after
  its last work and a waiter polls its slot from the moment it submits,
  until the answer or an ETA far enough away to sleep on; under PARK (torch
  on the CPU's cores) both block on semaphores, as below.
* Worker wait (spin, then park): block on the slot semaphore until shortly
  before ``eta_ns``, then poll ``state`` for a bounded time, then block
  again. Waking a long-idle core costs 100-250 us on virtual machines; waking
  early on a timer hides that cost behind the model's compute.
* Worker wait: wait on the slot semaphore with a timeout; check ``state`` is
  DONE/ERROR and ``seq`` is its own (a stale post from an abandoned request is
  drained and ignored; a wait that times out looks at ``state`` too, so a
  post that failed costs one poll interval, not the request); copy ``out``
  rows; then ``state = FREE``.

Embedding cache segment (``/NS-cache``, sized by SHM_EMBED_CACHE_MB). Only
the sidecar writes entries; workers read them without locks::

    +--------------------------------------------------------------+  0
    | CACHE_HEADER_DTYPE: magic[8] "SHMECACH" | version u32 |      |
    |   header_bytes u32 | layout_hash u64 | epoch u64 (the        |
    |   sidecar's; a new epoch makes a new, empty segment) |        |
    |   n_buckets, ways, dim, entry_bytes, n_rings (u32) |         |
    |   inserts, evictions, bytes u64 (sidecar-only counters)     |
    +--------------------------------------------------------------+  header itemsize
    | CACHE_RING_DTYPE x n_rings: hits u64, misses u64; each ring's |
    |   counters are written only by the worker that leases it    |
    +--------------------------------------------------------------+
    | ref u8[n_buckets, ways]: CLOCK reference bits, set by a     |
    |   worker's hit, cleared by the sidecar's hand (not checked: |
    |   a wrong bit only changes which entry is evicted)          |
    +--------------------------------------------------------------+  rounded up to SLOT_ALIGN
    | cache_entry_dtype(dim) x n_buckets x ways                    |
    |   version u64    seqlock: 0 never written, odd being written |
    |   checksum u64   xxh64(CACHE_CHECKSUM_SEED) of every byte    |
    |                  from ``key`` to the end of the entry        |
    |   key CACHE_KEY_DTYPE: hash_lo, hash_hi (xxh3_128 of the key |
    |       material), check (xxh64, CACHE_CHECK_SEED, of the same |
    |       bytes), length (of those bytes)                        |
    |   epoch u64 | model u32 (table index) | dim u32 (the model's) |
    |   n_tokens u32 (after truncation) | vector f32[dim]          |
    +--------------------------------------------------------------+

The key material (``cache_key_material``) is the model's name, the epoch,
the prompt, the long-input policy (``truncate``, ``truncate_left`` or
``refuse``; chunked texts are not cached) and the text's UTF-8 bytes:
everything that changes the vector the sidecar computes. ``dimensions`` and ``normalize``
are applied by the client after the answer, so a hit serves them all.
Text ``i`` of a request lives in bucket ``hash_lo % n_buckets``, in any of
its ``ways`` entries (CLOCK within the bucket).

* Worker lookup, before it tokenizes: find ``hash_lo`` among the bucket's
  keys; read ``version`` (odd or 0: a miss); copy the entry; read
  ``version`` again (changed: a miss); the copy's key, epoch, model and dim
  must be the request's and its checksum must hold, else a miss. Random
  bytes written into the segment are a miss, never another text's vector.
  On a hit, set the entry's reference bit. Misses go to the ring with their
  keys in ``cache_keys``; texts that all hit never touch the ring.
* Sidecar insert, after it published the answer: a bucket entry with the
  same key is left alone (rewritten in place if it no longer checks out);
  else an empty entry, else the CLOCK hand's victim (the first entry whose
  reference bit is clear, clearing bits it passes).
  NOTE: ``version`` odd, then the entry (checksum included), then
  ``version`` even (the next one): a reader that overlaps the write sees the
  version change, or an odd one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, LayoutMismatch, SidecarUnavailable

MAGIC = b"SHMEMBED"
PROTOCOL_VERSION = 5

#: Alignment of every slot, in bytes.
SLOT_ALIGN = 64


class SlotState(enum.IntEnum):
    FREE = 0
    CLAIMED = 1
    READY = 2
    BUSY = 3
    DONE = 4
    ERROR = 5


# Plain-int aliases for the hot paths: numpy compares an IntEnum member about
# 50 times slower than an int (it takes a generic-object path).
SLOT_FREE, SLOT_CLAIMED, SLOT_READY, SLOT_BUSY, SLOT_DONE, SLOT_ERROR = (int(s) for s in SlotState)

# Special values of a slot's ``eta_ns`` (real ETAs are monotonic clock
# readings, far above both): not picked up yet; picked up in a batch whose
# waiters should block on the semaphore rather than spin.
ETA_NONE = 0
ETA_PARK = 1


class WaitPolicy(enum.IntEnum):
    """How both sides wait (the sidecar decides; SHM_EMBED_WAIT_POLICY)."""

    PARK = 0  # block on semaphores, spinning only SPIN_US around the expected answer
    SPIN = 1  # the sidecar polls its doorbell while idle, waiters poll their slot


class SidecarState(enum.IntEnum):
    STARTING = 0
    READY = 1
    DRAINING = 2
    STOPPED = 3
    HANDED_OVER = 4  # drained for a successor (``takeover_pid``), which creates the namespace again


def sidecar_state_name(value: int) -> str:
    """The lower-case name of a header ``state`` value; "unknown" for a value
    no sidecar writes (a corrupt or hostile header is unavailable, never a crash)."""
    try:
        return SidecarState(value).name.lower()
    except ValueError:
        return "unknown"


class SlotError(enum.IntEnum):
    """Why the sidecar failed a slot. Stored in the slot's ``error`` field."""

    NONE = 0
    BAD_COUNT = 1  # n_texts or n_tokens out of range
    BAD_OFFSETS = 2  # offsets not 0..n_tokens, not increasing, or an empty text
    BAD_TOKEN = 3  # a token id below 0 or at/above the vocabulary size
    TOO_LONG = 4  # a text longer than the model's max sequence length
    MODEL_FAILED = 5  # the model raised (e.g. out of memory)
    SHUTDOWN = 6  # the sidecar stopped before it could serve the slot
    REAPED = 7  # the slot's owner died; counted, never seen by a live worker
    CANCELLED = 8  # its worker gave up on it (timeout, stall) before the model ran; counted, not computed
    BAD_MODEL = 9  # the slot's model index names no served model
    BAD_SEGMENTS = 10  # a segment split beyond its text, or a split for a model that takes no pairs


#: Models one sidecar serves at most (the header's model table has this many entries).
MAX_MODELS = 8
#: Bytes of a model's name in the table (UTF-8).
MODEL_NAME_BYTES = 128


class ModelKind(enum.IntEnum):
    """What a served model computes (a model table entry's ``kind``)."""

    EMBED = 0  # a SentenceTransformer: one vector per text
    RERANK = 1  # a CrossEncoder: scores per (query, document) pair
    CLASSIFY = 2  # a sequence classifier: one logit per label (``dim`` labels) per text or pair


class Activation(enum.IntEnum):
    """What turns a reranker's raw score (logit) into its relevance score,
    as CrossEncoder.predict applies it, or a classifier's logits into its
    labels' scores; the sidecar writes raw scores."""

    IDENTITY = 0
    SIGMOID = 1  # each score on its own (a reranker; a multi-label classifier)
    SOFTMAX = 2  # over a row's scores (a single-label classifier)


class ModelFlag(enum.IntFlag):
    """Bits of a model table entry's ``flags``."""

    MATRYOSHKA = 1  # trained for truncated vectors: ``dimensions`` below its size may be served


# Histogram bucket upper bounds. The last bucket is "above the last bound".
BATCH_TEXTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

STATS_DTYPE = np.dtype(
    [
        ("requests", "<u8"),  # slots served (DONE)
        ("texts", "<u8"),
        ("tokens", "<u8"),  # real tokens embedded
        ("padded_tokens", "<u8"),  # tokens the model ran, padding included
        ("batches", "<u8"),
        ("errors", "<u8", (len(SlotError),)),  # by SlotError code
        ("queue_ns_sum", "<u8"),
        ("compute_ns_sum", "<u8"),
        ("batch_texts_hist", "<u8", (len(BATCH_TEXTS_BUCKETS) + 1,)),
        ("queue_hist", "<u8", (len(LATENCY_BUCKETS_S) + 1,)),
        ("compute_hist", "<u8", (len(LATENCY_BUCKETS_S) + 1,)),
        ("ready_slots", "<u4"),  # READY slots seen at the last scan (queue depth)
        ("busy_slots", "<u4"),  # slots in the batch being computed
        ("rings_reaped", "<u8"),
        ("loop_errors", "<u8"),  # exceptions the batching loop caught and survived (logged)
        ("stale_answers", "<u8"),  # answers dropped: the slot's generation changed in the model
    ],
    align=True,
)

#: Per-model counters, in each model table entry (the sidecar writes them after it answers).
MODEL_STATS_DTYPE = np.dtype(
    [
        ("requests", "<u8"),
        ("texts", "<u8"),
        ("tokens", "<u8"),
        ("padded_tokens", "<u8"),
        ("batches", "<u8"),
        ("errors", "<u8"),  # slots of this model answered with any error
        ("queue_ns_sum", "<u8"),
        ("compute_ns_sum", "<u8"),
    ],
    align=True,
)

MODEL_DTYPE = np.dtype(
    [
        ("name", f"S{MODEL_NAME_BYTES}"),
        ("kind", "<u4"),  # ModelKind
        ("dim", "<u4"),  # vector size; a reranker's scores per pair; a classifier's labels
        ("max_seq_length", "<u4"),  # tokens of one text (a pair: both parts and the specials)
        ("vocab_size", "<u4"),
        ("type_vocab_size", "<u4"),  # segment ids the model takes; 0: none (pairs go without them)
        ("activation", "<u4"),  # Activation of a reranker's or classifier's scores
        ("flags", "<u4"),  # ModelFlag bits
        ("tokenizer_path", "S512"),
        ("dtype", "S16"),  # the weights' dtype on the device (float32, bfloat16, float16)
        ("stats", MODEL_STATS_DTYPE),
    ],
    align=True,
)

# Only these fields are read before the layout is known to match.
PREFIX_DTYPE = np.dtype([("magic", "S8"), ("version", "<u4"), ("header_bytes", "<u4"), ("layout_hash", "<u8")],
                        align=True)

HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_bytes", "<u4"),
        ("layout_hash", "<u8"),  # LAYOUT_HASH of the writer: every field of header, ring and slot
        ("n_rings", "<u4"),
        ("slots_per_ring", "<u4"),
        ("max_texts", "<u4"),
        ("max_tokens", "<u4"),
        ("dim", "<u4"),
        ("max_seq_length", "<u4"),
        ("vocab_size", "<u4"),
        ("slot_bytes", "<u4"),
        ("device", "S32"),
        ("n_models", "<u4"),  # entries of ``models`` in use; model 0 is the default
        ("models", MODEL_DTYPE, (MAX_MODELS,)),
        ("sidecar_pid", "<i4"),
        ("state", "<u4"),
        ("epoch", "<u8"),
        ("heartbeat_ns", "<u8"),
        ("started_ns", "<u8"),
        ("max_batch_tokens", "<u4"),  # SHM_EMBED_ADMIT_TOKENS: the unpadded admission budget
        ("max_batch_texts", "<u4"),
        ("loop_ns", "<u8"),  # monotonic: the batching loop's last sign of progress
        ("loop_deadline_ns", "<u8"),  # monotonic: the loop shows progress again before this
        ("bell_gen", "<u4"),  # bumped when the sidecar replaces a tampered doorbell: workers reopen it
        ("wait_policy", "<u4"),  # WaitPolicy the sidecar chose: whether waiters poll their slot or park
        ("takeover_pid", "<i4"),  # a successor sidecar asking for the namespace (see Takeover); 0: none
        ("stats", STATS_DTYPE),
    ],
    align=True,
)

RING_DTYPE = np.dtype(
    [("owner_pid", "<i4"), ("leases", "<u8"), ("claimed_ns", "<u8"),
     # The owner's load, written by the owner alone (its HTTP requests, not
     # its slots) and read by the Gunicorn master that scales the workers:
     # requests in progress, and request-nanoseconds spent up to busy_at_ns
     # (monotonic). Busy up to now = busy_ns + inflight x (now - busy_at_ns).
     ("inflight", "<u4"), ("busy_ns", "<u8"), ("busy_at_ns", "<u8")],
    align=True,
)

# -- the embedding cache (see "Embedding cache segment" above) ---------------------------

CACHE_MAGIC = b"SHMECACH"
CACHE_VERSION = 1
#: Entries per bucket (CLOCK within a bucket).
CACHE_WAYS = 8
#: Seed of a key's second, independent hash (xxh64): a 128-bit hash that
#: collides must also collide here, at the same length, to mix two texts up.
CACHE_CHECK_SEED = 0x5EED_C0DE_CAC4E
#: Seed of an entry's checksum (xxh64 over key, epoch, model, dim, tokens, vector).
CACHE_CHECKSUM_SEED = 0x0C4EC_5A11

#: One text's key, as a worker sends it in a slot and the entry stores it.
CACHE_KEY_DTYPE = np.dtype(
    [("hash_lo", "<u8"), ("hash_hi", "<u8"), ("check", "<u8"), ("length", "<u8")], align=True)

CACHE_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_bytes", "<u4"),
        ("layout_hash", "<u8"),  # CACHE_LAYOUT_HASH of the writer
        ("epoch", "<u8"),  # the sidecar's epoch; entries of another are never served
        ("n_buckets", "<u4"),
        ("ways", "<u4"),
        ("dim", "<u4"),  # floats of an entry's vector: the largest embedding model's
        ("entry_bytes", "<u4"),
        ("n_rings", "<u4"),  # entries of the ring counters table
        ("inserts", "<u8"),  # sidecar-only counters from here on
        ("evictions", "<u8"),
        ("bytes", "<u8"),  # bytes of the entries in use
    ],
    align=True,
)

#: Hit and miss counters of one ring, written only by the worker that leases it.
CACHE_RING_DTYPE = np.dtype([("hits", "<u8"), ("misses", "<u8")], align=True)


def cache_entry_dtype(dim: int) -> np.dtype:
    """One cache entry for vectors of ``dim`` floats, padded to SLOT_ALIGN."""
    packed = np.dtype(
        [
            ("version", "<u8"),  # seqlock: 0 never written, odd while being written
            ("checksum", "<u8"),  # xxh64(CACHE_CHECKSUM_SEED) of the bytes from "key" to the end
            ("key", CACHE_KEY_DTYPE),
            ("epoch", "<u8"),
            ("model", "<u4"),
            ("dim", "<u4"),  # the model's vector size (the first dim floats of vector)
            ("n_tokens", "<u4"),
            ("vector", "<f4", (dim,)),
        ],
        align=True,
    )
    fields = packed.fields
    return np.dtype({"names": list(packed.names), "formats": [fields[n][0] for n in packed.names],
                     "offsets": [fields[n][1] for n in packed.names],
                     "itemsize": _round_up(packed.itemsize, SLOT_ALIGN)})


#: The fields of an entry a reader compares with its request, in entry
#: order and contiguous: key, epoch, model, dim (packed as one struct).
CACHE_MATCH_FIELDS = ("key", "epoch", "model", "dim")


@dataclass(frozen=True)
class CacheGeometry:
    """Where everything lies in a cache segment of these parameters."""

    n_buckets: int
    dim: int
    n_rings: int
    ways: int = CACHE_WAYS

    @property
    def entry_dtype(self) -> np.dtype:
        return cache_entry_dtype(self.dim)

    @property
    def rings_offset(self) -> int:
        return CACHE_HEADER_DTYPE.itemsize

    @property
    def ref_offset(self) -> int:
        return self.rings_offset + CACHE_RING_DTYPE.itemsize * self.n_rings

    @property
    def entries_offset(self) -> int:
        return _round_up(self.ref_offset + self.n_buckets * self.ways, SLOT_ALIGN)

    @property
    def total_bytes(self) -> int:
        return self.entries_offset + self.entry_dtype.itemsize * self.n_buckets * self.ways

    @classmethod
    def for_budget(cls, budget_bytes: int, dim: int, n_rings: int) -> CacheGeometry:
        """The most buckets that fit ``budget_bytes``; ConfigError below one bucket."""
        probe = cls(1, dim, n_rings)
        per_bucket = probe.entry_dtype.itemsize * probe.ways + probe.ways
        fixed = probe.entries_offset + SLOT_ALIGN  # header, ring counters, rounding
        n_buckets = (budget_bytes - fixed) // per_bucket
        if n_buckets < 1:
            raise ConfigError(f"SHM_EMBED_CACHE_MB: {budget_bytes} bytes hold no bucket of {CACHE_WAYS} "
                              f"vectors of {dim} floats; raise it, or 0 to turn the cache off")
        return cls(int(n_buckets), dim, n_rings)

    @classmethod
    def from_header(cls, header: np.ndarray) -> CacheGeometry:
        return cls(int(header["n_buckets"]), int(header["dim"]), int(header["n_rings"]), int(header["ways"]))

    def write_header(self, header: np.ndarray) -> None:
        header["version"] = CACHE_VERSION
        header["header_bytes"] = CACHE_HEADER_DTYPE.itemsize
        header["layout_hash"] = CACHE_LAYOUT_HASH
        for f in ("n_buckets", "dim", "n_rings", "ways"):
            header[f] = getattr(self, f)
        header["entry_bytes"] = self.entry_dtype.itemsize


def cache_key_material(model: str, epoch: int, prompt: str | None, policy: str) -> bytes:
    """What comes before a text's UTF-8 bytes in its cache key (the same for
    every text of a request): model name, epoch, prompt, long-input policy.
    Each variable part goes after its length, so that no two requests whose
    parts differ give the same bytes."""
    parts = [model.encode("utf-8", "surrogatepass"), (prompt or "").encode("utf-8", "surrogatepass"),
             policy.encode("ascii")]
    return b"".join((len(parts[0]).to_bytes(4, "little"), parts[0], epoch.to_bytes(8, "little"),
                     len(parts[1]).to_bytes(4, "little"), parts[1], len(parts[2]).to_bytes(4, "little"), parts[2]))


def cache_view(buf, geometry: CacheGeometry):
    """(header 0-d view, ring counters, reference bits (n_buckets, ways),
    entries (n_buckets, ways)) over a mapped cache segment."""
    header = np.frombuffer(buf, dtype=CACHE_HEADER_DTYPE, count=1).reshape(())
    rings = np.frombuffer(buf, dtype=CACHE_RING_DTYPE, count=geometry.n_rings, offset=geometry.rings_offset)
    ref = np.frombuffer(buf, dtype=np.uint8, count=geometry.n_buckets * geometry.ways,
                        offset=geometry.ref_offset).reshape(geometry.n_buckets, geometry.ways)
    entries = np.frombuffer(buf, dtype=geometry.entry_dtype, count=geometry.n_buckets * geometry.ways,
                            offset=geometry.entries_offset).reshape(geometry.n_buckets, geometry.ways)
    return header, rings, ref, entries


def check_cache_prefix(buf, name: str) -> None:
    """Raise LayoutMismatch unless ``buf`` is a cache segment of this build's layout."""
    if len(buf) < CACHE_HEADER_DTYPE.itemsize:
        raise LayoutMismatch(f"{name}: segment is {len(buf)} bytes, smaller than a cache header")
    header = np.frombuffer(buf, dtype=CACHE_HEADER_DTYPE, count=1)[0]
    if bytes(header["magic"]) != CACHE_MAGIC:
        raise LayoutMismatch(f"{name}: bad magic {bytes(header['magic'])!r}, not an shm-embed cache segment")
    if (int(header["version"]), int(header["layout_hash"]), int(header["header_bytes"])) != (
            CACHE_VERSION, CACHE_LAYOUT_HASH, CACHE_HEADER_DTYPE.itemsize):
        raise LayoutMismatch(f"{name}: cache layout version {int(header['version'])} "
                             f"(fingerprint {int(header['layout_hash']):016x}), this build "
                             f"{CACHE_VERSION} ({CACHE_LAYOUT_HASH:016x})")


@dataclass(frozen=True)
class ModelEntry:
    """One entry of the header's model table, as plain Python values."""

    index: int
    name: str
    kind: ModelKind
    dim: int
    max_seq_length: int
    vocab_size: int
    type_vocab_size: int = 0
    activation: Activation = Activation.IDENTITY
    flags: ModelFlag = ModelFlag(0)
    tokenizer_path: str = ""
    dtype: str = "float32"

    @property
    def matryoshka(self) -> bool:
        return bool(self.flags & ModelFlag.MATRYOSHKA)

    def write(self, rec: np.ndarray) -> None:
        """Fill a MODEL_DTYPE record (the sidecar, before it is READY)."""
        for f in ("name", "tokenizer_path", "dtype"):
            raw = getattr(self, f).encode("utf-8")
            if len(raw) > MODEL_DTYPE[f].itemsize:
                raise ConfigError(f"model {f} {getattr(self, f)!r} is longer than {MODEL_DTYPE[f].itemsize} bytes")
            rec[f] = raw
        for f in ("kind", "dim", "max_seq_length", "vocab_size", "type_vocab_size", "activation", "flags"):
            rec[f] = int(getattr(self, f))

    @classmethod
    def read(cls, index: int, rec: np.ndarray) -> ModelEntry:
        """The entry from a MODEL_DTYPE record. Raises ValueError on values no
        sidecar writes (a corrupt or hostile header)."""
        def text(f: str) -> str:
            return bytes(rec[f]).rstrip(b"\0").decode("utf-8", "replace")

        return cls(index, text("name"), ModelKind(int(rec["kind"])), int(rec["dim"]), int(rec["max_seq_length"]),
                   int(rec["vocab_size"]), int(rec["type_vocab_size"]), Activation(int(rec["activation"])),
                   ModelFlag(int(rec["flags"]) & int(ModelFlag.MATRYOSHKA)), text("tokenizer_path"),
                   text("dtype"))


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _slot_fields(max_texts: int, max_tokens: int, dim: int) -> list:
    return [
        ("state", "<u4"),
        ("error", "<u4"),
        ("n_texts", "<u4"),
        ("n_tokens", "<u4"),
        ("seq", "<u8"),  # the request's generation, unique per client (never 0)
        ("submit_ns", "<u8"),  # worker's clock; informational (the sidecar orders by its own)
        ("queue_ns", "<u8"),
        ("compute_ns", "<u8"),  # the model calls that served it (batching work not included)
        ("eta_ns", "<u8"),  # when the sidecar expects to answer (monotonic); ETA_NONE, ETA_PARK
        ("batch_texts", "<u4"),
        ("cancel", "<u8"),  # a generation its worker gave up on: the sidecar skips it (CANCELLED)
        ("model", "<u4"),  # index into the header's model table
        ("offsets", "<u4", (max_texts + 1,)),
        ("segments", "<u4", (max_texts,)),  # where a pair's second segment starts in text i (0: none)
        ("cache_keys", CACHE_KEY_DTYPE, (max_texts,)),  # each text's cache key (all zero: not to be cached)
        ("tokens", "<i4", (max_tokens,)),
        ("out", "<f4", (max_texts, dim)),
    ]


#: Every field of a slot, in layout order (SlotViews has one attribute each).
SLOT_FIELDS = tuple(f[0] for f in _slot_fields(1, 1, 1))


def slot_dtype(max_texts: int, max_tokens: int, dim: int) -> np.dtype:
    """The dtype of one slot for these layout parameters, padded to SLOT_ALIGN."""
    packed = np.dtype(_slot_fields(max_texts, max_tokens, dim), align=True)
    fields = packed.fields
    return np.dtype(
        {
            "names": list(packed.names),
            "formats": [fields[n][0] for n in packed.names],
            "offsets": [fields[n][1] for n in packed.names],
            "itemsize": _round_up(packed.itemsize, SLOT_ALIGN),
        }
    )


@dataclass(frozen=True)
class LayoutParams:
    """The parameters that fix every size in both segments."""

    n_rings: int
    slots_per_ring: int
    max_texts: int
    max_tokens: int
    dim: int
    max_seq_length: int
    vocab_size: int

    @property
    def slot_dtype(self) -> np.dtype:
        return slot_dtype(self.max_texts, self.max_tokens, self.dim)

    @property
    def ctl_bytes(self) -> int:
        return HEADER_DTYPE.itemsize + RING_DTYPE.itemsize * self.n_rings

    @property
    def data_bytes(self) -> int:
        return self.slot_dtype.itemsize * self.n_rings * self.slots_per_ring

    @classmethod
    def from_header(cls, header: np.ndarray) -> LayoutParams:
        return cls(**{f: int(header[f]) for f in cls.__dataclass_fields__})

    def write_header(self, header: np.ndarray) -> None:
        for f in self.__dataclass_fields__:
            header[f] = getattr(self, f)
        header["slot_bytes"] = self.slot_dtype.itemsize


def _layout_hash() -> int:
    """A fingerprint of every field of the header, the ring table and a slot
    (names, types, order): two builds that would read each other's bytes
    differently never agree on it, even where the sizes happen to match."""
    import hashlib

    text = repr((HEADER_DTYPE.descr, RING_DTYPE.descr, _slot_fields(1, 1, 1), MAX_MODELS))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


LAYOUT_HASH = _layout_hash()


def _cache_layout_hash() -> int:
    """A fingerprint of every field of the cache segment (as _layout_hash)."""
    import hashlib

    text = repr((CACHE_HEADER_DTYPE.descr, CACHE_RING_DTYPE.descr, cache_entry_dtype(1).descr, CACHE_WAYS,
                 CACHE_CHECK_SEED, CACHE_CHECKSUM_SEED))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


CACHE_LAYOUT_HASH = _cache_layout_hash()


def check_prefix(buf, name: str) -> None:
    """Raise LayoutMismatch unless ``buf`` starts with our magic and version."""
    if len(buf) < HEADER_DTYPE.itemsize:
        raise LayoutMismatch(f"{name}: segment is {len(buf)} bytes, smaller than a header")
    prefix = np.frombuffer(buf, dtype=PREFIX_DTYPE, count=1)[0]
    if bytes(prefix["magic"]).strip(b"\0") == b"":
        # Created but not yet written: a sidecar is starting right now.
        raise SidecarUnavailable(f"{name}: the sidecar is still creating its segments", reason="starting")
    if bytes(prefix["magic"]) != MAGIC:
        raise LayoutMismatch(f"{name}: bad magic {bytes(prefix['magic'])!r}, not an shm-embed segment")
    if int(prefix["version"]) != PROTOCOL_VERSION:
        raise LayoutMismatch(
            f"{name}: protocol version {int(prefix['version'])}, this client speaks {PROTOCOL_VERSION}; "
            "upgrade the sidecar and the workers together",
            found=int(prefix["version"]),
            expected=PROTOCOL_VERSION,
        )
    if int(prefix["layout_hash"]) != LAYOUT_HASH:
        raise LayoutMismatch(
            f"{name}: protocol version {PROTOCOL_VERSION} but another field layout (fingerprint "
            f"{int(prefix['layout_hash']):016x}, this build {LAYOUT_HASH:016x}); "
            "upgrade the sidecar and the workers together"
        )


def header_view(buf) -> np.ndarray:
    """A writable (or read-only, as ``buf`` is) 0-d view of the header."""
    return np.frombuffer(buf, dtype=HEADER_DTYPE, count=1).reshape(())


def model_stats_view(header: np.ndarray, index: int) -> np.ndarray:
    """A writable 0-d view of model ``index``'s counters in the header
    (indexing one element of a structured array gives a copy-like scalar)."""
    return header["models"]["stats"][index: index + 1].reshape(())


def ring_table_view(buf, n_rings: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=RING_DTYPE, count=n_rings, offset=HEADER_DTYPE.itemsize)


class SlotViews:
    """One numpy view per slot field over an array of slots, built once.

    The client views its ring (``slots[ring]``), the sidecar every slot
    (``slots.reshape(-1)``): ``views.state[i]`` is slot i's state. Looking a
    field up on a structured array costs about a microsecond, so the hot paths
    use these views."""

    __slots__ = SLOT_FIELDS

    def __init__(self, slots: np.ndarray):
        for name in SLOT_FIELDS:
            setattr(self, name, slots[name])


class RecordViews:
    """One writable view per field of a 0-d structured array (the header, its
    stats): a scalar field as a 1-element array (``views.batches[0] += 1``),
    an array field as itself. Updating a field by name on the record costs a
    few microseconds; through these views, a fraction of one."""

    def __init__(self, record: np.ndarray):
        for name in record.dtype.names:
            view = record[name]
            setattr(self, name, view.reshape(1) if view.ndim == 0 else view)


def slots_view(buf, params: LayoutParams) -> np.ndarray:
    """The data segment as an (n_rings, slots_per_ring) array of slots."""
    return np.frombuffer(
        buf, dtype=params.slot_dtype, count=params.n_rings * params.slots_per_ring
    ).reshape(params.n_rings, params.slots_per_ring)


def bucket_index(value: float, bounds: tuple) -> int:
    """Index of the histogram bucket for ``value`` (le semantics, last is +Inf)."""
    for i, b in enumerate(bounds):
        if value <= b:
            return i
    return len(bounds)


def hist_quantile(counts, bounds: tuple, q: float) -> float | None:
    """Estimate a quantile from bucket counts: the upper bound of the bucket
    that holds it (the last bound for the overflow bucket). None when empty."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    idx = int(np.searchsorted(np.cumsum(counts), q * total))
    return float(bounds[min(idx, len(bounds) - 1)])
