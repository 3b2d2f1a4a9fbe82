"""Where a request's microseconds go, stage by stage, on the worker's side of
one short text through a synthetic sidecar (the CPU free during its call):

    python bench/hot_path.py [--requests 3000] [--policy spin|park] [--us 0] [--gap-us 0] [--sleeps]

Stages: check (argument checks and session lookup), tokenize, prepare (ids
and output buffers), take (a free slot, its semaphore drained), submit (slot
write and doorbell), wait (until the answer is published: the sidecar's wake,
scan, validation, call and publish, and this process's own wake), copy-out
(vectors out of the slot, slot given back). Sidecar-side figures come from the
slot: queue (doorbell seen to batch taken) and call (the model call).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import pct, running_sidecar, short_queries, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--policy", default="spin")
    ap.add_argument("--us", type=int, default=0, help="the synthetic model call, in microseconds")
    ap.add_argument("--gap-us", type=int, default=0, help="pause before each request (0: back to back)")
    ap.add_argument("--sleeps", action="store_true",
                    help="also print what a timed wait of N us really costs here (timer slack, the VM's wake-up)")
    args = ap.parse_args()
    if args.sleeps:
        sleep_costs()
    from shm_protocol import EmbeddingClient
    from shm_protocol.tokenizer import check_texts

    texts = short_queries(args.requests, seed=5)
    with running_sidecar(SHM_EMBED_SYNTHETIC_US=str(args.us), SHM_EMBED_WAIT_POLICY=args.policy) as (settings, proc):
        client = EmbeddingClient.connect(settings)
        cpu0 = (_cpu_s(proc.pid), _cpu_s(os.getpid()), time.monotonic())
        stages = {k: [] for k in ("check", "tokenize", "prepare", "take", "submit", "wait", "copy-out",
                                  "total", "sidecar queue", "sidecar call", "embed_detailed")}
        for i, text in enumerate(texts):
            if args.gap_us:
                time.sleep(args.gap_us / 1e6)
            # The same steps as EmbeddingClient.embed_detailed for one text, timed one by one.
            t0 = time.perf_counter_ns()
            tx = check_texts([text])
            sess = client._get_session()
            t1 = time.perf_counter_ns()
            tok = client._tokenizers[0].tokenize_request(tx, prompt=None, truncate=True, max_tokens=None)
            t2 = time.perf_counter_ns()
            ids = tok.ids[0]
            lengths = np.array([len(ids)], dtype=np.int64)
            out = np.empty((1, sess.params.dim), np.float32)
            t3 = time.perf_counter_ns()
            sess.enter()
            slot = sess.take_slot(None)
            t4 = time.perf_counter_ns()
            seq = sess.submit(slot, ids, lengths)
            t5 = time.perf_counter_ns()
            sess._await_answer(slot, seq)
            t6 = time.perf_counter_ns()
            queue_ns, compute_ns = int(sess.slot_views.queue_ns[slot]), int(sess.slot_views.compute_ns[slot])
            out[:] = sess.slot_views.out[slot, :1]
            sess.give_back(slot)
            sess.leave()
            t7 = time.perf_counter_ns()
            if args.gap_us:
                time.sleep(args.gap_us / 1e6)
            r0 = time.perf_counter_ns()
            client.embed_detailed([text])
            r1 = time.perf_counter_ns()
            if i < 200:
                continue
            for k, a, b in (("check", t0, t1), ("tokenize", t1, t2), ("prepare", t2, t3), ("take", t3, t4),
                            ("submit", t4, t5), ("wait", t5, t6), ("copy-out", t6, t7), ("total", t0, t7),
                            ("embed_detailed", r0, r1)):
                stages[k].append((b - a) / 1e3)
            stages["sidecar queue"].append(queue_ns / 1e3)
            stages["sidecar call"].append(compute_ns / 1e3)
        cpu1 = (_cpu_s(proc.pid), _cpu_s(os.getpid()), time.monotonic())
        client.close()
    wall = cpu1[2] - cpu0[2]
    rows = [[k, f"{pct(v, 50):.1f}", f"{pct(v, 99):.1f}"] for k, v in stages.items()]
    gap = f"{args.gap_us} us apart" if args.gap_us else "back to back"
    print(f"\n{args.policy} policy, one short text, {len(stages['total'])} requests {gap}, synthetic {args.us} us")
    print(table(rows, ["stage", "p50 us", "p99 us"]))
    print(f"CPU while it ran: the sidecar {100 * (cpu1[0] - cpu0[0]) / wall:.0f}% of a core, this worker "
          f"{100 * (cpu1[1] - cpu0[1]) / wall:.0f}% (what spinning costs: idle gaps shorter than "
          f"SHM_EMBED_IDLE_POLL_US are spent polling)")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleep_costs() -> None:
    """What a timed wait of N us costs here, with the kernel's default timer
    slack (50 us) and with the hot path's (1 us): the basis of how early a
    waiter wakes before a slot's ETA (SHM_EMBED_SPIN_US)."""
    from shm_protocol import hotpath

    hp = hotpath.load()
    rows = []
    for slack in (50_000, hotpath.TIMER_SLACK_NS):
        hp.set_timer_slack(slack)  # for this thread's next waits
        for us in (10, 50, 100, 200, 500, 1000):
            real = [x / 1e3 for x in hp.sleep_cost(us, 200)]
            rows.append([f"{slack / 1000:g}", str(us), f"{pct(real, 50) - us:.1f}",
                         f"{pct(real, 99) - us:.1f}"])
    hp.set_timer_slack(hotpath.TIMER_SLACK_NS)
    print("\ntimed sleeps: how late they wake")
    print(table(rows, ["timer slack us", "sleep us", "late p50 us", "late p99 us"]))


if __name__ == "__main__":
    main()
