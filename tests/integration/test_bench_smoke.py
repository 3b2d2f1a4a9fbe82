"""Every benchmark under bench/ still runs: each once, in a configuration of
seconds, as a subprocess (no figure is asserted; the point is that an API
change that breaks a benchmark fails here, not months later). The six
whose smallest run costs 20 s or more of this suite's 2-core budget
(model loads in several processes, or in several dtypes) are imported and
their arguments parsed instead; the soak runs in test_soak.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCH = REPO / "bench"

RUNS = {
    "hot_path.py": ["--requests", "210", "--gap-us", "200", "--sleeps"],
    "protocol_overhead.py": ["--requests", "20", "--block", "10", "--work", "synthetic:0", "--gap-us", "200"],
    "cpu_split.py": ["--seconds", "1", "--clients", "2", "--rounds", "1"],
    "search.py": ["--sizes", "1000", "--reps", "10", "--ingest-docs", "10"],
}
#: Imported and their --help run: 20 s to a minute or more each at their
#: smallest (model loads in several processes, or two models in every
#: dtype for fidelity.py), past this suite's budget.
IMPORTED = ("throughput.py", "http_load.py", "rerank.py", "http_latency.py", "memory.py", "fidelity.py", "cache.py",
            "binary_index.py")
#: Not entry points: imported by the others (or by Gunicorn, for dirty_app and peer_apps).
HELPERS = ("__init__.py", "_common.py", "_peers.py", "overhead_work.py", "dirty_app.py", "peer_apps.py",
           "gunicorn_dirty.conf.py", "soak.py")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_every_benchmark_is_covered_here():
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == set(RUNS) | set(IMPORTED) | set(HELPERS), scripts ^ (set(RUNS) | set(IMPORTED) | set(HELPERS))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_a_benchmark_runs_in_a_quick_configuration(script):
    r = subprocess.run([sys.executable, str(BENCH / script), *RUNS[script]], cwd=BENCH, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "---" in r.stdout, r.stdout[-3000:]  # it printed its table


@pytest.mark.parametrize("script", IMPORTED)
def test_a_long_benchmark_imports_and_parses_its_arguments(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--setups", "shm-embed,bogus"], "accepted: shm-embed, per-worker, dirty-workers, infinity, vllm"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs a CUDA device"),
])
def test_http_load_refuses_a_setup_or_dtype_it_cannot_run(args, message):
    r = subprocess.run([sys.executable, str(BENCH / "http_load.py"), *args], cwd=BENCH, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-3000:]
