"""``advgkl summarize DIR...``: one table over run folders, the seeds of each setting collapsed.

A run is a folder with ``results.json`` (accuracies as fractions), named ``<name>_s<seed>`` by ``advgkl
sweep``; a DIR is a run, or holds runs (directly or under ``runs/``). Runs whose configs agree on
everything that changes the trained weights except the seed (``trainers.RESUMABLE_CHANGES`` and
``runtime.seed`` are left out) form one group, named after their folders without the seed and ordered by
mean AutoAttack accuracy, best first. Per group: mean ± sample std over seeds in %, the collapsed seeds,
the AutoAttack version and points, PGD-20 on the full test set where every run has ``pgd20_full.json``,
and the seeds flagged for gradient masking. Written as Markdown (``summary.md``), one CSV row per run
(``summary.csv``) and a bar plot (``summary.png``).
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError

COLLAPSED_BELOW = 0.2  # a run that ended below twice chance (10 classes): flagged, still in the mean
Z_95 = 1.959964  # two-sided 95 % quantile of the standard normal
DATASETS = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
NORMS = {"Linf": "L∞", "L2": "L2"}


# ------------------------------------------------------------------------------------------- runs
def load_run(run: Path) -> dict | None:
    """A finished run's results: its results.json, with the AutoAttack evaluation on the most test points
    (an ``aa<N>/results.json`` top-up where one exists) and the training job's seed, epochs and train time;
    ``pgd20_full`` holds pgd20_full.json or None. None while the run has no results.json."""
    if not (run / "results.json").is_file():
        return None
    trained = json.loads((run / "results.json").read_text())
    best = max([trained] + [json.loads(p.read_text()) for p in sorted(run.glob("aa*/results.json"))],
               key=lambda r: r["n_examples"])
    res = dict(best, seed=trained["seed"], epochs=trained["epochs"],
               wall_time_s={"train": trained["wall_time_s"]["train"], "eval": best["wall_time_s"]["eval"]})
    full = run / "pgd20_full.json"
    res["pgd20_full"] = json.loads(full.read_text()) if full.is_file() else None
    return res


def parse_run_name(name: str) -> tuple[str, int] | None:
    """``<name>_s<seed>`` -> (name, seed); None for a folder not named that way."""
    stem, sep, seed = name.rpartition("_s")
    return (stem, int(seed)) if sep and stem and seed.isdigit() else None


def run_folders(dirs: list[Path]) -> list[Path]:
    """The run folders in ``dirs``: a DIR with results.json is a run, else its ``runs/*`` or ``*`` folders."""
    found = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d} is not a folder of runs")
        if (d / "results.json").is_file():
            found.append(d)
        else:
            found += sorted(p for p in (d / "runs" if (d / "runs").is_dir() else d).iterdir() if p.is_dir())
    return found


def _setting(res: dict) -> str:
    """What the group key compares: the config without the seed and what a resume may change."""
    from .config import _flatten, from_saved
    from .trainers import RESUMABLE_CHANGES

    try:  # as this version reads it: keys added since an old run are not differences
        config = from_saved(res.get("config") or {}).to_dict()
    except (UserError, TypeError, ValueError):
        config = res.get("config") or {}
    flat = _flatten(config)
    return json.dumps({k: v for k, v in sorted(flat.items())
                       if k != "runtime.seed" and not k.startswith(RESUMABLE_CHANGES)}, default=str)


def collect(dirs: list[Path]) -> tuple[list[dict], list[str]]:
    """(finished runs, names of folders without results.json). A run is ``{"name", "stem", "seed", "res",
    "recipe"}`` (``recipe``: its config's method section)."""
    runs, unfinished = [], []
    for run_dir in run_folders(dirs):
        res = load_run(run_dir)
        if res is None:
            unfinished.append(run_dir.name)
            continue
        stem, seed = parse_run_name(run_dir.name) or (run_dir.name, res["seed"])
        runs.append({"name": run_dir.name, "stem": stem, "seed": seed, "res": res, "dir": run_dir,
                     "recipe": res.get("config", {}).get("method", {})})
    return runs, unfinished


def group(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs that differ only in the seed, by group name (the folder names without the seed; a name shared
    by two settings gets ``#2``...), the best mean AutoAttack accuracy first (ties by name)."""
    by_setting = defaultdict(list)
    for r in runs:
        by_setting[(r["stem"], _setting(r["res"]))].append(r)
    groups, taken = {}, defaultdict(int)
    for (stem, _), rs in by_setting.items():
        taken[stem] += 1
        groups[stem if taken[stem] == 1 else f"{stem}#{taken[stem]}"] = sorted(rs, key=lambda r: r["seed"])
    order = sorted(groups, key=lambda g: (-np.mean([_aa(r) for r in groups[g]]), g))
    return {g: groups[g] for g in order}


def _aa(run: dict) -> float:
    aa = run["res"]["autoattack_acc"]
    return aa if aa is not None else float("nan")


# ------------------------------------------------------------------------------------------- numbers
def pct_mean_std(values) -> tuple[float, float | None]:
    """Mean and sample std (ddof = 1) of fractions, in %; the std is None for a single value."""
    a = 100 * np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def fmt(mean: float, std: float | None) -> str:
    """``mean ± std`` to two decimals, or ``mean (n=1, no std)``."""
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (n=1, no std)"


def joined(values) -> str:
    """The distinct values, sorted, comma-separated."""
    return ", ".join(str(v) for v in sorted(set(values)))


def is_collapsed(res: dict) -> bool:
    """Whether the run's clean accuracy is below ``COLLAPSED_BELOW`` (0.2, twice chance)."""
    return res["clean_acc"] < COLLAPSED_BELOW


def subset_halfwidth_95(acc_pct: float, n_points: int) -> float:
    """95 % half-width, in %, of a binomial proportion ``acc_pct`` measured on ``n_points`` test points."""
    p = acc_pct / 100
    return 100 * Z_95 * float(np.sqrt(p * (1 - p) / n_points))


def summarise_group(rs: list[dict]) -> dict:
    """One group's numbers: means and stds in %, seeds, the collapsed and masking-flagged seeds, the
    AutoAttack versions and points, PGD-20 on the full test set (None unless every run has it)."""
    res = [r["res"] for r in rs]
    clean_mean, clean_std = pct_mean_std([x["clean_acc"] for x in res])
    aa_mean, aa_std = pct_mean_std([x["autoattack_acc"] for x in res])
    full = [x["pgd20_full"] for x in res if x.get("pgd20_full")]
    pgd_mean, pgd_std = pct_mean_std([f["pgd20_acc"] for f in full]) if len(full) == len(rs) else (None, None)
    return {
        "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
        "clean_mean": clean_mean, "clean_std": clean_std, "aa_mean": aa_mean, "aa_std": aa_std,
        "aa_test_subset_95": subset_halfwidth_95(aa_mean, min(x["n_examples"] for x in res)),
        "pgd20_full_mean": pgd_mean, "pgd20_full_std": pgd_std,
        "pgd20_points": sorted({f["n_examples"] for f in full if "n_examples" in f}),
        "models": sorted({x.get("model", "?") for x in res}),
        "autoattack_versions": sorted({x["autoattack_version"] for x in res}),
        "n_examples": sorted({x["n_examples"] for x in res}),
        "epochs": sorted({x.get("epochs") for x in res if x.get("epochs") is not None}),
        "train_hours": float(np.mean([(x.get("wall_time_s") or {}).get("train") or 0 for x in res])) / 3600,
        "collapsed": sorted(r["seed"] for r in rs if is_collapsed(r["res"])),
        "masking": sorted(r["seed"] for r in rs if r["res"].get("suspicious_gradient_masking")),
        "recipe": rs[0].get("recipe", {}),
    }


def describe_recipe(m: dict) -> str:
    """The method name, and for gkl_kd its loss and inputs."""
    if m.get("name") != "gkl_kd":
        return m.get("name", "?")
    return f"gkl_kd ({m.get('kd_loss')}, {'adversarial' if m.get('kd_adversarial') else 'natural'} inputs)"


def _points(n: int) -> str:
    return f"all {n // 1000}k" if n % 1000 == 0 else f"all {n}"


def _pgd(s: dict) -> str:
    return fmt(s["pgd20_full_mean"], s["pgd20_full_std"]) if s["pgd20_full_mean"] is not None else "-"


# column name -> (header, cell of one group's summary); headers with {pgd} name the PGD-20 points
COLUMNS = {
    "method": ("method", lambda g, s: g),
    "run": ("run", lambda g, s: g),
    "recipe": ("method", lambda g, s: describe_recipe(s["recipe"])),
    "runs": ("runs (seeds)", lambda g, s: f"{s['n']} ({joined(s['seeds'])})"),
    "seeds": ("seeds", lambda g, s: joined(s["seeds"])),
    "collapsed": ("collapsed", lambda g, s: f"seed {joined(s['collapsed'])}" if s["collapsed"] else "-"),
    "clean": ("clean %", lambda g, s: fmt(s["clean_mean"], s["clean_std"])),
    "autoattack": ("AutoAttack %", lambda g, s: fmt(s["aa_mean"], s["aa_std"])),
    "subset": ("± test subset (95%)", lambda g, s: f"± {s['aa_test_subset_95']:.1f}"),
    "pgd20": ("PGD-20 % ({pgd})", lambda g, s: _pgd(s)),
    "version": ("AutoAttack version", lambda g, s: joined(s["autoattack_versions"])),
    "points": ("test points", lambda g, s: joined(s["n_examples"])),
    "version_points": ("AA version (points)",
                       lambda g, s: f"{joined(s['autoattack_versions'])} ({joined(s['n_examples'])})"),
    "epochs": ("epochs", lambda g, s: joined(s["epochs"])),
    "model": ("model", lambda g, s: joined(s["models"])),
    "masking": ("masking", lambda g, s: f"seed {joined(s['masking'])}" if s["masking"] else "-"),
}
STUDY_COLUMNS = ("method", "runs", "collapsed", "clean", "autoattack", "subset", "pgd20", "version", "points",
                 "epochs", "model")  # the Fashion-MNIST study's main table
SHORT_COLUMNS = ("run", "recipe", "seeds", "clean", "autoattack", "version_points", "pgd20", "model")
DEFAULT_COLUMNS = ("method", "runs", "collapsed", "clean", "autoattack", "subset", "pgd20", "version", "points",
                   "epochs", "model", "masking")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table, without a trailing newline."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def table(summary: dict[str, dict], columns=DEFAULT_COLUMNS) -> str:
    """The groups of ``summary`` (``summarise_group`` by name, in order) as a markdown table, one row each;
    ``pgd20`` is left out when no group has PGD-20 on the full test set."""
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise UserError(f"--columns {', '.join(unknown)}: unknown; choose from {', '.join(COLUMNS)}")
    points = sorted({n for s in summary.values() for n in s["pgd20_points"]})
    if not points and all(s["pgd20_full_mean"] is None for s in summary.values()):
        columns = [c for c in columns if c != "pgd20"]
    pgd = _points(points[0]) if len(points) == 1 else "full test set"
    head = [COLUMNS[c][0].format(pgd=pgd) for c in columns]
    return markdown_table(head, [[COLUMNS[c][1](g, s) for c in columns] for g, s in summary.items()])


def footnote(runs: list[dict], source: str, written_by: str = "advgkl summarize") -> str:
    """What the table's numbers are: dataset, eps, the statistics and where they come from."""
    res = [r["res"] for r in runs]
    data = joined(DATASETS.get(_dataset(x), _dataset(x)) for x in res)
    norms = joined(NORMS.get(x.get("norm") or x.get("config", {}).get("attack", {}).get("norm"), "?") for x in res)
    full = sorted({x["pgd20_full"]["n_examples"] for x in res if x.get("pgd20_full")})
    pgd = (f" PGD-20 (CE, random start) on all {joined(f'{n:,}' for n in full)} test points, '-' where a run lacks "
           "it." if full else "")
    return (f"{data}, {norms} eps = {joined(x.get('eps') for x in res)}; mean ± sample std over seeds (n=1: a single "
            f"seed, no std), collapsed runs (training ended below {100 * COLLAPSED_BELOW:g} % clean accuracy, chance "
            f"is 10 %) included; AutoAttack on the first n test points of each run;{pgd} Written by {written_by} "
            f"from {source}/results.json.")


def _dataset(res: dict) -> str:
    return res.get("dataset", res.get("config", {}).get("data", {}).get("dataset", "?"))


def runs_csv(runs: list[dict], path: Path) -> Path | None:
    """``summary.csv``: one row per run (name without the seed, seed, accuracies as fractions, AutoAttack
    version and points, times, masking flag, PGD-20 on the full test set, accuracy after each attack)."""
    rows = []
    for r in sorted(runs, key=lambda r: r["name"]):
        x = r["res"]
        row = {"method": r["stem"], "seed": r["seed"], "clean_acc": x["clean_acc"],
               "autoattack_acc": x["autoattack_acc"],
               "autoattack_version": x["autoattack_version"], "n_examples": x["n_examples"], "epochs": x["epochs"],
               "train_time_s": round(x["wall_time_s"]["train"], 1), "eval_time_s": round(x["wall_time_s"]["eval"], 1),
               "suspicious_gradient_masking": x.get("suspicious_gradient_masking")}
        if x["pgd20_full"] is not None:
            p = x["pgd20_full"]
            row.update(clean_acc_full=p["clean_acc"], pgd20_acc_full=p["pgd20_acc"], n_full=p["n_examples"])
        row.update({f"aa_{k}": v for k, v in x["per_attack_robust_acc"].items() if k != "clean"})
        rows.append(row)
    if not rows:
        return None
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(summary: dict[str, dict], by_group: dict[str, list[dict]], eps_values, path: Path | None = None):
    """Clean and AutoAttack accuracy per group (bars: mean ± std; dots: the seeds); saved to ``path``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.38
    for j, (key, label, hatch) in enumerate([("clean", "clean", ""), ("aa", "AutoAttack", "//")]):
        means = [summary[m][f"{key}_mean"] for m in names]
        stds = [summary[m][f"{key}_std"] or 0.0 for m in names]
        pos = x + (j - 0.5) * width
        ax.bar(pos, means, width, yerr=stds, capsize=3, color=[colors[m] for m in names],
               alpha=0.45 if key == "clean" else 0.9, hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
        for i, m in enumerate(names):  # every seed as a dot: n is visible, not only the mean
            seeds = [100 * r["res"]["clean_acc" if key == "clean" else "autoattack_acc"] for r in by_group[m]]
            ax.plot([pos[i]] * len(seeds), seeds, "k.", markersize=5)
            ax.text(pos[i], means[i] + stds[i] + 0.8, f"{means[i]:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xlim(-0.7, len(names) - 0.3)  # a single group keeps the bar width of many
    ax.set_xticklabels([f"{m}\n(n={summary[m]['n']})" for m in names], fontsize=8)
    top = max(summary[m]["clean_mean"] + (summary[m]["clean_std"] or 0) for m in names)
    data = joined(DATASETS.get(_dataset(r["res"]), _dataset(r["res"])) for rs in by_group.values() for r in rs)
    ax.set(ylabel="accuracy %", ylim=(0, min(100, top + 10)),
           title=f"{data}, L∞ eps = {joined(eps_values)}: clean and AutoAttack "
                 f"({joined(v for s in summary.values() for v in s['autoattack_versions'])}, "
                 f"first {joined(n for s in summary.values() for n in s['n_examples'])} test points)")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def summarize(dirs: list[Path], *, md: Path | None = None, csv_path: Path | None = None, png: Path | None = None,
              columns=DEFAULT_COLUMNS, with_footnote: bool = True, written_by: str = "advgkl summarize",
              source: str | None = None) -> dict:
    """Collect, group and write; returns {"runs", "unfinished", "groups" (runs by group), "summary"
    (``summarise_group`` by group), "markdown"}. Nothing is written without finished runs. ``source``: how
    the footnote names the folders (default: ``dirs`` as given)."""
    runs, unfinished = collect(dirs)
    if not runs:
        raise UserError(f"no finished runs (folders with results.json) in {', '.join(map(str, dirs))}")
    groups = group(runs)
    summary = {g: summarise_group(rs) for g, rs in groups.items()}
    text = table(summary, columns) + "\n"
    if with_footnote:
        sources = [str(d).rstrip("/") + ("/runs/*" if (Path(d) / "runs").is_dir() else "/*") for d in dirs]
        text += "\n" + footnote(runs, source or ", ".join(sources), written_by) + "\n"
    if md is not None:
        Path(md).write_text(text)
    if csv_path is not None:
        runs_csv(runs, Path(csv_path))
    if png is not None:
        import matplotlib.pyplot as plt

        plt.close(plot(summary, groups, sorted({r["res"].get("eps") for r in runs}), Path(png)))
    return {"runs": runs, "unfinished": unfinished, "groups": groups, "summary": summary, "markdown": text}
