"""The HTTP side of bench/http_load.py's per-worker, infinity and vLLM setups:
shm-embed's own Falcon app in every Gunicorn worker (started with the
project's gunicorn.conf.py), with the backend each setup stands for.

* ``local_application()``: per-worker. The project's local fallback
  (USE_IPC_EMBEDDING=false) loads the model in each worker; its weights are
  then moved to the setup's device and dtype (SHM_EMBED_DEVICE,
  SHM_EMBED_DTYPE), which the fallback alone keeps at CPU float32.
* ``remote_application()``: infinity and vLLM. Each worker POSTs the texts
  to the server's OpenAI-style embeddings route (``BENCH_PEER_URL``, model
  ``BENCH_PEER_MODEL``) over a keep-alive connection per thread, as an app in
  front of such a server does.
* ``place_model()``: a SentenceTransformer on a device at a dtype, also used
  by the dirty-worker setup (bench/dirty_app.py).
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def resolve_device(device: str) -> str:
    """SHM_EMBED_DEVICE's value for a benchmark setup: auto is CUDA when torch sees a GPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def place_model(model, device: str, dtype: str):
    """``model`` (a SentenceTransformer) moved to ``device`` (auto, cpu, cuda) with
    weights of ``dtype`` (auto means float32 here); returns it."""
    import torch

    dtype = "float32" if dtype == "auto" else dtype
    return model.to(device=torch.device(resolve_device(device)), dtype=getattr(torch, dtype))


def local_application():
    """Per-worker: the project's local fallback in this worker, on the setup's device and dtype."""
    from compat.fallback import FallbackClient
    from shm_protocol.config import Settings
    from shm_protocol.logs import configure_logging
    from web.app import create_app

    settings = Settings.from_env(os.environ).replace(use_ipc=False)
    configure_logging(settings, component="web")
    client = FallbackClient(settings)
    place_model(client.local.model, settings.device, settings.dtype)  # loads the model now, in this worker
    return create_app(client, settings)


class PeerError(Exception):
    """The peer server answered something other than embeddings."""


class RemoteBackend:
    """The client interface of shm-embed's web app, served by an embedding
    server's OpenAI-style route (infinity's /embeddings, vLLM's /v1/embeddings)."""

    mode = "remote"

    def __init__(self, url: str, model: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parsed.hostname, parsed.port, parsed.path
        self.model = model
        self._local = threading.local()
        self.dimension = int(self._post(["warm up"])[0].shape[1])

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        return conn

    def _post(self, texts: list[str]) -> tuple[np.ndarray, int]:
        body = orjson.dumps({"input": texts, "model": self.model})
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection
            conn = self._connection()
            try:
                conn.request("POST", self.path, body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        if resp.status != 200:
            raise PeerError(f"{self.host}:{self.port}{self.path} answered {resp.status}: {data[:300]!r}")
        out = orjson.loads(data)
        rows = sorted(out["data"], key=lambda item: item["index"])
        vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        return vectors, int(out.get("usage", {}).get("prompt_tokens", 0))

    def embed_detailed(self, texts, *, truncate=True, normalize=False, **options):
        from shm_protocol.client import EmbedResult

        vectors, tokens = self._post(list(texts))
        if normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        # The server reports the request's token total only: one count, which is all the app reads (its sum).
        return EmbedResult(vectors, np.asarray([tokens]), 0, 0, 0, model=self.model)

    def info(self):
        return {"model": self.model, "dimension": self.dimension, "max_seq_length": 256,
                "device": f"remote ({self.host}:{self.port})"}

    def stats(self):
        from shm_protocol.errors import SidecarUnavailable

        raise SidecarUnavailable("no sidecar in this setup")

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def remote_application():
    """Infinity or vLLM: shm-embed's app whose backend is the server at BENCH_PEER_URL."""
    from shm_protocol.config import Settings
    from shm_protocol.logs import configure_logging
    from web.app import create_app

    settings = Settings.from_env(os.environ)
    configure_logging(settings, component="web")
    return create_app(RemoteBackend(os.environ["BENCH_PEER_URL"], os.environ["BENCH_PEER_MODEL"]), settings)
