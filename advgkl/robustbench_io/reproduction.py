"""``advgkl reproduce``: measure a leaderboard entry's clean accuracy and its board's metric, and judge its claim.

The metric is AutoAttack accuracy on the Linf / L2 boards and corruption accuracy on the corruptions
boards: RobustBench's mean over 15 corruptions x 5 severities of the clean accuracy on the same first N
test points, each corrupted set read with robustbench's loaders. The claim is judged through 95 %
Wilson score intervals over the N test points; the report (``reproduce_report.json``) and the printout
give accuracies in percent, as RobustBench does.
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

from .board import METRICS, claimed_per_corruption, leaderboard_entry, load_leaderboard_model, metric, parse_eps
from .testsets import SEVERITIES, corruptions, load_clean, load_corrupted, preprocessing, require_corruptions
from .zoo import checkpoint_path

Z_95 = 1.959963984540054  # two-sided 95 % standard-normal quantile
REPORT_NAME = "reproduce_report.json"
CONFIG_NAME = "reproduce_config.json"  # what the saved AutoAttack / corruption state is valid for
STATE_NAME = "autoattack_state.pt"
CORRUPTION_STATE_NAME = "corruptions_state.json"


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
            aa_ci: tuple[float, float], metric_name: str = "AutoAttack accuracy") -> tuple[str, str]:
    """("consistent" | "not consistent", detail): consistent when each claim lies inside its CI.

    All numbers in percent; ``claimed_aa`` / ``aa_ci`` are the board's metric, named ``metric_name`` in
    the detail ("corruption accuracy" on a corruptions board). The claims are published with two
    decimals, so a claim within 0.005 of an interval end counts as inside.
    """
    tol = 0.005
    bad = []
    for what, claim, (lo, hi) in (("clean accuracy", claimed_clean, clean_ci), (metric_name, claimed_aa, aa_ci)):
        if not lo - tol <= claim <= hi + tol:
            side = "above" if claim > hi else "below"
            bad.append(f"claimed {what} {claim:.2f} is {side} the measured 95% CI [{lo:.2f}, {hi:.2f}]")
    if bad:
        return "not consistent", "; ".join(bad)
    return "consistent", "both claimed numbers lie inside the measured 95% confidence intervals"


# ----------------------------------------------------------------------------------------------------
# Corruption accuracy.

def corruption_accuracy(model: nn.Module, dataset: str, data_dir: str | Path, n: int, *, prepr=None,
                        batch_size: int = 500, device: str | torch.device = "cpu",
                        state_path: str | Path | None = None, progress: bool = True) -> dict:
    """RobustBench's corruption accuracy of ``model`` on the first ``n`` test points (fractions, not %).

    For each of the 15 corruptions at severities 1..5, the first ``n`` corrupted test points are read
    with robustbench's loader (``testsets.load_corrupted``; ``prepr`` is the ImageNet transform) and
    classified in fp32 without gradients; the board's number is the mean of the 75 accuracies. Returns
    ``{"corruptions_acc", "per_set": {"fog/3": correct count}, "per_point": int [n] (how many of the 75
    sets classify each point correctly), "wall_time_s"}``. With ``state_path`` the counts are saved
    (atomically, JSON) after every set and a later call with the same ``n`` skips the sets already done.
    """
    from tqdm.auto import tqdm

    from advgkl.checkpoint import write_json
    from advgkl.evaluate import clean_accuracy

    sets = [(c, s) for c in corruptions() for s in SEVERITIES]
    state = {"n": n, "per_set": {}, "per_point": [0] * n, "wall_time_s": 0.0}
    if state_path is not None and Path(state_path).is_file():
        saved = json.loads(Path(state_path).read_text())
        if saved.get("n") != n:
            raise UserError(f"{state_path} holds a corruption evaluation of {saved.get('n')} points, not {n}")
        state = saved
    per_point = torch.tensor(state["per_point"], dtype=torch.int64)
    todo = [(c, s) for c, s in sets if f"{c}/{s}" not in state["per_set"]]
    with tqdm(total=len(sets), initial=len(sets) - len(todo), desc="corruptions", unit="set",
              disable=not progress) as bar:
        for c, s in todo:
            t0 = time.time()
            x, y = load_corrupted(dataset, data_dir, n, c, s, prepr)
            if len(y) != n:  # robustbench slices its files silently: a short file gives fewer points
                raise UserError(f"robustbench's loader gave {len(y)} points, not {n}, for {dataset} {c} severity {s}")
            correct = clean_accuracy(model, x, y, device, batch_size).long()
            per_point += correct
            state["per_set"][f"{c}/{s}"] = int(correct.sum())
            state["per_point"] = per_point.tolist()
            state["wall_time_s"] += time.time() - t0
            if state_path is not None:
                write_json(state_path, state)
            bar.update(1)
    total = sum(state["per_set"].values())
    return dict(state, corruptions_acc=total / (len(sets) * n))


# ----------------------------------------------------------------------------------------------------
# Reproduce a leaderboard entry.

@dataclass(frozen=True)
class _Job:
    """One reproduce call, fixed before any compute."""

    name: str
    dataset: str
    threat_model: str
    entry: dict  # leaderboard_entry(name, dataset, threat_model)
    metric: str  # metric(threat_model): "autoattack_acc" | "corruptions_acc"
    eps: float | None  # None on a corruptions board
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

    @property
    def corrupted(self) -> bool:
        return self.threat_model == "corruptions"


def reproduce(name: str, dataset: str = "cifar10", threat_model: str = "Linf", *, n_examples: int | None = None,
              model_dir: str | Path = "models", data_dir: str | Path | None = None, out_dir: str | Path | None = None,
              batch_size: int = 500, device: str | None = None, wandb: str = "offline", version: str = "standard",
              attacks: list[str] | None = None, seed: int = 0, download: bool = True, progress: bool = True,
              resume: bool = False, echo=print) -> dict:
    """Checks a leaderboard claim: clean accuracy and the board's metric on the first ``n_examples`` test points.

    Linf / L2 boards: AutoAttack accuracy with the leaderboard's eps (8/255 Linf and 0.5 L2 on CIFAR,
    4/255 on ImageNet) and AutoAttack ``version`` (the leaderboard's is "standard"; ``attacks`` only with
    version "custom"). Corruptions boards: ``corruption_accuracy`` (``version``, ``attacks`` and ``seed``
    play no part). CIFAR test points come from ``data_dir``'s CIFAR batches (and CIFAR-10-C/, CIFAR-100-C/),
    ImageNet ones from ``data_dir``/val/ (and ImageNet-C/) through robustbench's loaders and the model's
    preprocessing; ``n_examples`` defaults to the whole test set (5,000 images for ImageNet).
    Writes ``{out_dir}/reproduce_report.json`` (returned as a dict; accuracies in %, 95 % Wilson
    intervals, per-attack or per-corruption accuracy, wall time, verdict, environment) and
    ``metrics.jsonl`` / W&B through ``RunLogger`` (job_type "reproduce"), and prints a summary through
    ``echo``. The attack or corruption state lives in ``{out_dir}``: an ``out_dir`` that already holds a
    reproduce run is refused unless ``resume``: then a killed evaluation continues and a finished one
    returns its numbers at once. A different configuration in the same ``out_dir`` is refused either
    way. The checkpoint is loaded before the test data is read; with ``download=False`` nothing is
    downloaded, and a missing checkpoint (or the timm / torchvision weights of a hub entry), then missing
    test data, is a one-line UserError naming the file and --model-dir / --data-dir. ImageNet data is
    never downloaded.
    """
    from advgkl.checkpoint import RunLock

    entry = leaderboard_entry(name, dataset, threat_model)
    corrupted = threat_model == "corruptions"
    if corrupted and attacks:
        raise UserError(f"--attacks applies to the Linf and L2 boards; {dataset} corruptions measures clean accuracy "
                        f"on corrupted images, with no attack")
    eps = None if corrupted else parse_eps(entry["eps"])
    dev = resolve_device(device, flag="--device")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if data_dir is None:
        from advgkl.data import DEFAULT_ROOT as data_dir  # read at call time: tests and $ADVGKL_DATA move it
    if out_dir is not None and not resume:  # the default --out depends on N, known once the data is read
        _refuse_used_output(Path(out_dir))
    # the checkpoint before the data: it is the bigger download, and the harder thing to fix
    model = load_leaderboard_model(name, dataset, threat_model, model_dir, dev, download=download)
    x, y, n_total = load_clean(dataset, name, threat_model, data_dir, n_examples, download=download)
    n = len(y)
    if corrupted:
        require_corruptions(dataset, data_dir, n, download=download)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "reproduce" / f"{dataset}_{threat_model}_{name}_n{n}"
    if not resume:
        _refuse_used_output(out)
    job = _Job(name=name, dataset=dataset, threat_model=threat_model, entry=entry, metric=metric(threat_model),
               eps=eps, n=n, n_total=n_total, device=dev, out=out, model_dir=model_dir, data_dir=data_dir,
               batch_size=batch_size, wandb=wandb, version=version, attacks=attacks, seed=seed, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # two jobs writing one report and one evaluation state would corrupt both
        report = _reproduce_locked(job, model, x, y, echo)
    echo(format_report(report))
    echo(f"report: {out / REPORT_NAME}")
    return report


def _refuse_used_output(out: Path) -> None:
    """Without --resume, a folder holding a reproduce run is refused rather than silently reused."""
    if (out / REPORT_NAME).is_file():
        raise UserError(f"{out} already holds a reproduce report; pass --resume to reuse its finished evaluation, "
                        f"or choose another --out")
    if any((out / f).is_file() for f in (CONFIG_NAME, STATE_NAME, CORRUPTION_STATE_NAME)):
        raise UserError(f"{out} already holds an interrupted reproduce run; pass --resume to continue it, "
                        f"or choose another --out")


def _reproduce_locked(job: _Job, model: nn.Module, x: torch.Tensor, y: torch.Tensor, echo) -> dict:
    """The evaluation inside ``job.out``'s lock: check or save its identity, evaluate, write and log the report."""
    from advgkl.checkpoint import write_json

    ckpt_info = _checkpoint_info(job)
    identity = _identity(job, ckpt_info)
    resumed = _check_or_save_identity(job.out, identity)
    logger = _logger(job, identity, resumed)
    try:
        if job.corrupted:
            echo(f"reproducing {job.name} ({job.entry['architecture']}) on {job.dataset} corruptions: "
                 f"{len(corruptions())} corruptions x {len(SEVERITIES)} severities on the first {job.n} of "
                 f"{job.n_total} test points, device {job.device}" + (" (resuming)" if resumed else ""))
            report = _corruption_report(job, model, x, y, ckpt_info=ckpt_info, resumed=resumed)
        else:
            echo(f"reproducing {job.name} ({job.entry['architecture']}) on {job.dataset} {job.threat_model} "
                 f"eps={job.entry['eps']}: AutoAttack {job.version} on the first {job.n} of {job.n_total} test "
                 f"points, device {job.device}" + (" (resuming)" if resumed else ""))
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
    """What makes a saved evaluation state valid for this call (batch size is part of AutoAttack's schedule)."""
    attack = not job.corrupted  # a corruptions board runs no attack: its options change nothing
    return {"model_name": job.name, "dataset": job.dataset, "threat_model": job.threat_model, "eps": job.eps,
            "n_examples": job.n, "version": job.version if attack else None,
            "attacks": list(job.attacks) if job.attacks else None, "seed": job.seed if attack else None,
            "batch_size": job.batch_size if attack else None,
            "checkpoint_sha256": ckpt_info["sha256"] if ckpt_info else None}


