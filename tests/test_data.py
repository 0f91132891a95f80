"""Data: real Fashion-MNIST, files in the real CIFAR/MNIST/SVHN/ImageFolder formats, deterministic
splits, generated-data files, and the device-resident loader (augmentation, mixing, exact resume)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import advgkl.data as data
from advgkl.data import (DATASETS, BatchLoader, augment_batch, dataset_info, load_dataset,
                         load_generated_npz, random_crop_flip, split_validation, take_subset)
from advgkl.errors import UserError


@pytest.fixture(scope="module")
def fmnist_train(fmnist_root):
    return load_dataset("fashion_mnist", fmnist_root, train=True)


@pytest.fixture(scope="module")
def fmnist_1k(fmnist_train):
    """First 1,000 training images, uint8 [1000, 1, 28, 28], int64 [1000]."""
    return fmnist_train[0][:1000], fmnist_train[1][:1000]


# ---------------------------------------------------------------- registry and real data

def test_registry_and_info():
    assert sorted(DATASETS) == ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "imagenet", "mnist", "svhn"]
    for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn"):
        info = dataset_info(name)
        assert len(info.class_names) == info.num_classes
        assert len(info.mean) == len(info.std) == info.image_shape[0]
    assert dataset_info("cifar100").num_classes == 100 and len(set(dataset_info("cifar100").class_names)) == 100
    assert dataset_info("fashion_mnist").class_names[9] == "Ankle boot"


@pytest.mark.parametrize("call", [lambda: dataset_info("imagenet21k"), lambda: load_dataset("imagenet21k", "/tmp")])
def test_unknown_dataset_lists_names(call):
    with pytest.raises(UserError) as err:
        call()
    assert "imagenet21k" in str(err.value) and ", ".join(sorted(DATASETS)) in str(err.value)


def test_imagenet_is_never_loaded_whole():
    assert dataset_info("imagenet", image_size=64).image_shape == (3, 64, 64)
    with pytest.raises(UserError, match=r"imagenet is too large to load whole: advgkl reads it batch by batch"):
        load_dataset("imagenet", "/tmp")


def test_unknown_option_is_an_error(fmnist_root):
    with pytest.raises(UserError, match="image_size"):
        load_dataset("fashion_mnist", fmnist_root, image_size=32)


def test_real_fashion_mnist(fmnist_root, fmnist_train):
    images, labels = fmnist_train
    test_images, test_labels = load_dataset("fashion_mnist", fmnist_root, train=False)
    assert images.shape == (60000, 1, 28, 28) and test_images.shape == (10000, 1, 28, 28)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 1000))
    assert images.float().mean().item() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert images.float().std().item() / 255 == pytest.approx(0.3530, abs=5e-4)
    assert labels[:5].tolist() == [9, 0, 0, 3, 0]  # the published first training labels


def test_fmnist_test_small_fixture(fmnist_test_small):
    x, y = fmnist_test_small
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (256,) and y[:3].tolist() == [9, 2, 1]


def test_fmnist_installs_into_an_empty_root(tmp_path):
    images, labels = load_dataset("fashion_mnist", tmp_path, train=False)
    assert len(images) == 10000
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_fmnist_missing_everywhere_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path / "empty")


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_mnist_idx_files_plain_and_gz(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_x, False)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(12) % 10, True)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", test_x, True)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5), False)
    images, labels = load_dataset("mnist", tmp_path, train=True)
    assert images.shape == (12, 1, 28, 28) and torch.equal(images[:, 0], torch.from_numpy(train_x).byte())
    assert labels.tolist() == (np.arange(12) % 10).tolist()
    assert torch.equal(load_dataset("mnist", tmp_path, train=False)[0][:, 0], torch.from_numpy(test_x).byte())


# ---------------------------------------------------------------- CIFAR and other formats

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_format_files_load(make_cifar, name):
    fake = make_cifar(name, n_train=23, n_test=7)
    for train, images_ref, labels_ref in ((True, fake.train_images, fake.train_labels),
                                          (False, fake.test_images, fake.test_labels)):
        images, labels = load_dataset(name, fake.root, train=train)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, images_ref) and torch.equal(labels, labels_ref)


def test_cifar_row_layout_is_channel_planes(make_cifar):
    """Each 3072-byte row is the 1024 red values, then green, then blue, row-major."""
    fake = make_cifar("cifar10", n_train=5, n_test=1)
    with open(fake.root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        row = pickle.load(fh, encoding="bytes")[b"data"][0]
    image = load_dataset("cifar10", fake.root, train=False)[0][0]
    assert image[1, 0, 5].item() == row[1024 + 5] and image[2, 3, 7].item() == row[2048 + 3 * 32 + 7]


@pytest.mark.parametrize("name,hint", [("cifar10", "data_batch_1"), ("cifar100", "cifar-100-python"),
                                       ("mnist", "train-images-idx3-ubyte"), ("svhn", "train_32x32.mat")])
def test_missing_files_offline_is_a_user_error(tmp_path, monkeypatch, name, hint):
    def offline(name, root):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(UserError) as err:
        load_dataset(name, tmp_path)
    assert hint in str(err.value) and str(tmp_path) in str(err.value) and "unreachable" in str(err.value)


def test_incomplete_cifar_names_the_missing_file(make_cifar):
    fake = make_cifar("cifar10")
    (fake.root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset("cifar10", fake.root)


def test_cifar_pickle_cannot_run_code(make_cifar):
    fake = make_cifar("cifar10")
    with open(fake.root / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": os.getcwd, b"labels": [0]}, fh)  # a global: what an exploit would need
    with pytest.raises(UserError, match="refusing"):
        load_dataset("cifar10", fake.root, train=False)


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [10], [9]])})
    images, labels = load_dataset("svhn", tmp_path, train=False)
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3, 0, 9]
    assert images[2, 1, 4, 5].item() == x[4, 5, 1, 2]


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, per_class in (("train", 3), ("val", 2)):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            folder = tmp_path / split / ["cat", "dog"][c]
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 30), colour).save(folder / f"{i}.png")
    images, labels = load_dataset("imagefolder", tmp_path, train=True, image_size=16)
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images[0, 0].float().mean() == 255 and images[3, 2].float().mean() == 255  # red cat, blue dog
    val_images, val_labels = load_dataset("imagefolder", tmp_path, train=False, image_size=16)
    assert val_images.shape == (4, 3, 16, 16) and val_labels.tolist() == [0, 0, 1, 1]
    info = dataset_info("imagefolder", tmp_path, image_size=16)
    assert info.class_names == ("cat", "dog") and info.image_shape == (3, 16, 16)
    with pytest.raises(UserError, match="train"):
        load_dataset("imagefolder", tmp_path / "nothing")


# ---------------------------------------------------------------- splits and subsets

def test_split_validation_is_deterministic_disjoint_balanced(fmnist_1k):
    images, labels = fmnist_1k
    ids = torch.arange(len(labels))  # split ids alongside labels to check coverage exactly
    (tr_ids, tr_y), (va_ids, va_y) = split_validation(ids, labels, 200, seed=3)
    assert len(va_ids) == 200 and len(tr_ids) == 800
    assert set(tr_ids.tolist()).isdisjoint(va_ids.tolist())
    assert torch.equal(torch.cat([tr_ids, va_ids]).sort().values, ids)
    assert torch.equal(tr_y, labels[tr_ids]) and torch.equal(va_y, labels[va_ids])
    assert torch.bincount(va_y, minlength=10).tolist() == [20] * 10  # class-balanced hold-out
    assert torch.equal(split_validation(ids, labels, 200, seed=3)[1][0], va_ids)
    assert not torch.equal(split_validation(ids, labels, 200, seed=4)[1][0], va_ids)
    (tr_images, _), _ = split_validation(images, labels, 200, seed=3)
    assert torch.equal(tr_images, images[tr_ids])
    with pytest.raises(UserError):
        split_validation(ids, labels, 1000)


def test_take_subset_is_deterministic_and_balanced(fmnist_1k):
    images, labels = fmnist_1k
    ids, sub_y = take_subset(torch.arange(1000), labels, 95, seed=0)
    assert len(set(ids.tolist())) == 95 and torch.equal(sub_y, labels[ids])
    counts = torch.bincount(sub_y, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 10
    assert torch.equal(take_subset(torch.arange(1000), labels, 95, seed=0)[0], ids)
    assert not torch.equal(take_subset(torch.arange(1000), labels, 95, seed=1)[0], ids)
    assert torch.equal(take_subset(images, labels, 95, seed=0)[0], images[ids])
    with pytest.raises(UserError):
        take_subset(images, labels, 1001)


# ---------------------------------------------------------------- generated data files

def test_generated_npz_nhwc_and_nchw(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", image=nchw.transpose(0, 2, 3, 1), label=labels)
    np.savez_compressed(tmp_path / "nchw.npz", image=nchw, label=labels)
    for f in ("nhwc.npz", "nchw.npz"):
        images, y = load_generated_npz(tmp_path / f, num_classes=10, image_shape=(3, 32, 32))
        assert images.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(nchw)) and y.tolist() == labels.tolist()


@pytest.mark.parametrize("arrays,match", [
    ({"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.zeros(4, np.int64)}, "uint8"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8)}, "label"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(3, np.int64)}, "one label per image"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.array([0, 1, 2, 10])}, r"labels span \[0, 10\]"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.array([0, -1, 2, 3])}, "labels span"),
    ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.float32)}, "integers"),
    ({"image": np.zeros((32, 32, 3), np.uint8), "label": np.zeros(32, np.int64)}, "shape"),
    ({"image": np.zeros((4, 32, 32, 5), np.uint8), "label": np.zeros(4, np.int64)}, "channel"),
    ({"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.zeros(4, np.int64)}, r"expected \(3, 32, 32\)"),
    ({"image": np.array([None] * 4, dtype=object), "label": np.zeros(4, np.int64)}, "pickles"),
])
def test_generated_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=match):
        load_generated_npz(tmp_path / "bad.npz", num_classes=10, image_shape=(3, 32, 32))


def test_generated_npz_missing_or_not_npz(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_generated_npz(tmp_path / "none.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(UserError, match="single .npy"):
        load_generated_npz(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match="cannot read"):
        load_generated_npz(tmp_path / "text.npz")


# ---------------------------------------------------------------- loader

def test_loader_shapes_range_and_full_coverage(fmnist_1k):
    images, labels = fmnist_1k
    loader = BatchLoader(images, torch.arange(1000), 96, drop_last=False, seed=0)  # sample ids as labels
    assert len(loader) == 11
    batches = list(loader)
    assert [len(y) for _, y in batches] == [96] * 10 + [40]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (96, 1, 28, 28) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
    # without augmentation every sample appears exactly once, pixels untouched
    ids = torch.cat([b[1] for b in batches])
    assert torch.equal(ids.sort().values, torch.arange(1000)) and not torch.equal(ids, torch.arange(1000))
    assert torch.equal(torch.cat([b[0] for b in batches]).mul(255).round().byte(), images[ids])
    assert len(BatchLoader(images, labels, 96, seed=0)) == 10  # drop_last


def test_loader_order_depends_on_seed_and_epoch(fmnist_1k):
    images, labels = fmnist_1k
    def first_labels(seed, epoch):
        loader = BatchLoader(images, labels, 50, seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[1]
    assert torch.equal(first_labels(0, 0), first_labels(0, 0))
    assert not torch.equal(first_labels(0, 0), first_labels(1, 0))
    assert not torch.equal(first_labels(0, 0), first_labels(0, 1))
    unshuffled = BatchLoader(images, labels, 50, shuffle=False)
    assert torch.equal(next(iter(unshuffled))[1], labels[:50])


def test_crop_flip_is_a_shifted_maybe_flipped_copy(fmnist_1k):
    images = fmnist_1k[0][:64]
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    shifts = flips = 0
    for i in range(16):  # each output must equal some 28x28 window of the padded image, maybe mirrored
        windows = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 28, dx:dx + 28]))]
        assert windows, f"image {i} is not a crop of its padded original"
        shifts += windows[0][:2] != (4, 4)
        flips += windows[0][2]
    assert shifts >= 10 and 2 <= flips <= 14  # offsets are random, flips about half
    # flips alone keep every pixel value
    only_flip = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    assert torch.equal(only_flip.flatten(1).sort(1).values, images.flatten(1).sort(1).values)


def test_loader_augmentation_changes_pixels_keeps_statistics(fmnist_1k):
    images, labels = fmnist_1k
    plain = next(iter(BatchLoader(images, labels, 256, seed=0)))
    aug = next(iter(BatchLoader(images, labels, 256, seed=0, augment="crop_flip")))
    assert torch.equal(plain[1], aug[1]) and not torch.equal(plain[0], aug[0])
    # a crop only trades border pixels for zeros: the mean drops a little, lit pixels keep their statistics
    assert 0.9 * plain[0].mean() < aug[0].mean() < plain[0].mean()
    lit_plain, lit_aug = plain[0][plain[0] > 0], aug[0][aug[0] > 0]
    assert lit_aug.mean().item() == pytest.approx(lit_plain.mean().item(), rel=0.02)
    assert lit_aug.std().item() == pytest.approx(lit_plain.std().item(), rel=0.02)


def test_autoaugment_is_seeded_and_leaves_global_rng_alone(fmnist_1k):
    images = fmnist_1k[0][:8]
    torch.manual_seed(123)
    a = augment_batch(images, "autoaugment", seed=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    b = augment_batch(images, "autoaugment", seed=5)
    assert torch.equal(a, b) and torch.equal(torch.rand(3), after)
    assert not torch.equal(a, augment_batch(images, "autoaugment", seed=6))
    with pytest.raises(UserError, match="crop_flip"):
        augment_batch(images, "mixup", seed=0)


def _collect(loader, passes):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(passes)]


@pytest.mark.parametrize("augment", ["crop_flip", "autoaugment"])
def test_loader_resume_is_bit_identical(fmnist_1k, augment):
    images, labels = fmnist_1k[0][:256], fmnist_1k[1][:256]
    gen = (255 - images[:100], labels[:100])  # generated stand-ins, so mixing is covered too
    kw = dict(augment=augment, seed=7, generated=gen, generated_ratio=0.25)
    ref = BatchLoader(images, labels, 32, **kw)
    epochs = _collect(ref, 2)
    assert len(epochs[0]) == len(ref) == 256 // 24
    resumed = BatchLoader(images, labels, 32, **kw)
    resumed.load_state_dict({"epoch": 0, "batch": 3})
    resumed.set_epoch(0)  # same epoch: must keep the resumed position
    rest, second = _collect(resumed, 2)
    for (x, y), (rx, ry) in zip(epochs[0][3:] + epochs[1], rest + second, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_loader_state_points_at_the_next_batch(fmnist_1k):
    loader = BatchLoader(*fmnist_1k, 250)
    states = [loader.state_dict() for _ in loader]
    assert states == [{"epoch": 0, "batch": 1}, {"epoch": 0, "batch": 2}, {"epoch": 0, "batch": 3},
                      {"epoch": 1, "batch": 0}]
    loader.set_epoch(5)
    assert loader.state_dict() == {"epoch": 5, "batch": 0}
    with pytest.raises(UserError):
        loader.load_state_dict({"epoch": 0, "batch": 4})


def test_generated_mixing_ratio(fmnist_1k):
    images = fmnist_1k[0]
    ids = torch.arange(1000)  # sample ids as labels: real < 10_000 <= generated
    gen_images = torch.full((300, 1, 28, 28), 255, dtype=torch.uint8)
    loader = BatchLoader(images, ids, 40, generated=(gen_images, 10_000 + torch.arange(300)),
                         generated_ratio=0.3, seed=1)
    assert loader.num_generated == 12 and loader.num_real == 28 and len(loader) == 1000 // 28
    real_seen, gen_seen = [], []
    for x, y in loader:
        is_gen = y >= 10_000
        assert is_gen.sum().item() == 12 and torch.all(x[is_gen] == 1.0)
        assert torch.equal(x[~is_gen].mul(255).round().byte(), images[y[~is_gen]])
        real_seen += y[~is_gen].tolist()
        gen_seen += y[is_gen].tolist()
    assert len(real_seen) == len(set(real_seen)) == 35 * 28  # the epoch is one pass over the real set
    assert len(gen_seen) == 420 and len(set(gen_seen)) == 300  # 420 draws > 300: all of them, then a new pass
    assert len(set(gen_seen[:300])) == 300  # without replacement within a pass


def test_loader_rejects_bad_inputs(fmnist_1k):
    images, labels = fmnist_1k
    with pytest.raises(UserError, match="uint8"):
        BatchLoader(images.float(), labels, 32)
    with pytest.raises(UserError, match="generated"):
        BatchLoader(images, labels, 32, generated_ratio=0.5)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        BatchLoader(images, labels, 32, generated=(images, labels), generated_ratio=1.0)
    with pytest.raises(UserError, match="augmentation"):
        BatchLoader(images, labels, 32, augment="cutout")
    with pytest.raises(UserError, match="no full batch"):
        BatchLoader(images[:10], labels[:10], 32)
