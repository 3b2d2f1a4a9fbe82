"""Processes as /proc shows them: a process's children, its memory (RSS, PSS),
and stopping a child process within a time limit.

The benchmarks and the tests use these to find Gunicorn's and nginx's
workers and to measure what each process of a setup costs; a host's own
tools can do the same without psutil.
"""

from __future__ import annotations

import os
import signal
import subprocess


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pss_mb(pid: int) -> float:
    """Proportional set size of a process in MiB (from /proc/<pid>/smaps_rollup): its
    private pages plus, for each page several processes map, its share of it. The PSS of
    processes sharing one copy of a file add up to about one copy; their RSS count it in each."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold
    spaces): index 1 is the parent pid, 11 and 12 user and system clock ticks."""
    with open(f"/proc/{pid}/stat") as stat_file:
        stat = stat_file.read()
    return stat[stat.rindex(")") + 2:].split()


def children_by_parent() -> dict[int, list[int]]:
    """Every process's pid under its parent's pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(proc_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError):
                pass  # gone meanwhile
    return children


def child_pids(parent: int) -> list[int]:
    """Pids of the direct children of ``parent``."""
    return children_by_parent().get(parent, [])


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send ``sig`` to ``proc`` if it still runs, wait up to ``timeout``
    seconds, then kill it; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
