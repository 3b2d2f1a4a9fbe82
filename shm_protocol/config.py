"""All of shm-embed's configuration, in one table.

Every setting is a field of :class:`Settings`, declared once with its
environment variable, default and meaning. Entry points call
``Settings.from_env(os.environ)`` once at start-up; nothing reads the
environment at import time. ``python -m shm_protocol.config`` prints the
table, ``--markdown`` the whole of docs/configuration.md (a unit test fails
when that file differs from it) and ``--env`` the example environment file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .long_inputs import POLICIES

#: The file under SHM_EMBED_DATA_DIR that holds every collection.
COLLECTIONS_DB = "collections.sqlite3"

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _setting(env: str, default: Any, doc: str, *, choices: tuple = (), minimum: float | None = None,
             secret: bool = False):
    """A setting; a ``secret`` one (a key, a URL with a password) is left out of the settings' repr."""
    return field(default=default, repr=not secret,
                 metadata={"env": env, "doc": doc, "choices": choices, "minimum": minimum})


@dataclass(frozen=True, kw_only=True)
class Settings:
    # --- deployment and access -------------------------------------------------
    namespace: str = _setting(
        "SHM_EMBED_NAMESPACE", "shm-embed",
        "Prefix of every shared-memory segment and semaphore; two deployments on one host need two namespaces.",
    )
    group: str = _setting(
        "SHM_EMBED_GROUP", "",
        "When set, segments and semaphores are created mode 0660 and owned by this group; otherwise 0600 (owner only).",
    )
    # --- layout (fixed by the sidecar at start; workers read it from the header) --
    rings: int = _setting(
        "SHM_EMBED_RINGS", 16, "Rings in the data segment: the most worker processes attached at once.", minimum=1
    )
    slots_per_ring: int = _setting(
        "SHM_EMBED_SLOTS_PER_RING", 4,
        "Slots per ring: the most requests (or request parts) one worker has in flight.", minimum=1,
    )
    slot_texts: int = _setting(
        "SHM_EMBED_SLOT_TEXTS", 64, "Texts one slot holds; larger requests span slots.", minimum=1
    )
    slot_tokens: int = _setting(
        "SHM_EMBED_SLOT_TOKENS", 4096,
        "Token ids one slot holds (ragged, no padding); at least the model's max sequence length.", minimum=8,
    )
    # --- sidecar ---------------------------------------------------------------
    model: str = _setting(
        "SHM_EMBED_MODEL", "",
        "Path of a sentence-transformers model folder; empty means the bundled all-MiniLM-L6-v2.",
    )
    models: str = _setting(
        "SHM_EMBED_MODELS", "",
        "Several models in one sidecar: comma-separated name=path entries (sentence-transformers folders, "
        "embedding models, cross-encoders or sequence classifiers, told apart by their configs); each may add "
        ";embed, ;rerank, ;classify or ;matryoshka (e.g. minilm=/models/minilm,rerank=/models/ce;rerank). The "
        "first is the default for embedding, the first reranker for reranking, the first classifier for "
        "classification; a request's 'model' picks by name. Empty: the one model of SHM_EMBED_MODEL.",
    )
    device: str = _setting(
        "SHM_EMBED_DEVICE", "auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
    )
    matryoshka: bool = _setting(
        "SHM_EMBED_MATRYOSHKA", False,
        "true: the model was trained for truncated dimensions (Matryoshka), so 'dimensions' below its size cuts "
        "and renormalizes its vectors; also read from the folder's configs (is_matryoshka, "
        "matryoshka_dimensions). Otherwise other dimensions are a 422.",
    )
    dtype: str = _setting(
        "SHM_EMBED_DTYPE", "auto",
        "Model weights on the device. auto: float16 on CUDA, bfloat16 on a CPU with AMX (2-4x faster, cosine "
        "0.9999 against float32), float32 elsewhere (a CPU with avx512_bf16 but no AMX: the faster of the two, "
        "timed at load). float32 gives SentenceTransformer.encode's vectors exactly; float16 is CUDA only.",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    torch_threads: int = _setting(
        "SHM_EMBED_TORCH_THREADS", 0, "torch intra-op threads in the sidecar; 0 means one per CPU core.", minimum=0
    )
    admit_tokens: int = _setting(
        "SHM_EMBED_ADMIT_TOKENS", 16384,
        "Token ids one batch takes from the rings at most, counted as the slots hold them (unpadded, every "
        "text of every slot); the oldest ready slot always joins however large. Replaces "
        "SHM_EMBED_MAX_BATCH_TOKENS (still read, with a deprecation warning, for this and "
        "SHM_EMBED_CALL_TOKENS).", minimum=1,
    )
    call_tokens: int = _setting(
        "SHM_EMBED_CALL_TOKENS", 16384,
        "Padded tokens of one model call at most (texts x its longest text); a batch is cut into calls under "
        "it. The staging buffers (pinned on CUDA) hold this many token ids, or the model's max sequence "
        "length if that is more.", minimum=1,
    )
    max_batch_texts: int = _setting(
        "SHM_EMBED_MAX_BATCH_TEXTS", 256, "Texts in one batch, and in one model call, at most.", minimum=1
    )
    call_rows: int = _setting(
        "SHM_EMBED_CALL_ROWS", 0,
        "Texts per model call at most, below SHM_EMBED_MAX_BATCH_TEXTS; N > 0 fixes it. 0: measured for each "
        "model at start (calls of 1 to 128 texts of 32 tokens; the fewest that reach 95% of the best texts/s: on "
        "a CPU that is 16-32, where filling the token budget runs slower per text), then refined while serving "
        "from the texts/s of the calls it runs, per size and width of call (see docs/model-calls.md).", minimum=0,
    )
    cuda_graphs: str = _setting(
        "SHM_EMBED_CUDA_GRAPHS", "auto",
        "auto: on a CUDA device, each embedding or reranking model captures one CUDA graph per bucket of "
        "(texts, padded width) at start and replays it for calls that fit (small calls are launch-bound: a "
        "replay saves the kernel launches); a model that cannot be captured runs eagerly, with a log line. "
        "off: every call runs eagerly. No effect on a CPU.",
        choices=("auto", "off"),
    )
    max_wait_us: int = _setting(
        "SHM_EMBED_MAX_WAIT_US", 4000,
        "Longest the sidecar lingers for more work when fewer slots are ready than its last batch held "
        "(a lone client never waits); 0 never waits: work that arrives while the model runs forms the next batch.",
        minimum=0,
    )
    spin_us: int = _setting(
        "SHM_EMBED_SPIN_US", 300,
        "Busy-poll window, in microseconds, before parking on a semaphore: the sidecar polls the doorbell this "
        "long after a batch, a worker polls its slot this long around the expected answer. 0 always parks.",
        minimum=0,
    )
    wait_policy: str = _setting(
        "SHM_EMBED_WAIT_POLICY", "auto",
        "spin: the sidecar polls its doorbell while idle (for SHM_EMBED_IDLE_POLL_US after its last work) and "
        "workers poll their slot while they wait: the lowest latency, for a core on each side while requests "
        "are in flight. park: both block on semaphores but for SPIN_US around the expected answer; no CPU "
        "while waiting, 30-250 us more per request. auto: spin when the model leaves the CPU free (CUDA, "
        "synthetic) on 2 or more cores, park when torch computes on the CPU.",
        choices=("auto", "spin", "park"),
    )
    idle_poll_us: int = _setting(
        "SHM_EMBED_IDLE_POLL_US", 20000,
        "Under the spin policy: how long the sidecar keeps polling its doorbell after its last work, and how "
        "long a worker polls its slot at most, before they park.", minimum=0,
    )
    heartbeat_s: float = _setting(
        "SHM_EMBED_HEARTBEAT_S", 0.1, "Interval of the sidecar's heartbeat and ring reaper.", minimum=0.01
    )
    loop_stall_s: float = _setting(
        "SHM_EMBED_LOOP_STALL_S", 2.0,
        "The batching loop counts as wedged (workers fail fast, /ready is 503, systemd's watchdog is no longer "
        "fed) when it shows no progress for this long, plus 4x the expected time of a model call in progress.",
        minimum=0.05,
    )
    model_call_max_s: float = _setting(
        "SHM_EMBED_MODEL_CALL_MAX_S", 60.0,
        "Time allowed to a model call of a size not timed yet (the first of its size) before the loop counts "
        "as wedged.", minimum=0.01,
    )
    wedge_exit_s: float = _setting(
        "SHM_EMBED_WEDGE_EXIT_S", 30.0,
        "A sidecar whose batching loop stays wedged this long removes its objects and exits (status 70) so "
        "that its supervisor (systemd, make run) starts a fresh one; 0 never exits.", minimum=0.0,
    )
    cache_mb: int = _setting(
        "SHM_EMBED_CACHE_MB", 64,
        "Size in MiB of the host-wide embedding cache (one shared-memory segment per namespace, made new and "
        "empty by each sidecar start): workers answer texts found there without tokenizing or a round trip to "
        "the sidecar. 0 turns it off.", minimum=0,
    )
    synthetic_us: int = _setting(
        "SHM_EMBED_SYNTHETIC_US", -1,
        "-1 serves the model. N >= 0 serves the synthetic backend instead: no torch, each model call takes N "
        "microseconds with the CPU left free (as on a GPU), vectors are deterministic from the token ids.",
        minimum=-1,
    )
    synthetic_dim: int = _setting(
        "SHM_EMBED_SYNTHETIC_DIM", 384, "Dimension of the synthetic backend's vectors.", minimum=1
    )
    # --- worker client -----------------------------------------------------------
    timeout_s: float = _setting(
        "SHM_EMBED_TIMEOUT_S", 30.0, "Longest a request waits for its vectors from a live sidecar.", minimum=0.001
    )
    ring_wait_s: float = _setting(
        "SHM_EMBED_RING_WAIT_S", 1.0,
        "Longest a request waits for a free slot in its worker's ring before RingFull (HTTP 429).", minimum=0.0,
    )
    stale_after_s: float = _setting(
        "SHM_EMBED_STALE_AFTER_S", 1.0,
        "Heartbeat age after which a sidecar counts as hung and requests fail fast.", minimum=0.05,
    )
    long_inputs: str = _setting(
        "SHM_EMBED_LONG_INPUTS", "truncate",
        "What becomes of a text over the model's token limit when a request does not say (its truncate, "
        "truncation_direction and chunk fields): truncate (cut at the end), truncate_left (cut at the start), "
        "refuse (413 naming the limit) or chunk (embed windows of the limit and average them, weighted by "
        "their tokens). See docs/long-inputs-and-quantization.md.",
        choices=POLICIES,
    )
    use_ipc: bool = _setting(
        "USE_IPC_EMBEDDING", True, "false: every worker embeds with its own local model (no sidecar)."
    )
    fallback: str = _setting(
        "SHM_EMBED_FALLBACK", "none",
        "local: a worker whose sidecar is unavailable embeds with a local model until it is back; none: raise.",
        choices=("none", "local"),
    )
    # --- web service -------------------------------------------------------------
    bind: str = _setting("SHM_EMBED_BIND", "127.0.0.1:8000", "Address Gunicorn listens on.")
    web_concurrency: int = _setting(
        "WEB_CONCURRENCY", 0,
        "Gunicorn worker processes (each leases one ring of the sidecar); 0: min(4, 2 x CPU cores + 1).", minimum=0,
    )
    min_workers: int = _setting(
        "WEB_MIN_WORKERS", 0,
        "Fewest Gunicorn workers, and how many start; 0: WEB_CONCURRENCY.", minimum=0,
    )
    max_workers: int = _setting(
        "WEB_MAX_WORKERS", 0,
        "Most Gunicorn workers; 0: WEB_CONCURRENCY (or WEB_MIN_WORKERS when above). Above WEB_MIN_WORKERS the "
        "master adds workers while their threads are busy and retires them when load stays low; the sidecar "
        "needs at least this many rings (SHM_EMBED_RINGS), or the web service refuses to start.", minimum=0,
    )
    scale_up_busy: float = _setting(
        "WEB_SCALE_UP_BUSY", 0.75,
        "Share of the workers' threads busy (requests in progress, averaged over a second) at or above which "
        "workers are added, once it has lasted WEB_SCALE_UP_AFTER_S.", minimum=0.01,
    )
    scale_down_busy: float = _setting(
        "WEB_SCALE_DOWN_BUSY", 0.25,
        "Share of the workers' threads busy at or below which one worker is retired, once it has lasted "
        "WEB_SCALE_DOWN_AFTER_S (and only if the others would stay below WEB_SCALE_UP_BUSY).", minimum=0.0,
    )
    scale_up_after_s: float = _setting(
        "WEB_SCALE_UP_AFTER_S", 2.0,
        "Seconds the load stays at or above WEB_SCALE_UP_BUSY before workers are added; the clock restarts "
        "after every change, so it is also the cool-down between two additions.", minimum=0.0,
    )
    scale_down_after_s: float = _setting(
        "WEB_SCALE_DOWN_AFTER_S", 60.0,
        "Seconds the load stays at or below WEB_SCALE_DOWN_BUSY before one worker is retired (gracefully: its "
        "requests finish, its ring goes back); the clock restarts after every change.", minimum=0.0,
    )
    api_key: str = _setting(
        "SHM_EMBED_API_KEY", "", "When set, every endpoint but /health needs 'Authorization: Bearer <key>'.",
        secret=True,
    )
    max_inputs: int = _setting(
        "SHM_EMBED_MAX_INPUTS", 2048, "Texts in one HTTP request at most (413 above).", minimum=1
    )
    max_input_chars: int = _setting(
        "SHM_EMBED_MAX_INPUT_CHARS", 100_000, "Characters in one text at most (413 above).", minimum=1
    )
    max_body_bytes: int = _setting(
        "SHM_EMBED_MAX_BODY_BYTES", 16 * 1024 * 1024, "HTTP request body size at most (413 above).", minimum=1
    )
    max_json_values: int = _setting(
        "SHM_EMBED_MAX_JSON_VALUES", 100_000,
        "JSON values (objects, arrays, strings, numbers) in one request body at most (413 above), counted before "
        "the body is parsed: 16 MiB of '{}' would otherwise take a worker 400 MiB.", minimum=16,
    )
    max_inflight_body_bytes: int = _setting(
        "SHM_EMBED_MAX_INFLIGHT_BODY_BYTES", 32 * 1024 * 1024,
        "Request body bytes one worker reads and parses at once, over all its threads; a request that would go "
        "over is answered 503 with Retry-After (at least SHM_EMBED_MAX_BODY_BYTES).", minimum=1,
    )
    max_request_tokens: int = _setting(
        "SHM_EMBED_MAX_REQUEST_TOKENS", 300_000,
        "Tokens one HTTP request may have embedded, after truncation, over all its inputs and passages (413 "
        "above).", minimum=1,
    )
    # --- collections and web search ---------------------------------------------
    data_dir: str = _setting(
        "SHM_EMBED_DATA_DIR", "./.data",
        "Where vector collections are stored (one SQLite file; every worker of the host shares it) unless "
        "SHM_EMBED_COLLECTIONS_URL is set; with either store, this host's index snapshots (index/).",
    )
    collections_url: str = _setting(
        "SHM_EMBED_COLLECTIONS_URL", "",
        "postgresql://user:password@host:5432/db: keep collections in PostgreSQL, shared by the workers of "
        "every host behind a load balancer (schema created and migrated at start); empty: the SQLite file "
        "under SHM_EMBED_DATA_DIR, shared by the workers of one host.", secret=True,
    )
    collections_pool: int = _setting(
        "SHM_EMBED_COLLECTIONS_POOL", 4,
        "PostgreSQL only: connections each worker process keeps at most (so workers x this per host, for every "
        "host, must fit the server's max_connections).", minimum=1,
    )
    collections_timeout_s: float = _setting(
        "SHM_EMBED_COLLECTIONS_TIMEOUT_S", 5.0,
        "PostgreSQL only: longest a request waits for a connection (and a connection attempt takes) before it "
        "is answered 503 with Retry-After. A statement runs at most 4 times this (at least the 30 s wait for a "
        "collection's write lock plus this), and a server that does not answer at all is given up this much "
        "later (503).", minimum=0.1,
    )
    search_nprobe: int = _setting(
        "SHM_EMBED_SEARCH_NPROBE", 32,
        "Inverted lists an IVF collection scans per query: higher is more exact and slower.", minimum=1,
    )
    search_threads: int = _setting(
        "SHM_EMBED_SEARCH_THREADS", 1,
        "FAISS threads of a worker's collection searches; more only helps where cores are spare (the sidecar "
        "needs them for the model).", minimum=1,
    )
    ivf_min_vectors: int = _setting(
        "SHM_EMBED_IVF_MIN_VECTORS", 50_000,
        "Passages at which an index 'auto' collection trains its IVF quantizer and stops searching exhaustively.",
        minimum=1000,
    )
    filter_max_values: int = _setting(
        "SHM_EMBED_FILTER_MAX_VALUES", 1000,
        "Values a collection search's filter may list, all keys together (422 above).", minimum=1,
    )
    snapshots: bool = _setting(
        "SHM_EMBED_SNAPSHOTS", True,
        "true: the workers of a host share one memory-mapped index snapshot per collection (under "
        "SHM_EMBED_DATA_DIR/index, with either store, rebuilt in the background) and each holds only the changes "
        "since it; false: every worker holds every collection's vectors in its own memory.",
    )
    snapshot_delta: int = _setting(
        "SHM_EMBED_SNAPSHOT_DELTA", 50_000,
        "Passages added or removed since a collection's snapshot at which a worker starts a rebuild in the "
        "background: about what each worker holds of its own between rebuilds (1.5 KB per passage at 384 "
        "dimensions).", minimum=1,
    )
    snapshot_stale_host_s: float = _setting(
        "SHM_EMBED_SNAPSHOT_STALE_HOST_S", 604800.0,
        "The change log is compacted up to what every host's snapshot covers, except hosts that have not "
        "refreshed their mark for this long (down, or gone); their workers reload from the tables if they come "
        "back.", minimum=60.0,
    )
    search_url: str = _setting(
        "SHM_EMBED_SEARCH_URL", "",
        "A SearxNG-compatible JSON search endpoint (e.g. http://127.0.0.1:8888/search) for POST /search/web "
        "without urls; empty: urls are required.",
    )
    fetch_allow: str = _setting(
        "SHM_EMBED_FETCH_ALLOW", "",
        "Comma-separated addresses or networks (127.0.0.1, 10.0.0.0/8) the page fetcher may reach although they "
        "are not public; everything loopback, private, link-local or reserved is refused otherwise.",
    )
    fetch_timeout_s: float = _setting(
        "SHM_EMBED_FETCH_TIMEOUT_S", 10.0, "Connect and read timeout of one page fetch.", minimum=0.1
    )
    fetch_deadline_s: float = _setting(
        "SHM_EMBED_FETCH_DEADLINE_S", 15.0,
        "Longest one page fetch takes in all (connect, headers, body, every redirect hop; the search endpoint's "
        "answer too): when it is up the connection is closed and the page is listed as failed, however slowly "
        "the server keeps sending. SHM_EMBED_FETCH_TIMEOUT_S bounds each wait for bytes within it.", minimum=0.1,
    )
    fetch_total_s: float = _setting(
        "SHM_EMBED_FETCH_TOTAL_S", 30.0, "Longest all the fetches of one web search take together.", minimum=0.1
    )
    fetch_max_bytes: int = _setting(
        "SHM_EMBED_FETCH_MAX_BYTES", 2 * 1024 * 1024, "Bytes of one page read at most; the rest is cut off.",
        minimum=1024,
    )
    fetch_max_redirects: int = _setting(
        "SHM_EMBED_FETCH_MAX_REDIRECTS", 5, "Redirects one fetch follows at most (each hop is checked again).",
        minimum=0,
    )
    fetch_concurrency: int = _setting(
        "SHM_EMBED_FETCH_CONCURRENCY", 5, "Pages one web search fetches at once.", minimum=1
    )
    search_max_pages: int = _setting(
        "SHM_EMBED_SEARCH_MAX_PAGES", 8, "Pages one web search fetches at most (urls given or found).", minimum=1
    )
    # --- logging -------------------------------------------------------------------
    log_level: str = _setting("SHM_EMBED_LOG_LEVEL", "INFO", "loguru level: DEBUG, INFO, WARNING, ERROR.")
    log_json: bool = _setting("SHM_EMBED_LOG_JSON", False, "true: one JSON object per log line.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``env`` (default ``os.environ``); keyword
        arguments override. Raises ConfigError naming the variable at fault."""
        env = _with_aliases(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for setting in dataclasses.fields(cls):
            var = setting.metadata["env"]
            if setting.name in overrides:
                values[setting.name] = overrides.pop(setting.name)
            elif var in env:
                values[setting.name] = _parse(var, env[var], type(setting.default))
        if overrides:
            raise ConfigError(f"unknown settings: {', '.join(sorted(overrides))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            var = setting.metadata["env"]
            if setting.metadata["choices"] and value not in setting.metadata["choices"]:
                raise ConfigError(f"{var}={value!r}: must be one of {', '.join(setting.metadata['choices'])}")
            if setting.metadata["minimum"] is not None and value < setting.metadata["minimum"]:
                raise ConfigError(f"{var}={value!r}: must be at least {setting.metadata['minimum']}")
        if not self.namespace or "/" in self.namespace or len(self.namespace) > 200:
            raise ConfigError(f"SHM_EMBED_NAMESPACE={self.namespace!r}: must be non-empty, without '/'")
        if self.models:
            from .model_files import parse_model_specs

            parse_model_specs(self.models)  # ConfigError naming the entry at fault
        if self.collections_url and not self.collections_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("SHM_EMBED_COLLECTIONS_URL: must be a postgresql:// URL (or empty for SQLite)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"SHM_EMBED_DEVICE={self.device!r}: must be auto, cpu, cuda or cuda:N")
        fewest, most = self.worker_range
        if most < fewest:
            raise ConfigError(f"WEB_MAX_WORKERS={most}: must be at least WEB_MIN_WORKERS ({fewest})")
        if not self.scale_down_busy < self.scale_up_busy <= 1:
            raise ConfigError(
                f"WEB_SCALE_DOWN_BUSY={self.scale_down_busy}, WEB_SCALE_UP_BUSY={self.scale_up_busy}: need "
                "0 <= WEB_SCALE_DOWN_BUSY < WEB_SCALE_UP_BUSY <= 1")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ConfigError(
                f"SHM_EMBED_MAX_INFLIGHT_BODY_BYTES={self.max_inflight_body_bytes}: must be at least "
                f"SHM_EMBED_MAX_BODY_BYTES ({self.max_body_bytes}), or no body of the largest size could be read")
        # An idle loop shows progress once per heartbeat interval (plus a spin
        # and a linger): the stall limit must leave room for that, twice over.
        quiet_s = self.heartbeat_s + max(self.spin_us, self.idle_poll_us) / 1e6 + self.max_wait_us / 1e6
        if self.loop_stall_s < 2 * quiet_s:
            raise ConfigError(
                f"SHM_EMBED_LOOP_STALL_S={self.loop_stall_s}: must be at least {2 * quiet_s:g} s, twice the "
                "longest a healthy idle loop stays quiet "
                "(SHM_EMBED_HEARTBEAT_S + SPIN_US or IDLE_POLL_US + MAX_WAIT_US)"
            )

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) Gunicorn workers, from WEB_MIN_WORKERS, WEB_MAX_WORKERS and WEB_CONCURRENCY."""
        base = self.web_concurrency or min(4, 2 * (os.cpu_count() or 1) + 1)
        fewest = self.min_workers or base
        return fewest, self.max_workers or max(base, fewest)

    @property
    def ipc_mode(self) -> int:
        """File mode of every shared-memory object this deployment creates."""
        return 0o660 if self.group else 0o600


#: Variables of earlier releases, each read for the settings that replaced
#: it (those set themselves win), with a deprecation warning.
DEPRECATED_ALIASES: dict[str, tuple[str, ...]] = {
    # One number meant three things: the unpadded admission sum, the padded
    # per-call budget, and the staging buffers' size (the last two are one now).
    "SHM_EMBED_MAX_BATCH_TOKENS": ("SHM_EMBED_ADMIT_TOKENS", "SHM_EMBED_CALL_TOKENS"),
}


def _with_aliases(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` with each deprecated variable's value copied to the settings
    that replaced it, where those are not set themselves."""
    old = [var for var in DEPRECATED_ALIASES if var in env]
    if not old:
        return env
    from loguru import logger

    merged = dict(env)
    for var in old:
        new_vars = DEPRECATED_ALIASES[var]
        for new_var in new_vars:
            merged.setdefault(new_var, env[var])
        logger.warning("{} is deprecated: set {} instead (it is read for those of them not set)", var,
                       " and ".join(new_vars))
    return merged


def _parse(var: str, raw: str, kind: type) -> Any:
    raw = raw.strip()
    try:
        if kind is bool:
            low = raw.lower()
            if low in _BOOL_TRUE:
                return True
            if low in _BOOL_FALSE:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: not a valid {kind.__name__}") from None


def markdown_table() -> str:
    """Every setting as a row of a Markdown table: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in dataclasses.fields(Settings):
        default = setting.default if setting.default != "" else "(empty)"
        rows.append(f"| `{setting.metadata['env']}` | `{default}` | {setting.metadata['doc']} |")
    return "\n".join(rows)


_DOC_HEAD = """\
<!-- Generated by `python -m shm_protocol.config --markdown > docs/configuration.md`
     from the settings table in shm_protocol/config.py: edit that table, not this file. -->

# Configuration

Every setting is read once at start-up from the environment
(`shm_protocol/config.py` is the one table; `python -m shm_protocol.config`
prints it). Invalid values stop the process with a `ConfigError` that names
the variable. `python -m shm_protocol.config --env` prints every setting as
a commented line of an environment file (`systemd/shm-embed.env.example`).
"""

_DOC_TAIL = """\
Gunicorn reads `WEB_CONCURRENCY` (workers, default 4), `WEB_THREADS` (threads
per worker, default 4), `WEB_WORKER_CLASS` (default `gthread`),
`WEB_MAX_REQUESTS` (recycle a worker after that many requests; default 0,
never), `WEB_TIMEOUT` and `WEB_GRACEFUL_TIMEOUT` in `gunicorn.conf.py`.
"""


def markdown_document() -> str:
    """The whole of docs/configuration.md: an introduction, the table, Gunicorn's own variables."""
    return f"{_DOC_HEAD}\n{markdown_table()}\n\n{_DOC_TAIL}"


def env_file_settings() -> str:
    """Every setting as a commented line of an environment file, with its meaning."""
    blocks = []
    for setting in dataclasses.fields(Settings):
        default = str(setting.default).lower() if isinstance(setting.default, bool) else setting.default
        blocks.append(f"# {setting.metadata['doc']}\n#{setting.metadata['env']}={default}\n")
    return "\n".join(blocks)


def main(argv: list[str]) -> str:
    """What ``python -m shm_protocol.config [--markdown | --env]`` prints."""
    if "--markdown" in argv:
        return markdown_document()
    if "--env" in argv:
        return env_file_settings() + "\n"
    return markdown_table() + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(main(sys.argv[1:]))
