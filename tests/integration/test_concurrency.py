"""Several worker processes, each with several threads, for 20 seconds:
every answer matches its own texts, nothing hangs, nothing is left behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time

import pytest

from tests.helpers import cosine_rows

DURATION_S = float(os.environ.get("SHM_EMBED_TEST_SOAK_S", "20"))
PROCS, THREADS = 4, 3


def pool_texts() -> list[str]:
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    return [f"text {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 80))) for i in range(400)]


def worker(settings, ref, seconds, seed, results):
    from shm_protocol import EmbeddingClient

    texts = pool_texts()
    client = EmbeddingClient.connect(settings)
    counts = {"requests": 0, "texts": 0, "bad": 0, "errors": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(tseed):
        rng = random.Random(tseed)
        while time.monotonic() < stop_at:
            idx = [rng.randrange(len(texts)) for _ in range(rng.choice([1, 1, 2, 5, 17, 70, 150]))]
            try:
                got = client.embed([texts[i] for i in idx])
            except Exception as exc:  # counted: the test demands zero
                with lock:
                    counts["errors"] += 1
                    counts["last_error"] = repr(exc)
                continue
            cos = cosine_rows(got, ref[idx])
            with lock:
                counts["requests"] += 1
                counts["texts"] += len(idx)
                counts["bad"] += int((cos < 0.9999).sum())

    threads = [threading.Thread(target=run, args=(seed * 100 + t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
        if thread.is_alive():
            counts["hung"] = True
    client.close()
    results.put(counts)


@pytest.mark.slow  # 30 s on 2 cores: DURATION_S of load, then the checks
def test_many_processes_and_threads_no_cross_talk(fresh_tiny_sidecar, tiny_st):
    sc = fresh_tiny_sidecar(SHM_EMBED_SLOTS_PER_RING="3", SHM_EMBED_SLOT_TEXTS="32")
    ref = tiny_st.encode(pool_texts())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(sc.settings, ref, DURATION_S, i, queue)) for i in range(PROCS)]
    t0 = time.monotonic()
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=DURATION_S + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert time.monotonic() - t0 >= DURATION_S
    total = {k: sum(r.get(k, 0) for r in results) for k in ("requests", "texts", "bad", "errors")}
    assert not any(r.get("hung") for r in results)
    assert total["errors"] == 0, [r.get("last_error") for r in results]
    assert total["bad"] == 0, total
    assert total["requests"] > 100, total
    assert sc.stop() == 0
    assert sc.names.dev_shm_entries() == []
