"""The peer embedding servers of bench/http_load.py, each its own process on
its own Python: infinity-emb (a virtual environment this module builds from
bench/requirements-infinity.txt, or ``--infinity-python``) and vLLM's
embedding server (on a CUDA host, with a Python that imports vllm: the
current one or ``--vllm-python``). Both listen on 127.0.0.1 only, load the
model from its folder, and download nothing (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import stop_process

BENCH = Path(__file__).resolve().parent
INFINITY_REQUIREMENTS = BENCH / "requirements-infinity.txt"
#: Where the infinity environment is built (XDG_CACHE_HOME, default ~/.cache).
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shm-embed-bench"
#: The name both servers serve the model under.
SERVED_NAME = "all-MiniLM-L6-v2"
#: Seconds a server may take to load the model and answer its health route.
START_TIMEOUT_S = 600
#: Share of the GPU's memory vLLM takes for weights and its cache (its default, 0.9, would leave none).
VLLM_GPU_MEMORY = "0.3"
_TORCH_PTH = "shm_embed_bench_torch.pth"


class PeerUnavailable(Exception):
    """This setup cannot run here; the message says why."""


def _probe(python: str, code: str) -> str:
    """Run ``code`` with ``python``; its output, or PeerUnavailable with its last error line."""
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{python}: {exc}") from exc
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise PeerUnavailable(f"{python}: {last}")
    return r.stdout.strip()


def _build_infinity_venv(venv: Path) -> None:
    """A fresh environment with bench/requirements-infinity.txt (every package pinned, no
    resolution) and, after its own packages on sys.path, the folder of this Python's torch."""
    import shutil

    shutil.rmtree(venv, ignore_errors=True)
    print(f"... building the infinity environment in {venv} (once; a minute or two)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r",
                        str(INFINITY_REQUIREMENTS)], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [""])[-1]
        raise PeerUnavailable(f"pip could not install {INFINITY_REQUIREMENTS.name}: {last}")
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise PeerUnavailable("torch is not importable here, and the infinity environment takes this one's")
    torch_folder = Path(spec.origin).parent.parent
    site = _probe(str(python), "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # Written after pip ran, so pip never saw (nor tried to replace) the project's packages.
    (Path(site) / _TORCH_PTH).write_text(f"{torch_folder}\n")


def infinity_python(explicit: str | None = None) -> str:
    """A Python that runs infinity_emb: ``explicit`` if given, else the cached environment,
    built or rebuilt when bench/requirements-infinity.txt changed."""
    if explicit:
        python = explicit
    else:
        venv = CACHE / "infinity-venv"
        stamp = venv / ".requirements"
        wanted = INFINITY_REQUIREMENTS.read_text()
        if not (stamp.is_file() and stamp.read_text() == wanted and (venv / "bin" / "python").exists()):
            _build_infinity_venv(venv)
            stamp.write_text(wanted)
        python = str(venv / "bin" / "python")
    _probe(python, "import infinity_emb, torch")
    return python


def vllm_python(explicit: str | None, device: str) -> str:
    """A Python that runs vLLM on a CUDA device: ``explicit`` if given, else this one
    if it imports vllm; PeerUnavailable otherwise."""
    if device != "cuda":
        raise PeerUnavailable("vLLM serves embeddings on a CUDA device only (this run is on the CPU)")
    if explicit:
        python = explicit
    elif importlib.util.find_spec("vllm") is not None:
        python = sys.executable
    else:
        raise PeerUnavailable("vllm is not importable here; give --vllm-python PATH (a Python with vllm)")
    _probe(python, "import torch, vllm; assert torch.cuda.is_available(), 'torch sees no CUDA device'")
    return python


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(name: str, cmd: list[str], port: int, route: str, env: dict):
    """Start ``cmd``; wait for its /health; yield (process, URL of its embeddings route); stop it."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"shm-embed-bench-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = " | ".join(log.read().strip().splitlines()[-5:])
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer in time"
                raise PeerUnavailable(f"{name} {state}: {tail}")
            time.sleep(0.5)
        yield proc, f"http://127.0.0.1:{port}{route}"
    finally:
        stop_process(proc, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any helper process it started (vLLM's engine) with it
        log.close()
        os.unlink(log.name)


def _server_env(env: dict) -> dict:
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # its own packages, not the project's
    return dict(env, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
                VLLM_NO_USAGE_STATS="1")


def infinity_server(python: str, model_path: Path, device: str, dtype: str, env: dict):
    """infinity_emb v2 serving the model folder (torch engine) on ``device`` at ``dtype``."""
    port = _free_port()
    cmd = [python, "-c", "import sys; from infinity_emb.cli import cli; sys.argv[0] = 'infinity_emb'; cli()",
           "v2", "--model-id", str(model_path), "--served-model-name", SERVED_NAME, "--engine", "torch",
           "--device", device, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return _serving("infinity", cmd, port, "/embeddings", _server_env(env))


def vllm_server(python: str, model_path: Path, dtype: str, env: dict):
    """vLLM's OpenAI-compatible server with the model as a pooling (embedding) model."""
    port = _free_port()
    version = _probe(python, "import vllm; print(vllm.__version__)")
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    runner = ["--runner", "pooling"] if major_minor >= (0, 10) else ["--task", "embed"]
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--served-model-name", SERVED_NAME, *runner, "--dtype", dtype, "--host", "127.0.0.1",
           "--port", str(port), "--gpu-memory-utilization", VLLM_GPU_MEMORY]
    return _serving("vllm", cmd, port, "/v1/embeddings", _server_env(env))
