"""Soak under chaos: mixed HTTP load for minutes while the faults users meet
come at random, one at a time:

* the sidecar SIGKILLed, then restarted;
* the sidecar stopped (SIGSTOP) for 0.3 to 2.5 s, then continued (a stall,
  a paused VM);
* a Gunicorn worker SIGKILLed; workers also recycle themselves every few
  dozen requests (Gunicorn's max_requests);

and, all along:

* request timeouts followed by a close or an exit: a process whose client
  gives up on a request while its slots are still in the model, then closes
  (or exits without closing), and a new client starts at once;
* hostile bytes written into a leased ring's slots.

Every answer, over HTTP or straight from a client, is checked against a
reference vector of its own text computed in this process, so a wrong
vector is counted, never assumed away. Prints requests sent, correct, wrong,
hung, clear errors by status, /dev/shm objects left after shutdown, rings
leased when the load stops, and the share answered correctly while the
sidecar was running and not stopped. Bounded in time; 127.0.0.1 only.

    python bench/soak.py [--seconds 600] [--model PATH] [--clients 6] [--workers 3]
                         [--up-ratio 0.995] [--json RESULT.json]

The exit status is 0 when every target is met; ``--json`` also writes every
count to a file (the test suite runs a short soak this way).
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
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from _common import REPO, child_pids, passages, short_queries

sys.path.insert(0, str(REPO))

from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.region import Region, wait_until_ready  # noqa: E402
from shm_protocol.segments import Names, unlink_namespace  # noqa: E402

HUNG_AFTER_S = 30.0
#: Longest a continued sidecar may take to show it runs again before it counts as up anyway.
RESUME_WAIT_S = 1.0
#: Share of requests sent while the sidecar ran (not killed, not stopped) that must be answered correctly.
UP_RATIO_TARGET = 0.995

# A process that times out on its requests and then closes its client (or
# exits without closing it), again and again; a new client of the next
# process starts at once and must get its own vectors. Prints its counts.
TIMEOUT_CHURNER = r"""
import json, os, random, sys, time
import numpy as np
from shm_protocol import EmbeddingClient, Settings
from shm_protocol.errors import SidecarTimeout, ShmEmbedError
data = np.load(sys.argv[1])
refs = data["refs"]
pool = json.loads(open(sys.argv[2]).read())
rng = random.Random(int(sys.argv[3]))
end = time.monotonic() + float(sys.argv[4])
counts = {"direct_sent": 0, "direct_correct": 0, "direct_wrong": 0, "timeouts": 0, "direct_unavailable": 0}
settings = Settings.from_env()

def check(c, idx):
    got = c.embed([pool[i] for i in idx])
    want = refs[idx]
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
    counts["direct_sent"] += 1
    counts["direct_correct" if cos.min() >= 0.9999 else "direct_wrong"] += 1

while time.monotonic() < end:
    try:
        c = EmbeddingClient.connect(settings.replace(timeout_s=rng.choice([0.002, 0.01, 0.05])))
        try:
            check(c, [rng.randrange(len(pool)) for _ in range(40)])
        except SidecarTimeout:
            counts["timeouts"] += 1
        how = rng.random()
        if how < 0.25:
            print(json.dumps(counts), flush=True)
            os._exit(0)  # like a worker killed after its timeout: no close at all
        if how < 0.75:
            c.close()  # like a worker recycled after its timeout
        fresh = EmbeddingClient.connect(settings)
        check(fresh, [rng.randrange(len(pool)) for _ in range(rng.choice([1, 3]))])
        fresh.close()
    except ShmEmbedError:
        counts["direct_unavailable"] += 1
        time.sleep(0.1)
