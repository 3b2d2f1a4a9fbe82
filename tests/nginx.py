"""A throwaway nginx that runs the shipped deploy/nginx/shm-embed.conf.

The test instance gets a complete nginx.conf of its own in a temporary
folder (pid file, logs and every temporary path in there, ``daemon off``)
whose http block includes a copy of the shipped file in which only the
arguments of the three lines marked ``# EDIT listen``, ``# EDIT upstream``
and ``# EDIT access_log`` are replaced: every other directive runs as shipped.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shm_protocol.processes import child_pids
from tests.helpers import REPO, free_port

SHIPPED = REPO / "deploy" / "nginx" / "shm-embed.conf"


def _marked(directive: str, marker: str) -> re.Pattern:
    """A line ``<directive> <first argument>...;  # EDIT <marker>``; groups: before, argument, after."""
    return re.compile(rf"^([ \t]*{directive}[ \t]+)([^\s;]+)([ \t;][^\n]*#[ \t]*EDIT {marker}[ \t]*)$", re.MULTILINE)


_LISTEN = _marked("listen", "listen")
_UPSTREAM = _marked("server", "upstream")
_ACCESS_LOG = _marked("access_log", "access_log")


def find_nginx() -> str | None:
    """The nginx binary, or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def require_nginx() -> str:
    """The nginx binary; skips the calling test where there is none."""
    import pytest

    found = find_nginx()
    if found is None:
        pytest.skip("nginx is not installed: not on PATH nor at /usr/sbin/nginx "
                    "(`make test` installs it as root with apt-get: scripts/install_test_services.sh)")
    return found


def _sub_one(pattern: re.Pattern, text: str, what: str, replace) -> str:
    matches = pattern.findall(text)
    if len(matches) != 1:
        raise AssertionError(f"{SHIPPED.name}: expected exactly one line marked '# EDIT {what}', found {len(matches)}")
    return pattern.sub(replace, text)


def site_config(listen: str, upstreams: list[str], access_log: Path, shipped: Path = SHIPPED) -> str:
    """The shipped file with its listen address, upstream servers and access
    log replaced; one upstream line per address, each with the shipped line's
    parameters."""
    text = shipped.read_text()
    text = _sub_one(_LISTEN, text, "listen", lambda m: f"{m.group(1)}{listen}{m.group(3)}")
    text = _sub_one(_UPSTREAM, text, "upstream",
                    lambda m: "\n".join(f"{m.group(1)}{addr}{m.group(3)}" for addr in upstreams))
    text = _sub_one(_ACCESS_LOG, text, "access_log", lambda m: f"{m.group(1)}{access_log}{m.group(3)}")
    return text


def main_config(root: Path, site: Path, workers: int = 1) -> str:
    """A complete nginx.conf whose every path lies under ``root``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody otherwise
    temps = "\n".join(f"    {kind}_temp_path {root / (kind + '_temp')};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
            f"pid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} info;\n"
            "events {\n    worker_connections 1024;\n}\n"
            "http {\n"
            f"{temps}\n"
            f"    access_log {root / 'access.log'};\n"
            f"    include {site};\n"
            "}\n")


@dataclass
class Nginx:
    binary: str
    root: Path
    port: int
    proc: subprocess.Popen | None = None
    workers: list[int] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.root / "shm-embed.access.log"

    def args(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.root}/", "-c", str(self.conf), "-e", str(self.root / "error.log"), *extra]

    def test_config(self) -> str:
        """``nginx -t`` on the generated configuration; its output. Raises when it fails."""
        r = subprocess.run(self.args("-t"), capture_output=True, text=True, timeout=30, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nginx -t failed ({r.returncode}):\n{r.stdout}{r.stderr}\n{self.conf.read_text()}")
        return r.stdout + r.stderr

    def error_log(self) -> str:
        p = self.root / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []

    def start(self, timeout: float = 15.0) -> Nginx:
        self.test_config()
        out = (self.root / "nginx.out").open("wb")
        self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
            if self._answers():
                self.workers = child_pids(self.proc.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer on port {self.port} within {timeout}s:\n{self.error_log()}")

    def _answers(self) -> bool:
        """True once nginx answers an HTTP request (any status: the upstream may be down)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (graceful), then SIGKILL for the master and its workers; checks they are gone."""
        if self.proc is None:
            return
        workers = set(self.workers)
        if self.proc.poll() is None:
            workers.update(child_pids(self.proc.pid))
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                workers.update(child_pids(self.proc.pid))
                self.proc.kill()
                self.proc.wait()
        for pid in workers:  # a worker outlives a killed master
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.05)
        left = [pid for pid in workers if _alive(pid)]
        assert self.proc.poll() is not None, "nginx master still runs"
        assert not left, f"nginx workers still run: {left}"
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", self.port)) != 0, f"port {self.port} still accepts connections"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def make_nginx(tmp_path: Path, upstreams: list[str], workers: int = 1) -> Nginx:
    """Write the configuration of a test nginx in front of ``upstreams``
    (host:port each); not started. Skips where nginx is not installed."""
    binary = require_nginx()
    root = tmp_path / f"nginx-{os.urandom(3).hex()}"
    root.mkdir()
    port = free_port()
    site = root / "shm-embed.conf"
    site.write_text(site_config(f"127.0.0.1:{port}", upstreams, root / "shm-embed.access.log"))
    ng = Nginx(binary, root, port)
    ng.conf.write_text(main_config(root, site, workers))
    return ng
