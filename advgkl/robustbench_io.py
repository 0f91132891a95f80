"""RobustBench interop: leaderboard checkpoints, leaderboard metadata, reproduce a claim, export ours.

- ``import_robustbench()``: the one place that makes ``import robustbench`` work in advgkl's pinned
  environment (module-name alias for AutoAttack, ``pkg_resources`` fallback).
- ``leaderboard(dataset, threat_model)``: RobustBench's ``model_info`` metadata, shipped in
  ``advgkl/model_info/{dataset}/{threat_model}/{name}.json`` (copied from RobustBench, MIT licence).
- ``load_leaderboard_model(name, dataset, threat_model, model_dir)``: a zoo model through
  ``robustbench.utils.load_model``, offline when ``{model_dir}/{dataset}/{threat_model}/{name}.pt``
  exists; the file is checked before RobustBench sees it, so a bad file is an error, never a
  half-loaded model.
- ``reproduce(...)``: clean + AutoAttack accuracy on the first N test points, compared with the
  leaderboard claim through a 95 % Wilson score interval; resumable; writes ``reproduce_report.json``.
- ``export_robustbench(run_dir)``: one of our runs as a ``model_info`` JSON plus a weights file in
  RobustBench's layout.
- ``register_cli(subparsers)``: ``advgkl leaderboard | reproduce | export-robustbench``.

Accuracies in metadata, reports and printouts are percentages (RobustBench's convention).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import math
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from advgkl.errors import UserError
from advgkl.runtime import resolve_device

__all__ = [
    "import_robustbench", "supported", "leaderboard", "leaderboard_entry", "format_leaderboard", "parse_eps",
    "format_eps", "checkpoint_path", "check_checkpoint_file", "load_leaderboard_model", "wilson_interval",
    "verdict", "reproduce", "format_report", "export_robustbench", "register_cli",
]

MODEL_INFO_DIR = Path(__file__).resolve().parent / "model_info"
TEST_SET_SIZE = {"cifar10": 10_000, "cifar100": 10_000}
Z_95 = 1.959963984540054  # two-sided 95 % standard-normal quantile
REPORT_NAME = "reproduce_report.json"


# ----------------------------------------------------------------------------------------------------
# Importing robustbench: the only place that knows about its environment problems.

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pkg_resources deprecation
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.interface in a zoo architecture
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            import importlib
            import types

            stub = types.ModuleType("pkg_resources")
            stub.resource_filename = lambda package, path: str(
                Path(importlib.import_module(package).__file__).parent / path)
            sys.modules["pkg_resources"] = stub
        try:
            import robustbench
            import robustbench.utils  # noqa: F401
        except ImportError as e:
            raise UserError(f"cannot import robustbench ({e}); install robustbench==1.1.1 and setuptools<81") from e
    return robustbench


def _zoo(dataset: str, threat_model: str) -> dict:
    """RobustBench's model-zoo dict ``{name: {"model": constructor, "gdrive_id": ...}}``."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat_model), {})


# ----------------------------------------------------------------------------------------------------
# Leaderboard metadata.

def supported() -> list[tuple[str, str]]:
    """The (dataset, threat_model) pairs whose metadata ships with advgkl, e.g. ("cifar10", "Linf")."""
    return sorted((d.parent.name, d.name) for d in MODEL_INFO_DIR.glob("*/*") if d.is_dir())


def _check_pair(dataset: str, threat_model: str) -> None:
    if (dataset, threat_model) not in supported():
        known = ", ".join(f"{d} {t}" for d, t in supported())
        raise UserError(f"no RobustBench leaderboard for dataset {dataset!r} / threat model {threat_model!r}; "
                        f"advgkl ships: {known}")


