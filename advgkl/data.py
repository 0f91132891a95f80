"""Datasets as whole uint8 tensors, deterministic splits, generated-data files, and a device-resident
batch loader with vectorised augmentation and exact resume.

    images, labels = load_dataset("cifar10", root, train=True)   # uint8 [N, C, H, W], int64 [N]
    loader = BatchLoader(images, labels, 128, augment="crop_flip", device="cuda", seed=0)
    for x, y in loader: ...                                       # float [B, C, H, W] in [0, 1]

Every dataset but ImageNet is small enough to hold in memory (CIFAR-10 is 150 MB as uint8), so there are
no Dataset objects or worker processes: indexing a tensor on the GPU is the whole pipeline. ImageNet is
read from disk batch by batch by ``advgkl.streaming`` (docs/imagenet.md).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advgkl.errors import UserError

DEFAULT_ROOT = Path(os.environ.get("ADVGKL_DATA", "~/.cache/advgkl/data")).expanduser()
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. image_shape is (C, H, W); mean/std are per channel in [0, 1] units."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm").split()
_DIGITS = tuple(str(i) for i in range(10))

# `imagefolder` has no fixed classes or size: dataset_info("imagefolder", root, image_size) fills them in
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
        "Ankle boot")),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), _DIGITS),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), tuple(_CIFAR100_NAMES)),
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _DIGITS),
    "imagefolder": DatasetInfo("imagefolder", 0, (3, 0, 0), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ()),
    # read from disk batch by batch (advgkl.streaming), never whole; image_shape from data.image_size
    "imagenet": DatasetInfo("imagenet", 1000, (3, 0, 0), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ()),
}
STREAMING_DATASETS = ("imagenet",)  # too large for memory: advgkl.streaming reads them


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")


def dataset_info(name: str, root: str | Path | None = None, image_size: int = 32) -> DatasetInfo:
    """Facts for `name`; for `imagefolder` the classes come from `<root>/train/` and the size from image_size;
    `imagenet` has 1000 classes and image_size x image_size images."""
    _check_name(name)
    if name == "imagenet":
        return replace(DATASETS[name], image_shape=(3, image_size, image_size))
    if name != "imagefolder":
        return DATASETS[name]
    if root is None:
        raise UserError("dataset_info('imagefolder') needs root, the folder holding train/ and test/ (or val/)")
    classes = tuple(_folder_classes(Path(root) / "train"))
    return replace(DATASETS[name], num_classes=len(classes), image_shape=(3, image_size, image_size),
                   class_names=classes)


def load_dataset(name: str, root: str | Path = DEFAULT_ROOT, train: bool = True,
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split in memory: images uint8 [N, C, H, W] (CPU), labels int64 [N].

    Layout under root: FashionMNIST/raw/, MNIST/raw/ (idx files, .gz or not), cifar-10-batches-py/,
    cifar-100-python/, svhn/{train,test}_32x32.mat; imagefolder: root/train/<class>/*, root/test/ or
    root/val/. Only `imagefolder` takes an option: image_size (default 32). Missing files raise
    `UserError` saying what to put where (Fashion-MNIST is copied from the Debian package).
    """
    _check_name(name)
    if name in STREAMING_DATASETS:
        raise UserError(f"{name} is too large to load whole: advgkl reads it batch by batch (advgkl.streaming)")
    root = Path(root).expanduser()
    if name == "imagefolder":
        unknown = sorted(set(kw) - {"image_size"})
    else:
        unknown = sorted(kw)
    if unknown:
        raise UserError(f"dataset {name!r} got unknown options {unknown}"
                        + ("; it accepts ['image_size']" if name == "imagefolder" else "; it takes none"))
    if name == "fashion_mnist":
        images, labels = _load_fashion_mnist(root, train)
    elif name == "mnist":
        images, labels = _load_mnist(root, train)
    elif name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        images, labels = _load_cifar(root, "cifar10", "cifar-10-batches-py", names, b"labels")
    elif name == "cifar100":
        images, labels = _load_cifar(root, "cifar100", "cifar-100-python", ["train" if train else "test"],
                                     b"fine_labels")
    elif name == "svhn":
        images, labels = _load_svhn(root, train)
    else:
        images, labels = _load_imagefolder(root, train, kw.get("image_size", 32))
    return images, labels


# ---------------------------------------------------------------- idx files (MNIST, Fashion-MNIST)

