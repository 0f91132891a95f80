"""Every benchmarks/bench_*.py runs with --smoke on CPU, exits 0 and ends with its ratio line.

The convention (STYLE.md): a benchmark's last stdout line is `bench_<name>: ... ratio ...`. No timing is
asserted here; the benchmarks themselves check their targets when run in full.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_smoke_runs_and_prints_its_ratio_line(script: Path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",  # CPU even where a GPU exists: CI parity
           "OMP_NUM_THREADS": "1",  # shared CI cores: more threads than free cores makes OpenMP spin
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    output = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{script.name} --smoke exited {proc.returncode}\n{output}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{script.name} printed nothing\n{output}"
    last = lines[-1]
    assert last.startswith(f"{script.stem}:") and "ratio" in last.lower(), (
        f"{script.name}: the last line must be the ratio line '{script.stem}: ... ratio ...', got {last!r}")


def test_the_core_benchmarks_exist():
    names = {p.stem for p in BENCHMARKS}
    assert {"bench_losses", "bench_train_step"} <= names, names
