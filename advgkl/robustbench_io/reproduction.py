"""``advgkl reproduce``: measure a leaderboard entry's clean and AutoAttack accuracy and judge its claim.

The claim is judged through 95 % Wilson score intervals over the N test points; the report
(``reproduce_report.json``) and the printout give accuracies in percent, as RobustBench does.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from advgkl.checkpoint import file_sha256
from advgkl.errors import UserError
from advgkl.runtime import resolve_device

from .board import leaderboard_entry, load_leaderboard_model, parse_eps
from .zoo import checkpoint_path

Z_95 = 1.959963984540054  # two-sided 95 % standard-normal quantile
REPORT_NAME = "reproduce_report.json"
CONFIG_NAME = "reproduce_config.json"  # what the saved AutoAttack state is valid for
STATE_NAME = "autoattack_state.pt"


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

@dataclass(frozen=True)
class _Job:
    """One reproduce call, fixed before any compute."""

    name: str
    dataset: str
    threat_model: str
    entry: dict  # leaderboard_entry(name, dataset, threat_model)
    eps: float
    n: int
    n_total: int
    device: torch.device
    out: Path
    model_dir: str | Path
    data_dir: str | Path
    batch_size: int
    wandb: str
    version: str
    attacks: list[str] | None
    seed: int
    progress: bool


def reproduce(name: str, dataset: str = "cifar10", threat_model: str = "Linf", *, n_examples: int | None = None,
              model_dir: str | Path = "models", data_dir: str | Path | None = None, out_dir: str | Path | None = None,
              batch_size: int = 500, device: str | None = None, wandb: str = "offline", version: str = "standard",
              attacks: list[str] | None = None, seed: int = 0, download: bool = True, progress: bool = True,
              resume: bool = False, echo=print) -> dict:
    """Checks a leaderboard claim: clean and AutoAttack accuracy on the first ``n_examples`` test points.

    Uses the leaderboard's eps (e.g. 8/255 Linf, 0.5 L2) and AutoAttack ``version`` (the leaderboard's
    is "standard"; ``attacks`` only with version "custom"). Writes ``{out_dir}/reproduce_report.json``
    (returned as a dict; accuracies in %, 95 % Wilson intervals, per-attack robust accuracy, wall time,
    verdict, environment) and ``metrics.jsonl`` / W&B through ``RunLogger`` (job_type "reproduce"), and
    prints a summary through ``echo``. AutoAttack's state lives in ``{out_dir}/autoattack_state.pt``.
    An ``out_dir`` that already holds a reproduce run is refused unless ``resume``: then a killed
    evaluation continues and a finished one returns its numbers at once. A different configuration in
    the same ``out_dir`` is refused either way. The checkpoint is loaded before the test set is read; with
    ``download=False`` nothing is downloaded, and a missing checkpoint (or the timm-hosted weights of an
    XCiT entry), then a missing test set, is a one-line UserError naming the file and --model-dir / --data-dir.
    """
    from advgkl.checkpoint import RunLock
    from advgkl.data import load_dataset

    entry = leaderboard_entry(name, dataset, threat_model)
    eps = parse_eps(entry["eps"])
    dev = resolve_device(device, flag="--device")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if data_dir is None:
        from advgkl.data import DEFAULT_ROOT as data_dir  # read at call time: tests and $ADVGKL_DATA move it
    if out_dir is not None and not resume:  # the default --out depends on N, known once the data is read
        _refuse_used_output(Path(out_dir))
    # the checkpoint before the data: it is the bigger download, and the harder thing to fix
    model = load_leaderboard_model(name, dataset, threat_model, model_dir, dev, download=download)
    if not download:
        _require_test_set(dataset, Path(data_dir).expanduser())
    x, y = load_dataset(dataset, data_dir, train=False)
    n_total = len(y)
    n = n_total if n_examples is None else int(n_examples)
    if not 1 <= n <= n_total:
        raise UserError(f"--n-examples must be between 1 and {n_total} (the {dataset} test set), got {n}")
    out = Path(out_dir) if out_dir is not None else Path("runs") / "reproduce" / f"{dataset}_{threat_model}_{name}_n{n}"
    if not resume:
        _refuse_used_output(out)
    job = _Job(name=name, dataset=dataset, threat_model=threat_model, entry=entry, eps=eps, n=n, n_total=n_total,
               device=dev, out=out, model_dir=model_dir, data_dir=data_dir, batch_size=batch_size, wandb=wandb,
               version=version, attacks=attacks, seed=seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # two jobs writing one report and one AutoAttack state would corrupt both
        report = _reproduce_locked(job, model, x, y, echo)
    echo(format_report(report))
    echo(f"report: {out / REPORT_NAME}")
    return report


# the test-set file load_dataset reads for each RobustBench dataset, under data_dir
_TEST_SET_FILES = {"cifar10": ("cifar-10-batches-py", "test_batch"), "cifar100": ("cifar-100-python", "test")}


def _require_test_set(dataset: str, data_dir: Path) -> None:
    """With downloads off, a missing test set is an error here (load_dataset would try to download it)."""
    if dataset not in _TEST_SET_FILES:
        return
    folder, file = _TEST_SET_FILES[dataset]
    if not (data_dir / folder / file).is_file():
        where = f"{data_dir / folder}/ has no {file}" if (data_dir / folder).is_dir() else \
            f"{data_dir / folder}/ does not exist"
        raise UserError(f"{dataset} test set not found and downloads are off (--offline): {where}; point --data-dir "
                        f"at the folder that holds {folder}/{file} (the python version of {dataset})")


def _refuse_used_output(out: Path) -> None:
    """Without --resume, a folder holding a reproduce run is refused rather than silently reused."""
    if (out / REPORT_NAME).is_file():
        raise UserError(f"{out} already holds a reproduce report; pass --resume to reuse its finished evaluation, "
                        f"or choose another --out")
    if (out / CONFIG_NAME).is_file() or (out / STATE_NAME).is_file():
        raise UserError(f"{out} already holds an interrupted reproduce run; pass --resume to continue it, "
                        f"or choose another --out")


def _reproduce_locked(job: _Job, model: nn.Module, x: torch.Tensor, y: torch.Tensor, echo) -> dict:
    """The evaluation inside ``job.out``'s lock: check or save its identity, attack, write and log the report."""
    from advgkl.checkpoint import write_json

    ckpt_info = _checkpoint_info(job)
    identity = _identity(job, ckpt_info)
    resumed = _check_or_save_identity(job.out, identity)
    logger = _logger(job, identity, resumed)
    try:
        echo(f"reproducing {job.name} ({job.entry['architecture']}) on {job.dataset} {job.threat_model} "
             f"eps={job.entry['eps']}: AutoAttack {job.version} on the first {job.n} of {job.n_total} test points, "
             f"device {job.device}" + (" (resuming)" if resumed else ""))
        result, this_call_s = _run_autoattack(job, model, x, y)
        report = _report(job, result, this_call_s=this_call_s, resumed=resumed, ckpt_info=ckpt_info)
        write_json(job.out / REPORT_NAME, report)
        _log_report(logger, job, report)
    finally:
        logger.finish()
    return report