_IDX = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(directory: Path, stem: str) -> Path | None:
    for path in (directory / stem, directory / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (LeCun's format: magic 0x0000 08 <ndim>, big-endian uint32 dims, uint8 data)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise UserError(f"{path} is truncated: header says {dims}, found {body.size} values; delete it and reload")
    return body.reshape(dims)


def _load_idx_pair(raw: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(_find(raw, _IDX[train][0]))
    labels = _read_idx(_find(raw, _IDX[train][1]))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _has_idx(raw: Path) -> bool:
    return all(_find(raw, stem) for pair in _IDX.values() for stem in pair)


def _load_fashion_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = root / "FashionMNIST" / "raw"
    if not _has_idx(raw):
        if not all((FMNIST_SYSTEM_DIR / f"{stem}.gz").is_file() for pair in _IDX.values() for stem in pair):
            raise UserError(
                f"Fashion-MNIST not found in {raw}. Install it with `apt-get install dataset-fashion-mnist` "
                f"(files go to {FMNIST_SYSTEM_DIR}/ and are copied here on first use), or put "
                f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                f"t10k-labels-idx1-ubyte (optionally .gz) into {raw}/")
        try:
            _install_fmnist(raw)
        except OSError as err:  # read-only HOME or data root, a file in the way, a full disk
            # the copy only saves a gunzip per load: read the Debian package's files where they are
            if raw not in _READ_IN_PLACE and os.environ.get("RANK", "0") == "0":  # once, and by one rank
                _READ_IN_PLACE.add(raw)
                print(f"note: cannot copy Fashion-MNIST into {raw} ({_os_reason(err, raw)}); reading it from "
                      f"{FMNIST_SYSTEM_DIR}/ in place. Set ADVGKL_DATA or data.root to a writable folder to "
                      "keep an unpacked copy", file=sys.stderr, flush=True)
            return _load_idx_pair(FMNIST_SYSTEM_DIR, train)
    return _load_idx_pair(raw, train)


def _install_fmnist(raw: Path) -> None:
    """Gunzip the Debian package's files into raw/ (each via a temp file + rename: parallel runs are safe).

    On failure no temp file is left behind; files already copied stay (each one is complete).
    """
    raw.mkdir(parents=True, exist_ok=True)
    for stem in (*_IDX[True], *_IDX[False]):
        if (raw / stem).is_file():
            continue
        tmp = raw / f".{stem}.{os.getpid()}.tmp"
        try:
            with gzip.open(FMNIST_SYSTEM_DIR / f"{stem}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw / stem)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise


_READ_IN_PLACE: set[Path] = set()  # Fashion-MNIST folders already reported as unwritable (one note each)


# errno values that mean "this folder cannot be written" rather than "the network failed"
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}


def _os_reason(err: OSError, folder: Path | None = None) -> str:
    """``Not a directory: /path`` for an OSError, on one line (the path left out when it is ``folder``)."""
    what = err.strerror or " ".join(str(err).split())
    return f"{what}: {err.filename}" if err.filename and str(err.filename) != str(folder) else what


def _load_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    raw = root / "MNIST" / "raw"
    if not _has_idx(raw):
        _download_or_explain("mnist", root, f"the four MNIST idx files (train-images-idx3-ubyte, "
                             f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) in {raw}/")
    return _load_idx_pair(raw, train)


# ---------------------------------------------------------------- downloads (torchvision)

def _download(name: str, root: Path) -> None:
    """Fetch `name` into root with torchvision (needs internet). Tests monkeypatch this to fail."""
    from torchvision import datasets

    if name == "svhn":
        for split in ("train", "test"):
            datasets.SVHN(str(root / "svhn"), split=split, download=True)
        return
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    cls(str(root), train=True, download=True)


def _download_or_explain(name: str, root: Path, what: str) -> None:
    try:
        _download(name, root)
    except Exception as err:  # offline, proxy, disk: all mean the same thing to the user
        if isinstance(err, OSError) and err.errno in _NOT_WRITABLE:
            raise UserError(f"{name} not found in {root}, and it cannot be downloaded there ({_os_reason(err, root)}). "
                            f"Set ADVGKL_DATA or data.root to a writable folder, or put {what}") from None
        reason = " ".join(str(err).split())  # torchvision lists every mirror it tried, a line each
        raise UserError(f"{name} not found and the automatic download failed ({type(err).__name__}: {reason}). "
                        f"Put {what}") from err


# ---------------------------------------------------------------- CIFAR (python pickle batches)

class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow only the numpy globals an array needs, never arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _load_cifar(root: Path, name: str, folder: str, files: list[str],
                label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    directory = root / folder
    if not directory.is_dir():
        every = "data_batch_1 ... data_batch_5 and test_batch" if name == "cifar10" else "train and test"
        _download_or_explain(name, root, f"the python-version batch files ({every}) in {directory}/")
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UserError(f"{name}: {directory}/ lacks {', '.join(missing)}; the dataset is incomplete")
    images, labels = [], []
    for f in files:
        try:
            with open(directory / f, "rb") as fh:
                entry = _CifarUnpickler(fh, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, then G, then B values
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise UserError(f"{directory / f} is not a {name} batch file ({type(err).__name__}: {err})") from err
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---------------------------------------------------------------- SVHN (.mat) and image folders

def _load_svhn(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    path = root / "svhn" / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        _download_or_explain("svhn", root, f"train_32x32.mat and test_32x32.mat in {path.parent}/")
    from scipy.io import loadmat

    mat = loadmat(str(path))
    images = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
    return torch.from_numpy(images), torch.from_numpy(labels)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder_classes(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise UserError(f"image folder {directory}/ not found: expected one sub-folder of images per class")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"image folder {directory}/ has no class sub-folders")
    return classes


def _load_imagefolder(root: Path, train: bool, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once, RGB, resized to image_size x image_size (bilinear); classes from train/."""
    from PIL import Image

    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"imagefolder image_size must be a positive integer, got {image_size!r}")

    classes = _folder_classes(root / "train")
    split = root / "train"
    if not train:
        split = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
        if split is None:
            raise UserError(f"image folder {root}/ has no test/ or val/ sub-folder")
    extra = sorted(set(_folder_classes(split)) - set(classes))
    if extra:
        raise UserError(f"{split}/ has classes missing from {root / 'train'}/: {extra}")
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = split / cls
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(img).transpose(2, 0, 1))
                labels.append(label)
    if not images:
        raise UserError(f"no images found under {split}/")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------- splits and subsets

def _balanced_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A random order of all indices that visits the classes round-robin: any prefix is class-balanced."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm].cpu()
    by_class = torch.sort(shuffled, stable=True).indices  # grouped by class, random within class
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - starts[shuffled[by_class]]  # position of each sample within its class
    return perm[torch.argsort(rank * n + torch.arange(n))]  # all first-of-class, then all seconds, ...


def split_validation(images: torch.Tensor, labels: torch.Tensor, n_val: int, seed: int = 0):
    """Hold out n_val class-balanced samples: ((train_images, train_labels), (val_images, val_labels)).

    Deterministic in seed, disjoint, each part keeps the original order.
    """
    if not 0 <= n_val < len(labels):
        raise UserError(f"n_val must be in [0, {len(labels)}), got {n_val}")
    order = _balanced_order(labels, seed)
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return (images[train], labels[train]), (images[val], labels[val])


def take_subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0):
    """n class-balanced samples (counts differ by at most one while classes last), original order kept."""
    if not 0 < n <= len(labels):
        raise UserError(f"subset size must be in [1, {len(labels)}], got {n}")
    idx = _balanced_order(labels, seed)[:n].sort().values
    return images[idx], labels[idx]


# ---------------------------------------------------------------- generated data

def load_generated_npz(path: str | Path, num_classes: int | None = None,
                       image_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a generated-data `.npz` with arrays `image` (uint8 NHWC or NCHW) and `label` (integers).

    Returns uint8 [N, C, H, W] and int64 [N]. When given, labels must lie in [0, num_classes) and
    images must have image_shape (C, H, W). Every problem is a `UserError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"generated data file {path} not found")
    try:
        npz = np.load(path, allow_pickle=False)  # no pickles: a data file must not run code
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} as .npz without pickles ({err})") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single .npy array, expected an .npz with arrays 'image' and 'label'")
    with npz:
        missing = [k for k in ("image", "label") if k not in npz.files]
        if missing:
            raise UserError(f"{path} lacks array(s) {missing}; it has {npz.files}")
        try:
            image, label = npz["image"], npz["label"]
        except (ValueError, OSError) as err:  # object arrays need pickles; corrupt members
            raise UserError(f"cannot read the arrays of {path} without pickles ({err})") from err
    if image.dtype != np.uint8:
        raise UserError(f"{path}: 'image' must be uint8 in [0, 255], got {image.dtype}")
    if image.ndim != 4 or len(image) == 0:
        raise UserError(f"{path}: 'image' must be [N, H, W, C] or [N, C, H, W] with N > 0, got shape {image.shape}")
    if image.shape[1] not in (1, 3) and image.shape[3] in (1, 3):
        image = image.transpose(0, 3, 1, 2)  # NHWC (what the generated-data releases use) -> NCHW
    elif image.shape[1] not in (1, 3):
        raise UserError(f"{path}: cannot find a channel axis of size 1 or 3 in 'image' shape {image.shape}")
    if image_shape is not None and tuple(image.shape[1:]) != tuple(image_shape):
        raise UserError(f"{path}: images are {tuple(image.shape[1:])} (C, H, W), expected {tuple(image_shape)}")
    if label.ndim != 1 or len(label) != len(image):
        raise UserError(f"{path}: 'label' must be 1-D with one label per image ({len(image)}), got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise UserError(f"{path}: 'label' must be integers, got {label.dtype}")
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    if label.min() < 0 or label.max() >= high:
        raise UserError(f"{path}: labels span [{label.min()}, {label.max()}], expected [0, {high - 1}]")
    return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(label.astype(np.int64))


# ---------------------------------------------------------------- augmentation

AUGMENTATIONS = ("none", "crop_flip", "autoaugment", "two_view_autoaugment")
# Augmentations that return two views of each image: [B] images in, [2B] out, all first views first.
TWO_VIEW_AUGMENTATIONS = ("two_view_autoaugment",)


def _seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's str hash is salted per process, blake2b is not)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to H x W at a random offset, flip left-right with p = 0.5.

    images: uint8 [B, C, H, W] on any device; one gather for the whole batch, no per-sample Python.
    The random numbers come from `generator` (a CPU generator), so results do not depend on the device.
    """
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)  # [B, H] rows of the padded image to read
    cols = dx + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)  # reading columns backwards is the flip
    dev = images.device
    padded = F.pad(images, (padding,) * 4)
    batch = torch.arange(b, device=dev)[:, None, None]
    # advanced indices on dims 0, 2, 3 around a slice put the broadcast dims first: [B, H, W, C]
    out = padded[batch, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def augment_batch(images: torch.Tensor, mode: str, seed: int, crop_padding: int = 4) -> torch.Tensor:
    """Augment a uint8 [B, C, H, W] batch; the result depends only on (images, mode, seed, crop_padding).

    crop_flip: `random_crop_flip`, vectorised on the images' device. autoaugment: crop_flip, then
    torchvision's AutoAugment (CIFAR-10 policy, black fill) per image on the CPU; it draws from the global
    RNG, which is forked and seeded with `seed` so the caller's random stream is left untouched.
    two_view_autoaugment: [2B] images, a crop_flip view of each image, then an independent crop_flip +
    AutoAugment view with grey fill (128), as the GKL reference's CIFAR-100 AutoAugment training.
    """
    if mode == "none":
        return images
    if mode not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {mode!r}; known: {', '.join(AUGMENTATIONS)}")
    if mode == "two_view_autoaugment":
        plain = random_crop_flip(images, torch.Generator().manual_seed(seed), crop_padding)
        return torch.cat([plain, _autoaugment(images, _seed_for(seed, 1), crop_padding, fill=128)])
    out = random_crop_flip(images, torch.Generator().manual_seed(seed), crop_padding)
    if mode == "autoaugment":
        out = _autoaugment(out, seed, 0, fill=None)
    return out


def _autoaugment(images: torch.Tensor, seed: int, crop_padding: int, fill: int | None) -> torch.Tensor:
    """crop_flip (when crop_padding > 0) and then AutoAugment, CIFAR-10 policy, with ``fill`` for the pixels
    that rotations and shears uncover (None: black)."""
    from torchvision.transforms import v2

    out = random_crop_flip(images, torch.Generator().manual_seed(seed), crop_padding) if crop_padding else images
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(img) for img in out.cpu()]).to(images.device)


# ---------------------------------------------------------------- loader

class LoaderCursor:
    """A loader's position, {"epoch": e, "batch": k}: the next batch it yields. A loader is a cursor: each
    pass continues where the last one stopped and moves on to the next epoch at the end, so
    `for x, y in loader` once per epoch needs no `set_epoch`; `state_dict()` is all a resume needs."""

    epoch, batch = 0, 0

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Jump to batch 0 of `epoch`; a no-op for the current epoch, so a resumed position survives it."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < len(self):
            raise UserError(f"loader position {state} is outside 0 <= batch < {len(self)}")
        self.epoch, self.batch = epoch, batch


class BatchLoader(LoaderCursor):
    """Device-resident, exactly reproducible batches: yields (x float32 [B, C, H, W] in [0, 1], y int64 [B]).

    images uint8 [N, C, H, W] and labels [N] are moved to `device` once. Epoch e's order is a
    randperm seeded by (seed, e); batch k's augmentation is seeded by (seed, e, k); so any batch can
    be rebuilt from its position (`LoaderCursor`).

    generated=(images, labels), generated_ratio=r: each batch holds round(r * B) generated samples
    after B - round(r * B) real ones; an epoch is one pass over the real set, and the generated
    samples of epoch e are drawn without replacement from a randperm seeded by (seed, e).
    drop_last=False keeps a smaller last batch (with proportionally fewer generated samples).

    rank=r, world_size=W (DDP): batch_size is the global batch; every rank builds the same global batch
    (same order and augmentation) and yields its rows r::W, B / W of them, so the position is the
    same on all ranks and a 1-rank and a W-rank run see the same global batches. Strided, not
    contiguous, rows: a contiguous slice would give the last ranks only the generated samples.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = True, augment: str = "none", crop_padding: int = 4, seed: int = 0,
                 device: str | torch.device = "cpu", generated: tuple[torch.Tensor, torch.Tensor] | None = None,
                 generated_ratio: float = 0.0, rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise UserError(f"BatchLoader needs uint8 images [N, C, H, W] and N labels, got images "
                            f"{images.dtype} {tuple(images.shape)} and {len(labels)} labels")
        if augment not in AUGMENTATIONS:
            raise UserError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
        if not 0.0 <= generated_ratio < 1.0:
            raise UserError(f"generated_ratio must be in [0, 1), got {generated_ratio}")
        if generated_ratio > 0 and generated is None:
            raise UserError("generated_ratio > 0 needs generated=(images, labels)")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise UserError(f"the global batch_size {batch_size} must split evenly over world_size {world_size} "
                            f"ranks (rank {rank} given)")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.crop_padding, self.seed = augment, crop_padding, seed
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.num_generated = round(generated_ratio * batch_size) if generated is not None else 0
        self.num_real = batch_size - self.num_generated
        if self.num_real < 1:
            raise UserError(f"generated_ratio {generated_ratio} leaves no real samples in a batch of {batch_size}")
        if self.num_generated:
            gen_images, gen_labels = generated
            if gen_images.dtype != torch.uint8 or tuple(gen_images.shape[1:]) != tuple(images.shape[1:]):
                raise UserError(f"generated images must be uint8 {tuple(images.shape[1:])} like the real ones, "
                                f"got {gen_images.dtype} {tuple(gen_images.shape[1:])}")
            self.gen_images = gen_images.to(self.device)
            self.gen_labels = gen_labels.to(self.device, torch.int64)
        if len(self) == 0:
            raise UserError(f"{len(labels)} samples make no full batch of {self.num_real} real samples "
                            "(use a smaller batch_size or drop_last=False)")
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch, counted on the real set."""
        n = len(self.labels)
        return n // self.num_real if self.drop_last else math.ceil(n / self.num_real)

    def _orders(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(self.labels)
        if self.shuffle:
            real = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(self.seed, epoch, 0)))
        else:
            real = torch.arange(n)
        gen = None
        if self.num_generated:
            g = torch.Generator().manual_seed(_seed_for(self.seed, epoch, 1))
            need, m = len(self) * self.num_generated, len(self.gen_labels)
            # more generated samples needed than exist: chain fresh permutations
            gen = torch.cat([torch.randperm(m, generator=g) for _ in range(math.ceil(need / m))])
            gen = gen.to(self.device)
        return real.to(self.device), gen

    def _make_batch(self, epoch: int, k: int, real: torch.Tensor, gen: torch.Tensor | None):
        idx = real[k * self.num_real:(k + 1) * self.num_real]
        x, y = self.images[idx], self.labels[idx]
        if gen is not None:
            # a short last batch (drop_last=False) keeps the ratio
            m = round(len(idx) * self.num_generated / self.num_real)
            gidx = gen[k * self.num_generated:k * self.num_generated + m]
            x = torch.cat([x, self.gen_images[gidx]])
            y = torch.cat([y, self.gen_labels[gidx]])
        x = augment_batch(x, self.augment, _seed_for(self.seed, epoch, k, 2), self.crop_padding)
        if self.augment in TWO_VIEW_AUGMENTATIONS:  # the rows are [views 1; views 2]
            y = torch.cat([y, y])
        if self.world_size > 1:  # augment the whole batch first: the result must not depend on world_size
            x, y = x[self.rank::self.world_size], y[self.rank::self.world_size]
        return x.float().div_(255), y

    def __iter__(self):
        epoch, start, n = self.epoch, self.batch, len(self)
        real, gen = self._orders(epoch)
        for k in range(start, n):
            # move the cursor before yielding: a checkpoint taken during step k resumes at k + 1
            self.epoch, self.batch = (epoch, k + 1) if k + 1 < n else (epoch + 1, 0)
            yield self._make_batch(epoch, k, real, gen)
