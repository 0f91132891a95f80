"""ImageNet-scale data: images decoded from disk batch by batch, for datasets too large to hold in memory.

Every other dataset lives in memory as one uint8 tensor (``advgkl.data``); ImageNet's 1.28 M training
images do not fit, so it is read with torchvision's ``ImageFolder`` and a torch ``DataLoader`` with
worker processes. ``StreamingLoader`` has ``BatchLoader``'s interface and guarantees: epoch e's order is
a randperm seeded by (seed, e), each image's augmentation is seeded by (seed, e, index), so a batch is
the same whatever the number of workers, and ``state_dict()`` ({"epoch", "batch"}) resumes exactly.

Layout (the standard ILSVRC-2012 one, validation images sorted into class folders):

    <data.root>/imagenet/train/<wnid>/*.JPEG     <data.root>/imagenet/val/<wnid>/*.JPEG
"""
from __future__ import annotations

from pathlib import Path

import torch

from advgkl.data import LoaderCursor, _balanced_order, _seed_for
from advgkl.errors import UserError

FOLDER = "imagenet"
AUGMENTATIONS = ("none", "crop_flip")  # none: resize + centre crop; crop_flip: random-resized crop + flip


def split_folder(root: str | Path, train: bool) -> Path:
    """``<root>/imagenet/train`` or ``<root>/imagenet/val``; ``UserError`` naming the layout if it is absent."""
    folder = Path(root).expanduser() / FOLDER / ("train" if train else "val")
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise UserError(f"ImageNet not found: expected {folder}/<wnid>/*.JPEG, one folder per class (the "
                        "ILSVRC-2012 layout, validation images sorted into class folders too); it cannot be "
                        "downloaded automatically")
    return folder


