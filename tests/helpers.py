"""Helpers that start real sidecar processes on unique namespaces.

Every namespace a test makes starts with ``shm-embed-test-`` and is checked
empty in /dev/shm when its sidecar has stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.processes import stop_process  # noqa: E402
from shm_protocol.segments import Names, unlink_namespace  # noqa: E402


def new_namespace() -> str:
    return f"shm-embed-test-{uuid.uuid4().hex[:10]}"


@dataclass
class SidecarProc:
    proc: subprocess.Popen
    settings: Settings
    env: dict
    log: Path

    @property
    def names(self) -> Names:
        return Names(self.settings.namespace)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def sidecar_env(namespace: str, model: str | None = None, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        SHM_EMBED_NAMESPACE=namespace,
        SHM_EMBED_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    # Tests compare vectors with SentenceTransformer.encode's float32 ones;
    # the tests of other dtypes ask for them.
    env.setdefault("SHM_EMBED_DTYPE", "float32")
    # Calls as large as the token budget allows, as before call sizes were
    # measured (a second per start); the test of the measurement asks for it.
    env.setdefault("SHM_EMBED_CALL_ROWS", "256")
    # Every text goes to the sidecar, as the tests of the round trip expect
    # (they send the same texts again); tests/*/test_cache.py turn the cache on.
    env.setdefault("SHM_EMBED_CACHE_MB", "0")
    if model:
        env["SHM_EMBED_MODEL"] = str(model)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_ready(names: Names, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    from shm_protocol.region import wait_until_ready

    pid = proc.pid if proc is not None else None
    if not wait_until_ready(names, pid, timeout, alive=lambda: proc is None or proc.poll() is None):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode} before it was ready")
        raise TimeoutError(f"sidecar of {names.namespace} not ready after {timeout}s")


def start_sidecar(tmp_path: Path, model: str | None, namespace: str | None = None, **extra) -> SidecarProc:
    namespace = namespace or new_namespace()
    env = sidecar_env(namespace, model, **extra)
    log = tmp_path / f"sidecar-{namespace}-{uuid.uuid4().hex[:4]}.log"
    proc = subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, cwd=REPO,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(Names(namespace), proc)
    except BaseException:
        proc.kill()
        proc.wait()
        unlink_namespace(Names(namespace), lock=True)  # whatever it made before it failed
        raise RuntimeError(f"sidecar failed to start:\n{log.read_text(errors='replace')}") from None
    settings = Settings.from_env(env)
    return SidecarProc(proc, settings, env, log)


def client_for(sc: SidecarProc, **overrides):
    from shm_protocol.client import EmbeddingClient

    return EmbeddingClient.connect(sc.settings.replace(**overrides) if overrides else sc.settings)


def synthetic_reference(client, texts):
    """The vectors the synthetic backend must return for ``texts``."""
    import numpy as np

    from sidecar.synthetic import synthetic_vector

    tok, prompt = client.text_tokenizer()  # the ids an embed call sends: truncated at the model's limit
    ids = tok.tokenize_request(list(texts), prompt=prompt, truncate=True, max_tokens=None).ids
    return np.stack([synthetic_vector(np.asarray(row), client.dimension) for row in ids])


def leased_rings(names) -> list[int]:
    """Owner pids of the namespace's leased rings (orphaned ones included)."""
    from shm_protocol.region import Region

    region = Region.attach(names, readonly=True, with_data=False)
    try:
        return [int(o) for o in region.rings["owner_pid"] if int(o) != 0]
    finally:
        region.close()


def cosine_rows(a, b):
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.where(den == 0, 1, den)


def stop_and_check(sc: SidecarProc) -> None:
    """Stop a sidecar and assert it left nothing in /dev/shm."""
    code = sc.stop()
    left = sc.names.dev_shm_entries()
    if left:
        unlink_namespace(sc.names, lock=True)
    assert left == [], f"objects left in /dev/shm after the sidecar stopped: {left}"
    assert code in (0, -signal.SIGKILL), f"sidecar exit code {code}\n{sc.log_text()[-3000:]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebProc:
    proc: subprocess.Popen
    base: str
    log: Path

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout=timeout)


def start_web(tmp_path: Path, env: dict, workers: int = 2, **extra) -> WebProc:
    """Gunicorn with the project's gunicorn.conf.py on a free loopback port."""
    import urllib.request

    port = free_port()
    env = dict({"SHM_EMBED_DATA_DIR": str(tmp_path / "data")}, **env)
    env.update(SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(workers))
    env.update({k: str(v) for k, v in extra.items()})
    log = tmp_path / f"web-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")],
                            env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return WebProc(proc, base, log)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gunicorn did not answer:\n{log.read_text(errors='replace')}")


class FixedVectorClient:
    """A client without a sidecar, for stores used as a library: 8-dimensional
    unit vectors, a fixed one per text."""

    def info(self) -> dict:
        return {"model": "fake", "dimension": 8}

    def embed(self, texts, normalize=True, **_):
        import numpy as np

        rows = [np.random.default_rng(sum(map(ord, t))).standard_normal(8) for t in texts]
        return np.array([r / np.linalg.norm(r) for r in rows], dtype=np.float32)


def linked_model_folder(src, dest, config_name: str = "config_sentence_transformers.json", **config_updates):
    """A model folder at ``dest`` whose files link to ``src``'s, but for its
    ``config_name`` (config_sentence_transformers.json), which gets ``config_updates``."""
    import json
    import os
    from pathlib import Path

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True)
    name = config_name
    for entry in src.iterdir():
        if entry.name != name:
            os.symlink(entry, dest / entry.name)
    cfg = json.loads((src / name).read_text())
    cfg.update(config_updates)
    (dest / name).write_text(json.dumps(cfg))
    return dest
