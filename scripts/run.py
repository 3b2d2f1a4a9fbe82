"""`make run`: start the sidecar, wait until it is ready, start Gunicorn;
stop both cleanly on Ctrl-C (or SIGTERM). Like systemd's Restart=always, a
sidecar that exits on its own (a crash, or one that gave up on a wedged
loop) is started again after a second; the workers re-attach to it. If
Gunicorn exits, everything stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.region import wait_until_ready  # noqa: E402
from shm_protocol.segments import Names  # noqa: E402

#: Pause before a sidecar that exited is started again (systemd's RestartSec).
RESTART_DELAY_S = 1.0


def main() -> int:
    settings = Settings.from_env(os.environ)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    def start_sidecar() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, cwd=REPO, start_new_session=True)

    print(f"shm-embed: starting the sidecar (namespace {settings.namespace})", flush=True)
    sidecar = start_sidecar()
    if not wait_until_ready(Names(settings.namespace), sidecar.pid, 300, alive=lambda: sidecar.poll() is None):
        print("shm-embed: the sidecar did not become ready", file=sys.stderr)
        sidecar.terminate()
        return sidecar.wait() or 1
    print(f"shm-embed: sidecar ready; starting Gunicorn on http://{settings.bind}", flush=True)
    web = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")],
                           env=env, cwd=REPO, start_new_session=True)
    while not stop["flag"] and web.poll() is None:
        if sidecar.poll() is not None:
            print(f"shm-embed: the sidecar exited with status {sidecar.returncode}; restarting it in 1 s",
                  file=sys.stderr, flush=True)
            time.sleep(RESTART_DELAY_S)
            if stop["flag"]:
                break
            sidecar = start_sidecar()
        time.sleep(0.2)
    # Web first (it drains requests), then the sidecar (it drains slots and unlinks).
    for proc in (web, sidecar):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("shm-embed: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
