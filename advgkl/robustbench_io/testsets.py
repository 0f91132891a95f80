"""Each board's test points, read through robustbench's own loaders, and what each board needs on disk.

CIFAR clean test sets come from ``advgkl.data`` (the python-pickle batches every advgkl command reads);
CIFAR-10-C / CIFAR-100-C, the ImageNet validation subset and ImageNet-C come from ``robustbench.data``
(``load_cifar10c``, ``load_cifar100c``, ``load_imagenet``, ``load_imagenetc``) with the model's own
preprocessing (``get_preprocessing``). Before robustbench sees a folder its layout is checked here, so a
missing or incomplete folder is a one-line UserError naming the folder and the files, never a KeyError
or an unasked-for download from inside robustbench. Images come back as float [N, 3, H, W] in [0, 1]
(32 x 32 for CIFAR, the model's crop for ImageNet, e.g. 224 x 224), labels as int64 [N].
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch

from advgkl.errors import UserError

from .zoo import import_robustbench

TEST_SET_SIZE = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}  # imagenet: RobustBench's subset
SEVERITIES = (1, 2, 3, 4, 5)
_CIFAR_CLEAN = {"cifar10": ("cifar-10-batches-py", "test_batch"), "cifar100": ("cifar-100-python", "test")}
_CIFAR_C = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
_CIFAR_C_SHAPE = (5 * 10_000, 32, 32, 3)  # severities 1..5 of the 10,000 test images, stacked, HWC uint8
_IMAGENET_C = "ImageNet-C"
_ID_LIST = "robustbench/helper_files/imagenet_test_image_ids.txt"


def _rb_data():
    """``robustbench.data`` (looked up at call time, so tests can replace its downloader)."""
    import_robustbench()
    import robustbench.data

    return robustbench.data


def corruptions() -> tuple[str, ...]:
    """RobustBench's 15 common corruptions, in the order its own evaluation visits them."""
    return tuple(_rb_data().CORRUPTIONS)


def layout(dataset: str, threat_model: str) -> str:
    """What a board's ``reproduce`` reads under --data-dir, in one line."""
    if dataset == "imagenet":
        val = "val/{wnid}/*.JPEG (1000 class folders, RobustBench's 5,000-image list)"
        return val + (f"; {_IMAGENET_C}/{{corruption}}/{{1..5}}/{{wnid}}/*.JPEG" if threat_model == "corruptions"
                      else "")
    folder, file = _CIFAR_CLEAN[dataset]
    extra = f"; {_CIFAR_C[dataset]}/labels.npy + {{corruption}}.npy x 15" if threat_model == "corruptions" else ""
    return f"{folder}/{file}{extra}"


def preprocessing(name: str, dataset: str, threat_model: str):
    """RobustBench's transform for ``name`` (PIL image -> tensor; for ImageNet it resizes and crops per model)."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return _rb_data().get_preprocessing(BenchmarkDataset(dataset), ThreatModel(threat_model), name, None)


def check_n(n: int | None, n_total: int, dataset: str) -> int:
    """``n`` (default: all ``n_total``) checked to lie in [1, n_total]."""
    n = n_total if n is None else int(n)
    if not 1 <= n <= n_total:
        what = "RobustBench's ImageNet test subset" if dataset == "imagenet" else f"the {dataset} test set"
        raise UserError(f"--n-examples must be between 1 and {n_total} ({what}), got {n}")
    return n


# ----------------------------------------------------------------------------------------------------
# Clean test points.

def load_clean(dataset: str, name: str, threat_model: str, data_dir: str | Path, n: int | None, *,
               download: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``n`` clean test points (default: all) as (x float [n, 3, H, W] in [0, 1], y [n], n_total)."""
    data_dir = Path(data_dir).expanduser()
    if dataset == "imagenet":
        n = check_n(n, TEST_SET_SIZE["imagenet"], dataset)
        root = data_dir / "val"
        require_image_folder(root, n, "ImageNet validation images", "the folder that holds val/")
        x, y = _robustbench_read(root, _rb_data().load_imagenet, n, str(data_dir),
                                 preprocessing(name, dataset, threat_model))
        return x, y, TEST_SET_SIZE["imagenet"]
    from advgkl.data import load_dataset

    if not download:
        _require_cifar_test_set(dataset, data_dir)
    x, y = load_dataset(dataset, data_dir, train=False)
    n = check_n(n, len(y), dataset)
    return x[:n].float().div_(255), y[:n], len(y)


