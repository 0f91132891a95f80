"""SIGKILL a real training job at many moments; --resume must always finish with bitwise the same
weights and evaluation as a run that was never interrupted (CPU, deterministic mode)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advgkl.checkpoint import load_checkpoint

KILLER = Path(__file__).with_name("killer.py")
RECIPE = """
name: killtest
data: {dataset: fashion_mnist, root: ROOT, subset: 512, batch_size: 32}
model: {name: tiny_cnn}
method: {name: gkl_at, beta: 3.0}
attack: {eps: 0.1, steps: 2, eps_schedule: linear}
optim: {name: adamw, lr: 0.01, weight_decay: 0.0, epochs: 2}
ema: {enabled: true, decay: 0.9}
eval: {n_examples: 24, version: custom, attacks: [apgd-ce, apgd-t], batch_size: 8, honesty_pgd_steps: 5}
logging: {wandb: disabled, progress: false}
runtime: {seed: 0, deterministic: true, threads: 1, checkpoint_every_steps: 5}
"""


@pytest.fixture(scope="module")
def recipe(fmnist_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "kill.yaml"
    path.write_text(RECIPE.replace("ROOT", str(fmnist_root)))
    return path


def run(point, n, recipe, out, resume=False, wait=True):
    argv = [sys.executable, str(KILLER), point, str(n), "--", "train", str(recipe), "--out", str(out)]
    if resume:
        argv.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def outcome(out: Path):
    final = load_checkpoint(out / "checkpoints" / "final.pt")
    results = json.loads((out / "results.json").read_text())
    return final, results


def assert_identical(a: Path, b: Path):
    (fa, ra), (fb, rb) = outcome(a), outcome(b)
    for key in ("model", "ema"):
        for name in fa[key]:
            assert torch.equal(fa[key][name], fb[key][name]), f"{key}.{name}"
    for key in ("clean_acc", "autoattack_acc", "per_attack_robust_acc", "per_point", "warnings"):
        assert ra[key] == rb[key], key


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    proc = run("none", 0, recipe, out)
    assert proc.returncode == 0, proc.stderr
    (out / "duration_s").write_text(str(time.perf_counter() - t0))
    return out


# 2 epochs x 16 steps; checkpoints every 5 steps; 24 AutoAttack points in chunks of 8.
KILL_POINTS = [
    ("step", 3),         # before the first checkpoint: resume starts over
    ("step", 12),        # mid-epoch, after two mid-epoch checkpoints
    ("step", 20),        # second epoch
    ("attack", 7),       # inside the training attack
    ("ckpt_write", 1),   # during the first checkpoint write
    ("ckpt_write", 4),   # during the end-of-epoch checkpoint
    ("autoattack", 2),   # during the final AutoAttack, after its first chunk was saved
    ("autoattack", 3),   # during the second attack (APGD-CE ran in 2 chunks on the 12 clean-correct points)
]


@pytest.mark.parametrize("point,n", KILL_POINTS, ids=[f"{p}{n}" for p, n in KILL_POINTS])
def test_kill_then_resume_gives_the_uninterrupted_result(point, n, recipe, reference, tmp_path):
    killed = run(point, n, recipe, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "results.json").exists()
    for leftover in (tmp_path / "checkpoints").glob("*.pt") if (tmp_path / "checkpoints").exists() else []:
        load_checkpoint(leftover)  # every checkpoint on disk is complete and loads
    resumed = run("none", 0, recipe, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(reference, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines if '"epoch"' in line]
    assert epochs == [1, 2]  # no duplicated epoch records from the killed attempt


def test_random_time_kills_until_done(recipe, reference, tmp_path):
    rng = random.Random(0)
    duration = float((reference / "duration_s").read_text())  # a whole uninterrupted run, start-up included
    # On a shared machine a run can be much faster than the reference was: if one finishes before any
    # kill, start over in a fresh folder with kills twice as early, so the test always kills at least once.
    scale = 1.0
    for round_ in range(4):
        out, kills = tmp_path / f"round{round_}", 0
        for attempt in range(12):
            proc = run("none", 0, recipe, out, resume=True, wait=False)
            try:
                proc.wait(timeout=rng.uniform(0.4, 0.9) * scale * duration)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
            assert proc.returncode == 0, proc.stderr.read()
            break
        else:
            proc = run("none", 0, recipe, out, resume=True)
            assert proc.returncode == 0, proc.stderr
        if kills:
            break
        scale /= 2
    assert kills >= 1
    assert_identical(reference, out)


def test_a_kill_between_micro_batches_resumes_bitwise(fmnist_root, tmp_path):
    """optim.accumulate=2: the 13th training forward is the first micro-batch of step 7 (after the
    checkpoint of step 5); the resumed run redoes steps 6 and 7 whole and ends bitwise the same."""
    recipe = tmp_path / "accumulate.yaml"
    recipe.write_text(RECIPE.replace("ROOT", str(fmnist_root)).replace("epochs: 2}", "epochs: 2, accumulate: 2}"))
    reference = run("none", 0, recipe, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    killed = run("step", 13, recipe, tmp_path / "run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 5
    resumed = run("none", 0, recipe, tmp_path / "run", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(tmp_path / "reference", tmp_path / "run")
