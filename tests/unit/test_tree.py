"""The test suite stands on the product alone: no module under tests/ imports
a benchmark (bench/ may import the product, never the other way round), nor
puts bench/ on sys.path. Benchmarks are run as subprocesses, as an operator
runs them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_MODULES = {"bench"} | {path.stem for path in (REPO / "bench").glob("*.py")} - {"__init__"}


def bench_imports(path: Path) -> list[str]:
    """Each import of a bench module in ``path``, and each sys.path change naming bench, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("insert", "append") and "sys.path" in ast.unparse(node.func.value)):
            if "bench" in ast.unparse(node):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
            continue
        else:
            continue
        found += [f"{node.lineno}: import {module}" for module in modules
                  if module.split(".")[0] in BENCH_MODULES]
    return found


def test_the_scan_sees_each_way_of_reaching_bench(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom _common import child_pids\nimport soak as s\nfrom bench.memory import x\n"
                      "def f():\n    import sys\n    sys.path.insert(0, str(REPO / 'bench'))\n"
                      "from shm_protocol.processes import child_pids\n")
    assert [line.split(":")[0] for line in bench_imports(sample)] == ["2", "3", "4", "7"]


def test_no_module_under_tests_imports_bench():
    offenders = {str(path.relative_to(REPO)): found for path in sorted((REPO / "tests").rglob("*.py"))
                 if (found := bench_imports(path))}
    assert not offenders, offenders
