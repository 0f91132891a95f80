"""The Fashion-MNIST study's analysis: every number notebooks/02_fmnist_study.py shows, as functions.

The notebook only prints and plots what these return; the tables, summary.csv and the plot are
``advgkl summarize`` (``advgkl.summarize``), which this module calls. Import with this folder on
``sys.path`` (the notebook and the tests put it there): ``import analysis``. A run is
``runs/<method>_s<seed>/`` with ``results.json`` (accuracies as fractions) and
``metrics.jsonl``; the tables show percent.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from advgkl import summarize
from advgkl.summarize import (COLLAPSED_BELOW, Z_95, describe_recipe, fmt, is_collapsed, joined,  # noqa: F401
                              load_run, markdown_table, parse_run_name, pct_mean_std, subset_halfwidth_95)

SUBSTUDIES = ("kd", "ablations", "tricks", "a4")


def study_dir(root: Path, override: str | None) -> Path:
    """The results folder: ``override`` (``ADVGKL_STUDY_DIR``; relative to ``root``, ``~`` expanded) or the
    committed ``experiments/fmnist_study/results``."""
    path = Path(override).expanduser() if override else root / "experiments" / "fmnist_study" / "results"
    return path if path.is_absolute() else root / path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` ([] when it is absent); a blank or partial line (a killed run) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def logged_epochs(run_dir: Path) -> list[dict]:
    """One metrics.jsonl row per epoch, in epoch order; a resumed run logs an epoch again and the last row wins."""
    by_epoch = {m["epoch"]: m for m in read_jsonl(run_dir / "metrics.jsonl") if "epoch" in m}
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_study_run(run_dir: Path) -> dict:
    """A finished run as the notebook uses it: ``res`` is ``run_study.load_run`` (the AutoAttack evaluation
    on the most points), ``honesty`` and ``points`` are those of the evaluated weights, ``epochs`` the log."""
    method, seed = parse_run_name(run_dir.name)
    res = load_run(run_dir)
    which = res.get("evaluated_weights", "final")
    evaluation = res.get("evaluations", {}).get(which, {})
    return {"name": run_dir.name, "method": method, "seed": seed, "res": res, "which": which,
            "honesty": evaluation.get("honesty", {}), "points": res["per_point"][which],
            "epochs": logged_epochs(run_dir)}


def collect_runs(study: Path) -> tuple[list[dict], list[str], list[str]]:
    """(finished runs, unfinished folder names, folders not named <method>_s<seed>) under ``study/runs``.
    A run is finished once its results.json exists."""
    runs, unfinished, unnamed = [], [], []
    for run_dir in sorted(p for p in (study / "runs").glob("*") if p.is_dir()):
        if parse_run_name(run_dir.name) is None:
            unnamed.append(run_dir.name)
        elif not (run_dir / "results.json").is_file():
            unfinished.append(run_dir.name)
        else:
            runs.append(load_study_run(run_dir))
    return runs, unfinished, unnamed


def group_runs(runs: list[dict], key: str = "method") -> dict[str, list[dict]]:
    """Runs grouped by ``run[key]``, the group with the best mean AutoAttack accuracy first (ties by name)."""
    groups = defaultdict(list)
    for run in runs:
        groups[run[key]].append(run)
    order = sorted(groups, key=lambda g: (-np.mean([r["res"]["autoattack_acc"] for r in groups[g]]), g))
    return {g: groups[g] for g in order}


def summarise_method(rs: list[dict]) -> dict:
    """One method's row of the comparison table: ``advgkl.summarize.summarise_group`` of its runs."""
    return summarize.summarise_group(rs)


def comparison_table(study: Path, source) -> str:
    """The README's method table (summary.md): ``advgkl summarize`` over ``study/runs`` with the study's
    columns, and the footnote naming the results folder ``source``."""
    return summarize.summarize([study], columns=summarize.STUDY_COLUMNS, source=f"{source}/runs/*",
                               written_by="notebooks/02_fmnist_study.ipynb")["markdown"]


