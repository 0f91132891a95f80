"""Environment faults: W&B online without a network, a read-only HOME or data folder, and a clean exit of
every rank under torchrun. Each gives the run its normal result, or one line naming the folder and the fix."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from advgkl import data, distributed, logging as runlog, trainers
from advgkl.data import load_dataset
from advgkl.errors import UserError
from conftest import tiny_recipe

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real W&B key
# Variables that would point W&B, the caches or the data somewhere else than the test says.
_REDIRECTS = ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_API_KEY",
              "WANDB_BASE_URL", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "ADVGKL_DATA",
              "ADVGKL_WANDB_INIT_TIMEOUT")


def _clear_env(monkeypatch) -> None:
    """Unset the redirect variables for this test; set-then-delete so that the undo also removes any that
    the code under test sets (RunLogger points unwritable W&B folders elsewhere through the environment)."""
    for var in _REDIRECTS:
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- 1. W&B online, no network
def test_wandb_online_without_a_server_falls_back_to_offline_in_time(fmnist_root, tmp_path, monkeypatch, capfd):
    """A key but no server: within the init timeout the run logs offline instead, said in one line,
    and trains to the same weights as a run without W&B."""
    _clear_env(monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("ADVGKL_WANDB_INIT_TIMEOUT", "2")
    start = time.monotonic()
    online = trainers.train(tiny_recipe(fmnist_root, "logging.wandb=online"), tmp_path / "online")
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "W&B" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("W&B: cannot reach the server in 2 s (CommError: "), lines[0]
    offline = list((tmp_path / "online" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and f"logging offline to {offline[0]} instead (wandb sync {offline[0]} later)" in lines[0]
    assert list(offline[0].glob("run-*.wandb")), "the offline run folder holds W&B's log for `wandb sync`"
    run_id = (tmp_path / "online" / "wandb_run_id.txt").read_text().strip()
    assert offline[0].name.endswith(run_id)  # the same run id: the sync uploads the run the job meant to make
    assert online["wandb_dir"] == str(offline[0] / "files")
    assert elapsed < 60, f"{elapsed:.0f} s: the init timeout did not bound the wait"
    plain = trainers.train(tiny_recipe(fmnist_root), tmp_path / "plain")
    assert online["per_point"] == plain["per_point"] and online["clean_acc"] == plain["clean_acc"]
    records = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("epoch") == 1 for r in records)  # the JSONL log is complete whatever W&B does


@pytest.mark.parametrize("raw, expected, warned", [(None, 30.0, False), ("", 30.0, False), ("4.5", 4.5, False),
                                                   ("abc", 30.0, True), ("0", 30.0, True), ("nan", 30.0, True)])
def test_wandb_init_timeout_knob(monkeypatch, capsys, raw, expected, warned):
    monkeypatch.delenv(runlog.INIT_TIMEOUT_ENV, raising=False)
    if raw is not None:
        monkeypatch.setenv(runlog.INIT_TIMEOUT_ENV, raw)
    assert runlog.init_timeout() == expected
    err = capsys.readouterr().err
    assert (f"warning: {runlog.INIT_TIMEOUT_ENV}=" in err) == warned and err.count("\n") == int(warned)


# ------------------------------------------------------------------- 2. read-only HOME or data folder
def _unwritable(tmp_path: Path, how: str) -> Path:
    """A data root that cannot be created or written. ``under_a_file`` fails for root too (mkdir gives
    NotADirectoryError); chmod 555 only stops other users, so that variant needs a non-root run."""
    if how == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder\n")
        return blocker / "data"
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 555 does not stop root's writes (the under_a_file case covers root)")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("how", ["under_a_file", "chmod_555"])
def test_unwritable_data_root_reads_fashion_mnist_in_place(fmnist_root, tmp_path, capfd, how):
    root = _unwritable(tmp_path, how)
    before = sorted(tmp_path.rglob("*"))
    try:
        images, labels = load_dataset("fashion_mnist", root, train=False)
        again = load_dataset("fashion_mnist", root, train=True)  # a second load: no second note
    finally:
        if how == "chmod_555":
            root.chmod(0o755)
    expected_images, expected_labels = load_dataset("fashion_mnist", fmnist_root, train=False)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert len(again[1]) == 60000
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    raw = root / "FashionMNIST" / "raw"
    assert err.startswith(f"note: cannot copy Fashion-MNIST into {raw} (")
    assert f"reading it from {data.FMNIST_SYSTEM_DIR}/ in place. Set ADVGKL_DATA or data.root to a writable" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, no temporary file left


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_download_into_an_unwritable_root_names_the_folder_and_the_fix(tmp_path, name):
    root = _unwritable(tmp_path, "under_a_file")
    with pytest.raises(UserError) as info:
        load_dataset(name, root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name} not found in {root}, and it cannot be downloaded there (Not a directory)")
    assert "Set ADVGKL_DATA or data.root to a writable folder" in message
    assert not root.exists()


def test_copy_that_fails_half_way_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk during the Fashion-MNIST copy: the read falls back to the Debian files, no .tmp stays."""
    raw = tmp_path / "FashionMNIST" / "raw"
    real_copy = data.shutil.copyfileobj
    calls = []

    def disk_full_on_second_file(src, dst, *a):
        calls.append(dst)
        if len(calls) == 2:
            dst.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a)

    monkeypatch.setattr(data.shutil, "copyfileobj", disk_full_on_second_file)
    images, labels = load_dataset("fashion_mnist", tmp_path, train=False)
    assert len(labels) == 10000 and images.shape == (10000, 1, 28, 28)
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte"]  # complete files only


