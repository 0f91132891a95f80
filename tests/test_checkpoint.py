"""Checkpoint plumbing: an interrupted write leaves the previous file and no debris, a missing checkpoint
is named, provenance says "unknown" instead of failing, and a run folder admits one job at a time."""
import builtins
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from advgkl import checkpoint
from advgkl.checkpoint import FORMAT, RunLock, atomic_torch_save, load_checkpoint, write_json
from advgkl.errors import UserError


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("save,name", [
    (lambda path, value: atomic_torch_save({"format": FORMAT, "w": torch.full((256,), value)}, path), "last.pt"),
    (lambda path, value: write_json(path, {"format": FORMAT, "w": [value] * 256}), "results.json"),
])
def test_an_interrupt_mid_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch, save, name):
    path = tmp_path / "checkpoints" / name
    save(path, 1.0)
    before = path.read_bytes()
    real_open = builtins.open

    class CutAfterHalf:  # Ctrl-C (or a SIGTERM turned into an exception) while the bytes are going out
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "open", lambda p, mode="r", *a, **k: CutAfterHalf(real_open(p, mode, *a, **k)),
                        raising=False)
    with pytest.raises(KeyboardInterrupt):  # propagated as is: only OSError becomes a UserError
        save(path, 2.0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # the half-written temporary is gone


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "runs" / "final.pt")
    assert str(err.value) == f"checkpoint {tmp_path / 'runs' / 'final.pt'} does not exist"


def test_a_saved_checkpoint_loads_back_equal(tmp_path):
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    atomic_torch_save({"format": FORMAT, "model": {"w": weights}, "epoch": 3}, tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["model"]["w"], weights)


# ---------------------------------------------------------------- provenance


def fake_git(folder, script: str):
    git = folder / "git"
    git.write_text("#!/bin/sh\n" + script)
    git.chmod(0o755)


def test_git_commit_comes_from_git_and_is_unknown_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert checkpoint._git_commit() == "unknown"  # no git installed: FileNotFoundError, not a crash
    fake_git(tmp_path, 'echo "0123456789abcdef0123456789abcdef01234567"\n')
    assert checkpoint._git_commit() == "0123456789abcdef0123456789abcdef01234567"
    fake_git(tmp_path, 'echo "fatal: not a git repository" >&2\nexit 128\n')  # installed from a wheel
    assert checkpoint._git_commit() == "unknown"


def test_environment_info_says_not_installed_for_a_missing_package(monkeypatch):
    real_version = importlib.metadata.version

    def without_robustbench(name):
        if name == "robustbench":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_robustbench)
    info = checkpoint.environment_info()
    assert info["robustbench"] == "not installed"
    assert info["torchvision"] == real_version("torchvision")  # the others are still reported
    assert info["pyautoattack"] == real_version("pyautoattack")


# ---------------------------------------------------------------- run-folder lock


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes our stdin
""")


def test_a_run_folder_locked_by_another_job_is_refused_until_it_ends(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        fds = open_fds()
        with pytest.raises(UserError) as err:
            with RunLock(run):
                pass
        assert str(err.value) == f"{run} is in use by another advgkl job (lock held on {run / '.lock'})"
        assert open_fds() == fds  # the refused attempt closed its descriptor
    finally:
        other.stdin.close()
        other.wait(timeout=10)
    with RunLock(run) as held:  # the other job ended: its lock went with it
        assert held.path == run / ".lock"


def test_two_locks_on_one_folder_in_one_process_also_exclude_each_other(tmp_path):
    with RunLock(tmp_path / "new" / "run") as held:  # creates the folder
        assert held.path == tmp_path / "new" / "run" / ".lock"
        with pytest.raises(UserError, match="is in use by another advgkl job"):
            RunLock(tmp_path / "new" / "run").__enter__()
    with RunLock(tmp_path / "new" / "run") as again:  # released on exit: the folder can be locked again
        assert again.path == held.path
