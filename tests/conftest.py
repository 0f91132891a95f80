"""Shared pytest fixtures. Data fixtures use real Fashion-MNIST (Debian package dataset-fashion-mnist)
or small files written in the real formats; nothing here downloads."""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from advgkl.data import DEFAULT_ROOT, load_dataset
from advgkl.errors import UserError

# tests share small CPU boxes: more threads than free cores makes OpenMP spin and run ~10x slower
torch.set_num_threads(int(os.environ.get("ADVGKL_TEST_THREADS", "1")))


@pytest.fixture(autouse=True, scope="session")
def _coverage_survives_plain_pyautoattack():
    """Plain pyautoattack (the tests' reference) runs checks.check_dynamic, which ends with sys.settrace(None):
    that switches coverage's tracer off in this process for every later test. Keep whatever tracer was set."""
    from pyautoattack import checks

    original = checks.check_dynamic

    def keep_tracer(*args, **kwargs):
        tracer = sys.gettrace()
        try:
            return original(*args, **kwargs)
        finally:
            sys.settrace(tracer)

    checks.check_dynamic = keep_tracer
    yield
    checks.check_dynamic = original


# ---------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """Data root with FashionMNIST/raw/ (copied once from /usr/share/datasets/fashion-mnist/ into
    $ADVGKL_DATA or ~/.cache/advgkl/data). Fails, never skips, when the Debian package is missing."""
    try:
        load_dataset("fashion_mnist", DEFAULT_ROOT, train=False)  # installs the files on first use
    except UserError as err:
        pytest.fail(f"Fashion-MNIST is required for the tests: {err}")
    return DEFAULT_ROOT


@pytest.fixture(scope="session")
def fmnist_test_small(fmnist_root) -> tuple[torch.Tensor, torch.Tensor]:
    """First 256 Fashion-MNIST test images: float32 [256, 1, 28, 28] in [0, 1], int64 labels [256]."""
    images, labels = load_dataset("fashion_mnist", fmnist_root, train=False)
    return images[:256].float() / 255, labels[:256]


# ---------------------------------------------------------------- the tests' recipe

def tiny_recipe(root="", *overrides: str, **sections):
    """The one recipe the tests train: tiny_cnn on 256 real Fashion-MNIST images in batches of 32, one
    epoch, no AutoAttack, no W&B: seconds per run. ``sections`` change keys of a section (``eval={...}``)
    or a top-level value (``name="ddp"``); ``overrides`` then apply as on the command line. A plain
    function, not a fixture, so that spawned DDP ranks can build the same recipe."""
    from advgkl.config import apply_overrides, from_dict

    raw = {
        "name": "t", "data": {"dataset": "fashion_mnist", "root": str(root), "subset": 256, "batch_size": 32},
        "model": {"name": "tiny_cnn"},
        "attack": {"eps": 0.1, "steps": 2},
        "optim": {"epochs": 1},
        "eval": {"version": "none", "n_examples": 16, "batch_size": 16, "honesty_checks": False},
        "logging": {"wandb": "disabled", "progress": False},
        "runtime": {"seed": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(apply_overrides(raw, list(overrides)))


# ---------------------------------------------------------------- CIFAR-format files

@dataclass
class FakeCifar:
    """What `make_cifar` wrote: root for load_dataset, and the uint8 [N, 3, 32, 32] / int64 [N] arrays."""

    root: Path
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> FakeCifar:
    """Write random images in the real CIFAR python-pickle layout under root (cifar10 or cifar100).

    CIFAR-10 spreads n_train over data_batch_1..5; labels cycle through the classes.
    """
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(n) % num_classes
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        if name == "cifar10":
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        else:
            files = [split]
        for f, part in zip(files, np.array_split(np.arange(n), len(files))):
            entry = {b"batch_label": f.encode(), b"data": images[part].reshape(len(part), 3072),
                     key: labels[part].tolist(), b"filenames": [b"x.png"] * len(part)}
            if name == "cifar100":
                entry[b"coarse_labels"] = (labels[part] // 5).tolist()
            with open(folder / f, "wb") as fh:
                pickle.dump(entry, fh)
    return FakeCifar(root, *splits["train"], *splits["test"])


@pytest.fixture
def make_cifar(tmp_path):
    """Factory: make_cifar(name="cifar10", n_train=50, n_test=20, seed=0) -> FakeCifar in a fresh tmp dir."""

    def make(name: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> FakeCifar:
        return write_cifar(tmp_path / f"data_{name}_{seed}", name, n_train, n_test, seed)

    return make


# ---------------------------------------------------------------- trained tiny CNN (appended by the attacks owner)

@dataclass
class TrainedTiny:
    """A tiny_cnn trained on real Fashion-MNIST (eval mode, ~75% test accuracy) and test points for it.

    model: create_model("tiny_cnn", num_classes=10, in_channels=1); x: float32 [256, 1, 28, 28] in [0, 1]
    (fmnist_test_small); y: int64 [256]. Session-scoped and shared: deepcopy the model before changing it.
    """

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor


@pytest.fixture(scope="session")
def trained_tiny_fmnist(fmnist_root, fmnist_test_small) -> TrainedTiny:
    """4 epochs of Adam on 4,096 training images: about a second on one CPU core."""
    from advgkl.models import create_model
    import torch.nn.functional as F

    images, labels = load_dataset("fashion_mnist", fmnist_root, train=True)
    x, y = images[:4096].float() / 255, labels[:4096]
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # deterministic weights without touching the session's RNG stream
        torch.manual_seed(0)
        model = create_model("tiny_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().zero_grad(set_to_none=True)
    return TrainedTiny(model, *fmnist_test_small)
