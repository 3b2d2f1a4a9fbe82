"""A throwaway PostgreSQL cluster for the tests, made with the server's own tools.

``initdb`` writes a cluster into a temporary folder, ``pg_ctl`` starts it on a
free loopback port (and a socket folder in there) with trust authentication
for loopback only, and stops it at the end of the session; the folder is then
removed. Both tools refuse to run as root, so a root test run starts them as
an unprivileged user (``postgres`` where it exists, else ``nobody``) that owns
the folder. Durability on disk is not what the tests check (``fsync=off``):
every kill in them is of a client or of the server process, never of the
machine, so no committed write is lost to it.

The binaries are found with ``pg_config --bindir``, on ``PATH``, or under
``/usr/lib/postgresql/<version>/bin`` (the newest); where there are none the
tests that need a cluster skip with the reason (``make test`` installs
Debian's ``postgresql`` as root: scripts/install_test_services.sh).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port

#: The collection stores the store tests run against (fixture ``store_location``, tests/conftest.py).
STORES = ("sqlite", "postgresql")
#: The cluster's superuser (trust authentication on loopback: no password).
SUPERUSER = "postgres"
#: Unprivileged accounts a root test run starts the server as, in order of preference.
RUN_AS = ("postgres", "nobody")
_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres, or None."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        r = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False)
        if r.returncode == 0 and r.stdout.strip():
            candidates.append(Path(r.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)

    def version(path: str) -> tuple:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name))

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for cand in candidates:
        if all(os.access(cand / tool, os.X_OK) for tool in _TOOLS):
            return cand
    return None


def _unprivileged() -> pwd.struct_passwd | None:
    """The account to run the server as when this process is root; None when it is not root."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the accounts {RUN_AS} exists to run PostgreSQL as")


def unavailable_reason() -> str | None:
    """Why no cluster can be made here, or None."""
    if find_bindir() is None:
        return ("PostgreSQL's server is not installed: no initdb/pg_ctl/postgres from `pg_config --bindir`, on PATH "
                "or under /usr/lib/postgresql/*/bin (`make test` installs Debian's postgresql as root: "
                "scripts/install_test_services.sh)")
    try:
        _unprivileged()
    except RuntimeError as exc:
        return str(exc)
    return None


@dataclass
class Cluster:
    bindir: Path
    root: Path
    port: int
    account: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sockets"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A tool of the server's, as the unprivileged account when this process is root."""
        ids = {}
        if self.account is not None:
            ids = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])
        env = dict(os.environ, LC_ALL="C", LANG="C")
        if self.account is not None:
            env["HOME"] = str(self.root)
        completed = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                                   timeout=timeout, env=env, cwd=self.root, check=False, **ids)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({completed.returncode}):\n"
                               f"{completed.stdout}{completed.stderr}\n"
                               f"{self.server_log()[-3000:]}")
        return completed

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def init(self) -> Cluster:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C",
                  "--no-sync", "--no-instructions")
        self.socket_dir.mkdir()
        if self.account is not None:
            os.chown(self.socket_dir, self.account.pw_uid, self.account.pw_gid)
        # Loopback only: trust is safe there and nothing else listens.
        (self.data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       "fsync = off\nfull_page_writes = off\nshared_buffers = 32MB\nmax_connections = 200\n"
                       "log_min_messages = warning\n")
        return self

    def start(self) -> Cluster:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: sessions are ended, their transactions rolled back)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        r = subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True,
                           timeout=30, check=False, **({} if self.account is None else dict(
                               user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[])))
        return r.returncode == 0

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def make_cluster() -> Cluster:
    """Initialise and start a cluster in a fresh temporary folder; raises with the server's log if it fails."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(unavailable_reason())
    account = _unprivileged()
    # Under /tmp itself: pytest's own temporary folders are 0700 root's, which the server's account cannot enter.
    root = Path(tempfile.mkdtemp(prefix="shm-embed-pg-"))
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    cluster = Cluster(bindir, root, free_port(), account)
    try:
        cluster.init().start()
        deadline = time.monotonic() + 30
        while not _answers(cluster):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not answer on port {cluster.port}:\n{cluster.server_log()}")
            time.sleep(0.1)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def _answers(cluster: Cluster) -> bool:
    import psycopg

    try:
        with psycopg.connect(cluster.url(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False