def test_read_only_home_trains_with_notes_and_an_offline_wandb_run(fmnist_root, tmp_path):
    """HOME that cannot be written (data cache, W&B's logs and caches): the CLI run succeeds, prints one
    note per folder it could not use, and W&B still writes its offline run into the run folder."""
    blocker = tmp_path / "home_is_a_file"
    blocker.write_text("not a folder\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("").to_dict()))  # data.root "" = $ADVGKL_DATA or ~/.cache/...
    env = {k: v for k, v in os.environ.items() if k not in _REDIRECTS and k not in ("TORCH_HOME", "PYTHONPATH")}
    env.update(HOME=str(blocker / "home"), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(data.__file__).parents[1]))
    run = subprocess.run([sys.executable, "-m", "advgkl", "train", str(recipe), "logging.wandb=offline",
                          "--out", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 2, run.stderr
    raw = blocker / "home" / ".cache" / "advgkl" / "data" / "FashionMNIST" / "raw"
    assert lines[0].startswith(f"note: cannot copy Fashion-MNIST into {raw} (Not a directory); reading it from ")
    assert lines[1].startswith(f"note: W&B cannot write to {blocker / 'home' / '.cache' / 'wandb'}, ")
    assert lines[1].endswith(f"it keeps its logs and caches in {tmp_path / 'run' / 'wandb' / 'home'} instead")
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["clean_acc"] is not None
    assert "results:" in run.stdout


# ----------------------------------------------------------------------------- 3. torchrun with gloo
def _single_rank_env(monkeypatch) -> None:
    """torchrun's environment for a 1-process job, so that process_group opens (and owns) a gloo group."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


@pytest.mark.parametrize("raised", [None, UserError("bad recipe"), KeyboardInterrupt(), RuntimeError("a bug")])
def test_process_group_is_destroyed_on_every_path(monkeypatch, raised):
    assert not dist.is_initialized()
    _single_rank_env(monkeypatch)
    with pytest.raises(type(raised)) if raised is not None else contextlib.nullcontext():
        with distributed.process_group("cpu", timeout_s=30) as world:
            assert dist.is_initialized() and world.distributed and world.size == 1
            if raised is not None:
                raise raised
    assert not dist.is_initialized()


def test_a_lost_peer_is_one_line_and_the_group_is_left_to_the_exit(monkeypatch):
    """Destroying a group whose peer died or hangs can wait on work that never completes: it stays open."""
    _single_rank_env(monkeypatch)
    try:
        with pytest.raises(UserError, match=r"^rank 0 of 1 lost contact with the other processes \(\[gloo\] "
                                            r"Connection closed by peer\); .*\(timeout: 30 s, "
                                            r"runtime.dist_timeout_s\)$"):
            with distributed.process_group("cpu", timeout_s=30):
                raise RuntimeError("[gloo] Connection closed by peer\nsecond line")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_a_group_the_caller_opened_is_left_open(monkeypatch):
    _single_rank_env(monkeypatch)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        with distributed.process_group("cpu"):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_all_exit_zero(fmnist_root, tmp_path):
    """A finished 2-rank CPU job exits 0 on every rank: no SIGABRT from gloo at interpreter exit."""
    from test_distributed import torchrun, write_recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist_root)
    run = torchrun("train", recipe, "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for sign in ("terminate called", "SIGABRT", "Signal 6", "exitcode"):
        assert sign not in run.stderr, run.stderr[-3000:]
    assert run.stdout.count("results:") == 1