def image_folder(root: str | Path, train: bool):
    """torchvision's ImageFolder over one split. val/ must have train/'s classes (when train/ is there), so
    that a label means the same class in both."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(split_folder(root, train)))
    train_dir = Path(root).expanduser() / FOLDER / "train"
    if not train and train_dir.is_dir():
        train_classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())  # ImageFolder's classes
        if folder.classes != train_classes:
            missing = sorted(set(train_classes) ^ set(folder.classes))[:5]
            raise UserError(f"{split_folder(root, False)} and {split_folder(root, True)} hold different class "
                            f"folders (e.g. {missing}); every class needs a folder in both")
    return folder


def transform(augment: str, image_size: int):
    """PIL image -> uint8 [3, S, S]. Training: random-resized crop and flip (crop_flip), or the evaluation
    transform (none): resize the short side to S * 256 / 224, centre crop S, the standard protocol."""
    from torchvision.transforms import v2

    if augment not in AUGMENTATIONS:
        raise UserError(f"data.augment: {augment!r} is not available for imagenet; use one of {', '.join(AUGMENTATIONS)}")
    if augment == "crop_flip":
        steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.PILToTensor(), *steps])


class _Seeded(torch.utils.data.Dataset):
    """Items are (index, seed): the image ``index`` decoded and transformed under its own seed, so the result
    does not depend on which worker produced it."""

    def __init__(self, folder, transform_):
        self.folder, self.transform = folder, transform_

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, item):
        index, seed = item
        path, label = self.folder.samples[index]
        image = self.folder.loader(path).convert("RGB")
        with torch.random.fork_rng(devices=[]):  # with no workers this runs in the training process
            torch.manual_seed(seed)
            return self.transform(image), label


class StreamingLoader(LoaderCursor):
    """Yields (x float32 [B / W, 3, S, S] in [0, 1] on ``device``, y int64) from ``indices`` of an ImageFolder.

    Like ``advgkl.data.BatchLoader``: a ``LoaderCursor`` over epochs and batches, full batches only, rank r
    of W takes rows r::W of every global batch.
    ``workers`` decode in parallel (0: in this process).
    """

    def __init__(self, folder, indices: torch.Tensor, batch_size: int, *, augment: str, image_size: int,
                 seed: int = 0, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 workers: int = 0):
        if batch_size % world_size:
            raise UserError(f"the global batch_size {batch_size} must split evenly over world_size {world_size}")
        self.dataset = _Seeded(folder, transform(augment, image_size))
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.device, self.rank, self.world_size, self.workers = torch.device(device), rank, world_size, workers
        if len(self) == 0:
            raise UserError(f"{len(indices)} training images make no full batch of {batch_size}")
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size

    def _batches(self, epoch: int, start: int) -> list[list[tuple[int, int]]]:
        order = self.indices[torch.randperm(len(self.indices),
                                            generator=torch.Generator().manual_seed(_seed_for(self.seed, epoch, 0)))]
        b = self.batch_size
        return [[(i, _seed_for(self.seed, epoch, i)) for i in order[k * b:(k + 1) * b].tolist()][self.rank::self.world_size]
                for k in range(start, len(self))]

    def __iter__(self):
        epoch, start, n = self.epoch, self.batch, len(self)
        pin = self.device.type == "cuda"
        batches = torch.utils.data.DataLoader(self.dataset, batch_sampler=self._batches(epoch, start),
                                              num_workers=self.workers, pin_memory=pin)
        for k, (x, y) in zip(range(start, n), batches):
            # move the cursor before yielding: a checkpoint taken during step k resumes at k + 1
            self.epoch, self.batch = (epoch, k + 1) if k + 1 < n else (epoch + 1, 0)
            yield x.to(self.device, non_blocking=pin).float().div_(255), y.to(self.device, non_blocking=pin)


def _decode(folder, indices: torch.Tensor, image_size: int, workers: int = 0):
    """The evaluation transform of ``indices``: (uint8 [N, 3, S, S], int64 [N]), decoded in parallel."""
    dataset = _Seeded(folder, transform("none", image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers,
                                         sampler=[(i, 0) for i in indices.tolist()])
    parts = list(loader)
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def check_test_size(root, n: int) -> None:
    """``evaluation_points``' refusals without decoding any image."""
    count = len(image_folder(root, False).samples)
    if not 0 < n <= count:
        raise UserError(f"eval.n_examples={n}: imagenet evaluates the first n of its {count} validation images "
                        f"in a fixed class-balanced order; 0 (all) is not available, choose 1..{count}")


def labels_of(folder) -> torch.Tensor:
    return torch.tensor(folder.targets, dtype=torch.int64)


def training_split(root, subset: int, val_size: int, seed: int):
    """(ImageFolder of train/, training indices, held-out indices): the held-out images are a class-balanced
    draw (seed), the subset a class-balanced draw of the rest, as ``data.split_validation``/``take_subset``."""
    folder = image_folder(root, True)
    labels = labels_of(folder)
    if val_size >= len(labels) or subset > len(labels) - val_size:
        raise UserError(f"data.subset={subset}, data.val_size={val_size}: the imagenet training set under "
                        f"{split_folder(root, True)} has {len(labels)} images")
    order = _balanced_order(labels, seed)
    val, rest = order[:val_size], order[val_size:]
    if subset:
        rest = rest[_balanced_order(labels[rest], seed)[:subset]]
    return folder, rest.sort().values, val.sort().values


def held_out(folder, indices: torch.Tensor, image_size: int, workers: int = 0):
    """The held-out training images for validation, decoded once with the evaluation transform."""
    return _decode(folder, indices, image_size, workers) if len(indices) else None


def evaluation_points(root, n: int, image_size: int, workers: int = 0):
    """The first ``n`` points of a fixed class-balanced order (seed 0) of the validation split, evaluation
    transform: float [n, 3, S, S] in [0, 1] and labels. ImageFolder lists the split class by class, so its
    first n images would be a few classes only."""
    check_test_size(root, n)
    folder = image_folder(root, False)
    images, y = _decode(folder, _balanced_order(labels_of(folder), 0)[:n], image_size, workers)
    return images.float().div_(255), y
