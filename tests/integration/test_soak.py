"""A short run of bench/soak.py: HTTP load while the sidecar is killed and
stopped, workers are killed and recycled, clients time out and close, and a
ring gets hostile bytes. Zero wrong answers, zero hung requests, zero leaked
objects, no more rings leased than workers at the end, and 99% of the
requests sent while the sidecar ran answered (the 10-minute run asks 99.5%).

The soak runs as a subprocess, as an operator runs it: the tests import
nothing from bench/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

SOAK_S = float(os.environ.get("SHM_EMBED_TEST_SOAK_S", "25"))


@pytest.mark.slow
def test_short_soak_under_chaos(tiny_model, tmp_path):
    result_file = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", str(SOAK_S), "--model", str(tiny_model),
         "--clients", "4", "--workers", "2", "--seed", "1", "--up-ratio", "0.99", "--json", str(result_file)],
        cwd=REPO / "bench", env=env, capture_output=True, text=True, timeout=SOAK_S + 300,
    )
    assert result_file.exists(), (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads(result_file.read_text())
    assert result.get("sidecar_kills", 0) >= 1 and result.get("worker_kills", 0) >= 1, result
    assert result.get("sidecar_stalls", 0) >= 1 and result.get("hostile_slots", 0) >= 1, result
    assert result.get("timeouts", 0) >= 1 and result.get("direct_correct", 0) >= 1, result
    assert result.get("wrong", 0) == 0 and result.get("direct_wrong", 0) == 0 and result.get("hung", 0) == 0, result
    assert result["leaked_objects"] == 0, result
    assert result["leased_rings_at_end"] <= result["workers"], result
    assert result["up_ratio"] >= 0.99, result
    assert not any(key.startswith("http_5") and key != "http_503" for key in result), result
    # The exit status is the soak's own verdict on every target (churner crashes included).
    assert run.returncode == 0, (result, run.stdout[-3000:], run.stderr[-3000:])
