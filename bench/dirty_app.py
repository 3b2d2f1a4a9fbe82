"""The comparison setups of bench/http_load.py, as Gunicorn apps.

* :class:`EmbedApp`: a Gunicorn "dirty app" (gunicorn >= 25) holding the model
  in the dirty worker pool, on SHM_EMBED_DEVICE at SHM_EMBED_DTYPE; HTTP
  workers call it over gunicorn's own socket.
* ``dirty_application()``: the same Falcon app as shm-embed, with a backend
  that calls the dirty app.
* :class:`OverheadApp`: the dirty app of bench/protocol_overhead.py, serving
  the same timed work as that benchmark's other servers (``BENCH_WORK_*``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gunicorn.dirty.app import DirtyApp  # noqa: E402

APP_PATH = "bench.dirty_app:EmbedApp"


class EmbedApp(DirtyApp):
    """The model, loaded once in the dirty worker."""

    def init(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        from bench.peer_apps import place_model
        from shm_protocol.model_files import bundled_model_path

        torch.set_num_threads(int(os.environ.get("SHM_EMBED_TORCH_THREADS") or os.cpu_count()))
        model = SentenceTransformer(str(bundled_model_path()), device="cpu")
        # The setup's device and dtype, as the sidecar's (SHM_EMBED_DEVICE, SHM_EMBED_DTYPE)
        self.model = place_model(model, os.environ.get("SHM_EMBED_DEVICE", "cpu"),
                                 os.environ.get("SHM_EMBED_DTYPE", "float32"))
        self.tok = self.model.tokenizer

    def embed(self, texts, normalize=False):
        vecs = self.model.encode(texts, batch_size=32, normalize_embeddings=normalize)
        tokens = [len(x) for x in self.tok(texts, truncation=True, max_length=256)["input_ids"]]
        return {"vectors": vecs.tolist(), "tokens": tokens}


class OverheadApp(DirtyApp):
    """bench/protocol_overhead.py's work in the dirty worker; once loaded it
    writes the arbiter's socket path to ``BENCH_SOCKET_FILE`` (the benchmark
    connects a DirtyClient there, as an HTTP worker's client does)."""

    def init(self):
        from bench.overhead_work import Work

        env = os.environ
        self.work = Work(env["BENCH_WORK_KIND"], int(env["BENCH_WORK_US"]), env["BENCH_MODEL_PATH"],
                         int(env["BENCH_THREADS"]), env.get("BENCH_DEVICE", "cpu"))
        tmp = env["BENCH_SOCKET_FILE"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(env["GUNICORN_DIRTY_SOCKET"])
        os.replace(tmp, env["BENCH_SOCKET_FILE"])

    def embed(self, texts):
        vecs, compute_ns = self.work(texts)
        return {"vectors": np.ascontiguousarray(vecs, np.float32).tobytes(), "compute_ns": compute_ns}


def idle_application(environ, start_response):
    """The HTTP side of the overhead setup, which the benchmark does not call."""
    start_response("404 Not Found", [("content-length", "0")])
    return [b""]


class DirtyBackend:
    """The client interface of shm-embed's web app, served by the dirty app."""

    mode = "dirty"

    def embed_detailed(self, texts, *, truncate=True, normalize=False, **options):
        from gunicorn.dirty.client import get_dirty_client

        from shm_protocol.client import EmbedResult

        out = get_dirty_client(timeout=60).execute(APP_PATH, "embed", list(texts), normalize=normalize)
        return EmbedResult(np.asarray(out["vectors"], np.float32), np.asarray(out["tokens"]), 0, 0, 0)

    def info(self):
        return {"model": "all-MiniLM-L6-v2", "dimension": 384, "max_seq_length": 256,
                "device": os.environ.get("SHM_EMBED_DEVICE", "cpu")}

    def stats(self):
        from shm_protocol.errors import SidecarUnavailable

        raise SidecarUnavailable("no sidecar in the dirty-worker setup")

    def close(self):
        pass


def dirty_application():
    from shm_protocol.config import Settings
    from shm_protocol.logs import configure_logging
    from web.app import create_app

    settings = Settings.from_env(os.environ)
    configure_logging(settings, component="web")
    return create_app(DirtyBackend(), settings)