def _require_cifar_test_set(dataset: str, data_dir: Path) -> None:
    """With downloads off, a missing test set is an error here (load_dataset would try to download it)."""
    folder, file = _CIFAR_CLEAN[dataset]
    if not (data_dir / folder / file).is_file():
        where = f"{data_dir / folder}/ has no {file}" if (data_dir / folder).is_dir() else \
            f"{data_dir / folder}/ does not exist"
        raise UserError(f"{dataset} test set not found and downloads are off (--offline): {where}; point --data-dir "
                        f"at the folder that holds {folder}/{file} (the python version of {dataset})")


def _robustbench_read(where: Path, loader, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """One robustbench loader call; an unreadable file inside a checked folder is a UserError naming it."""
    try:
        x, y = loader(*args)
    except (OSError, ValueError, RuntimeError) as e:  # PIL and numpy report bad files with these
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"robustbench could not read the images under {where} ({type(e).__name__}: {reason})") from None
    return x.float(), y.long()


# ----------------------------------------------------------------------------------------------------
# ImageNet: RobustBench's image list and class folders.

@functools.lru_cache(maxsize=None)
def _imagenet_ids() -> tuple[str, ...]:
    """RobustBench's 5,000 validation images as '{wnid}/{file}', in evaluation order."""
    rb = import_robustbench()
    return tuple((Path(rb.__file__).parent / "helper_files" / "imagenet_test_image_ids.txt").read_text().split())


@functools.lru_cache(maxsize=None)
def _imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet class folders, sorted: a label is its folder's index in this order."""
    rb = import_robustbench()
    return tuple(sorted(json.loads((Path(rb.__file__).parent / "helper_files" /
                                    "imagenet_class_to_id_map.json").read_text())))


def require_image_folder(root: Path, n: int, what: str, hint: str) -> None:
    """``root`` holds exactly the 1000 class folders and the first ``n`` images of RobustBench's list."""
    ids = _imagenet_ids()
    expected = (f"RobustBench reads {root}/{{wnid}}/{{file}} for the images listed in {_ID_LIST} (the first is "
                f"{root / ids[0]}), with one folder per ImageNet class (1000 wnids such as n01440764: the "
                f"ILSVRC2012 validation set sorted into class folders)")
    if not root.is_dir():
        raise UserError(f"{what} not found: {root}/ does not exist. {expected}; point --data-dir at {hint}")
    folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
    wnids = _imagenet_wnids()
    if folders != list(wnids):  # labels are the folders' sorted positions: one extra or missing shifts them
        missing, extra = sorted(set(wnids) - set(folders)), sorted(set(folders) - set(wnids))
        raise UserError(f"{what}: {root}/ holds {len(folders)} class folders, not the 1000 ImageNet wnids "
                        f"(missing {len(missing)}: {missing[:3]}, unexpected {len(extra)}: {extra[:3]}); labels "
                        f"are the folders' sorted order, so all 1000 and nothing else must be there. {expected}")
    absent = [i for i in ids[:n] if not (root / i).is_file()]
    if absent:
        raise UserError(f"{what}: {len(absent)} of the first {n} images RobustBench evaluates are missing, e.g. "
                        f"{root / absent[0]}. {expected}")


# ----------------------------------------------------------------------------------------------------
# Corrupted test points.