def _checkpoint_info(job: _Job) -> dict | None:
    """Path, size and sha256 of the checkpoint file; None for weights robustbench takes from the hub."""
    ckpt = checkpoint_path(job.name, job.dataset, job.threat_model, job.model_dir)
    if not ckpt.is_file():
        return None
    return {"path": str(ckpt), "bytes": ckpt.stat().st_size, "sha256": file_sha256(ckpt)}


def _identity(job: _Job, ckpt_info: dict | None) -> dict:
    """What makes a saved AutoAttack state valid for this call (batch size is part of AutoAttack's schedule)."""
    return {"model_name": job.name, "dataset": job.dataset, "threat_model": job.threat_model, "eps": job.eps,
            "n_examples": job.n, "version": job.version, "attacks": list(job.attacks) if job.attacks else None,
            "seed": job.seed, "batch_size": job.batch_size,
            "checkpoint_sha256": ckpt_info["sha256"] if ckpt_info else None}


def _check_or_save_identity(out: Path, identity: dict) -> bool:
    """Saves ``identity`` in a new folder, refuses a different saved one; True when an AutoAttack state resumes."""
    from advgkl.checkpoint import write_json

    id_path = out / CONFIG_NAME
    if not id_path.is_file():
        write_json(id_path, identity)
        return False
    old = json.loads(id_path.read_text())
    if old != identity:
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        raise UserError(f"{out} holds a reproduce run with a different configuration {diff} (saved, now); "
                        f"use another --out or delete {out} to start over")
    return (out / STATE_NAME).is_file()


def _logger(job: _Job, identity: dict, resumed: bool):
    from advgkl.logging import RunLogger

    config = dict(identity, device=str(job.device), model_dir=str(job.model_dir), data_dir=str(job.data_dir),
                  claimed_clean_acc=float(job.entry["clean_acc"]),
                  claimed_autoattack_acc=float(job.entry["autoattack_acc"]))
    return RunLogger(job.out, mode=job.wandb, project="advgkl", name=_run_name(job), group="reproduce",
                     tags=("reproduce", job.dataset, job.threat_model, job.name), config=config,
                     job_type="reproduce", resume=resumed)


def _run_name(job: _Job) -> str:
    return f"reproduce-{job.name}-{job.dataset}-{job.threat_model}"


