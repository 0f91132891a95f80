"""Data errors a user can meet (broken idx files, image folders laid out wrong, impossible loader settings),
the partial Fashion-MNIST install, and the torchvision download wiring (no network: torchvision's dataset
classes are replaced by recorders)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advgkl import data
from advgkl.data import FMNIST_SYSTEM_DIR, BatchLoader, dataset_info, load_dataset
from advgkl.errors import UserError


def _message(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as err:
        fn(*args, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_imagefolder_info_needs_its_root():
    assert _message(dataset_info, "imagefolder") == (
        "dataset_info('imagefolder') needs root, the folder holding train/ and test/ (or val/)")


def _write_idx(path: Path, dims: tuple, body: bytes, magic: bytes = b"\0\0\x08") -> None:
    path.write_bytes(magic + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body)


def test_broken_idx_files_are_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", (2, 2, 2), bytes(8), magic=b"\0\0\x0d")  # float32, not uint8
    _write_idx(raw / "t10k-labels-idx1-ubyte", (2,), bytes(2))
    _write_idx(raw / "train-images-idx3-ubyte", (1, 2, 2), bytes(4))
    _write_idx(raw / "train-labels-idx1-ubyte", (1,), bytes(1))
    assert _message(load_dataset, "mnist", tmp_path, train=False) == (
        f"{raw / 't10k-images-idx3-ubyte'} is not a uint8 idx file")
    _write_idx(raw / "t10k-images-idx3-ubyte", (2, 2, 2), bytes(5))  # 5 of 8 values
    assert _message(load_dataset, "mnist", tmp_path, train=False) == (
        f"{raw / 't10k-images-idx3-ubyte'} is truncated: header says (2, 2, 2), found 5 values; delete it and reload")
    _write_idx(raw / "t10k-images-idx3-ubyte", (2, 2, 2), bytes(range(8)))
    images, labels = load_dataset("mnist", tmp_path, train=False)
    assert images.shape == (2, 1, 2, 2) and images.flatten().tolist() == list(range(8))


def test_a_partial_fashion_mnist_install_is_completed_without_touching_what_is_there(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    kept = raw / "t10k-labels-idx1-ubyte"
    kept.write_bytes(gzip.decompress((FMNIST_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    before = os.stat(kept)
    images, labels = load_dataset("fashion_mnist", tmp_path, train=False)
    assert images.shape == (10_000, 1, 28, 28) and torch.bincount(labels).tolist() == [1000] * 10
    assert os.stat(kept).st_ino == before.st_ino and os.stat(kept).st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in raw.iterdir()) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                     "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


@pytest.mark.parametrize("name,expected", [
    ("mnist", [("MNIST", {"train": True, "download": True})]),
    ("cifar10", [("CIFAR10", {"train": True, "download": True})]),
    ("cifar100", [("CIFAR100", {"train": True, "download": True})]),
    ("svhn", [("SVHN", {"split": "train", "download": True}), ("SVHN", {"split": "test", "download": True})]),
])
def test_downloads_go_through_torchvision(tmp_path, monkeypatch, name, expected):
    from torchvision import datasets

    calls = []
    for cls in ("MNIST", "CIFAR10", "CIFAR100", "SVHN"):
        monkeypatch.setattr(datasets, cls, lambda root, _cls=cls, **kw: calls.append((_cls, root, kw)))
    data._download(name, tmp_path)
    where = str(tmp_path / "svhn") if name == "svhn" else str(tmp_path)
    assert calls == [(cls, where, kw) for cls, kw in expected]


def test_an_offline_download_says_what_to_put_where(tmp_path, monkeypatch):
    def offline(name, root):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_download", offline)
    message = _message(load_dataset, "mnist", tmp_path)
    assert message.startswith("mnist not found and the automatic download failed (OSError: [Errno -3] Temporary "
                              "failure in name resolution). Put the four MNIST idx files")
    assert message.endswith(f"in {tmp_path / 'MNIST' / 'raw'}/")


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((5, 7, 3), value, np.uint8)).save(path)


def test_image_folders_laid_out_wrong_are_named(tmp_path):
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    assert _message(load_dataset, "imagefolder", root) == f"image folder {root / 'train'}/ has no class sub-folders"
    assert _message(load_dataset, "imagefolder", root, image_size=0) == (
        "imagefolder image_size must be a positive integer, got 0")
    _image(root / "train" / "cat" / "a.png", 10)
    _image(root / "train" / "dog" / "b.png", 200)
    assert _message(load_dataset, "imagefolder", root, train=False) == (
        f"image folder {root}/ has no test/ or val/ sub-folder")
    _image(root / "val" / "cow" / "c.png", 50)
    assert _message(load_dataset, "imagefolder", root, train=False) == (
        f"{root / 'val'}/ has classes missing from {root / 'train'}/: ['cow']")
    (root / "val" / "cow" / "c.png").unlink()
    (root / "val" / "cow").rmdir()
    (root / "val" / "dog").mkdir()
    (root / "val" / "dog" / "notes.txt").write_text("not an image")
    assert _message(load_dataset, "imagefolder", root, train=False) == f"no images found under {root / 'val'}/"
    _image(root / "val" / "dog" / "d.png", 200)
    images, labels = load_dataset("imagefolder", root, train=False, image_size=4)
    assert images.shape == (1, 3, 4, 4) and labels.tolist() == [1] and images.unique().tolist() == [200]


def test_impossible_loader_settings_are_refused():
    images, labels = torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.arange(8) % 2
    assert _message(BatchLoader, images, labels, 4, rank=0, world_size=3) == (
        "the global batch_size 4 must split evenly over world_size 3 ranks (rank 0 given)")
    gen = (torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    assert _message(BatchLoader, images, labels, 2, generated=gen, generated_ratio=0.9) == (
        "generated_ratio 0.9 leaves no real samples in a batch of 2")
    wrong = (torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    assert _message(BatchLoader, images, labels, 4, generated=wrong, generated_ratio=0.5) == (
        "generated images must be uint8 (1, 4, 4) like the real ones, got torch.uint8 (3, 4, 4)")


def test_a_many_line_download_error_becomes_one_line(tmp_path, monkeypatch):
    def mirrors(name, root):
        raise RuntimeError("Error downloading x.gz:\nTried https://a/, got:\n<urlopen error>\n")

    monkeypatch.setattr(data, "_download", mirrors)
    assert _message(data._download_or_explain, "cifar10", tmp_path, "the files in x/") == (
        "cifar10 not found and the automatic download failed (RuntimeError: Error downloading x.gz: Tried "
        "https://a/, got: <urlopen error>). Put the files in x/")