@functools.lru_cache(maxsize=None)
def _model_info(dataset: str, threat_model: str) -> dict[str, dict]:
    out = {}
    for path in sorted((MODEL_INFO_DIR / dataset / threat_model).glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def parse_eps(eps: str | float) -> float:
    """RobustBench's eps field as a float: "8/255" -> 0.03137..., "0.5" -> 0.5."""
    try:
        return float(Fraction(str(eps).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read eps {eps!r}; expected a number or a fraction like 8/255") from None


def format_eps(eps: float, threat_model: str) -> str:
    """The inverse of ``parse_eps`` in RobustBench's style: 8/255 for Linf multiples of 1/255, else '0.5'."""
    k = eps * 255
    if threat_model == "Linf" and abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _robust_acc(info: dict) -> float:
    return float(info["autoattack_acc"])


def leaderboard(dataset: str = "cifar10", threat_model: str = "Linf") -> list[dict]:
    """All leaderboard entries for one dataset / threat model, by AutoAttack accuracy, best first.

    Each dict holds the shipped ``model_info`` fields unchanged (strings such as ``"clean_acc": "85.31"``
    and ``"eps": "8/255"``, exactly as RobustBench publishes them) plus ``model_name`` (the id that
    ``load_model`` takes), ``threat_model`` and ``in_model_zoo`` (False for entries that RobustBench
    lists from external evaluations without a downloadable checkpoint).
    """
    _check_pair(dataset, threat_model)
    zoo = _zoo(dataset, threat_model)
    rows = [dict(info, model_name=name, threat_model=threat_model, in_model_zoo=name in zoo)
            for name, info in _model_info(dataset, threat_model).items()]
    return sorted(rows, key=lambda r: (-_robust_acc(r), r["model_name"]))


def _suggest(name: str, candidates) -> list[str]:
    by_lower = {c.lower(): c for c in candidates}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]


def leaderboard_entry(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> dict:
    """One entry of ``leaderboard()``; an unknown name is a UserError listing close matches."""
    _check_pair(dataset, threat_model)
    infos = _model_info(dataset, threat_model)
    if name in infos:
        return dict(infos[name], model_name=name, threat_model=threat_model,
                    in_model_zoo=name in _zoo(dataset, threat_model))
    msg = f"unknown RobustBench model {name!r} for {dataset} {threat_model}."
    close = _suggest(name, infos)
    if close:
        msg += " Did you mean: " + ", ".join(close) + "?"
    elsewhere = [f"{d} {t}" for d, t in supported() if (d, t) != (dataset, threat_model) and name in _model_info(d, t)]
    if elsewhere:
        msg += f" {name!r} exists for: {', '.join(elsewhere)} (use --dataset / --threat-model)."
    msg += f" List the names with: advgkl leaderboard --dataset {dataset} --threat-model {threat_model}"
    raise UserError(msg)


def format_leaderboard(rows: list[dict]) -> str:
    """A plain-text table: rank, name, architecture, clean %, AutoAttack %, extra data."""
    head = ("#", "name", "architecture", "clean", "AA", "extra data")
    lines = [(str(i + 1), r["model_name"] + ("" if r.get("in_model_zoo", True) else " (no checkpoint)"),
              r["architecture"], f"{float(r['clean_acc']):.2f}", f"{float(r['autoattack_acc']):.2f}",
              "yes" if r["additional_data"] else "no") for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    right = {0, 3, 4}  # numbers right-aligned
    fmt = lambda cells: "  ".join(c.rjust(w) if j in right else c.ljust(w)
                                  for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in lines])


# ----------------------------------------------------------------------------------------------------
# Loading leaderboard checkpoints.

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


def load_leaderboard_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | Path = "models", device: str | torch.device = "cpu", *,
                           download: bool = True) -> nn.Module:
    """A RobustBench zoo model with its published weights, ready for evaluation.

    Returns the module built by ``robustbench.utils.load_model``: it takes images in [0, 1]
    ([B, 3, 32, 32] for CIFAR; normalisation is inside), returns logits [B, classes], is in eval mode,
    fp32, on ``device``, with ``requires_grad`` off for every parameter (attacks need input gradients
    only). The checkpoint is ``{model_dir}/{dataset}/{threat_model}/{name}.pt``; when it is missing
    and ``download`` is True it is downloaded (robustbench's Google-Drive downloader), else a
    UserError says where to put it. Every file is read and checked before robustbench loads it, and
    robustbench loads the state dict strictly into a fresh model, so a bad file raises UserError and
    no model is returned.
    """
    entry = leaderboard_entry(name, dataset, threat_model)  # unknown names fail here, with suggestions
    zoo = _zoo(dataset, threat_model)
    if name not in zoo:
        raise UserError(f"{name} is on the {dataset} {threat_model} leaderboard from an external evaluation "
                        f"({entry.get('link', '')}) but RobustBench's model zoo has no checkpoint for it")
    rb = import_robustbench()
    gdrive = zoo[name]["gdrive_id"]
    path = checkpoint_path(name, dataset, threat_model, model_dir)
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    import timm

    if gdrive is None or timm.is_model(timm_name):
        files = []  # weights come from the Hugging Face hub through timm, not from a file we can check
    elif isinstance(gdrive, list):  # ensembles: one file per member, robustbench's naming
        files = [(Path(f"{path}_m{i}.pt"), gid) for i, gid in enumerate(gdrive)]
    else:
        files = [(path, gdrive)]
    for file, gid in files:
        hint = (f" Put the file for {name} at {file.resolve()} (RobustBench's layout "
                f"{{model_dir}}/{{dataset}}/{{threat_model}}/{{name}}.pt); it is published at {_gdrive_url(gid)}")
        if not file.is_file():
            if not download:
                raise UserError(f"checkpoint for {name} not found and downloads are off.{hint}")
            _fetch(gid, file, hint)
        check_checkpoint_file(file, hint=hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = rb.utils.load_model(model_name=name, model_dir=str(model_dir), dataset=dataset,
                                        threat_model=threat_model)
    except Exception as e:  # a fresh model is built inside load_model, so nothing half-loaded escapes
        reason = " ".join(str(e).split())[:600]
        raise UserError(f"robustbench could not load {name} from {path if files else 'the Hugging Face hub'}: "
                        f"{type(e).__name__}: {reason}. The file does not hold the weights of "
                        f"{entry['architecture']} for {dataset} {threat_model}, or the download failed.") from None
    model = model.float().to(device).eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# Statistics and verdict.

def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (fractions in [0, 1]), 95 % by default.

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps close to nominal
    coverage for small n and proportions near 0 or 1 (Brown, Cai & DasGupta 2001).
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(claimed_clean: float, clean_ci: tuple[float, float], claimed_aa: float,
            aa_ci: tuple[float, float]) -> tuple[str, str]:
    """("consistent" | "not consistent", detail): consistent when each claim lies inside its CI.

    All numbers in percent. The claims are published with two decimals, so a claim within 0.005 of
    an interval end counts as inside.
    """
    tol = 0.005
    bad = []
    for what, claim, (lo, hi) in (("clean accuracy", claimed_clean, clean_ci),
                                  ("AutoAttack accuracy", claimed_aa, aa_ci)):
        if not lo - tol <= claim <= hi + tol:
            side = "above" if claim > hi else "below"
            bad.append(f"claimed {what} {claim:.2f} is {side} the measured 95% CI [{lo:.2f}, {hi:.2f}]")
    if bad:
        return "not consistent", "; ".join(bad)
    return "consistent", "both claimed numbers lie inside the measured 95% confidence intervals"


# ----------------------------------------------------------------------------------------------------
# Reproduce a leaderboard entry.

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pct(x: float) -> float:
    return round(100.0 * float(x), 4)


def reproduce(name: str, dataset: str = "cifar10", threat_model: str = "Linf", *, n_examples: int | None = None,
              model_dir: str | Path = "models", data_dir: str | Path | None = None, out_dir: str | Path | None = None,
              batch_size: int = 500, device: str | None = None, wandb: str = "offline", version: str = "standard",
              attacks: list[str] | None = None, seed: int = 0, download: bool = True, progress: bool = True,
              echo=print) -> dict:
    """Checks a leaderboard claim: clean and AutoAttack accuracy on the first ``n_examples`` test points.

    Uses the leaderboard's eps (e.g. 8/255 Linf, 0.5 L2) and AutoAttack ``version`` (the leaderboard's
    is "standard"; ``attacks`` only with version "custom"). Writes ``{out_dir}/reproduce_report.json`` (returned as a dict; accuracies in %,
    95 % Wilson intervals, per-attack robust accuracy, wall time, verdict, environment) and
    ``metrics.jsonl`` / W&B through ``RunLogger`` (job_type "reproduce"), and prints a summary through
    ``echo``. AutoAttack's state lives in ``{out_dir}/autoattack_state.pt``: running the same call
    again continues a killed evaluation; a different configuration in the same ``out_dir`` is refused.
    """
    from advgkl.checkpoint import RunLock
    from advgkl.data import load_dataset

    entry = leaderboard_entry(name, dataset, threat_model)
    eps = parse_eps(entry["eps"])
    dev = resolve_device(device, flag="--device")
    if data_dir is None:
        from advgkl.data import DEFAULT_ROOT as data_dir
    x, y = load_dataset(dataset, data_dir, train=False)
    n_total = len(y)
    n = n_total if n_examples is None else int(n_examples)
    if not 1 <= n <= n_total:
        raise UserError(f"--n-examples must be between 1 and {n_total} (the {dataset} test set), got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    model = load_leaderboard_model(name, dataset, threat_model, model_dir, dev, download=download)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "reproduce" / f"{dataset}_{threat_model}_{name}_n{n}"
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # two jobs writing one report and one AutoAttack state would corrupt both
        return _reproduce_locked(entry, model, name, dataset, threat_model, x, y, n, eps, dev, out,
                                 model_dir=model_dir, data_dir=data_dir, batch_size=batch_size, wandb=wandb,
                                 version=version, attacks=attacks, seed=seed, progress=progress, echo=echo)


def _reproduce_locked(entry, model, name, dataset, threat_model, x, y, n, eps, dev, out, *, model_dir, data_dir,
                      batch_size, wandb, version, attacks, seed, progress, echo) -> dict:
    from advgkl.attacks import AutoAttack
    from advgkl.checkpoint import environment_info, write_json
    from advgkl.logging import RunLogger

    n_total = len(y)
    ckpt = checkpoint_path(name, dataset, threat_model, model_dir)
    ckpt_info = {"path": str(ckpt), "bytes": ckpt.stat().st_size, "sha256": _sha256(ckpt)} if ckpt.is_file() else None

    # what makes a saved AutoAttack state valid for this call (batch size is part of AutoAttack's schedule)
    identity = {"model_name": name, "dataset": dataset, "threat_model": threat_model, "eps": eps,
                "n_examples": n, "version": version, "attacks": list(attacks) if attacks else None,
                "seed": seed, "batch_size": batch_size,
                "checkpoint_sha256": ckpt_info["sha256"] if ckpt_info else None}
    id_path = out / "reproduce_config.json"
    if id_path.is_file():
        old = json.loads(id_path.read_text())
        if old != identity:
            diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
            raise UserError(f"{out} holds a reproduce run with a different configuration {diff} (saved, now); "
                            f"use another --out or delete {out} to start over")
        resumed = (out / "autoattack_state.pt").is_file()
    else:
        write_json(id_path, identity)
        resumed = False

    config = dict(identity, device=str(dev), model_dir=str(model_dir),
                  data_dir=str(data_dir), claimed_clean_acc=float(entry["clean_acc"]),
                  claimed_autoattack_acc=float(entry["autoattack_acc"]))
    logger = RunLogger(out, mode=wandb, project="advgkl", name=f"reproduce-{name}-{dataset}-{threat_model}",
                       group="reproduce", tags=("reproduce", dataset, threat_model, name), config=config,
                       job_type="reproduce", resume=resumed)
    try:
        echo(f"reproducing {name} ({entry['architecture']}) on {dataset} {threat_model} eps={entry['eps']}: "
             f"AutoAttack {version} on the first {n} of {n_total} test points, device {dev}"
             + (" (resuming)" if resumed else ""))
        x_eval = x[:n].float().div_(255)  # uint8 -> [0, 1]; the model normalises internally
        y_eval = y[:n]
        aa = AutoAttack(model, norm=threat_model, eps=eps, version=version, attacks=attacks, batch_size=batch_size,
                        seed=seed, device=dev, state_path=out / "autoattack_state.pt", progress=progress)
        t0 = time.time()
        result = aa(x_eval, y_eval)
        wall = time.time() - t0

        k_clean = int(torch.as_tensor(result.clean_correct).sum())
        k_robust = int(torch.as_tensor(result.robust_correct).sum())
        clean_ci = tuple(_pct(v) for v in wilson_interval(k_clean, n))
        aa_ci = tuple(_pct(v) for v in wilson_interval(k_robust, n))
        claimed_clean, claimed_aa = float(entry["clean_acc"]), float(entry["autoattack_acc"])
        measured_clean, measured_aa = _pct(k_clean / n), _pct(k_robust / n)
        word, detail = verdict(claimed_clean, clean_ci, claimed_aa, aa_ci)
        notes = []
        if version != "standard":
            notes.append(f"AutoAttack {result.version!r} is not the leaderboard's 'standard': the robust "
                         f"accuracy is not comparable with the claim")
        if n < n_total:
            notes.append(f"measured on the first {n} of {n_total} test points; the claim is for all {n_total}")
        report = {
            "model_name": name, "dataset": dataset, "threat_model": threat_model,
            "eps": eps, "eps_str": entry["eps"], "autoattack_version": result.version,
            "attacks": list(result.attacks), "seed": seed,
            "n_examples": n, "n_test_set": n_total, "units": "percent",
            "architecture": entry["architecture"], "paper": entry.get("name"), "link": entry.get("link"),
            "claimed": {"clean_acc": claimed_clean, "autoattack_acc": claimed_aa,
                        "source": f"RobustBench model_info/{dataset}/{threat_model}/{name}.json"},
            "measured": {"clean_acc": measured_clean, "autoattack_acc": measured_aa,
                         "clean_correct": k_clean, "robust_correct": k_robust,
                         "clean_acc_ci95": list(clean_ci), "autoattack_acc_ci95": list(aa_ci)},
            "difference": {"clean_acc": round(measured_clean - claimed_clean, 4),
                           "autoattack_acc": round(measured_aa - claimed_aa, 4)},
            "ci_method": "Wilson score interval, 95% two-sided, binomial over the n_examples test points",
            "per_attack_robust_acc": {k: _pct(v) for k, v in result.per_attack_robust_acc.items()},
            # AutoAttack's time summed over resumed runs (the evaluation's cost), and this call's share
            "wall_time_s": round(float(result.wall_time_s), 3), "this_call_wall_time_s": round(wall, 3),
            "resumed": resumed, "device": str(dev), "batch_size": batch_size,
            "verdict": word, "verdict_detail": detail, "notes": notes,
            "checkpoint": ckpt_info, "environment": environment_info(),
        }
        report_path = out / REPORT_NAME
        write_json(report_path, report)
        logger.log({"clean_acc": measured_clean, "autoattack_acc": measured_aa,
                    **{f"robust_acc/{k}": v for k, v in report["per_attack_robust_acc"].items()}})
        logger.summary({"clean_acc": measured_clean, "autoattack_acc": measured_aa,
                        "claimed_clean_acc": claimed_clean, "claimed_autoattack_acc": claimed_aa,
                        "clean_acc_ci95_low": clean_ci[0], "clean_acc_ci95_high": clean_ci[1],
                        "autoattack_acc_ci95_low": aa_ci[0], "autoattack_acc_ci95_high": aa_ci[1],
                        "verdict": word, "wall_time_s": report["wall_time_s"]})
        logger.save_artifact(report_path, name=f"reproduce-{name}-{dataset}-{threat_model}", type="reproduce-report")
    finally:
        logger.finish()
    echo(format_report(report))
    echo(f"report: {report_path}")
    return report


def format_report(report: dict) -> str:
    """The human-readable summary of a ``reproduce`` report (what the command prints)."""
    c, m, d = report["claimed"], report["measured"], report["difference"]
    rows = [("clean", c["clean_acc"], m["clean_acc"], m["clean_acc_ci95"], d["clean_acc"]),
            ("AutoAttack", c["autoattack_acc"], m["autoattack_acc"], m["autoattack_acc_ci95"], d["autoattack_acc"])]
    lines = [f"{report['model_name']}  {report['dataset']} {report['threat_model']} eps={report['eps_str']}  "
             f"AutoAttack {report['autoattack_version']}  n={report['n_examples']}/{report['n_test_set']}",
             f"{'accuracy %':<12}{'claimed':>9}{'measured':>10}   {'95% CI (Wilson)':<18}{'diff':>7}"]
    for what, claim, meas, (lo, hi), diff in rows:
        inside = lo - 0.005 <= claim <= hi + 0.005
        lines.append(f"{what:<12}{claim:>9.2f}{meas:>10.2f}   [{lo:6.2f}, {hi:6.2f}]  {diff:>+7.2f}  "
                     + ("inside" if inside else "OUTSIDE"))
    lines.append("per attack:  " + " -> ".join(f"{k} {v:.2f}" for k, v in report["per_attack_robust_acc"].items()))
    lines.append(f"wall time:   {report['wall_time_s']:.1f} s of AutoAttack on {report['device']}"
                 + (f" (summed over resumed runs; this call {report['this_call_wall_time_s']:.1f} s)"
                    if report.get("resumed") else ""))
    lines.extend(f"note:        {note}" for note in report.get("notes", []))
    lines.append(f"verdict:     {report['verdict']} ({report['verdict_detail']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Export one of our runs in RobustBench's format.

_ARCH_PATTERNS = [  # advgkl model names -> RobustBench's architecture strings
    (re.compile(r"^(?:wrn|wide_?res_?net)[-_]?(\d+)[-_x](\d+)", re.I), "WideResNet-{0}-{1}"),
    (re.compile(r"^pre_?act_?res_?net[-_]?(\d+)", re.I), "PreActResNet-{0}"),
    (re.compile(r"^res_?net[-_]?(\d+)", re.I), "ResNet-{0}"),
]


def _architecture(model_name: str) -> str:
    for pattern, fmt in _ARCH_PATTERNS:
        m = pattern.match(model_name)
        if m:
            return fmt.format(*m.groups())
    return model_name


def _robustbench_keys_survive(state_dict: dict) -> list[str]:
    """Keys that robustbench's loader would rename (it strips 'module.' / 'model.' found anywhere)."""
    return [k for k in state_dict if "module." in k or "model." in k]


def _find_key(obj, words: tuple[str, ...]):
    """The first truthy config value whose key contains one of ``words`` (nested dicts searched)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(w in str(k).lower() for w in words) and v not in (None, False, 0, "", [], {}):
                return v
            found = _find_key(v, words)
            if found is not None:
                return found
    return None


def export_robustbench(run_dir: str | Path, *, name: str | None = None, out_dir: str | Path | None = None,
                       architecture: str | None = None, link: str = "", paper_title: str = "", authors: str = "",
                       venue: str = "", footnote: str | None = None, additional_data: bool | None = None,
                       echo=print) -> tuple[Path, Path]:
    """Writes one run as RobustBench would list it; returns (json_path, weights_path).

    Reads ``{run_dir}/results.json`` and the weights it reports on: ``results["evaluated_weights"]`` is
    "ema" (key "ema" of ``checkpoints/final.pt``), "final" / "model" (key "model"), or "best" (key
    "model" of ``checkpoints/best.pt``); without it, "ema" when present, else "model". An ``advgkl
    eval`` results.json names its checkpoint in ``results["checkpoint"]``, which is used instead. Writes ``{out}/model_info/{dataset}/{threat_model}/{name}.json`` with the shipped
    metadata's fields and ``{out}/{dataset}/{threat_model}/{name}.pt`` (a plain state dict of CPU
    tensors), so ``load_model(name, model_dir=out, ...)`` reads it once the architecture is in the zoo.
    ``out`` defaults to ``{run_dir}/robustbench``. Accuracies in results.json may be fractions or
    percentages (fractions when ``clean_acc <= 1``).
    """
    from advgkl.checkpoint import atomic_torch_save, write_json

    run_dir = Path(run_dir)
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise UserError(f"{res_path} not found: export-robustbench needs a finished run directory "
                        f"(results.json written by the final evaluation)")
    try:
        res = json.loads(res_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{res_path} is not valid JSON ({e})") from None
    required = ("dataset", "threat_model", "eps", "model", "method", "clean_acc", "autoattack_acc")
    missing = [k for k in required if k not in res]
    if missing:
        raise UserError(f"{res_path} lacks {missing}; it needs {list(required)}")
    dataset, threat_model = res["dataset"], res["threat_model"]
    _check_pair(dataset, threat_model)
    if res["autoattack_acc"] is None:
        raise UserError(f"{res_path} has no AutoAttack accuracy (evaluated with version 'none'); RobustBench "
                        f"lists AutoAttack accuracy: run 'advgkl eval' with --version standard first")
    which = res.get("evaluated_weights")
    ckpt_file = "best.pt" if which == "best" else "final.pt"
    ckpt_path = Path(res["checkpoint"]) if res.get("checkpoint") else run_dir / "checkpoints" / ckpt_file
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path} not found: the run has no final weights to export")
    ckpt = check_checkpoint_file(ckpt_path)
    if which is None:
        which = "ema" if ckpt.get("ema") is not None else "model"
    key = {"ema": "ema", "final": "model", "model": "model", "best": "model"}.get(which)
    state = ckpt.get(key) if key else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{ckpt_path} has no weights for evaluated_weights={which!r} (the checkpoint holds "
                        f"{sorted(k for k, v in ckpt.items() if isinstance(v, dict) and v)})")
    prefixes = ("_orig_mod.", "module.")  # torch.compile / DataParallel wrappers are not the architecture
    clean = {}
    for k, v in state.items():
        for p in prefixes:
            k = k[len(p):] if k.startswith(p) else k
        clean[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    renamed = _robustbench_keys_survive(clean)
    if renamed:
        raise UserError(f"robustbench's loader strips 'module.'/'model.' wherever it occurs in a key, so "
                        f"these keys would not load back: {renamed[:5]}; rename the submodules before exporting")

    arch = architecture or _architecture(str(res["model"]))
    name = name or f"advgkl_{res['method']}_{arch}".replace(" ", "_")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-', '.' (RobustBench model ids)")
    clean_acc, aa_acc = float(res["clean_acc"]), float(res["autoattack_acc"])
    scale = 100.0 if clean_acc <= 1.0 else 1.0
    if footnote is None:
        generated = _find_key(res.get("config", {}), ("generated",))
        footnote = "It uses additional generated images in training." if generated else ""
    if additional_data is None:
        additional_data = bool(res.get("additional_data", False))
    info = {
        "link": link, "name": paper_title or f"advgkl {res['method']}", "authors": authors,
        "additional_data": additional_data, "number_forward_passes": 1, "dataset": dataset,
        "venue": venue, "architecture": arch, "eps": format_eps(float(res["eps"]), threat_model),
        "clean_acc": f"{clean_acc * scale:.2f}", "reported": f"{aa_acc * scale:.2f}",
        "autoattack_acc": f"{aa_acc * scale:.2f}", "unreliable": False,
    }
    if footnote:
        info["footnote"] = footnote
    out = Path(out_dir) if out_dir is not None else run_dir / "robustbench"
    json_path = out / "model_info" / dataset / threat_model / f"{name}.json"
    weights_path = checkpoint_path(name, dataset, threat_model, out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, info)
    atomic_torch_save(clean, weights_path)
    n = res.get("n_examples")
    if n is not None and n < TEST_SET_SIZE.get(dataset, n):
        echo(f"warning: evaluated on {n} test points; RobustBench entries use the full test set "
             f"({TEST_SET_SIZE[dataset]})")
    if res.get("autoattack_version", "standard") != "standard":
        echo(f"warning: AutoAttack {res['autoattack_version']!r}; RobustBench entries use 'standard'")
    echo(f"exported {which!r} weights of {run_dir} as {name}:\n  {json_path}\n  {weights_path}")
    return json_path, weights_path


# ----------------------------------------------------------------------------------------------------
# Command line.

def _dataset_args(p) -> None:
    p.add_argument("--dataset", default="cifar10", choices=sorted({d for d, _ in supported()}))
    p.add_argument("--threat-model", default="Linf", choices=sorted({t for _, t in supported()}))


def _cmd_leaderboard(args) -> None:
    rows = leaderboard(args.dataset, args.threat_model)
    if args.grep:
        pattern = re.compile(re.escape(args.grep), re.I)
        rows = [r for r in rows if pattern.search(" ".join(str(r.get(k, "")) for k in
                                                           ("model_name", "architecture", "name", "authors")))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no {args.dataset} {args.threat_model} entries match {args.grep!r}")
    else:
        print(format_leaderboard(rows))


def _cmd_reproduce(args) -> None:
    reproduce(args.name, args.dataset, args.threat_model, n_examples=args.n_examples, model_dir=args.model_dir,
              data_dir=args.data_dir, out_dir=args.out, batch_size=args.batch_size, device=args.device,
              wandb=args.wandb, version=args.version, attacks=args.attacks, seed=args.seed,
              download=not args.offline,
              progress=not args.no_progress)


def _cmd_export(args) -> None:
    export_robustbench(args.run_dir, name=args.name, out_dir=args.out, architecture=args.architecture,
                       link=args.link, paper_title=args.paper_title, authors=args.authors, venue=args.venue,
                       footnote=args.footnote, additional_data=args.additional_data)


def register_cli(subparsers) -> None:
    """Adds ``leaderboard``, ``reproduce`` and ``export-robustbench`` to an argparse subparsers object."""
    from advgkl.attacks import AA_VERSIONS
    p = subparsers.add_parser("leaderboard", help="list RobustBench leaderboard entries (shipped metadata)",
                              description="List RobustBench entries: name, architecture, clean and AutoAttack "
                                          "accuracy (%), extra data; sorted by AutoAttack accuracy.")
    _dataset_args(p)
    p.add_argument("--grep", default=None, help="case-insensitive substring of name, architecture, paper or authors")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON instead of a table")
    p.set_defaults(func=_cmd_leaderboard)

    p = subparsers.add_parser("reproduce", help="check a leaderboard entry's claimed clean and AutoAttack accuracy",
                              description="Load a RobustBench checkpoint, measure clean and AutoAttack accuracy "
                                          "with the leaderboard's eps on the first N test points and compare "
                                          "with the claim (95% Wilson intervals). Rerun the same command to "
                                          "resume an interrupted evaluation.")
    p.add_argument("name", help="RobustBench model id, e.g. Cui2023Decoupled_WRN-34-10")
    _dataset_args(p)
    p.add_argument("--n-examples", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--model-dir", default="models", help="robustbench model dir: {dir}/{dataset}/{tm}/{name}.pt")
    p.add_argument("--data-dir", default=None,
                   help="dataset root with cifar-10-batches-py/ or cifar-100-python/ (default: $ADVGKL_DATA or "
                        "~/.cache/advgkl/data, as every advgkl command)")
    p.add_argument("--out", default=None, help="output dir (default runs/reproduce/{dataset}_{tm}_{name}_n{N})")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--version", default="standard", choices=list(AA_VERSIONS),
                   help="AutoAttack version (default and leaderboard: standard; fast = APGD-CE + APGD-T screening)")
    p.add_argument("--attacks", nargs="+", default=None, help="with --version custom, e.g. apgd-ce apgd-t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline", action="store_true", help="never download; a missing checkpoint is an error")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with 'advgkl train': rerunning a command always resumes it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reproduce)

    p = subparsers.add_parser("export-robustbench", help="write a run as a RobustBench model_info JSON + weights",
                              description="Turn RUN_DIR (results.json + checkpoints/final.pt) into "
                                          "OUT/model_info/{dataset}/{tm}/{name}.json and OUT/{dataset}/{tm}/{name}.pt.")
    p.add_argument("run_dir")
    p.add_argument("--name", default=None, help="model id (default advgkl_{method}_{architecture})")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/robustbench)")
    p.add_argument("--architecture", default=None, help="e.g. WideResNet-34-10 (default: from the model name)")
    p.add_argument("--link", default="", help="paper URL")
    p.add_argument("--paper-title", default="", help="the JSON's 'name' field (paper title)")
    p.add_argument("--authors", default="")
    p.add_argument("--venue", default="")
    p.add_argument("--footnote", default=None)
    p.add_argument("--additional-data", action=argparse.BooleanOptionalAction, default=None,
                   help="trained with extra real data (RobustBench counts generated data as no)")
    p.set_defaults(func=_cmd_export)
