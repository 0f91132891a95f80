"""robustbench itself: the import shim, its model zoo, and the checkpoint files its loader reads.

The bottom layer of ``advgkl.robustbench_io``: it knows robustbench's packaging problems, file layout and
downloader, and nothing of the leaderboard metadata advgkl ships (``board.py``).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from advgkl.errors import UserError


def import_robustbench():
    """Imports and returns the ``robustbench`` package, working around two packaging problems.

    1. robustbench 1.1.1 does ``from autoattack import AutoAttack`` (the GitHub package's module name)
       while the PyPI package ``pyautoattack`` installs the module ``pyautoattack``: when no real
       ``autoattack`` module is installed, ``autoattack`` and ``autoattack.state`` are aliased to
       ``pyautoattack`` and ``pyautoattack.state`` in ``sys.modules``. advgkl never calls
       ``robustbench.benchmark`` (its AutoAttack calls predate pyautoattack 0.2's API); only the model
       zoo and ``robustbench.utils.load_model`` are used.
    2. ``robustbench.loaders`` imports ``pkg_resources`` (removed in setuptools >= 81; pin
       ``setuptools<81``). Without it a stub with the one function robustbench calls,
       ``resource_filename``, is installed so the zoo still imports.
    Import-time deprecation warnings from robustbench's dependencies are silenced.
    """
    if "robustbench.utils" in sys.modules:
        return sys.modules["robustbench"]
    _alias_pyautoattack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pkg_resources deprecation
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.interface in a zoo architecture
        warnings.simplefilter("ignore", DeprecationWarning)
        _stub_pkg_resources_if_missing()
        try:
            import robustbench
            import robustbench.utils  # noqa: F401
        except ImportError as e:
            raise UserError(f"cannot import robustbench ({e}); install robustbench==1.1.1 and setuptools<81") from e
    return robustbench


def _alias_pyautoattack() -> None:
    """Makes ``import autoattack`` give ``pyautoattack`` unless a real ``autoattack`` is installed."""
    try:
        import autoattack  # noqa: F401  (the original package, if someone installed it, wins)
    except ImportError:
        try:
            import pyautoattack
            import pyautoattack.state
        except ImportError as e:
            raise UserError("robustbench needs AutoAttack: pip install pyautoattack==0.2.0") from e
        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = pyautoattack.state


def _stub_pkg_resources_if_missing() -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import importlib
        import types

        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda package, path: str(
            Path(importlib.import_module(package).__file__).parent / path)
        sys.modules["pkg_resources"] = stub


def _zoo(dataset: str, threat_model: str) -> dict:
    """RobustBench's model-zoo dict ``{name: {"model": constructor, "gdrive_id": ...}}``."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat_model), {})


# ----------------------------------------------------------------------------------------------------
# Checkpoint files.

def checkpoint_path(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> Path:
    """Where robustbench keeps (and advgkl looks for) a checkpoint: ``{model_dir}/{dataset}/{tm}/{name}.pt``."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def _gdrive_url(gdrive_id: str) -> str:
    return f"https://drive.google.com/uc?id={gdrive_id}"


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip().lower()
    return text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in text[:1024]


def check_checkpoint_file(path: str | Path, *, hint: str = "") -> dict:
    """Loads ``path`` fully with ``torch.load(weights_only=True)`` on the CPU and returns the mapping.

    An empty file, an HTML page (what a failed Google-Drive download saves), a truncated or corrupt
    file, or anything that is not a dict of tensors raises UserError ending with ``hint``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"checkpoint {path} is empty; delete it and download it again.{hint}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if _looks_like_html(head):
        raise UserError(f"checkpoint {path} is an HTML page, not a PyTorch file (a failed download saves the "
                        f"error page under the checkpoint's name); delete it and download it again.{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint {path} ({size} bytes) is not a readable PyTorch checkpoint: it is truncated "
                        f"or corrupt ({type(e).__name__}: {reason}); delete it and download it again.{hint}") from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict.{hint}")
    return obj


def _fetch(gdrive_id: str, path: Path, hint: str) -> None:
    """Downloads one checkpoint with robustbench's downloader into ``path`` via a temporary file."""
    rb = import_robustbench()
    part = path.with_name(path.name + ".part")  # never leave a half-written file under the real name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rb.utils.download_gdrive_new(gdrive_id, part)
        if not part.is_file():
            raise OSError("the downloader wrote no file")
        check_checkpoint_file(part)
    except UserError as e:
        part.unlink(missing_ok=True)
        raise UserError(f"the download of {path.name} gave no valid checkpoint ({e}). Google Drive answers with "
                        f"an HTML page when the file's download quota is exceeded; download it in a browser."
                        f"{hint}") from None
    except Exception as e:  # gdown/requests raise many types; all mean "no file"
        part.unlink(missing_ok=True)
        raise UserError(f"could not download {path.name} ({type(e).__name__}: {str(e)[:200]}).{hint}") from None
    part.replace(path)


def _checkpoint_files(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, Google-Drive id) for every file robustbench's loader reads for ``name``; [] for hub weights."""
    gdrive = _zoo(dataset, threat_model)[name]["gdrive_id"]
    path = checkpoint_path(name, dataset, threat_model, model_dir)
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    import timm

    if gdrive is None or timm.is_model(timm_name):
        return []  # weights come from the Hugging Face hub through timm, not from a file we can check
    if isinstance(gdrive, list):  # ensembles: one file per member, robustbench's naming
        return [(Path(f"{path}_m{i}.pt"), gid) for i, gid in enumerate(gdrive)]
    return [(path, gdrive)]


def _ensure_checkpoint_files(name: str, dataset: str, threat_model: str, model_dir: str | Path, *,
                             download: bool) -> bool:
    """Downloads (when allowed) and checks every file robustbench will read; False when none is a file."""
    files = _checkpoint_files(name, dataset, threat_model, model_dir)
    for file, gid in files:
        hint = (f" Put the file for {name} at {file.resolve()} (RobustBench's layout "
                f"{{model_dir}}/{{dataset}}/{{threat_model}}/{{name}}.pt); it is published at {_gdrive_url(gid)}")
        if not file.is_file():
            if not download:
                raise UserError(f"checkpoint for {name} not found and downloads are off.{hint}")
            _fetch(gid, file, hint)
        check_checkpoint_file(file, hint=hint)
    return bool(files)


def load_zoo_model(name: str, dataset: str, threat_model: str, model_dir: str | Path,
                   device: str | torch.device, *, architecture: str, download: bool) -> nn.Module:
    """``robustbench.utils.load_model`` on checked files: eval mode, fp32, on ``device``, parameters frozen.

    ``name`` must be in robustbench's zoo; ``architecture`` only words the error when the weights do not fit.
    """
    rb = import_robustbench()
    from_files = _ensure_checkpoint_files(name, dataset, threat_model, model_dir, download=download)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = rb.utils.load_model(model_name=name, model_dir=str(model_dir), dataset=dataset,
                                        threat_model=threat_model)
    except Exception as e:  # a fresh model is built inside load_model, so nothing half-loaded escapes
        reason = " ".join(str(e).split())[:600]
        source = checkpoint_path(name, dataset, threat_model, model_dir) if from_files else "the Hugging Face hub"
        raise UserError(f"robustbench could not load {name} from {source}: {type(e).__name__}: {reason}. The file "
                        f"does not hold the weights of {architecture} for {dataset} {threat_model}, or the "
                        f"download failed.") from None
    model = model.float().to(device).eval()
    model.requires_grad_(False)
    return model
