"""RobustBench's leaderboard metadata as advgkl ships it, eps strings, and loading an entry's model.

The metadata is RobustBench's ``model_info`` files, copied into
``advgkl/model_info/{dataset}/{threat_model}/{name}.json`` (MIT licence): seven boards, CIFAR-10 Linf / L2 /
corruptions, CIFAR-100 Linf / corruptions, ImageNet Linf / corruptions. Accuracies are percentages.
"""
from __future__ import annotations

import difflib
import functools
import json
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from advgkl.errors import UserError

from .zoo import _zoo, load_zoo_model

MODEL_INFO_DIR = Path(__file__).resolve().parent.parent / "model_info"  # advgkl/model_info

# threat model -> (the model_info field a board ranks by, its name in reports, its table heading)
METRICS = {"Linf": ("autoattack_acc", "AutoAttack accuracy", "AA"),
           "L2": ("autoattack_acc", "AutoAttack accuracy", "AA"),
           "corruptions": ("corruptions_acc", "corruption accuracy", "corr")}


def metric(threat_model: str) -> str:
    """The field a board ranks by: "autoattack_acc" (Linf, L2) or "corruptions_acc" (corruptions)."""
    return METRICS[threat_model][0]


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
    """``{name: model_info dict}`` for one shipped dataset / threat model, read once."""
    out = {}
    for path in sorted((MODEL_INFO_DIR / dataset / threat_model).glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def claimed_per_corruption(name: str, dataset: str) -> dict | None:
    """An entry's published accuracy (%) per corruption and severity, ``{corruption: {"1": .., "5": .., "mean": ..}}``.

    Read from RobustBench's ``unaggregated_results.csv`` of the corruptions board (shipped next to the
    JSON files); None when the board or the entry has no row there.
    """
    import csv

    path = MODEL_INFO_DIR / dataset / "corruptions" / "unaggregated_results.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    corruption_row, severity_row = rows[0], rows[1]
    row = next((r for r in rows[2:] if r and r[0] == name), None)
    if row is None:
        return None
    out: dict[str, dict] = {}
    for c, s, v in zip(corruption_row[1:], severity_row[1:], row[1:]):
        out.setdefault(c, {})[s] = round(100 * float(v), 4)
    for per in out.values():
        per["mean"] = round(sum(per.values()) / len(per), 4)
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


def _row(name: str, info: dict, threat_model: str, zoo: dict) -> dict:
    return dict(info, model_name=name, threat_model=threat_model, in_model_zoo=name in zoo)


def leaderboard(dataset: str = "cifar10", threat_model: str = "Linf") -> list[dict]:
    """All leaderboard entries for one dataset / threat model, by the board's metric, best first.

    The metric is ``metric(threat_model)``: AutoAttack accuracy for Linf / L2, the mean accuracy over 15
    corruptions x 5 severities for corruptions. Each dict holds the shipped ``model_info`` fields
    unchanged (strings such as ``"clean_acc": "85.31"`` and ``"eps": "8/255"``, exactly as RobustBench
    publishes them; ``eps`` is null on most corruptions entries) plus ``model_name`` (the id that
    ``load_model`` takes), ``threat_model`` and ``in_model_zoo`` (False for entries that RobustBench
    lists from external evaluations without a downloadable checkpoint).
    """
    _check_pair(dataset, threat_model)
    zoo = _zoo(dataset, threat_model)
    rows = [_row(name, info, threat_model, zoo) for name, info in _model_info(dataset, threat_model).items()]
    key = metric(threat_model)
    return sorted(rows, key=lambda r: (-float(r[key]), r["model_name"]))


def boards() -> list[dict]:
    """One dict per shipped board: dataset, threat_model, metric, eps (None for corruptions), entries,
    checkpoints (entries in robustbench's model zoo)."""
    out = []
    for dataset, threat_model in supported():
        rows = leaderboard(dataset, threat_model)
        eps = None
        if threat_model != "corruptions":  # the board's radius; a few entries write 8/255 as 0.031
            eps = format_eps(parse_eps(max(rows, key=lambda r: sum(q["eps"] == r["eps"] for q in rows))["eps"]),
                             threat_model)
        out.append({"dataset": dataset, "threat_model": threat_model, "metric": metric(threat_model), "eps": eps,
                    "entries": len(rows), "checkpoints": sum(r["in_model_zoo"] for r in rows)})
    return out


def leaderboard_entry(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> dict:
    """One entry of ``leaderboard()``; an unknown name is a UserError listing close matches."""
    _check_pair(dataset, threat_model)
    infos = _model_info(dataset, threat_model)
    if name not in infos:
        raise UserError(_unknown_name_message(name, dataset, threat_model))
    return _row(name, infos[name], threat_model, _zoo(dataset, threat_model))


def _unknown_name_message(name: str, dataset: str, threat_model: str) -> str:
    """Close matches, the other leaderboards that hold ``name``, and the command that lists the names."""
    msg = f"unknown RobustBench model {name!r} for {dataset} {threat_model}."
    by_lower = {c.lower(): c for c in _model_info(dataset, threat_model)}
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    if close:
        msg += " Did you mean: " + ", ".join(close) + "?"
    elsewhere = [f"{d} {t}" for d, t in supported() if (d, t) != (dataset, threat_model) and name in _model_info(d, t)]
    if elsewhere:
        msg += f" {name!r} exists for: {', '.join(elsewhere)} (use --dataset / --threat-model)."
    return msg + f" List the names with: advgkl leaderboard --dataset {dataset} --threat-model {threat_model}"


def format_table(head: tuple[str, ...], lines: list[tuple[str, ...]], right: set[int]) -> str:
    """A plain-text table with a dashed rule under ``head``; columns in ``right`` right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if j in right else c.ljust(w)
                                  for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in lines])


def format_leaderboard(rows: list[dict]) -> str:
    """A plain-text table of one board's rows: rank, name, architecture, clean %, metric %, extra data.

    The metric column is "AA" (AutoAttack accuracy) for Linf / L2 boards and "corr" (corruption accuracy)
    for corruptions boards.
    """
    key, _, short = METRICS[rows[0]["threat_model"]] if rows else METRICS["Linf"]
    head = ("#", "name", "architecture", "clean", short, "extra data")
    lines = [(str(i + 1), r["model_name"] + ("" if r.get("in_model_zoo", True) else " (no checkpoint)"),
              r["architecture"], f"{float(r['clean_acc']):.2f}", f"{float(r[key]):.2f}",
              "yes" if r["additional_data"] else "no") for i, r in enumerate(rows)]
    return format_table(head, lines, right={0, 3, 4})


def load_leaderboard_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | Path = "models", device: str | torch.device = "cpu", *,
                           download: bool = True) -> nn.Module:
    """A RobustBench zoo model with its published weights, ready for evaluation.

    Returns the module built by ``robustbench.utils.load_model``: it takes images in [0, 1]
    ([B, 3, 32, 32] for CIFAR, the crop of the model's preprocessing for ImageNet, e.g. [B, 3, 224, 224];
    normalisation is inside), returns logits [B, classes], is in eval mode,
    fp32, on ``device``, with ``requires_grad`` off for every parameter (attacks need input gradients
    only). The checkpoint is ``{model_dir}/{dataset}/{threat_model}/{name}.pt``; when it is missing
    and ``download`` is True it is downloaded (robustbench's Google-Drive downloader), else a
    UserError says where to put it. Every file is read and checked before robustbench loads it, and
    robustbench loads the state dict strictly into a fresh model, so a bad file raises UserError and
    no model is returned.
    """
    entry = leaderboard_entry(name, dataset, threat_model)  # unknown names fail here, with suggestions
    if not entry["in_model_zoo"]:
        raise UserError(f"{name} is on the {dataset} {threat_model} leaderboard from an external evaluation "
                        f"({entry.get('link', '')}) but RobustBench's model zoo has no checkpoint for it")
    return load_zoo_model(name, dataset, threat_model, model_dir, device, architecture=entry["architecture"],
                          download=download)
