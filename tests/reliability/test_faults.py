"""Storage faults, bad input, unsafe checkpoints, NaN losses and secrets: each a clear message, no
lost work, no code executed."""
import builtins
import errno
import os

import numpy as np
import pytest
import torch

from advgkl import checkpoint, cli, trainers
from advgkl.attacks import AutoAttack
from advgkl.checkpoint import load_checkpoint
from advgkl.errors import UserError
from test_train import small_cfg  # tests/ is on sys.path: it holds the package "reliability"


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(fmnist_root, tmp_path, monkeypatch):
    real_open = builtins.open
    writes = []

    def full_disk_open(path, mode="r", *args, **kw):
        if "w" in mode and ".tmp-" in str(path):
            writes.append(path)
            if len(writes) >= 3:  # the first two checkpoints fit, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    cfg = small_cfg(fmnist_root, "runtime.checkpoint_every_steps=10", "eval.version=none")
    with pytest.raises(UserError, match="No space left on device.*previous last.pt is intact"):
        trainers.train(cfg, tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 20  # the second good checkpoint survived
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no half-written leftovers
    monkeypatch.undo()
    trainers.train(cfg, tmp_path, resume=True)  # space is back: the run completes from step 20
    assert (tmp_path / "results.json").exists()


def test_output_folder_that_cannot_be_created(fmnist_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        trainers.train(small_cfg(fmnist_root, "eval.version=none"), blocker / "run")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": _Evil()}, path)
    refused = (f"{path} holds objects that are not plain tensors/containers (posix.system); advgkl only loads "
               f"weights_only checkpoints")
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value) == refused
    assert cli.main(["eval", str(path), "--wandb", "disabled"]) == 2
    err_text = capsys.readouterr().err
    assert err_text == f"advgkl eval: error: {refused}\n" and "weights_only=False" not in err_text
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


@pytest.mark.parametrize("content,says", [
    (b"", "is empty (0 bytes), not a checkpoint (an interrupted copy or download?)"),
    (b"\x00" * 100, "is not a torch checkpoint"),
    (b"<!DOCTYPE html><html>404</html>", "is an HTML page, not a checkpoint (a failed download?)"),
])
def test_truncated_or_foreign_checkpoints_are_refused(tmp_path, content, says):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path} {says}"


def test_truncated_real_checkpoint_is_refused(fmnist_root, tmp_path):
    trainers.train(small_cfg(fmnist_root, "eval.version=none"), tmp_path / "run")
    data = (tmp_path / "run" / "checkpoints" / "final.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(cut)


def test_a_plain_state_dict_is_not_mistaken_for_an_advgkl_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not an advgkl checkpoint"):
        load_checkpoint(path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(fmnist_root, tmp_path):
    cfg = small_cfg(fmnist_root, "optim.lr=1e30", "runtime.checkpoint_every_steps=1", "eval.version=none")
    with pytest.raises(UserError, match=r"the loss became (nan|inf) at epoch 1, step \d+") as err:
        trainers.train(cfg, tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 1 and f"at epoch 1, step {ckpt['step']} (lr " in str(err.value)
    assert str(err.value).endswith(f"; the last good checkpoint is {tmp_path / 'checkpoints' / 'last.pt'}")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("bad,message", [
    (lambda x, y: (x * 255, y), "finite values in \\[0, 1\\]"),
    (lambda x, y: (torch.where(torch.rand_like(x) < 0.01, torch.nan, x), y), "finite values"),
    (lambda x, y: (x.masked_fill(x > 0.9, float("inf")), y), "finite values"),
    (lambda x, y: (x[:, 0], y), "x must be a float tensor \\[N, C, H, W\\]"),
    (lambda x, y: (x, y.float()), "y must be an int64 tensor"),
    (lambda x, y: (x, y + 10), "label"),
])
def test_bad_evaluation_inputs_are_clear_errors_before_compute(trained_tiny_fmnist, bad, message):
    t = trained_tiny_fmnist
    x, y = bad(t.x[:8].clone(), t.y[:8].clone())
    with pytest.raises(UserError, match=message):
        AutoAttack(t.model, eps=0.1, progress=False)(x, y)


@pytest.mark.parametrize("arrays,message", [
    ({"image": np.zeros((4, 28, 28, 1), np.float32), "label": np.zeros(4, np.int64)}, "uint8"),
    ({"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.full(4, 10)}, "label"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.int64)}, r"images are \(3, 32, 32\).*expected \(1, 28, 28\)"),
    ({"label": np.zeros(4, np.int64)}, "image"),
])
def test_bad_generated_data_is_refused_before_training(fmnist_root, tmp_path, arrays, message):
    path = tmp_path / "gen.npz"
    np.savez(path, **arrays)
    cfg = small_cfg(fmnist_root, f"data.generated={path}", "data.generated_ratio=0.5", "eval.version=none")
    with pytest.raises(UserError, match=message):
        trainers.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wandb_api_key_is_never_written(fmnist_root, tmp_path, monkeypatch):
    secret = "a1b2c3d4e5f6SECRETKEY0123456789abcdef0123"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    trainers.train(small_cfg(fmnist_root, "logging.wandb=offline", "eval.version=none"), tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