def write_summary(folder: Path, text: str) -> Path:
    """Writes ``text`` to ``folder/summary.md`` and returns that path."""
    path = folder / "summary.md"
    path.write_text(text)
    return path


def comparability_notes(summary: dict[str, dict]) -> list[str]:
    """Warnings about means that mix evaluations (several AutoAttack versions or test-point counts in one
    method) and about screening (non-standard) AutoAttack numbers."""
    notes = []
    mixed = [m for m, s in summary.items() if len(s["autoattack_versions"]) > 1 or len(s["n_examples"]) > 1]
    if mixed:
        notes.append(f"warning: runs of {', '.join(mixed)} differ in AutoAttack version or test points: their mean "
                     "mixes evaluations that are not comparable")
    if any(v != "standard" for s in summary.values() for v in s["autoattack_versions"]):
        notes.append("note: a non-'standard' AutoAttack version is a screening number, not a headline number")
    return notes


def gaps_to_best(summary: dict[str, dict]) -> list[dict]:
    """For every method after the first (the best): its AutoAttack gap to the best in pp and Welch's standard
    error of that gap (None while either method has one seed); a rough yardstick with 2-3 seeds, not a test."""
    best, *others = summary
    a = summary[best]
    out = []
    for m in others:
        b = summary[m]
        se = (None if a["aa_std"] is None or b["aa_std"] is None
              else float(np.sqrt(a["aa_std"] ** 2 / a["n"] + b["aa_std"] ** 2 / b["n"])))
        out.append({"method": m, "gap": a["aa_mean"] - b["aa_mean"], "se": se})
    return out


def per_attack_means(by_method: dict[str, list[dict]]) -> tuple[list[str], dict[str, list[float]]]:
    """(AutoAttack stages in first-seen order, {method: robust accuracy after each stage, mean over seeds});
    a stage a run lacks is NaN."""
    attacks = list(dict.fromkeys(k for rs in by_method.values() for r in rs for k in r["res"]["per_attack_robust_acc"]))
    return attacks, {m: [float(np.mean([r["res"]["per_attack_robust_acc"].get(a, np.nan) for r in rs]))
                         for a in attacks] for m, rs in by_method.items()}


def eps_sweep(rs: list[dict]) -> dict | None:
    """PGD-20 accuracy in % against eps from the honesty checks of ``rs``: ``grid`` (the eps every run with a
    sweep has), ``mean`` and ``std`` over those ``n`` runs (std None for one); None when no run has a sweep."""
    sweeps = [{float(k): v for k, v in r["honesty"].get("pgd_acc_by_eps", {}).items()} for r in rs]
    sweeps = [s for s in sweeps if s]
    if not sweeps:
        return None
    grid = sorted(set.intersection(*(set(s) for s in sweeps)))
    acc = 100 * np.array([[s[e] for e in grid] for s in sweeps])
    return {"grid": grid, "mean": acc.mean(0), "std": acc.std(0, ddof=1) if len(sweeps) > 1 else None,
            "n": len(sweeps)}


def run_dataset(res: dict) -> str | None:
    """The dataset a run trained on (results.json's ``dataset``, else its config's ``data.dataset``)."""
    return res.get("dataset", res.get("config", {}).get("data", {}).get("dataset"))