def _run_autoattack(job: _Job, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """AutoAttack on the first ``job.n`` points, resuming from ``job.out``'s state; (result, this call's s)."""
    from advgkl.attacks import AutoAttack

    x_eval = x[:job.n].float().div_(255)  # uint8 -> [0, 1]; the model normalises internally
    aa = AutoAttack(model, norm=job.threat_model, eps=job.eps, version=job.version, attacks=job.attacks,
                    batch_size=job.batch_size, seed=job.seed, device=job.device, state_path=job.out / STATE_NAME,
                    progress=job.progress)
    t0 = time.time()
    result = aa(x_eval, y[:job.n])
    return result, time.time() - t0


def _pct(x: float) -> float:
    return round(100.0 * float(x), 4)


def _measured(result, n: int) -> dict:
    """Measured accuracies (%), the counts behind them and their 95 % Wilson intervals."""
    k_clean = int(torch.as_tensor(result.clean_correct).sum())
    k_robust = int(torch.as_tensor(result.robust_correct).sum())
    return {"clean_acc": _pct(k_clean / n), "autoattack_acc": _pct(k_robust / n),
            "clean_correct": k_clean, "robust_correct": k_robust,
            "clean_acc_ci95": [_pct(v) for v in wilson_interval(k_clean, n)],
            "autoattack_acc_ci95": [_pct(v) for v in wilson_interval(k_robust, n)]}


def _notes(job: _Job, result) -> list[str]:
    """Why the measurement may not be comparable with the claim."""
    notes = []
    if job.version != "standard":
        notes.append(f"AutoAttack {result.version!r} is not the leaderboard's 'standard': the robust "
                     f"accuracy is not comparable with the claim")
    if job.n < job.n_total:
        notes.append(f"measured on the first {job.n} of {job.n_total} test points; the claim is for all {job.n_total}")
    return notes


def _report(job: _Job, result, *, this_call_s: float, resumed: bool, ckpt_info: dict | None) -> dict:
    """The ``reproduce_report.json`` layout (accuracies in %)."""
    from advgkl.checkpoint import environment_info

    entry = job.entry
    claimed = {"clean_acc": float(entry["clean_acc"]), "autoattack_acc": float(entry["autoattack_acc"]),
               "source": f"RobustBench model_info/{job.dataset}/{job.threat_model}/{job.name}.json"}
    measured = _measured(result, job.n)
    word, detail = verdict(claimed["clean_acc"], measured["clean_acc_ci95"], claimed["autoattack_acc"],
                           measured["autoattack_acc_ci95"])
    return {
        "model_name": job.name, "dataset": job.dataset, "threat_model": job.threat_model,
        "eps": job.eps, "eps_str": entry["eps"], "autoattack_version": result.version,
        "attacks": list(result.attacks), "seed": job.seed,
        "n_examples": job.n, "n_test_set": job.n_total, "units": "percent",
        "architecture": entry["architecture"], "paper": entry.get("name"), "link": entry.get("link"),
        "claimed": claimed, "measured": measured,
        "difference": {k: round(measured[k] - claimed[k], 4) for k in ("clean_acc", "autoattack_acc")},
        "ci_method": "Wilson score interval, 95% two-sided, binomial over the n_examples test points",
        "per_attack_robust_acc": {k: _pct(v) for k, v in result.per_attack_robust_acc.items()},
        # AutoAttack's time summed over resumed runs (the evaluation's cost), and this call's share
        "wall_time_s": round(float(result.wall_time_s), 3), "this_call_wall_time_s": round(this_call_s, 3),
        "resumed": resumed, "device": str(job.device), "batch_size": job.batch_size,
        "verdict": word, "verdict_detail": detail, "notes": _notes(job, result),
        "checkpoint": ckpt_info, "environment": environment_info(),
    }


def _log_report(logger, job: _Job, report: dict) -> None:
    """The report's numbers to metrics.jsonl / W&B, and the report file as a W&B artifact."""
    m, c = report["measured"], report["claimed"]
    logger.log({"clean_acc": m["clean_acc"], "autoattack_acc": m["autoattack_acc"],
                **{f"robust_acc/{k}": v for k, v in report["per_attack_robust_acc"].items()}})
    (clean_lo, clean_hi), (aa_lo, aa_hi) = m["clean_acc_ci95"], m["autoattack_acc_ci95"]
    logger.summary({"clean_acc": m["clean_acc"], "autoattack_acc": m["autoattack_acc"],
                    "claimed_clean_acc": c["clean_acc"], "claimed_autoattack_acc": c["autoattack_acc"],
                    "clean_acc_ci95_low": clean_lo, "clean_acc_ci95_high": clean_hi,
                    "autoattack_acc_ci95_low": aa_lo, "autoattack_acc_ci95_high": aa_hi,
                    "verdict": report["verdict"], "wall_time_s": report["wall_time_s"]})
    logger.save_artifact(job.out / REPORT_NAME, name=_run_name(job), type="reproduce-report")


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