print(json.dumps(counts), flush=True)
"""


class Chaos:
    """Owns the sidecar process; records when it could not serve (killed or stopped)."""

    def __init__(self, env: dict):
        self.env = env
        self.names = Names(env["SHM_EMBED_NAMESPACE"])
        self.proc: subprocess.Popen | None = None
        self.down_since: float | None = time.monotonic()
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
        self._up()

    def _down(self) -> None:
        with self.lock:
            self.down_since = time.monotonic()

    def _up(self) -> None:
        with self.lock:
            if self.down_since is not None:
                self.down_spans.append((self.down_since, time.monotonic()))
            self.down_since = None

    def kill_sidecar(self, rng: random.Random) -> None:
        self._down()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.events["sidecar_kills"] += 1
        time.sleep(rng.uniform(0.2, 1.0))
        self.start_sidecar()

    def stall_sidecar(self, rng: random.Random) -> None:
        self._down()
        self.proc.send_signal(signal.SIGSTOP)
        self.events["sidecar_stalls"] += 1
        time.sleep(rng.uniform(0.3, 2.5))
        self.proc.send_signal(signal.SIGCONT)
        self._wait_running()
        self._up()

    def _wait_running(self, timeout: float = RESUME_WAIT_S) -> None:
        """After SIGCONT the sidecar has not run yet: its heartbeat and loop
        deadline are still those from before the stop until its threads are
        scheduled again (tens of ms on a busy machine), and workers rightly
        answer 503 meanwhile. It runs again once it reports itself
        available; bounded, so a sidecar that never recovers still counts."""
        stale = Settings.from_env(self.env).stale_after_s
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            self._poll_running(stale, deadline)
        finally:  # reported: a long wait here would be a product fault, not chaos
            waited_ms = round(1000 * (time.monotonic() - t0))
            self.events["resume_wait_ms_max"] = max(self.events["resume_wait_ms_max"], waited_ms)

    def _poll_running(self, stale: float, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                region = Region.attach(self.names, readonly=True, with_data=False)
            except Exception:
                return
            try:
                if region.unavailable_reason(stale, thorough=True) is None:
                    return
            finally:
                region.close()
            time.sleep(0.005)

    def was_up(self, t0: float, t1: float) -> bool:
        """Whether the sidecar ran (not killed, not stopped) through all of [t0, t1]."""
        with self.lock:
            if self.down_since is not None and self.down_since <= t1:
                return False
            return not any(a <= t1 and b >= t0 for a, b in self.down_spans)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)


def _hostile_ring(settings: Settings, stop: threading.Event, stats: collections.Counter, seed: int) -> None:
    """Lease a ring and write random bytes into its slots, one at a time."""
    from shm_protocol import EmbeddingClient
    from shm_protocol.errors import ShmEmbedError
    from shm_protocol.layout import SLOT_DONE, SLOT_ERROR, SLOT_READY

    rng = np.random.default_rng(seed)
    client = EmbeddingClient(settings)
    while not stop.wait(0.3):
        try:
            sess = client._get_session()
            slot = sess.take_slot(0.1)
            if slot is None:
                continue
            raw = sess.region.slots[sess.ring, slot: slot + 1].view(np.uint8)
            raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
            if rng.random() < 0.5:  # plausible counts over garbage offsets and ids
                sess.slot_views.n_texts[slot] = rng.integers(1, 5)
                sess.slot_views.n_tokens[slot] = rng.integers(1, 50)
            sess.slot_views.state[slot] = SLOT_READY
            sess.bell.post()
            deadline = time.monotonic() + 5
            while int(sess.slot_views.state[slot]) not in (SLOT_DONE, SLOT_ERROR) and time.monotonic() < deadline:
                time.sleep(0.005)
            stats["hostile_slots"] += 1
            if int(sess.slot_views.state[slot]) in (SLOT_DONE, SLOT_ERROR):
                sess.give_back(slot)
            else:
                sess.quarantine(slot)
        except ShmEmbedError:
            time.sleep(0.1)
    client.close()


def _churn_timeouts(env: dict, files: tuple[str, str], stop: threading.Event, stats: collections.Counter,
                    lock: threading.Lock, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        proc = subprocess.run([sys.executable, "-c", TIMEOUT_CHURNER, *files, str(rng.randrange(1 << 30)), "5"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = proc.stdout.strip().splitlines()
        with lock:
            stats["churner_processes"] += 1
            if proc.returncode != 0 or not lines:
                stats["churner_crashes"] += 1
                continue
            stats.update(json.loads(lines[-1]))


def leased_rings(names: Names) -> int:
    try:
        region = Region.attach(names, readonly=True, with_data=False)
    except Exception:
        return 0
    try:
        return int((region.rings["owner_pid"] != 0).sum())
    finally:
        region.close()


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
               WEB_MAX_REQUESTS="60",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    if model:
        env["SHM_EMBED_MODEL"] = model
    tmp = Path(tempfile.mkdtemp(prefix="shm-embed-soak-"))
    np.savez(tmp / "refs.npz", refs=ref)
    (tmp / "pool.json").write_text(json.dumps(pool))
    env["SHM_EMBED_DATA_DIR"] = str(tmp / "data")
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
    stop = threading.Event()

    def client(cseed: int) -> None:
        r = random.Random(cseed)
        while time.monotonic() < stop_at:
            idx = [r.randrange(len(pool)) for _ in range(r.choice([1, 1, 2, 4, 9, 20]))]
            body = json.dumps({"inputs": [pool[i] for i in idx], "normalize": False}).encode()
            req = urllib.request.Request(base + "/embed", data=body, headers={"content-type": "application/json"})
            t0 = time.monotonic()
            outcome = None
            for _attempt in (1, 2):  # embedding is idempotent: one retry on a reset connection
                try:
                    with urllib.request.urlopen(req, timeout=HUNG_AFTER_S) as resp:
                        got = np.asarray(json.loads(resp.read()), dtype=np.float32)
                    want = ref[idx]
                    ok = got.shape == want.shape and _cosines(got, want).min() >= 0.9999
                    outcome = "correct" if ok else "wrong"
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

    settings = Settings.from_env(env)
    threads = [threading.Thread(target=client, args=(seed * 100 + i,)) for i in range(clients)]
    side = [threading.Thread(target=_hostile_ring, args=(settings, stop, stats, seed)),
            threading.Thread(target=_churn_timeouts,
                             args=(env, (str(tmp / "refs.npz"), str(tmp / "pool.json")), stop, stats, lock, seed))]
    for thread in threads + side:
        thread.start()
    round_no = 0
    while time.monotonic() < stop_at - 3:
        time.sleep(rng.uniform(1.0, 3.0))
        if time.monotonic() >= stop_at - 3:
            break
        round_no += 1
        kind = round_no % 3  # worker kill, sidecar stall, sidecar kill, ...
        if kind == 1:
            pids = child_pids(web.pid)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                chaos.events["worker_kills"] += 1
        elif kind == 2:
            chaos.stall_sidecar(rng)
        else:
            chaos.kill_sidecar(rng)
    for thread in threads:
        thread.join(HUNG_AFTER_S + 10)
        if thread.is_alive():
            stats["hung"] += 1
    stop.set()
    for thread in side:
        thread.join(180)
    time.sleep(1.5)  # the reaper's rounds: rings of exited processes go back to the pool
    rings_end = leased_rings(chaos.names)
    web.send_signal(signal.SIGTERM)
    web.wait(60)
    chaos.proc.send_signal(signal.SIGTERM)
    chaos.proc.wait(60)
    time.sleep(0.2)
    left = chaos.names.dev_shm_entries()
    unlink_namespace(chaos.names, lock=True)
    result = dict(stats)
    result.update(chaos.events)
    result["workers"] = workers
    result["leaked_objects"] = len(left)
    result["leased_rings_at_end"] = rings_end
    result["up_ratio"] = stats["correct_while_up"] / max(1, stats["sent_while_up"])
    if not quiet:
        print(f"\nsoak, {seconds:.0f}s, {clients} clients, {workers} workers, model "
              f"{os.path.basename(model) if model else 'all-MiniLM-L6-v2'}")
        for k in ("sent", "correct", "wrong", "hung", "connection_error", "retried_after_reset",
                  "sidecar_kills", "sidecar_stalls", "worker_kills", "sent_while_up", "correct_while_up",
                  "direct_sent", "direct_correct", "direct_wrong", "timeouts", "direct_unavailable",
                  "churner_processes", "churner_crashes", "hostile_slots", "resume_wait_ms_max", "leaked_objects",
                  "leased_rings_at_end"):
            print(f"  {k:20} {result.get(k, 0)}")
        for k in sorted(x for x in result if x.startswith("http_")):
            print(f"  {k:20} {result[k]}")
        print(f"  correct while the sidecar ran: {100 * result['up_ratio']:.2f}%")
    return result


def targets_met(r: dict, up_ratio: float = UP_RATIO_TARGET) -> bool:
    return (r.get("wrong", 0) == 0 and r.get("direct_wrong", 0) == 0 and r.get("hung", 0) == 0
            and r["leaked_objects"] == 0 and r["leased_rings_at_end"] <= r["workers"]
            and r.get("churner_crashes", 0) == 0 and r["up_ratio"] >= up_ratio and r.get("correct", 0) > 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--up-ratio", type=float, default=UP_RATIO_TARGET,
                    help="share of requests sent while the sidecar ran that must be answered correctly")
    ap.add_argument("--json", type=Path, default=None, help="also write every count to this file")
    args = ap.parse_args()
    result = run_soak(args.seconds, args.model, args.clients, args.workers, args.seed)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    ok = targets_met(result, up_ratio=args.up_ratio)
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
