"""Soak under chaos: mixed HTTP load for minutes while the sidecar and the
Gunicorn workers are killed (SIGKILL) and restarted at random.

Prints requests sent, correct answers (vectors checked against a reference
computed in this process), clear errors by status, wrong answers, hung
requests and /dev/shm objects left after shutdown. Targets: zero wrong, zero
hung, zero leaked, and at least 99% of the requests sent while the sidecar
was up answered correctly. Bounded in time; talks to 127.0.0.1 only.

    python bench/soak.py [--seconds 180] [--model PATH] [--clients 6] [--workers 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from _common import REPO, child_pids, passages, short_queries

sys.path.insert(0, str(REPO))

from shm_protocol.region import wait_until_ready  # noqa: E402
from shm_protocol.segments import Names, unlink_namespace  # noqa: E402

HUNG_AFTER_S = 30.0


class Chaos:
    """Owns the sidecar process; records when it was up."""

    def __init__(self, env: dict):
        self.env = env
        self.names = Names(env["SHM_EMBED_NAMESPACE"])
        self.proc: subprocess.Popen | None = None
        self.up_since: float | None = None
        self.down_spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.events = collections.Counter()

    def start_sidecar(self) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar"], env=self.env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until_ready(self.names, proc.pid, 180, alive=lambda: proc.poll() is None):
            raise TimeoutError("sidecar did not start")
        with self.lock:
            self.proc = proc
            self.up_since = time.monotonic()

    def kill_sidecar(self) -> None:
        with self.lock:
            down_at = time.monotonic()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.up_since = None
            self._down_at = down_at
        self.events["sidecar_kills"] += 1

    def restarted(self) -> None:
        self.down_spans.append((self._down_at, time.monotonic()))

    def was_up(self, t0: float, t1: float) -> bool:
        """Whether the sidecar was up for the whole span [t0, t1]."""
        if self.up_since is None and not self.down_spans:
            return False
        for a, b in self.down_spans:
            if a <= t1 and b >= t0:
                return False
        with self.lock:
            if self.up_since is None and t1 >= getattr(self, "_down_at", 0):
                return False
        return True


def run_soak(seconds: float, model: str | None, clients: int = 6, workers: int = 3, seed: int = 0,
             quiet: bool = False) -> dict:
    import uuid

    from sentence_transformers import SentenceTransformer

    from shm_protocol.model_files import bundled_model_path

    rng = random.Random(seed)
    pool = short_queries(150, seed) + passages(150, seed + 1)
    ref_model = SentenceTransformer(model or str(bundled_model_path()), device="cpu")
    ref = ref_model.encode(pool, batch_size=32)
    del ref_model
    ns = f"shm-embed-soak-{uuid.uuid4().hex[:8]}"
    port = 20000 + rng.randrange(20000)
    env = dict(os.environ, SHM_EMBED_NAMESPACE=ns, SHM_EMBED_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1",
               SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(workers), SHM_EMBED_STALE_AFTER_S="0.5",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    if model:
        env["SHM_EMBED_MODEL"] = model
    chaos = Chaos(env)
    chaos.start_sidecar()
    web = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")], env=env,
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/ready", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    stats = collections.Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(cseed: int) -> None:
        r = random.Random(cseed)
        while time.monotonic() < stop_at:
            idx = [r.randrange(len(pool)) for _ in range(r.choice([1, 1, 2, 4, 9, 20]))]
            body = json.dumps({"inputs": [pool[i] for i in idx], "normalize": False}).encode()
            req = urllib.request.Request(base + "/embed", data=body, headers={"content-type": "application/json"})
            t0 = time.monotonic()
            outcome = None
            for attempt in (1, 2):  # embedding is idempotent: one retry on a reset connection
                try:
                    with urllib.request.urlopen(req, timeout=HUNG_AFTER_S) as resp:
                        got = np.asarray(json.loads(resp.read()), dtype=np.float32)
                    want = ref[idx]
                    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
                                                 + 1e-12)
                    outcome = "correct" if got.shape == want.shape and cos.min() >= 0.9999 else "wrong"
                except urllib.error.HTTPError as exc:
                    outcome = f"http_{exc.code}"
                except TimeoutError:
                    outcome = "hung"
                except (OSError, ValueError) as exc:
                    outcome = "hung" if "timed out" in str(exc) else "connection_error"
                if outcome != "connection_error":
                    break
                with lock:
                    stats["retried_after_reset"] += 1
            t1 = time.monotonic()
            with lock:
                stats["sent"] += 1
                stats[outcome] += 1
                if chaos.was_up(t0, t1):
                    stats["sent_while_up"] += 1
                    stats["correct_while_up"] += outcome == "correct"
            if outcome in ("http_503", "http_429"):
                time.sleep(0.1)  # a polite client backs off (Retry-After says 1 s; tests want speed)

    threads = [threading.Thread(target=client, args=(seed * 100 + i,)) for i in range(clients)]
    for t in threads:
        t.start()
    round_no = 0
    while time.monotonic() < stop_at - 3:
        time.sleep(rng.uniform(1.0, 3.0))
        if time.monotonic() >= stop_at - 3:
            break
        round_no += 1
        if round_no % 2 == 0:  # alternate: worker, sidecar, worker, ...
            chaos.kill_sidecar()
            time.sleep(rng.uniform(0.2, 1.0))
            chaos.start_sidecar()
            chaos.restarted()
        else:
            pids = child_pids(web.pid)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                chaos.events["worker_kills"] += 1
    for t in threads:
        t.join(HUNG_AFTER_S + 10)
        if t.is_alive():
            stats["hung"] += 1
    web.send_signal(signal.SIGTERM)
    web.wait(60)
    chaos.proc.send_signal(signal.SIGTERM)
    chaos.proc.wait(60)
    time.sleep(0.2)
    left = chaos.names.dev_shm_entries()
    unlink_namespace(chaos.names)
    result = dict(stats)
    result.update(chaos.events)
    result["leaked_objects"] = len(left)
    result["up_ratio"] = stats["correct_while_up"] / max(1, stats["sent_while_up"])
    if not quiet:
        print(f"\nsoak, {seconds:.0f}s, {clients} clients, {workers} workers, model "
              f"{os.path.basename(model) if model else 'all-MiniLM-L6-v2'}")
        for k in ("sent", "correct", "wrong", "hung", "connection_error", "retried_after_reset",
                  "sidecar_kills", "worker_kills",
                  "sent_while_up", "correct_while_up", "leaked_objects"):
            print(f"  {k:18} {result.get(k, 0)}")
        for k in sorted(x for x in result if x.startswith("http_")):
            print(f"  {k:18} {result[k]}")
        print(f"  correct while the sidecar was up: {100 * result['up_ratio']:.2f}%")
    return result


def targets_met(r: dict) -> bool:
    return (r.get("wrong", 0) == 0 and r.get("hung", 0) == 0 and r["leaked_objects"] == 0
            and r["up_ratio"] >= 0.99 and r.get("correct", 0) > 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    r = run_soak(args.seconds, args.model, args.clients, args.workers)
    ok = targets_met(r)
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
