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


def check_checkpoint_file(path: str | Path, *, hint: str = "") -> dict:
    """Loads ``path`` fully with ``torch.load(weights_only=True)`` on the CPU and returns the mapping.

    A folder, an empty file, an HTML page (what a failed Google-Drive download saves), a file that is no
    torch checkpoint, a truncated or corrupt one, one holding objects weights_only loading refuses, or
    anything that is not a dict of tensors raises a one-line UserError ending with ``hint``. torch's own
    message is not repeated: it advises loading with weights_only=False, which runs the file's code.
    """
    from advgkl.checkpoint import looks_like_html, safe_torch_load, why_unloadable

    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file.{hint}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"checkpoint {path} is empty; delete it and download it again.{hint}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if looks_like_html(head):
        raise UserError(f"checkpoint {path} is an HTML page, not a PyTorch file (a failed download saves the "
                        f"error page under the checkpoint's name); delete it and download it again.{hint}")
    try:
        obj = safe_torch_load(path, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        kind, detail = why_unloadable(path, e)
        what = {
            "objects": f"holds objects that are not plain tensors/containers ({detail}); advgkl only loads "
                       f"weights_only checkpoints",
            "legacy": "is an old-format torch checkpoint that weights_only loading cannot read; advgkl only "
                      "loads weights_only checkpoints",
            "unreadable": f"cannot be read ({detail})",
            "not-torch": f"({size} bytes) is not a torch checkpoint; delete it and download it again",
        }.get(kind, f"({size} bytes) is not a readable PyTorch checkpoint: it is truncated or corrupt "
                    f"({detail}); delete it and download it again")
        raise UserError(f"checkpoint {path} {what}.{hint}") from None
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


def _timm_name(name: str, dataset: str, threat_model: str) -> str:
    """The timm model id robustbench's ``load_model`` tries first (weights from timm, not from model_dir)."""
    return f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"


# ImageNet entries that robustbench's load_model builds with torchvision's pretrained weights (no file of its own)
_TORCHVISION_WEIGHTS = {"Standard_R50": "ResNet50_Weights"}


def _weights_provider(name: str, dataset: str) -> str:
    return "torchvision" if dataset == "imagenet" and name in _TORCHVISION_WEIGHTS else "timm"


def hub_weights(name: str, dataset: str, threat_model: str) -> tuple[str, Path | None] | None:
    """(URL, cached file) of a zoo entry whose weights timm or torchvision download; None otherwise.

    Those are the XCiT / DeiT entries (timm) and ImageNet's Standard_R50 (torchvision's ImageNet weights).
    Both fetch the URL with ``torch.hub`` into ``{torch.hub.get_dir()}/checkpoints/`` ($TORCH_HOME/hub,
    default ~/.cache/torch/hub) and read that file on later calls; ``model_dir`` plays no part. The file
    is None for weights on the Hugging Face hub (none of the zoo's entries in robustbench 1.1.1).
    """
    from urllib.parse import urlparse

    _zoo(dataset, threat_model)  # imports robustbench's model zoo, which registers its timm models
    if _weights_provider(name, dataset) == "torchvision":
        import torchvision

        url = getattr(torchvision.models, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url  # pretrained=True's
        return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    import timm

    timm_name = _timm_name(name, dataset, threat_model)
    if not timm.is_model(timm_name):
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    url = getattr(cfg, "url", None) or ""
    if not url:  # a Hugging Face hub id instead: its cache is huggingface_hub's, not torch.hub's
        return f"the Hugging Face hub ({getattr(cfg, 'hf_hub_id', None) or timm_name})", None
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _checkpoint_files(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, Google-Drive id) for every file robustbench's loader reads for ``name``; [] for hub weights."""
    gdrive = _zoo(dataset, threat_model)[name]["gdrive_id"]
    path = checkpoint_path(name, dataset, threat_model, model_dir)
    if gdrive is None or hub_weights(name, dataset, threat_model) is not None:
        return []  # weights come through timm (torch.hub), not from a file in model_dir
    if isinstance(gdrive, list):  # ensembles: one file per member, robustbench's naming
        return [(Path(f"{path}_m{i}.pt"), gid) for i, gid in enumerate(gdrive)]
    return [(path, gdrive)]


def _ensure_hub_weights(name: str, dataset: str, threat_model: str, *, download: bool) -> None:
    """Offline, the file timm / torchvision would download must already be in torch.hub's cache; a cached file
    must be one."""
    hub = hub_weights(name, dataset, threat_model)
    if hub is None:
        return
    url, cached = hub
    who = _weights_provider(name, dataset)
    if cached is None:
        if not download:
            raise UserError(f"the weights of {name} come from {url} through {who} and downloads are off "
                            f"(--offline); run once without --offline to cache them")
        return
    if cached.is_file():  # timm reads a cached file as is: a bad one is named here, not deep inside torch
        from advgkl.checkpoint import sniff

        kind = sniff(cached)
        if kind != "torch":
            what = {"empty": "is empty", "html": "is an HTML page (a failed download?)"}.get(
                kind, "is not a torch checkpoint")
            raise UserError(f"the cached weights of {name}, {cached}, {what}; delete the file so that {who} "
                            f"downloads it again from {url}")
        return
    if download:
        return
    raise UserError(f"the weights of {name} are not in torch.hub's cache and downloads are off (--offline): "
                    f"{who} (not --model-dir) provides them, from {url}; put that file at {cached} (the cache "
                    f"follows $TORCH_HOME), or run once without --offline")


def _ensure_checkpoint_files(name: str, dataset: str, threat_model: str, model_dir: str | Path, *,
                             download: bool) -> bool:
    """Downloads (when allowed) and checks every file robustbench will read; False when none is a file."""
    files = _checkpoint_files(name, dataset, threat_model, model_dir)
    if not files:
        _ensure_hub_weights(name, dataset, threat_model, download=download)
    for file, gid in files:
        hint = (f" Put the file for {name} at {file.resolve()} (RobustBench's layout "
                f"{{model_dir}}/{{dataset}}/{{threat_model}}/{{name}}.pt); it is published at {_gdrive_url(gid)}")
        if file.is_dir():
            raise UserError(f"checkpoint {file} is a folder, not a checkpoint file.{hint}")
        if not file.is_file():
            if not download:
                raise UserError(f"checkpoint for {name} not found in --model-dir {model_dir} and downloads are off "
                                f"(--offline).{hint}")
            _fetch(gid, file, hint)
        check_checkpoint_file(file, hint=hint)
    return bool(files)


def _first_line_without_unsafe_advice(err: BaseException) -> str:
    """The error's text on one line, minus torch's advice to retry with weights_only=False."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    kept = [ln for ln in lines if "weights_only" not in ln] or [type(err).__name__]
    return " ".join(" ".join(kept).split())


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
        reason = _first_line_without_unsafe_advice(e)[:600]
        if from_files:
            source = checkpoint_path(name, dataset, threat_model, model_dir)
        else:  # timm or torchvision downloads these weights itself (torch.hub), from a URL of its own
            hub = hub_weights(name, dataset, threat_model)
            who = _weights_provider(name, dataset)
            source = f"{hub[0]} ({who}'s download, cached in {hub[1].parent})" if hub and hub[1] else \
                (hub[0] if hub else who)
        raise UserError(f"robustbench could not load {name} from {source}: {type(e).__name__}: {reason}. The file "
                        f"does not hold the weights of {architecture} for {dataset} {threat_model}, or the "
                        f"download failed.") from None
    model = model.float().to(device).eval()
    model.requires_grad_(False)
    return model
