"""pytest-benchmark behaves as its users expect with bench/conftest.py: ``--benchmark-min-rounds`` is honoured by
the fixed-round (pedantic) benchmarks, ``--benchmark-compare`` against a run of the same machine gives no
"machine_info is different" warning, and saved runs go outside the checkout (rlvrw's cache directory) unless
``--benchmark-storage`` says where. Each check runs pytest-benchmark in a subprocess on a tiny benchmark file beside
a copy of bench/conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

REPO = Path(__file__).resolve().parents[1]

TINY_BENCHMARKS = '''
import torch


def test_through_the_runner(bench):
    bench.run(op="tiny", impl="eager", shape="tiny", make_state=lambda: {"x": torch.ones(16, requires_grad=True)},
              step=lambda state: state["x"].sum().backward())


def test_plain_pedantic(benchmark):
    benchmark.pedantic(sum, args=([1, 2],), rounds=2)
'''


@pytest.fixture
def bench_dir(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(REPO / "bench" / "conftest.py", suite / "conftest.py")
    (suite / "test_tiny.py").write_text(TINY_BENCHMARKS)
    return suite


def run_benchmarks(suite: Path, *args: str) -> tuple[dict | None, str]:
    """Run the tiny suite with pytest-benchmark (cwd: the suite; cache: beside it); (its JSON, its output)."""
    out = suite.parent / "run.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "RLVRW_CACHE": str(suite.parent / "cache"), "RLVRW_BENCH_ROUNDS": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}", *args]
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return json.loads(out.read_text()), output


def rounds(run: dict) -> dict[str, int]:
    return {b["name"]: b["stats"]["rounds"] for b in run["benchmarks"]}


def test_min_rounds_compare_and_storage(bench_dir):
    cache = bench_dir.parent / "cache" / "benchmarks"
    # 1. --benchmark-min-rounds raises every fixed-round benchmark to at least that many rounds
    first, _ = run_benchmarks(bench_dir, "--benchmark-min-rounds=7", "--benchmark-autosave")
    assert rounds(first) == {"test_through_the_runner": 7, "test_plain_pedantic": 7}
    assert first["rlvrw_bench"]["min_rounds"] == 7 and "rlvrw_bench" not in first["machine_info"]
    assert "rlvrw" in first["machine_info"]
    saved = list(cache.rglob("0001_*.json"))
    assert len(saved) == 1, list(cache.rglob("*"))
    assert not (bench_dir / ".benchmarks").exists()  # nothing saved inside the working directory
    # 2. without it, the benchmarks' own rounds; comparing with the saved run of this machine raises no warning
    second, output = run_benchmarks(bench_dir, "--benchmark-compare")
    assert rounds(second) == {"test_through_the_runner": 3, "test_plain_pedantic": 2}
    assert "Comparing against benchmarks from" in output and saved[0].name in output
    assert "machine_info is different" not in output, output
    # 3. --benchmark-storage still decides
    elsewhere = bench_dir.parent / "elsewhere"
    run_benchmarks(bench_dir, f"--benchmark-storage=file://{elsewhere}", "--benchmark-autosave")
    assert len(list(elsewhere.rglob("0001_*.json"))) == 1
    assert len(list(cache.rglob("*.json"))) == 1
