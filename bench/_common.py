"""Shared helpers of the benchmarks: start a sidecar on a private namespace,
texts of known shape, percentiles, process memory (RSS, PSS)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.processes import (  # noqa: E402,F401  (the benchmarks import them from here)
    child_pids,
    children_by_parent,
    proc_stat,
    pss_mb,
    rss_mb,
    stop_process,
)
from shm_protocol.region import wait_until_ready  # noqa: E402
from shm_protocol.segments import Names, unlink_namespace  # noqa: E402

WORDS = ("how what where why best cheap fast python rust shared memory ring buffer embedding model search "
         "query vector index server worker latency throughput gpu cpu batch token cache async thread "
         "process kernel socket database table join order price review weather recipe bread travel").split()


def short_queries(n: int, seed: int = 0) -> list[str]:
    """Search-query-like texts of 4 to 12 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def passages(n: int, seed: int = 1, lo: int = 8, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "." for _ in range(n)]


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@contextlib.contextmanager
def running_sidecar(model: str | None = None, **env_extra):
    """Start a sidecar on a fresh namespace; yield its Settings; stop it.
    The embedding cache is off unless SHM_EMBED_CACHE_MB is given: the
    benchmarks send the same texts again and measure the round trip and the
    model (bench/cache.py measures the cache)."""
    ns = f"shm-embed-bench-{uuid.uuid4().hex[:8]}"
    env_extra.setdefault("SHM_EMBED_CACHE_MB", 0)
    env = dict(os.environ, SHM_EMBED_NAMESPACE=ns, SHM_EMBED_LOG_LEVEL="WARNING",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if model:
        env["SHM_EMBED_MODEL"] = model
    env.update({k: str(v) for k, v in env_extra.items()})
    proc = subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, cwd=REPO)
    names = Names(ns)
    try:
        if not wait_until_ready(names, proc.pid, 180, alive=lambda: proc.poll() is None):
            raise RuntimeError(f"sidecar did not start (exit code {proc.poll()})")
        settings = Settings.from_env(env)
        yield settings, proc
    finally:
        stop_process(proc)
        unlink_namespace(names, lock=True)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
