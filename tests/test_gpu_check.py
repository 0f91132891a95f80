"""`make gpu-prep && make gpu-check SMOKE=1`: the GPU check's own script, at toy sizes on the CPU, so that
the one command a lent GPU runs cannot rot between GPU sessions (docs/gpu.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def prepared():
    proc = subprocess.run(["make", "-s", "gpu-prep"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_prep_carries_under_64_mib_and_its_wheels_install_offline(prepared, tmp_path):
    size = re.search(r"to copy to the GPU machine: .* = ([\d.]+) MiB \(limit 64 MiB\)", prepared)
    assert size, prepared
    assert 25 < float(size.group(1)) < 64  # Fashion-MNIST alone is 29 MiB
    wheels = sorted((ROOT / ".gpu" / "wheels").glob("*.whl"))
    assert {w.name.split("-")[0] for w in wheels} == {"pyautoattack", "robustbench", "gdown", "geotorch"}
    aa = next(w for w in wheels if w.name.startswith("pyautoattack-"))
    with zipfile.ZipFile(aa) as z:  # the 44 MB demo checkpoint is gone, from the files and from RECORD
        assert not any("examples/" in n for n in z.namelist())
        record = next(n for n in z.namelist() if n.endswith("RECORD"))
        assert "examples/" not in z.read(record).decode()
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (ROOT / ".gpu" / "data" / "FashionMNIST" / "raw" / f).stat().st_size > 0

    from gpu_check import install_wheels

    site = install_wheels(ROOT / ".gpu", tmp_path / "site")  # pip --no-index: what the GPU machine does
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import pyautoattack; print(pyautoattack.__file__)", str(site)],
                           capture_output=True, text=True)  # the installed copy wins over the venv's
    assert str(site) in probe.stdout, probe.stderr


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(prepared, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "-s", "gpu-check", "SMOKE=1", f"GPU_OUT={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["autoattack.txt", "data.txt", "ddp.txt", "e2e.txt", "profile.txt", "step.txt", "summary.json",
                     "summary.md"]  # at most 8 result files, one folder: what the device tool brings back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and all(s["status"] == "ran" for s in summary["sections"].values()), summary["sections"]
    assert list(summary["sections"]) == ["e2e", "step", "data", "profile", "ddp", "memory", "autoattack", "compile"]
    env_ = summary["environment"]
    assert env_["chip"].startswith("cpu") and env_["torch"] and env_["commit"] != "unknown"
    results = summary["results"]
    e2e = results["e2e"]
    assert e2e["points_that_differ"] == 0 and e2e["n_points"] == 8
    assert e2e["compiled_graphs"][0] > 0  # the demo recipe really ran under torch.compile
    step, compiled = results["step"], results["compile"]
    assert {"tiny_cnn/gkl_at/b8/baseline", "tiny_cnn/gkl_at/b8/advgkl", "tiny_cnn/pgd_at/b8/advgkl"} <= step.keys()
    assert list(compiled) == ["tiny_cnn/gkl_at/b8/baseline", "tiny_cnn/gkl_at/b8/advgkl+compile"]
    assert compiled["tiny_cnn/gkl_at/b8/advgkl+compile"]["ratio"] > 0
    assert all(v["images_per_s"] > 0 for v in [*step.values(), *compiled.values()])
    assert "advgkl+compile" in (out / "step.txt").read_text()
    assert results["data"]["ratio"] > 0 and results["ddp"]["plain"] > 0 and results["ddp"]["torchrun"] > 0
    assert len(results["profile"]["top"]) == 10
    assert results["autoattack"]["per_point_equal"] is True
    memory = results["memory"]["rows"]  # accumulate x activation checkpointing, appended to step.txt
    assert list(memory) == ["acc1", "acc1+ckpt", "acc4", "acc4+ckpt"]
    assert all(r["peak_bytes"] > 0 and r["step_ms"] > 0 and r["time_ratio"] > 0 for r in memory.values())
    for k in (1, 4):  # checkpointing changes no number (the script checks this too)
        assert memory[f"acc{k}+ckpt"]["loss"] == pytest.approx(memory[f"acc{k}"]["loss"], rel=1e-5)
    assert "bench_memory: wrn_34_10(depth=10,width=1) b8 peak-memory and time ratio" in (out / "step.txt").read_text()
    checks = {c["check"] for c in summary["checks"]}
    assert checks == {"e2e_verdicts", "step_wrn_gkl", "step_preact_pgd", "data", "ddp", "memory", "autoattack"}
    assert "| check | measured | target | verdict |" in (out / "summary.md").read_text()


def test_cuda_only_list_names_cuda_lines():
    """docs/gpu.md's list of lines only CUDA runs (the coverage report's accepted gaps) points at real lines."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    block = text.split("<!-- cuda-only -->")[1].split("<!-- /cuda-only -->")[0]
    entries = re.findall(r"`(advgkl/[\w/]+\.py):(\d+)`", block)
    assert entries
    for path, line in entries:
        source = (ROOT / path).read_text().splitlines()[int(line) - 1]
        assert re.search(r"cuda|nccl|cudnn", source, re.IGNORECASE), f"{path}:{line} is {source.strip()!r}"
