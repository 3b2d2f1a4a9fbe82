"""Operating it: the stats CLI against a live sidecar, the systemd units."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, client_for, new_namespace, sidecar_env

UNITS = REPO / "systemd"


def stats_cli(namespace: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--namespace", namespace, *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_stats_cli_counts_what_the_load_sent(fresh_tiny_sidecar):
    sc = fresh_tiny_sidecar()
    with client_for(sc) as client:
        for i in range(37):
            client.embed([f"stats {i}", "two", "three"])
        out = stats_cli(sc.settings.namespace, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["healthy"] is True and doc["status"] == "serving"
        assert doc["counters"]["requests"] == 37
        assert doc["counters"]["texts"] == 111
        tokens = sum(len(e.ids) for i in range(37) for e in client.tokenize([f"stats {i}", "two", "three"]))
        assert doc["counters"]["tokens"] == tokens
        assert sum(doc["batch_texts_hist"]) == doc["counters"]["batches"] >= 1
        ring = client.info()["ring"]
        row = next(r for r in doc["rings"] if r["ring"] == ring)
        assert row["owner_pid"] == os.getpid() and row["owner_alive"] is True
        assert row["slots"]["free"] == sc.settings.slots_per_ring
        table = stats_cli(sc.settings.namespace)
        assert table.returncode == 0 and "serving" in table.stdout and "requests" in table.stdout
    sc.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)
        stale = stats_cli(sc.settings.namespace)
        assert stale.returncode == 1
        assert re.search(r"heartbeat is \d+\.\ds old \(hung or stopped\)", stale.stderr), stale.stderr
    finally:
        sc.proc.send_signal(signal.SIGCONT)


def test_stats_cli_without_a_sidecar_says_so():
    out = stats_cli(new_namespace())
    assert out.returncode == 2
    assert "no sidecar" in out.stderr
    js = stats_cli(new_namespace(), "--json")
    assert js.returncode == 2 and json.loads(js.stdout)["status"] == "absent"


def installed_units(tmp_path: Path) -> Path:
    """The units with /opt/shm-embed pointing at this checkout (as an install would)."""
    dest = tmp_path / "units"
    dest.mkdir()
    venv = Path(sys.executable).parent.parent
    for unit in UNITS.glob("shm-embed*"):
        text = unit.read_text().replace("/opt/shm-embed/.venv", str(venv)).replace("/opt/shm-embed", str(REPO))
        (dest / unit.name).write_text(text)
    return dest


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = installed_units(tmp_path)
    files = sorted(str(p) for p in units.glob("*.service")) + [str(units / "shm-embed.target")]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True,
                         timeout=120, cwd=units)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "shm-embed" in line and "Failed to" not in line or "error" in line.lower()]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_env_example_lists_every_setting():
    import dataclasses

    from shm_protocol.config import Settings

    text = (UNITS / "shm-embed.env.example").read_text()
    for f in dataclasses.fields(Settings):
        assert re.search(rf"^#?{f.metadata['env']}=", text, re.M), f.metadata["env"]


def unit_exec_start(tmp_path: Path, name: str) -> list[str]:
    text = (installed_units(tmp_path) / name).read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


def read_env_file(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


def test_sidecar_unit_sends_ready_and_watchdog(tiny_model, tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(120)
    ns = new_namespace()
    env = sidecar_env(ns, str(tiny_model))
    env.update(read_env_file(UNITS / "shm-embed.env.example"))
    env.update(SHM_EMBED_NAMESPACE=ns, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    cmd = unit_exec_start(tmp_path, "shm-embed-sidecar.service")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages = []
        while "READY=1" not in messages:
            messages.append(sock.recv(4096).decode())
        from shm_protocol.segments import Names

        assert any(e.endswith("-ctl") for e in Names(ns).dev_shm_entries()), "segments exist when READY=1 comes"
        sock.settimeout(5)
        assert sock.recv(4096).decode() == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = []
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
        assert Names(ns).dev_shm_entries() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
