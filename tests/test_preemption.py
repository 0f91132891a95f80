"""Preemption: SIGUSR1 / SIGTERM mid-epoch and mid-AutoAttack save the resumable state, exit with 75,
and --resume ends bitwise where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from advgkl import attacks, preemption, trainers
from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main

TINY = {"name": "t", "data": {"dataset": "fashion_mnist", "subset": 256, "batch_size": 32, "val_size": 0},
        "model": {"name": "tiny_cnn"}, "attack": {"eps": 0.1, "steps": 2}, "optim": {"epochs": 2},
        "eval": {"version": "none", "n_examples": 32, "batch_size": 8, "honesty_checks": False},
        "logging": {"wandb": "disabled", "progress": False}, "runtime": {"seed": 0, "threads": 1}}
AA = ["eval.version=custom", "eval.attacks=[apgd-ce]", "eval.n_examples=48", "method.name=pgd_at"]


@pytest.fixture
def recipe(tmp_path, fmnist_root):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "root": str(fmnist_root)}}))
    return str(path)


def _signal_at(monkeypatch, module, name, at: int, sig=signal.SIGUSR1):
    """Wrap ``module.name`` so that its ``at``-th call sends ``sig`` to this process first."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "final.pt")["model"]


def test_a_signal_mid_epoch_saves_exits_75_and_resumes_bitwise(recipe, tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or coverage's own handler
    assert main(["train", recipe, "--out", str(tmp_path / "ref")]) == 0
    calls = _signal_at(monkeypatch, trainers, "train_step", at=11, sig=signal.SIGTERM)  # epoch 2, batch 3 of 8
    assert main(["train", recipe, "--out", str(tmp_path / "cut")]) == preemption.PREEMPTED_EXIT
    assert "preempted by SIGTERM at epoch 2, step 11" in capsys.readouterr().err
    saved = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["loader"]["batch"]) == (1, 11, 3)
    assert not (tmp_path / "cut" / "results.json").exists() and len(calls) == 11
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handlers are gone again
    assert main(["train", recipe, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    ref, cut = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref)
    assert len(calls) == 16  # 5 more steps: nothing trained twice


def test_a_signal_mid_autoattack_keeps_the_finished_chunks(recipe, tmp_path, monkeypatch, capsys):
    assert main(["train", recipe, *AA, "--out", str(tmp_path / "ref")]) == 0
    calls = _signal_at(monkeypatch, attacks, "_run_attack", at=2)
    assert main(["train", recipe, *AA, "--out", str(tmp_path / "cut")]) == preemption.PREEMPTED_EXIT
    assert "during AutoAttack apgd-ce" in capsys.readouterr().err
    state = torch.load(tmp_path / "cut" / "autoattack_state_final.pt", weights_only=True)
    assert state["current"] == "apgd-ce" and state["chunks_done"] == 2 and len(calls) == 2
    assert main(["train", recipe, *AA, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    ref, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ref", "cut"))
    assert cut["per_point"] == ref["per_point"] and cut["autoattack_acc"] == ref["autoattack_acc"]
    clean = sum(ref["per_point"][ref["evaluated_weights"]]["clean_correct"])
    assert len(calls) == -(-clean // 8) > 2  # every chunk of 8 clean points attacked once, none twice


def test_advgkl_eval_is_preempted_by_a_real_signal_and_resumes(recipe, tmp_path):
    """A child process: SIGUSR1 once AutoAttack has saved its first state, exit 75, then --resume."""
    assert main(["train", recipe, "optim.epochs=1", "--out", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "final.pt"
    args = [sys.executable, "-m", "advgkl", "eval", str(ckpt), "--n-examples", "48", "--batch-size", "8",
            "--version", "custom", "--attacks", "apgd-ce", "--wandb", "disabled", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], env=env)
    state = tmp_path / "cut" / "autoattack_state_final.pt"
    while not state.exists() and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGUSR1)
    assert child.wait(timeout=120) == preemption.PREEMPTED_EXIT
    assert not (tmp_path / "cut" / "results.json").exists()
    left = torch.load(state, weights_only=True)
    assert "apgd-ce" not in left["per_attack"] and left["chunks_done"] >= 1  # stopped between two chunks
    assert subprocess.run([*args, "--out", str(tmp_path / "cut"), "--resume"], env=env).returncode == 0
    assert main(args[3:] + ["--out", str(tmp_path / "ref")]) == 0
    ref, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ref", "cut"))
    assert cut["per_point"] == ref["per_point"] and cut["per_attack_robust_acc"] == ref["per_attack_robust_acc"]


def test_outside_the_cli_signals_keep_their_handlers_and_nothing_is_requested():
    assert preemption.requested() is None
    with preemption.watch():
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption.requested() == "SIGUSR2"
    assert preemption.requested() is None and signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


class _TwoRanks:
    """A World of two ranks whose other rank has (``theirs``) or has not received a signal."""

    size = 2

    def __init__(self, theirs: bool):
        self.theirs = theirs

    def any(self, mask):
        return mask | self.theirs


def test_every_rank_stops_when_one_is_signalled():
    assert preemption.requested(_TwoRanks(False)) is None
    assert preemption.requested(_TwoRanks(True)) == "SIGTERM (on another rank)"
    with preemption.watch():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested(_TwoRanks(False)) == "SIGUSR1"


def test_watch_outside_the_main_thread_installs_nothing():
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(preemption.watch().__enter__() is None))
    thread.start()
    thread.join()
    assert seen == [True] and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