def classwise(run: dict, labels: np.ndarray, n_classes: int) -> dict:
    """Per-class clean and AutoAttack accuracy of a run: its per-point outcomes are on the first test points,
    matched with ``labels`` (the test labels); with the class counts, the per-point robust accuracy, and
    pgd20_full.json's per-class PGD-20 accuracy where the run has it."""
    robust = np.asarray(run["points"]["robust_correct"], dtype=float)
    clean = np.asarray(run["points"]["clean_correct"], dtype=float)
    y = np.asarray(labels)[:len(robust)]
    counts = np.bincount(y, minlength=n_classes)
    out = {"counts": counts.tolist(),
           "clean": (np.bincount(y, weights=clean, minlength=n_classes) / np.maximum(counts, 1)).tolist(),
           "robust": (np.bincount(y, weights=robust, minlength=n_classes) / np.maximum(counts, 1)).tolist(),
           "per_point_robust_acc": float(robust.mean())}
    if run["res"].get("pgd20_full"):  # PGD-20 on all 10,000 test points: 1,000 per class
        out["pgd20_full"] = run["res"]["pgd20_full"]["per_class_pgd20_acc"]
    return out


def classwise_by_method(cw: dict[str, dict], by_method: dict[str, list[dict]]):
    """(methods with class-wise numbers, kinds shown, {kind: [methods x classes] array of means over seeds}).
    The kinds are clean and robust, and pgd20_full when every such run has it."""
    methods = [m for m, rs in by_method.items() if any(r["name"] in cw for r in rs)]
    kinds = ["clean", "robust"]
    if methods and all("pgd20_full" in cw[r["name"]] for m in methods for r in by_method[m] if r["name"] in cw):
        kinds.append("pgd20_full")
    by_class = {kind: np.array([np.mean([cw[r["name"]][kind] for r in by_method[m] if r["name"] in cw], 0)
                                for m in methods]) for kind in kinds}
    return methods, kinds, by_class


def validation_summary(run: dict) -> dict:
    """The training-curve table's row: epochs logged, eps schedule, and (when validation PGD was logged) the
    final validation clean and PGD accuracy and the best PGD accuracy with its epoch."""
    e = run["epochs"]
    pgd = [(x["val_pgd_acc"], x["epoch"]) for x in e if x.get("val_pgd_acc") is not None]
    row = {"epochs": len(e), "eps_schedule": run["res"].get("config", {}).get("attack", {}).get("eps_schedule", "?")}
    if pgd:
        best = max(pgd)
        row.update(final_clean=e[-1].get("val_clean_acc", np.nan), final_pgd=pgd[-1][0], best_pgd=best[0],
                   best_epoch=best[1])
    return row


def at_eps(sweep: dict, eps: float | None) -> float | None:
    """The sweep's value at ``eps``: its keys are eps printed with 6 significant digits, matched to a relative
    1e-5; None when absent."""
    return next((v for k, v in sweep.items() if eps is not None and abs(float(k) - eps) <= 1e-5 * eps), None)


def masking_row(run: dict) -> dict:
    """The gradient-masking table's row: the flag and, as fractions, AutoAttack, PGD-20 at the training eps and
    at the huge eps, PGD breaking AutoAttack-robust points, points only Square broke."""
    h, res = run["honesty"], run["res"]
    sweep = h.get("pgd_acc_by_eps", {})
    return {"flagged": bool(res.get("suspicious_gradient_masking")), "aa": res["autoattack_acc"],
            "pgd_at_eps": at_eps(sweep, res.get("eps")), "pgd_huge_eps": at_eps(sweep, h.get("huge_eps")),
            "pgd_breaks_aa_robust": h.get("pgd_breaks_aa_robust_frac"), "square_only": h.get("square_only_frac")}


def check_summary_csv(csv_path: Path, runs: list[dict]) -> tuple[str, list[str]]:
    """("absent" | "consistent" | "mismatch", problems): whether run_study's summary.csv has exactly the
    finished runs, with their clean and AutoAttack accuracy (to 1e-9)."""
    if not csv_path.is_file():
        return "absent", []
    with csv_path.open() as f:
        rows = {f"{row['method']}_s{row['seed']}": row for row in csv.DictReader(f)}
    problems = []
    for r in runs:
        row = rows.get(r["name"])
        if row is None:
            problems.append(f"{r['name']} missing from summary.csv (rerun run_study.py to refresh it)")
            continue
        problems += [f"{r['name']}: {key} {row[key]} in summary.csv, {r['res'][key]} in results.json"
                     for key in ("clean_acc", "autoattack_acc") if abs(float(row[key]) - r["res"][key]) > 1e-9]
    names = {r["name"] for r in runs}
    problems += [f"{name} in summary.csv has no results.json" for name in rows if name not in names]
    return ("mismatch" if problems else "consistent"), problems


