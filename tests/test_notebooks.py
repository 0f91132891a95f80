"""Every notebooks/*.ipynb executes on CPU without a failing cell; the numbers it prints are checked.

A notebook reports what the tests read as one stdout line `NOTEBOOK_RESULTS {json}`. Notebooks are
committed with outputs cleared, and generated ones must match their generator script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
# jupyter_client swaps these for sys.executable when it launches the kernel
PYTHON_ALIASES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


def _runs_this_python(name: str) -> bool:
    try:
        argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
    except NoSuchKernel:
        return False
    return argv0 in PYTHON_ALIASES or os.path.abspath(argv0) == os.path.abspath(sys.executable)


@pytest.fixture(scope="session")
def kernel_name() -> str:
    """`python3` when it starts this interpreter (the venv, with advgkl and torch); otherwise installs a
    kernelspec into sys.prefix (`python3`, or `advgkl-venv` if a user-level `python3` shadows it)."""
    if _runs_this_python("python3"):
        return "python3"
    for name in ("python3", "advgkl-venv"):
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name],
                       check=True, capture_output=True)
        if _runs_this_python(name):
            return name
    pytest.fail(f"no Jupyter kernel runs {sys.executable}; tried python3 and advgkl-venv")


def _execute(path: Path, kernel: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernel inherits it: shared CI cores, no OpenMP spinning
    try:
        client = NotebookClient(nb, timeout=300, kernel_name=kernel,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()  # raises CellExecutionError on the first failing cell, with its traceback
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return nb


def _results(nb: nbformat.NotebookNode) -> dict:
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
             if out.output_type == "stream" for line in out.text.splitlines()
             if line.startswith("NOTEBOOK_RESULTS ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}


def _cell_seconds(nb: nbformat.NotebookNode) -> float:
    """Sum of the cells' execution times (nbclient's timestamps; kernel start-up excluded)."""
    total = 0.0
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
            total += (end - start).total_seconds()
    return total


def check_01_gkl_loss(r: dict, seconds: float) -> None:
    assert 0 < seconds < 60, f"01_gkl_loss must run in < 60 s on CPU, took {seconds:.1f} s"
    assert r["max_grad_diff_kl_dkl"] < 1e-12
    assert r["kl_minus_sce_plus_entropy"] < 1e-12
    assert r["max_rel_value_diff_closed_pairwise"] < 1e-12
    assert r["max_grad_diff_closed_pairwise"] < 1e-12
    # GKL's wMSE reaches both branches, equal and opposite; DKL's reaches only the teacher
    assert r["gkl_wmse_grad_student_norm"] > 1e-3
    assert r["gkl_wmse_grad_teacher_norm"] == pytest.approx(r["gkl_wmse_grad_student_norm"], rel=1e-12)
    assert r["gkl_wmse_student_plus_teacher_grad"] < 1e-15
    assert r["dkl_wmse_grad_student_norm"] == 0.0
    assert r["frozen_teacher_dkl_minus_sce_grad"] < 1e-15
    # smaller gamma flattens the prior; gamma = 0 weighs all 10 classes equally
    eff = r["effective_classes"]
    for t in ("T1", "T4"):
        seq = [eff[f"{t}_gamma{g}"] for g in ("1", "0.4", "0.2", "0")]
        assert all(a < b for a, b in zip(seq, seq[1:])), (t, seq)
        assert seq[-1] == pytest.approx(10.0, rel=1e-5)
    assert eff["T1_gamma1"] < eff["T4_gamma1"]  # a higher prior temperature is flatter too
    assert set(r["timing"]) == {"B128_C10", "B128_C100", "B32_C1000"}
    assert all(v["closed_ms"] > 0 and v["pairwise_ms"] > 0 for v in r["timing"].values())


CHECKS = {"01_gkl_loss": check_01_gkl_loss}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, kernel_name: str):
    nb = _execute(path, kernel_name)
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    if path.stem in CHECKS:
        results = _results(nb)
        assert results, f"{path.name} printed no NOTEBOOK_RESULTS line"
        CHECKS[path.stem](results, _cell_seconds(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs first"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_generated_notebook_matches_its_generator(path: Path):
    generator = path.with_name(f"make_{path.stem.split('_')[0]}.py")
    if not generator.exists():
        pytest.skip(f"{path.name} is hand-written (no {generator.name})")
    spec = importlib.util.spec_from_file_location(f"_gen_{path.stem}", generator)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = nbformat.read(path, as_version=4)
    built = module.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{path.name} differs from {generator.name}: run python {generator.relative_to(NOTEBOOKS_DIR.parent)}")


def test_the_loss_notebook_exists():
    assert "01_gkl_loss" in [p.stem for p in NOTEBOOKS]
