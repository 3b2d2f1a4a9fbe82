"""The status page in a real browser: headless Chromium (Debian's package,
installed by scripts/install_test_services.sh) loads /status from a real
Gunicorn in front of a sidecar of the synthetic backend, runs its script for
a few seconds of virtual time (a poll each), and the DOM it leaves is checked: every chart
drawn after some traffic, and the sidecar shown down once it is stopped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

import httpx
import pytest

from tests.helpers import start_web

DRAWN = ("throughput", "queue_depth", "batch_size", "latency", "rings", "models")


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed (`make test` installs Debian's chromium as root: "
                "scripts/install_test_services.sh)")


def page_dom(chromium: str, url: str, profile, polls: int) -> str:
    """The page's DOM after ``polls`` seconds of virtual time (a poll a second)."""
    cmd = [chromium, "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={profile}", f"--virtual-time-budget={polls * 1000}",
           "--dump-dom", url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-2000:]
    return out.stdout


def charts(dom: str) -> dict[str, int | None]:
    """data-chart -> data-points (None where the chart was never drawn)."""
    found = {}
    for attrs in re.findall(r"<canvas([^>]*)>", dom):
        name = re.search(r'data-chart="(\w+)"', attrs).group(1)
        points = re.search(r'data-points="(\d+)"', attrs)
        found[name] = int(points.group(1)) if points else None
    return found


def test_page_draws_its_charts_and_shows_the_sidecar_down(synthetic_sidecar, tmp_path):
    chromium = find_chromium()
    sc = synthetic_sidecar(us=2000, SHM_EMBED_WAIT_POLICY="park")
    w = start_web(tmp_path, sc.env, workers=1)
    stop = threading.Event()
    codes = []

    def traffic():
        with httpx.Client(base_url=w.base, timeout=30) as http:
            while not stop.is_set():
                codes.append(http.post("/embed", json={"inputs": ["status page", "two texts"]}).status_code)
                stop.wait(0.01)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        sender.start()
        dom = page_dom(chromium, w.base + "/status", tmp_path / "profile", polls=3)
        stop.set()
        sender.join(30)
        assert codes and set(codes) == {200}
        drawn = charts(dom)
        assert set(drawn) >= set(DRAWN) | {"cache"}
        for name in DRAWN:
            assert (drawn[name] or 0) > 0, (name, drawn)
        assert drawn["cache"] is None  # no cache figures in the JSON: nothing drawn
        assert 'data-sidecar="up"' in dom
        assert re.search(r'id="state" data-state="up">sidecar ready<', dom), dom[:2000]
        sc.stop()
        dom = page_dom(chromium, w.base + "/status", tmp_path / "profile", polls=1)
        assert 'data-sidecar="down"' in dom
        assert re.search(r'id="state" data-state="down">sidecar down: [^<]+<', dom), dom[:2000]
    finally:
        stop.set()
        sender.join(30)
        w.stop()