def require_corruptions(dataset: str, data_dir: str | Path, n: int, *, download: bool) -> None:
    """Every corrupted set the evaluation reads is in place (CIFAR-C is downloaded first when allowed)."""
    data_dir = Path(data_dir).expanduser()
    if dataset == "imagenet":
        top = data_dir / _IMAGENET_C
        if not top.is_dir():
            raise UserError(f"ImageNet-C not found: {top}/ does not exist. RobustBench reads "
                            f"{top}/{{corruption}}/{{severity}}/{{wnid}}/{{file}} for the 15 corruptions "
                            f"({', '.join(corruptions())}) at severities 1-5, the same images as val/ (listed in "
                            f"{_ID_LIST}); point --data-dir at the folder that holds {_IMAGENET_C}/")
        for c in corruptions():
            for s in SEVERITIES:
                require_image_folder(top / c / str(s), n, f"ImageNet-C {c} severity {s}",
                                     f"the folder that holds {_IMAGENET_C}/")
        return
    folder = data_dir / _CIFAR_C[dataset]
    files = ["labels.npy"] + [f"{c}.npy" for c in corruptions()]
    every = (f"labels.npy and the 15 files {{corruption}}.npy ({', '.join(corruptions())}), each "
             f"{' x '.join(map(str, _CIFAR_C_SHAPE))} uint8 (severities 1-5 of the 10,000 test images, stacked)")
    if not folder.is_dir():
        if not download:
            raise UserError(f"{dataset} corruptions not found and downloads are off (--offline): {folder}/ does not "
                            f"exist; it must hold {every}, as in {_CIFAR_C[dataset]}.tar from Zenodo; point "
                            f"--data-dir at the folder that holds {_CIFAR_C[dataset]}/")
        _download_cifar_c(dataset, data_dir)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder}/ lacks {', '.join(missing)}; it must hold {every}")
    for f in files:
        _check_npy(folder / f, n, dataset, every)


def _check_npy(path: Path, n: int, dataset: str, every: str) -> None:
    """The header (and, for labels, the first ``n`` values) of one CIFAR-C file; the pixels are not read."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy file ({e}); {path.parent}/ must hold {every}") from None
    if path.name == "labels.npy":
        n_classes = 100 if dataset == "cifar100" else 10
        if arr.ndim != 1 or len(arr) < n or not (0 <= int(arr[:n].min()) and int(arr[:n].max()) < n_classes):
            raise UserError(f"{path} holds {arr.dtype} {list(arr.shape)}, not at least {n} labels in "
                            f"[0, {n_classes - 1}]; {path.parent}/ must hold {every}")
    elif arr.shape != _CIFAR_C_SHAPE or arr.dtype != np.uint8:
        raise UserError(f"{path} holds {arr.dtype} {list(arr.shape)}; {path.parent}/ must hold {every}")


def _download_cifar_c(dataset: str, data_dir: Path) -> None:
    """CIFAR-10-C / CIFAR-100-C from Zenodo with robustbench's downloader (about 3 GB)."""
    from robustbench.model_zoo.enums import BenchmarkDataset

    rb_data = _rb_data()
    record, files = rb_data.ZENODO_CORRUPTIONS_LINKS[BenchmarkDataset(dataset)]
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        rb_data.zenodo_download(record, files, save_dir=data_dir)
    except Exception as e:  # requests, tarfile and robustbench's DownloadError all mean "no data"
        raise UserError(f"could not download {_CIFAR_C[dataset]} from Zenodo record {record} ({type(e).__name__}: "
                        f"{str(e)[:200]}); download {', '.join(sorted(files))} by hand and unpack it in "
                        f"{data_dir}/") from None


def load_corrupted(dataset: str, data_dir: str | Path, n: int, corruption: str, severity: int,
                   prepr=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test points under one corruption and severity (1..5), as RobustBench's evaluation reads them.

    ``prepr`` is the model's ImageNet transform (``preprocessing``); CIFAR-C files are already 32 x 32.
    """
    rb_data = _rb_data()
    data_dir = Path(data_dir).expanduser()
    if dataset == "imagenet":
        where = data_dir / _IMAGENET_C / corruption / str(severity)
        return _robustbench_read(where, rb_data.load_imagenetc, n, severity, str(data_dir), False, [corruption], prepr)
    loader = rb_data.load_cifar10c if dataset == "cifar10" else rb_data.load_cifar100c
    return _robustbench_read(data_dir / _CIFAR_C[dataset], loader, n, severity, str(data_dir), False, [corruption])
