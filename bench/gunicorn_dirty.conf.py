"""Gunicorn config of the dirty-workers comparison setup (bench only)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

wsgi_app = "bench.dirty_app:dirty_application()"
bind = os.environ.get("SHM_EMBED_BIND", "127.0.0.1:8001")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
dirty_apps = ["bench.dirty_app:EmbedApp"]
dirty_workers = 1
dirty_threads = int(os.environ.get("DIRTY_THREADS", "1"))
dirty_timeout = 120
timeout = 120
control_socket_disable = True
loglevel = "warning"