def _check_or_save_identity(out: Path, identity: dict) -> bool:
    """Saves ``identity`` in a new folder, refuses a different saved one; True when a saved state resumes."""
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
    return (out / STATE_NAME).is_file() or (out / CORRUPTION_STATE_NAME).is_file()


def _logger(job: _Job, identity: dict, resumed: bool):
    from advgkl.logging import RunLogger

    config = dict(identity, device=str(job.device), model_dir=str(job.model_dir), data_dir=str(job.data_dir),
                  claimed_clean_acc=float(job.entry["clean_acc"]),
                  **{f"claimed_{job.metric}": float(job.entry[job.metric])})
    return RunLogger(job.out, mode=job.wandb, project="advgkl", name=_run_name(job), group="reproduce",
                     tags=("reproduce", job.dataset, job.threat_model, job.name), config=config,
                     job_type="reproduce", resume=resumed)


def _run_name(job: _Job) -> str:
    return f"reproduce-{job.name}-{job.dataset}-{job.threat_model}"


def _run_autoattack(job: _Job, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """AutoAttack on the ``job.n`` points, resuming from ``job.out``'s state; (result, this call's s)."""
    from advgkl.attacks import AutoAttack

    aa = AutoAttack(model, norm=job.threat_model, eps=job.eps, version=job.version, attacks=job.attacks,
                    batch_size=job.batch_size, seed=job.seed, device=job.device, state_path=job.out / STATE_NAME,
                    progress=job.progress)
    t0 = time.time()
    result = aa(x, y)
    return result, time.time() - t0


def _pct(x: float) -> float:
    return round(100.0 * float(x), 4)


def _measured(job: _Job, k_clean: int, k_metric: float, n: int) -> dict:
    """Measured accuracies (%), the counts behind them and their 95 % Wilson intervals.

    On a corruptions board ``k_metric`` is each point's share of the 75 corrupted sets classified
    correctly, summed over points: a mean of values in [0, 1] has at most Bernoulli variance, so the
    Wilson interval over the ``n`` points is conservative for it.
    """
    out = {"clean_acc": _pct(k_clean / n), job.metric: _pct(k_metric / n), "clean_correct": k_clean}
    out["corrupted_correct" if job.corrupted else "robust_correct"] = k_metric
    out["clean_acc_ci95"] = [_pct(v) for v in wilson_interval(k_clean, n)]
    out[f"{job.metric}_ci95"] = [_pct(v) for v in wilson_interval(k_metric, n)]
    return out


def _notes(job: _Job, version: str | None) -> list[str]:
    """Why the measurement may not be comparable with the claim."""
    notes = []
    if version is not None and job.version != "standard":
        notes.append(f"AutoAttack {version!r} is not the leaderboard's 'standard': the robust "
                     f"accuracy is not comparable with the claim")
    if job.n < job.n_total:
        notes.append(f"measured on the first {job.n} of {job.n_total} test points; the claim is for all {job.n_total}")
    return notes


def _common_report(job: _Job, measured: dict, *, wall_time_s: float, this_call_s: float, resumed: bool,
                   ckpt_info: dict | None, version: str | None) -> dict:
    """The fields of ``reproduce_report.json`` every board shares (accuracies in %)."""
    from advgkl.checkpoint import environment_info

    entry, key = job.entry, job.metric
    claimed = {"clean_acc": float(entry["clean_acc"]), key: float(entry[key]),
               "source": f"RobustBench model_info/{job.dataset}/{job.threat_model}/{job.name}.json"}
    word, detail = verdict(claimed["clean_acc"], measured["clean_acc_ci95"], claimed[key], measured[f"{key}_ci95"],
                           METRICS[job.threat_model][1])
    ci_over = "each point's accuracy over the 75 corrupted sets" if job.corrupted else "binomial"
    return {
        "model_name": job.name, "dataset": job.dataset, "threat_model": job.threat_model,
        "metric": key, "metric_name": METRICS[job.threat_model][1], "eps": job.eps, "eps_str": entry["eps"],
        "n_examples": job.n, "n_test_set": job.n_total, "units": "percent",
        "architecture": entry["architecture"], "paper": entry.get("name"), "link": entry.get("link"),
        "claimed": claimed, "measured": measured,
        "difference": {k: round(measured[k] - claimed[k], 4) for k in ("clean_acc", key)},
        "ci_method": f"Wilson score interval, 95% two-sided, {ci_over} over the n_examples test points",
        # time summed over resumed runs (the evaluation's cost), and this call's share
        "wall_time_s": round(float(wall_time_s), 3), "this_call_wall_time_s": round(this_call_s, 3),
        "resumed": resumed, "device": str(job.device), "batch_size": job.batch_size,
        "verdict": word, "verdict_detail": detail, "notes": _notes(job, version),
        "checkpoint": ckpt_info, "environment": environment_info(),
    }


def _report(job: _Job, result, *, this_call_s: float, resumed: bool, ckpt_info: dict | None) -> dict:
    """The report of a Linf / L2 board: AutoAttack's numbers."""
    k_clean = int(torch.as_tensor(result.clean_correct).sum())
    k_robust = int(torch.as_tensor(result.robust_correct).sum())
    report = _common_report(job, _measured(job, k_clean, k_robust, job.n), wall_time_s=result.wall_time_s,
                            this_call_s=this_call_s, resumed=resumed, ckpt_info=ckpt_info, version=result.version)
    report.update({"autoattack_version": result.version, "attacks": list(result.attacks), "seed": job.seed,
                   "per_attack_robust_acc": {k: _pct(v) for k, v in result.per_attack_robust_acc.items()}})
    return report


def _corruption_report(job: _Job, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ckpt_info: dict | None,
                       resumed: bool) -> dict:
    """The report of a corruptions board: clean accuracy on ``x`` and the corruption accuracy, per set too."""
    from advgkl.evaluate import clean_accuracy

    t0 = time.time()
    k_clean = int(clean_accuracy(model, x, y, job.device, job.batch_size).sum())
    clean_s = time.time() - t0
    prepr = preprocessing(job.name, job.dataset, job.threat_model) if job.dataset == "imagenet" else None
    res = corruption_accuracy(model, job.dataset, job.data_dir, job.n, prepr=prepr, batch_size=job.batch_size,
                              device=job.device, state_path=job.out / CORRUPTION_STATE_NAME, progress=job.progress)
    this_call_s = time.time() - t0
    k_corrupted = sum(res["per_point"]) / len(res["per_set"])  # the points' shares of correct sets, summed
    report = _common_report(job, _measured(job, k_clean, k_corrupted, job.n),
                            wall_time_s=res["wall_time_s"] + clean_s,
                            this_call_s=this_call_s, resumed=resumed, ckpt_info=ckpt_info, version=None)
    per = {c: {str(s): _pct(res["per_set"][f"{c}/{s}"] / job.n) for s in SEVERITIES} for c in corruptions()}
    for c in per:
        per[c]["mean"] = round(sum(per[c][str(s)] for s in SEVERITIES) / len(SEVERITIES), 4)
    report.update({"corruptions": list(corruptions()), "severities": list(SEVERITIES), "per_corruption_acc": per,
                   "claimed_per_corruption_acc": claimed_per_corruption(job.name, job.dataset)})
    return report


def _log_report(logger, job: _Job, report: dict) -> None:
    """The report's numbers to metrics.jsonl / W&B, and the report file as a W&B artifact."""
    m, c, key = report["measured"], report["claimed"], job.metric
    if job.corrupted:
        detail = {f"corruption_acc/{k}": v["mean"] for k, v in report["per_corruption_acc"].items()}
    else:
        detail = {f"robust_acc/{k}": v for k, v in report["per_attack_robust_acc"].items()}
    logger.log({"clean_acc": m["clean_acc"], key: m[key], **detail})
    (clean_lo, clean_hi), (lo, hi) = m["clean_acc_ci95"], m[f"{key}_ci95"]
    logger.summary({"clean_acc": m["clean_acc"], key: m[key],
                    "claimed_clean_acc": c["clean_acc"], f"claimed_{key}": c[key],
                    "clean_acc_ci95_low": clean_lo, "clean_acc_ci95_high": clean_hi,
                    f"{key}_ci95_low": lo, f"{key}_ci95_high": hi,
                    "verdict": report["verdict"], "wall_time_s": report["wall_time_s"]})
    logger.save_artifact(job.out / REPORT_NAME, name=_run_name(job), type="reproduce-report")


def format_report(report: dict) -> str:
    """The human-readable summary of a ``reproduce`` report (what the command prints)."""
    c, m, d = report["claimed"], report["measured"], report["difference"]
    key = report.get("metric", "autoattack_acc")  # reports written before the corruptions boards lack it
    corrupted = key == "corruptions_acc"
    label = "corruptions" if corrupted else "AutoAttack"
    rows = [("clean", c["clean_acc"], m["clean_acc"], m["clean_acc_ci95"], d["clean_acc"]),
            (label, c[key], m[key], m[f"{key}_ci95"], d[key])]
    how = (f"  {len(report['corruptions'])} corruptions x {len(report['severities'])} severities" if corrupted else
           f" eps={report['eps_str']}  AutoAttack {report['autoattack_version']}")
    lines = [f"{report['model_name']}  {report['dataset']} {report['threat_model']}{how}  "
             f"n={report['n_examples']}/{report['n_test_set']}",
             f"{'accuracy %':<12}{'claimed':>9}{'measured':>10}   {'95% CI (Wilson)':<18}{'diff':>7}"]
    for what, claim, meas, (lo, hi), diff in rows:
        inside = lo - 0.005 <= claim <= hi + 0.005
        lines.append(f"{what:<12}{claim:>9.2f}{meas:>10.2f}   [{lo:6.2f}, {hi:6.2f}]  {diff:>+7.2f}  "
                     + ("inside" if inside else "OUTSIDE"))
    if corrupted:
        claimed_per = report.get("claimed_per_corruption_acc") or {}
        lines.append("per corruption, mean of severities 1-5: measured (claimed)")
        lines.extend(f"  {name:<18}{per['mean']:>7.2f}" + (f"  ({claimed_per[name]['mean']:.2f})"
                                                          if name in claimed_per else "")
                     for name, per in report["per_corruption_acc"].items())
    else:
        lines.append("per attack:  " + " -> ".join(f"{k} {v:.2f}" for k, v in report["per_attack_robust_acc"].items()))
    what = "the corrupted sets" if corrupted else "AutoAttack"
    lines.append(f"wall time:   {report['wall_time_s']:.1f} s of {what} on {report['device']}"
                 + (f" (summed over resumed runs; this call {report['this_call_wall_time_s']:.1f} s)"
                    if report.get("resumed") else ""))
    lines.extend(f"note:        {note}" for note in report.get("notes", []))
    lines.append(f"verdict:     {report['verdict']} ({report['verdict_detail']})")
    return "\n".join(lines)