def substudy_runs(folder: Path) -> list[dict]:
    """The finished runs of a sub-study folder (kd/, ablations/): name without the seed, seed, load_run's
    results, and the config's ``method`` section as ``recipe``."""
    found = []
    for run_dir in sorted(p for p in (folder / "runs").glob("*_s*") if p.is_dir()):
        parsed, res = parse_run_name(run_dir.name), load_run(run_dir)
        if parsed and res is not None:
            found.append({"name": parsed[0], "seed": parsed[1], "res": res,
                          "recipe": res.get("config", {}).get("method", {})})
    return found


def substudy_table(folder: Path) -> str:
    """A sub-study's markdown table (its summary.md): ``advgkl summarize`` with the short columns."""
    return summarize.summarize([folder], columns=summarize.SHORT_COLUMNS, with_footnote=False)["markdown"]


def final_val(run_dir: Path) -> tuple[float | None, float | None]:
    """(validation clean accuracy, validation PGD accuracy) of the last logged epoch; Nones without a log."""
    epochs = logged_epochs(run_dir)
    last = epochs[-1] if epochs else {}
    return last.get("val_clean_acc"), last.get("val_pgd_acc")


def in_beta_sweep(res: dict) -> bool:
    """Whether a gkl_at run differs from the main constant-eps GKL-AT run (alpha 1, gamma 1, prior temperature
    4, symmetric, prior weights) at most in beta: the GKL rows of the tuning table."""
    m = res.get("config", {}).get("method", {})
    return (m.get("alpha") == 1.0 and m.get("gamma") == 1.0 and m.get("prior_temperature") == 4.0
            and m.get("symmetric", True) and m.get("weights", "prior") == "prior"
            and res.get("config", {}).get("attack", {}).get("eps_schedule") == "constant")


def tuning_rows(study: Path) -> list[dict]:
    """The validation-split rows of the tuning table, by (method, beta): every seed-0 run of ``tuning/``, the
    main study's seed-0 trades / mart / gkl_at runs and the ablations' gkl_at beta sweep."""
    rows = []
    for folder in (study / "tuning", study, study / "ablations"):
        for run_dir in sorted(p for p in (folder / "runs").glob("*_s0") if p.is_dir()):
            res = load_run(run_dir)
            m = (res or {}).get("config", {}).get("method", {})
            if res is None or folder == study and m.get("name") not in ("trades", "mart", "gkl_at"):
                continue
            if folder != study / "tuning" and m.get("name") == "gkl_at" and not in_beta_sweep(res):
                continue
            clean, pgd = final_val(run_dir)
            if pgd is not None:
                rows.append({"run": run_dir.name, "method": m.get("name"), "beta": m.get("beta"),
                             "val_clean": clean, "val_pgd": pgd})
    return sorted(rows, key=lambda r: (r["method"], r["beta"]))


def tuning_table(rows: list[dict]) -> str:
    """The tuning table (tuning/summary.md): method, beta, run, validation clean and PGD-10 accuracy in %."""
    cells = [[r["method"], f"{r['beta']:g}", r["run"], f"{100 * r['val_clean']:.2f}", f"{100 * r['val_pgd']:.2f}"]
             for r in rows]
    return markdown_table(["method", "beta", "run", "val clean %", "val PGD-10 %"], cells) + "\n"


def best_beta(rows: list[dict]) -> dict[str, dict]:
    """{method: its tuning row with the best validation PGD accuracy (the first on a tie)}."""
    return {m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_pgd"])
            for m in sorted({r["method"] for r in rows})}
