"""Writes notebooks/02_fmnist_study.ipynb (outputs cleared): python notebooks/make_02.py

The notebook is generated so that its source lives in one reviewable Python file; edit here, re-run,
commit both. tests/test_notebooks.py executes it and reads the `NOTEBOOK_RESULTS {...}` line it prints.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nbgen beside this file, also when imported by path
from nbgen import build_notebook, write_notebook  # noqa: E402

CELLS = [
    ("md", r"""# The Fashion-MNIST study: methods compared under AutoAttack

Tables and plots from the study's committed results; nothing here trains or attacks a model. Each finished
run is a folder `experiments/fmnist_study/results/runs/<method>_s<seed>/` written by
`experiments/fmnist_study/run_study.py`, with `results.json` (clean and AutoAttack accuracy, per-point
outcomes, the gradient-masking checks), `metrics.jsonl` (one line per epoch) and `config.yaml`. The notebook
uses whatever runs exist: the methods are the folder names without `_s<seed>`, and a run without
`results.json` is still training (or was interrupted) and is listed, not used.

* **Mean ± std** is over seeds, with the sample standard deviation (ddof = 1). A method with a single
  finished seed shows its one value marked `n=1, no std`: until it has more seeds, its difference to
  another method cannot be compared with the seed-to-seed spread.
* **AutoAttack** is evaluated on the first `n_examples` test points of each run (the table says how many
  and which AutoAttack version). The binomial noise of a finite test subset is reported next to it.
* Robust accuracy vs eps uses the PGD-20 sweep of the gradient-masking checks (0.25–4 × the training eps plus
  a huge eps that reaches every image), on the same test points as AutoAttack.

Environment variables: `ADVGKL_STUDY_DIR` reads another results folder (relative paths are taken from the
repository root); `ADVGKL_WRITE_FIGURES=1` also writes `summary.png` (the method comparison plot) and
`summary.md` (the markdown table printed below) into that folder. To refresh the README's table and plot:

    ADVGKL_WRITE_FIGURES=1 .venv/bin/jupyter execute notebooks/02_fmnist_study.ipynb

The last cell prints the numbers `tests/test_notebooks.py` checks."""),
    ("code", r"""import importlib.util
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to PNG and displayed explicitly
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import advgkl
from advgkl.data import DEFAULT_ROOT, dataset_info, load_dataset


def find_root() -> Path:
    # the kernel starts in notebooks/ (or wherever Jupyter was launched): look upwards for the study
    for p in (Path.cwd(), *Path.cwd().parents):
        if (p / "experiments" / "fmnist_study").is_dir():
            return p
    return Path(advgkl.__file__).resolve().parents[1]


ROOT = find_root()
STUDY_DIR = Path(os.environ.get("ADVGKL_STUDY_DIR") or ROOT / "experiments" / "fmnist_study" / "results")
STUDY_DIR = STUDY_DIR.expanduser() if STUDY_DIR.expanduser().is_absolute() else ROOT / STUDY_DIR
WRITE_FIGURES = os.environ.get("ADVGKL_WRITE_FIGURES") == "1"
RESULTS = {"study_dir": str(STUDY_DIR), "figure_written": None, "table_written": None}  # what the tests read


def show(fig, save_to=None):
    if save_to is not None:
        fig.savefig(save_to, dpi=120, bbox_inches="tight")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # blank line, or a partial last line left by a killed run
    return rows


# one rule for "a run's results", shared with the driver's summary.csv: run_study.load_run
_spec = importlib.util.spec_from_file_location("run_study", ROOT / "experiments" / "fmnist_study" / "run_study.py")
run_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_study)
load_run = run_study.load_run

print(f"study results: {STUDY_DIR}")"""),
    ("md", r"""## 1. The runs

A run counts once its `results.json` exists (the driver writes it after the final evaluation). The headline
numbers are those of the weights the run evaluated (`evaluated_weights`: `final`, or `ema` when EMA is on).
Where the driver later re-evaluated a run's final weights with standard AutoAttack on more test points
(`aa<N>/results.json`, for runs first evaluated on fewer), the evaluation on the most points is used, as in
`summary.csv`; `pgd20_full.json` is PGD-20 on all 10,000 test points."""),
    ("code", r"""runs, unfinished, unnamed = [], [], []
for run_dir in sorted(p for p in (STUDY_DIR / "runs").glob("*") if p.is_dir()):
    method, sep, seed = run_dir.name.rpartition("_s")
    if not (sep and method and seed.isdigit()):
        unnamed.append(run_dir.name)
        continue
    if not (run_dir / "results.json").is_file():
        unfinished.append(run_dir.name)
        continue
    res = load_run(run_dir)  # the AutoAttack evaluation on the most points, train time and PGD-20 on 10k
    which = res.get("evaluated_weights", "final")
    evaluation = res.get("evaluations", {}).get(which, {})
    by_epoch = {m["epoch"]: m for m in read_jsonl(run_dir / "metrics.jsonl") if "epoch" in m}  # last wins on resume
    runs.append({"name": run_dir.name, "method": method, "seed": int(seed), "res": res, "which": which,
                 "honesty": evaluation.get("honesty", {}), "points": res["per_point"][which],
                 "epochs": [by_epoch[e] for e in sorted(by_epoch)]})

by_method = defaultdict(list)
for run in runs:
    by_method[run["method"]].append(run)
# one order everywhere: best mean AutoAttack accuracy first
METHODS = sorted(by_method, key=lambda m: (-np.mean([r["res"]["autoattack_acc"] for r in by_method[m]]), m))
COLORS = {m: plt.cm.tab10(i % 10) for i, m in enumerate(METHODS)}

print(f"{len(runs)} finished run(s) of {len(METHODS)} method(s)")
for m in METHODS:
    seeds = sorted(r["seed"] for r in by_method[m])
    print(f"  {m:<24} seeds {seeds}" + ("   (one seed: mean only, no std)" if len(seeds) == 1 else ""))
if unfinished:
    print(f"not finished (no results.json yet), left out: {', '.join(unfinished)}")
if unnamed:
    print(f"folders not named <method>_s<seed>, left out: {', '.join(unnamed)}")
if not runs:
    print(f"no finished runs under {STUDY_DIR / 'runs'}: the sections below have nothing to show")
RESULTS["n_runs"] = len(runs)
RESULTS["unfinished"] = unfinished"""),
    ("md", r"""## 2. Method comparison

Clean and AutoAttack accuracy in %, mean ± sample std over seeds. The `± test subset` column is the 95 %
half-width of a binomial proportion over the run's `n_examples` test points: the noise from evaluating on a
subset, which seeds do not average away (every seed is evaluated on the same points). The markdown table is
the one the README shows."""),
    ("code", r"""def pct_mean_std(values):
    a = 100 * np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def fmt(mean, std):
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (n=1, no std)"


def joined(values):
    return ", ".join(str(v) for v in sorted(set(values)))


# a run that ended at or near chance (clean accuracy below twice 1/10): it still counts in the mean
COLLAPSED_BELOW = 0.2
summary = {}
for m in METHODS:
    rs = by_method[m]
    clean_mean, clean_std = pct_mean_std([r["res"]["clean_acc"] for r in rs])
    aa_mean, aa_std = pct_mean_std([r["res"]["autoattack_acc"] for r in rs])
    n_points = min(r["res"]["n_examples"] for r in rs)
    p = aa_mean / 100
    full = [r["res"]["pgd20_full"] for r in rs if r["res"].get("pgd20_full")]
    pgd_mean, pgd_std = pct_mean_std([f["pgd20_acc"] for f in full]) if len(full) == len(rs) else (None, None)
    summary[m] = {
        "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
        "clean_mean": clean_mean, "clean_std": clean_std, "aa_mean": aa_mean, "aa_std": aa_std,
        "aa_test_subset_95": 100 * 1.959964 * float(np.sqrt(p * (1 - p) / n_points)),
        "pgd20_full_mean": pgd_mean, "pgd20_full_std": pgd_std,
        "models": sorted({r["res"].get("model", "?") for r in rs}),
        "autoattack_versions": sorted({r["res"]["autoattack_version"] for r in rs}),
        "n_examples": sorted({r["res"]["n_examples"] for r in rs}),
        "epochs": sorted({r["res"].get("epochs") for r in rs if r["res"].get("epochs") is not None}),
        "train_hours": float(np.mean([(r["res"].get("wall_time_s") or {}).get("train") or 0 for r in rs])) / 3600,
        "collapsed": sorted(r["seed"] for r in rs if r["res"]["clean_acc"] < COLLAPSED_BELOW),
    }

head = ["method", "runs (seeds)", "collapsed", "clean %", "AutoAttack %", "± test subset (95%)",
        "PGD-20 % (all 10k)", "AutoAttack version", "test points", "epochs", "model"]
rows = [[m, f"{s['n']} ({joined(s['seeds'])})",
         f"seed {joined(s['collapsed'])}" if s["collapsed"] else "-",
         fmt(s["clean_mean"], s["clean_std"]), fmt(s["aa_mean"], s["aa_std"]),
         f"± {s['aa_test_subset_95']:.1f}",
         fmt(s["pgd20_full_mean"], s["pgd20_full_std"]) if s["pgd20_full_mean"] is not None else "-",
         joined(s["autoattack_versions"]), joined(s["n_examples"]), joined(s["epochs"]), joined(s["models"])]
        for m, s in summary.items()]
eps_values = sorted({r["res"].get("eps") for r in runs})
source = STUDY_DIR.relative_to(ROOT) if STUDY_DIR.is_relative_to(ROOT) else STUDY_DIR
footnote = (f"Fashion-MNIST, L∞ eps = {joined(eps_values)}; mean ± sample std over seeds (n=1: a single seed, "
            f"no std), collapsed runs (training ended below {100 * COLLAPSED_BELOW:g} % clean accuracy, chance is 10 %) "
            f"included; "
            f"AutoAttack on the first n test points of each run; PGD-20 (CE, random start) on all "
            f"10,000 test points, '-' where a run lacks it. Written by "
            f"notebooks/02_fmnist_study.ipynb from {source}/runs/*/results.json.")
TABLE_MD = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows]) + "\n\n" + footnote + "\n"
print("README table (markdown):\n")
print(TABLE_MD)
if WRITE_FIGURES and runs:
    (STUDY_DIR / "summary.md").write_text(TABLE_MD)
    RESULTS["table_written"] = str(STUDY_DIR / "summary.md")
    print(f"wrote {STUDY_DIR / 'summary.md'}")

mixed = [m for m, s in summary.items() if len(s["autoattack_versions"]) > 1 or len(s["n_examples"]) > 1]
if mixed:
    print(f"warning: runs of {', '.join(mixed)} differ in AutoAttack version or test points: their mean mixes "
          "evaluations that are not comparable")
if any(v != "standard" for s in summary.values() for v in s["autoattack_versions"]):
    print("note: a non-'standard' AutoAttack version is a screening number, not a headline number")

# Is a gap larger than the seed-to-seed spread? Welch's standard error of a difference of two means;
# with 2-3 seeds per method this is a rough yardstick, not a test.
if len(METHODS) > 1:
    best = METHODS[0]
    print(f"\nAutoAttack gap to the best method ({best}), against the seed-to-seed spread:")
    for m in METHODS[1:]:
        a, b = summary[best], summary[m]
        gap = a["aa_mean"] - b["aa_mean"]
        if a["aa_std"] is None or b["aa_std"] is None:
            print(f"  {m:<24} {gap:5.2f} pp   no seed spread yet (a method with one seed)")
        else:
            se = float(np.sqrt(a["aa_std"] ** 2 / a["n"] + b["aa_std"] ** 2 / b["n"]))
            print(f"  {m:<24} {gap:5.2f} pp   seed std {a['aa_std']:.2f} / {b['aa_std']:.2f} pp, standard error of "
                  f"the gap {se:.2f} pp: {'more' if gap > 2 * se else 'not more'} than 2 standard errors")

attacks = list(dict.fromkeys(k for r in runs for k in r["res"]["per_attack_robust_acc"]))
print("\nrobust accuracy % after each AutoAttack stage (mean over seeds; 'clean' = before any attack):")
print(f"{'method':<24}" + "".join(f"{a:>10}" for a in attacks))
for m in METHODS:
    vals = [np.mean([r["res"]["per_attack_robust_acc"].get(a, np.nan) for r in by_method[m]]) for a in attacks]
    print(f"{m:<24}" + "".join(f"{100 * v:>10.2f}" for v in vals))
RESULTS["methods"] = summary
RESULTS["table_rows"] = len(rows)"""),
    ("code", r"""def comparison_plot():
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(METHODS) + 2), 4))
    x = np.arange(len(METHODS))
    width = 0.38
    for j, (key, label, hatch) in enumerate([("clean", "clean", ""), ("aa", "AutoAttack", "//")]):
        means = [summary[m][f"{key}_mean"] for m in METHODS]
        stds = [summary[m][f"{key}_std"] or 0.0 for m in METHODS]
        pos = x + (j - 0.5) * width
        ax.bar(pos, means, width, yerr=stds, capsize=3, color=[COLORS[m] for m in METHODS],
               alpha=0.45 if key == "clean" else 0.9, hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
        for i, m in enumerate(METHODS):  # every seed as a dot: n is visible, not only the mean
            seeds = [100 * r["res"]["clean_acc" if key == "clean" else "autoattack_acc"] for r in by_method[m]]
            ax.plot([pos[i]] * len(seeds), seeds, "k.", markersize=5)
            ax.text(pos[i], means[i] + stds[i] + 0.8, f"{means[i]:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xlim(-0.7, len(METHODS) - 0.3)  # a single method keeps the bar width of many
    ax.set_xticklabels([f"{m}\n(n={summary[m]['n']})" for m in METHODS], fontsize=8)
    top = max(summary[m]["clean_mean"] + (summary[m]["clean_std"] or 0) for m in METHODS)
    ax.set(ylabel="accuracy %", ylim=(0, min(100, top + 10)),
           title=f"Fashion-MNIST, L∞ eps = {joined(eps_values)}: clean and AutoAttack "
                 f"({joined(v for s in summary.values() for v in s['autoattack_versions'])}, "
                 f"first {joined(n for s in summary.values() for n in s['n_examples'])} test points)")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    save_to = STUDY_DIR / "summary.png" if WRITE_FIGURES else None
    show(fig, save_to)
    if save_to is not None:
        RESULTS["figure_written"] = str(save_to)
        print(f"wrote {save_to}")


comparison_plot() if runs else print("no runs: no plot")"""),
    ("md", r"""## 3. Robust accuracy vs eps

PGD-20 (cross-entropy, random start) accuracy at 0.25, 0.5, 1, 2 and 4 × the training eps and at a huge eps
that reaches every image, from the gradient-masking check of each run; the band is ± one std over seeds where
a method has several. The star is AutoAttack at the training eps (dashed line): it should sit at or below the
PGD curve, and the curve should fall to ~0 at the huge eps."""),
    ("code", r"""def eps_curves():
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in METHODS:
        sweeps = [{float(k): v for k, v in r["honesty"].get("pgd_acc_by_eps", {}).items()} for r in by_method[m]]
        sweeps = [s for s in sweeps if s]
        if not sweeps:
            print(f"{m}: no PGD eps sweep in results.json (honesty checks off)")
            continue
        grid = sorted(set.intersection(*(set(s) for s in sweeps)))
        acc = 100 * np.array([[s[e] for e in grid] for s in sweeps])
        mean = acc.mean(0)
        ax.plot(grid, mean, marker="o", color=COLORS[m], label=f"{m} (n={len(sweeps)})")
        if len(sweeps) > 1:
            std = acc.std(0, ddof=1)
            ax.fill_between(grid, mean - std, mean + std, color=COLORS[m], alpha=0.2)
        eps = by_method[m][0]["res"].get("eps")
        ax.plot([eps], [summary[m]["aa_mean"]], marker="*", markersize=13, color=COLORS[m], markeredgecolor="black")
        curve[m] = {f"{e:g}": float(v) for e, v in zip(grid, mean)}
    for eps in eps_values:
        ax.axvline(eps, color="gray", linestyle="--", linewidth=1)
    ax.set(xscale="log", xlabel="L∞ eps (log scale)", ylabel="PGD-20 accuracy %", ylim=(-2, 100),
           title="robust accuracy vs eps (star: AutoAttack at the training eps)")
    ax.legend(fontsize=8)
    show(fig)
    print(f"{'method':<24}" + "".join(f"{e:>9}" for e in next(iter(curve.values()), {})))
    for m, c in curve.items():
        print(f"{m:<24}" + "".join(f"{v:>9.1f}" for v in c.values()))


curve = {}
eps_curves() if runs else print("no runs: no curves")
RESULTS["pgd_acc_by_eps"] = curve"""),
    ("md", r"""## 4. Class-wise accuracy

The evaluated points are the first `n_examples` Fashion-MNIST test images, so each run's per-point outcomes
(`per_point.robust_correct`, AutoAttack's per-point verdict) are matched with the test labels. A class holds
about a tenth of the points (about 100 of 1,000), so one point moves its accuracy by ~1 pp: read large
differences between classes, not small differences between methods. Where every run has `pgd20_full.json`, a
third panel shows PGD-20 on all 10,000 test points (1,000 per class), the less noisy per-class view. The upper-body garments (T-shirt, Pullover, Coat,
Shirt) look alike and are where a Fashion-MNIST classifier makes most of its mistakes; GKL's class-prior
weights are built from exactly these confusions."""),
    ("code", r"""info = dataset_info("fashion_mnist")
CLASSES = list(info.class_names)
_, test_labels = load_dataset("fashion_mnist", DEFAULT_ROOT, train=False)
test_labels = test_labels.numpy()

classwise = {}  # run name -> per-class clean / robust accuracy and counts
for r in runs:
    if r["res"].get("dataset", r["res"].get("config", {}).get("data", {}).get("dataset")) != "fashion_mnist":
        print(f"{r['name']}: not a Fashion-MNIST run, left out")
        continue
    robust = np.asarray(r["points"]["robust_correct"], dtype=float)
    clean = np.asarray(r["points"]["clean_correct"], dtype=float)
    y = test_labels[:len(robust)]
    counts = np.bincount(y, minlength=len(CLASSES))
    classwise[r["name"]] = {
        "counts": counts.tolist(),
        "clean": (np.bincount(y, weights=clean, minlength=len(CLASSES)) / np.maximum(counts, 1)).tolist(),
        "robust": (np.bincount(y, weights=robust, minlength=len(CLASSES)) / np.maximum(counts, 1)).tolist(),
        "per_point_robust_acc": float(robust.mean()),
    }
    if r["res"].get("pgd20_full"):  # PGD-20 on all 10,000 test points: 1,000 per class
        classwise[r["name"]]["pgd20_full"] = r["res"]["pgd20_full"]["per_class_pgd20_acc"]
    if abs(robust.mean() - r["res"]["autoattack_acc"]) > 0.5 / len(robust):
        print(f"warning: {r['name']}: per-point robust accuracy {robust.mean():.4f} differs from the headline "
              f"{r['res']['autoattack_acc']:.4f}")

class_methods = [m for m in METHODS if any(r["name"] in classwise for r in by_method[m])]
KINDS = ["clean", "robust"]
if class_methods and all("pgd20_full" in classwise[r["name"]] for m in class_methods for r in by_method[m]):
    KINDS.append("pgd20_full")
TITLES = {"clean": "clean accuracy % per class", "robust": "AutoAttack accuracy % per class (first n points)",
          "pgd20_full": "PGD-20 accuracy % per class (all 10,000)"}
by_class = {kind: np.array([np.mean([classwise[r["name"]][kind] for r in by_method[m] if r["name"] in classwise], 0)
                            for m in class_methods]) for kind in KINDS}


def classwise_plot():
    fig, axes = plt.subplots(1, len(KINDS), figsize=(7.5 * len(KINDS), 0.55 * len(class_methods) + 2.2), sharey=True)
    for ax, kind in zip(axes, KINDS):
        data = 100 * by_class[kind]
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] < 60 else "black")
        ax.set(title=TITLES[kind],
               xticks=range(len(CLASSES)), yticks=range(len(class_methods)))
        ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    axes[0].set_yticklabels([f"{m} (n={len(by_method[m])})" for m in class_methods])
    fig.colorbar(im, ax=axes, shrink=0.8)
    show(fig)
    counts = next(iter(classwise.values()))["counts"]
    print("test points per class: " + ", ".join(f"{c} {k}" for c, k in zip(CLASSES, counts)))
    kind = KINDS[-1]  # the most points available
    for m, row in zip(class_methods, by_class[kind]):
        order = np.argsort(row)
        print(f"{m:<24} weakest ({TITLES[kind].split(' %')[0]}): "
              + ", ".join(f"{CLASSES[i]} {100 * row[i]:.0f}%" for i in order[:3]))


classwise_plot() if class_methods else print("no Fashion-MNIST runs: no class-wise accuracy")
RESULTS["classwise"] = classwise
RESULTS["classwise_robust_by_method"] = {m: row.tolist() for m, row in zip(class_methods, by_class["robust"])}"""),
    ("md", r"""## 5. Training curves

From each run's `metrics.jsonl`: training loss, and clean / PGD accuracy on the held-out validation split at
the end of each epoch (the validation PGD is the cheap one configured in `eval.val_pgd_steps`, not
AutoAttack). The training losses of different methods are different functions (CE on adversarial inputs,
TRADES, MART, GKL) and are only comparable within a method; with `attack.eps_schedule: linear` the training eps
grows during the first epochs, so the loss can rise while the model improves."""),
    ("code", r"""def training_curves():
    keys = [("train_loss", "training loss"), ("val_clean_acc", "validation clean accuracy %"),
            ("val_pgd_acc", "validation PGD accuracy %")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")  # room for the eps axis
    labelled = set()
    for r in runs:
        m = r["method"]
        for ax, (key, title) in zip(axes, keys):
            points = [(e["epoch"], e[key]) for e in r["epochs"] if e.get(key) is not None]
            if points:
                ep, v = zip(*points)
                scale = 1 if key == "train_loss" else 100
                ax.plot(ep, [scale * x for x in v], marker=".", color=COLORS[m],
                        label=m if m not in labelled else None)
                labelled.add(m)
    for ax, (_, title) in zip(axes, keys):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    eps_axis = axes[0].twinx()  # the eps ramp explains most of the loss's shape in the first epochs
    for r in runs:
        points = [(e["epoch"], e["eps"]) for e in r["epochs"] if e.get("eps") is not None]
        if points:
            eps_axis.plot(*zip(*points), color="gray", linestyle=":", linewidth=1)
    eps_axis.set_ylabel("training eps (gray dotted)", color="gray")
    eps_axis.tick_params(axis="y", colors="gray")
    axes[0].legend(fontsize=8)
    show(fig)
    print(f"{'run':<28}{'epochs':>7}{'eps sched.':>11}{'final val clean':>17}{'final val PGD':>15}"
          f"{'best PGD (epoch)':>18}")
    for r in runs:
        e = r["epochs"]
        pgd = [(x["val_pgd_acc"], x["epoch"]) for x in e if x.get("val_pgd_acc") is not None]
        sched = r["res"].get("config", {}).get("attack", {}).get("eps_schedule", "?")
        if not pgd:
            print(f"{r['name']:<28}{len(e):>7}{sched:>11}   (no validation metrics in metrics.jsonl)")
            continue
        best = max(pgd)
        print(f"{r['name']:<28}{len(e):>7}{sched:>11}{100 * e[-1].get('val_clean_acc', np.nan):>16.1f}%"
              f"{100 * pgd[-1][0]:>14.1f}%{100 * best[0]:>11.1f}% ({best[1]})")


training_curves() if runs else print("no runs: no curves")
RESULTS["epochs_logged"] = {r["name"]: len(r["epochs"]) for r in runs}"""),
    ("md", r"""## 6. Gradient-masking checks

Every evaluation runs four cheap checks (`advgkl/honesty.py`): PGD-20 must not break points AutoAttack left
robust, accuracy must fall to ~0 at the huge eps, must not rise with eps, and the black-box Square attack must
not break points every white-box attack failed on. A flagged run's robust accuracy is not to be trusted."""),
    ("code", r"""def at_eps(sweep: dict, eps):
    # keys are eps printed with 6 significant digits: match, don't compare floats exactly
    return next((v for k, v in sweep.items() if eps is not None and abs(float(k) - eps) <= 1e-5 * eps), None)


def pct(v):
    return f"{100 * v:.1f}" if v is not None else "-"


print("all numbers in % of the evaluated test points")
print(f"{'run':<28}{'flag':>6}{'AA':>7}{'PGD-20':>8}{'huge eps':>10}{'PGD breaks AA-robust':>22}{'Square only':>13}")
flagged = []
for r in runs:
    h, res = r["honesty"], r["res"]
    sweep = h.get("pgd_acc_by_eps", {})
    flag = bool(res.get("suspicious_gradient_masking"))
    flagged += [r["name"]] if flag else []
    print(f"{r['name']:<28}{'YES' if flag else 'no':>6}{pct(res['autoattack_acc']):>7}"
          f"{pct(at_eps(sweep, res.get('eps'))):>8}{pct(at_eps(sweep, h.get('huge_eps'))):>10}"
          f"{pct(h.get('pgd_breaks_aa_robust_frac')):>22}{pct(h.get('square_only_frac')):>13}")
    for w in res.get("warnings", []):
        print(f"    warning: {w}")
    if not h:
        print("    (no honesty checks in results.json)")
print(f"\n{len(flagged)} of {len(runs)} run(s) flagged for gradient masking"
      + (f": {', '.join(flagged)}" if flagged else ""))
RESULTS["masking_flagged"] = flagged"""),
    ("md", r"""## 7. `summary.csv`

`run_study.py` writes `results/summary.csv` (one row per finished run) at the end of a sitting. Everything above
is computed from the per-run `results.json`; the CSV, when it exists, must agree with them."""),
    ("code", r"""import csv

csv_path = STUDY_DIR / "summary.csv"
if not csv_path.is_file():
    RESULTS["summary_csv"] = "absent"
    print("no summary.csv: the numbers above come from the per-run results.json")
else:
    rows_csv = {f"{row['method']}_s{row['seed']}": row for row in csv.DictReader(csv_path.open())}
    problems = []
    for r in runs:
        row = rows_csv.get(r["name"])
        if row is None:
            problems.append(f"{r['name']} missing from summary.csv (rerun run_study.py to refresh it)")
            continue
        for key in ("clean_acc", "autoattack_acc"):
            if abs(float(row[key]) - r["res"][key]) > 1e-9:
                problems.append(f"{r['name']}: {key} {row[key]} in summary.csv, {r['res'][key]} in results.json")
    names = {r["name"] for r in runs}
    problems += [f"{name} in summary.csv has no results.json" for name in rows_csv if name not in names]
    RESULTS["summary_csv"] = "mismatch" if problems else "consistent"
    print("\n".join(problems) if problems else f"summary.csv agrees with the {len(runs)} results.json file(s)")"""),
    ("md", r"""## 8. Robust distillation and the GKL ablations

Two smaller studies live beside the main one, each in a subfolder with the same layout (`runs/<name>_s<seed>/`):
`kd/` distils the robust small_cnn teacher into the mini_cnn student (KL vs GKL, natural vs adversarial inputs,
and the student trained with PGD-AT alone as the reference), evaluated with standard AutoAttack; `ablations/`
changes one thing at a time in GKL-AT and is evaluated with the labelled fast screening attack (APGD-CE +
APGD-T) on fewer points, so its AutoAttack column is not comparable with the main table's; PGD-20 on all 10,000
test points is the comparable column there. With `ADVGKL_WRITE_FIGURES=1` each table is also written to
`<subfolder>/summary.md`."""),
    ("code", r"""def substudy(folder: Path) -> list[dict]:
    found = []
    for run_dir in sorted(p for p in (folder / "runs").glob("*_s*") if p.is_dir()):
        res = load_run(run_dir)
        if res is None:
            continue
        name, _, seed = run_dir.name.rpartition("_s")
        m = res.get("config", {}).get("method", {})
        found.append({"name": name, "seed": int(seed), "res": res, "method": m})
    return found


def substudy_table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for row in rows:
        groups[row["name"]].append(row)
    head = ["run", "method", "seeds", "clean %", "AutoAttack %", "AA version (points)", "PGD-20 % (all 10k)", "model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda n: -np.mean([r["res"]["autoattack_acc"] for r in groups[n]]))
    for n in order:
        rs = groups[n]
        full = [r["res"]["pgd20_full"]["pgd20_acc"] for r in rs if r["res"].get("pgd20_full")]
        m = rs[0]["method"]
        what = m.get("name", "?") + (f" ({m.get('kd_loss')}, {'adversarial' if m.get('kd_adversarial') else 'natural'}"
                                     " inputs)" if m.get("name") == "gkl_kd" else "")
        lines.append("| " + " | ".join([
            n, what, joined(r["seed"] for r in rs), fmt(*pct_mean_std([r["res"]["clean_acc"] for r in rs])),
            fmt(*pct_mean_std([r["res"]["autoattack_acc"] for r in rs])),
            f"{joined(r['res']['autoattack_version'] for r in rs)} ({joined(r['res']['n_examples'] for r in rs)})",
            fmt(*pct_mean_std(full)) if len(full) == len(rs) else "-",
            joined(r["res"].get("model", "?") for r in rs)]) + " |")
    return "\n".join(lines) + "\n"


RESULTS["substudies"] = {}
for sub in ("kd", "ablations"):
    rows = substudy(STUDY_DIR / sub)
    if not rows:
        print(f"{sub}/: no finished runs")
        continue
    table = substudy_table(rows)
    print(f"### {sub}/\n\n{table}")
    teachers = sorted({r["method"].get("teacher") for r in rows if r["method"].get("teacher")})
    if teachers:
        print("teacher checkpoint(s): " + ", ".join(teachers) + "\n")
    RESULTS["substudies"][sub] = {r["name"] + f"_s{r['seed']}": r["res"]["autoattack_acc"] for r in rows}
    if WRITE_FIGURES:
        (STUDY_DIR / sub / "summary.md").write_text(table)"""),
    ("md", r"""## 9. Tuning on the validation split

`tuning/` trains other values of TRADES' and MART's beta with the study's budget and evaluates them on the
validation split only (2,000 held-out training images, PGD-10 after the last epoch, from `metrics.jsonl`); the
seed-0 main runs (beta 6) and the GKL-AT beta ablations (`ablations/`, beta 2 / 10 vs the main run's 5) are
listed with their validation numbers beside them. The test set plays no part in this table."""),
    ("code", r"""def final_val(run_dir: Path):
    by_epoch = {m["epoch"]: m for m in read_jsonl(run_dir / "metrics.jsonl") if "epoch" in m}
    last = by_epoch[max(by_epoch)] if by_epoch else {}
    return last.get("val_clean_acc"), last.get("val_pgd_acc")


tuning_rows = []
for folder in (STUDY_DIR / "tuning", STUDY_DIR, STUDY_DIR / "ablations"):
    for run_dir in sorted(p for p in (folder / "runs").glob("*_s0") if p.is_dir()):
        res = load_run(run_dir)
        if res is None:
            continue
        m = res.get("config", {}).get("method", {})
        if folder == STUDY_DIR and m.get("name") not in ("trades", "mart", "gkl_at"):
            continue
        if folder != STUDY_DIR / "tuning" and m.get("name") == "gkl_at" and (
                m.get("alpha") != 1.0 or m.get("gamma") != 1.0 or m.get("prior_temperature") != 4.0
                or not m.get("symmetric", True) or m.get("weights", "prior") != "prior"
                or res.get("config", {}).get("attack", {}).get("eps_schedule") != "constant"):
            continue  # GKL rows: only the beta sweep around the main constant-eps run
        clean, pgd = final_val(run_dir)
        if pgd is not None:
            tuning_rows.append({"run": run_dir.name, "method": m.get("name"), "beta": m.get("beta"),
                                "val_clean": clean, "val_pgd": pgd})
tuning_rows.sort(key=lambda r: (r["method"], r["beta"]))
TUNING_MD = "\n".join(["| method | beta | run | val clean % | val PGD-10 % |", "|---|---|---|---|---|"]
                       + [f"| {r['method']} | {r['beta']:g} | {r['run']} | {100 * r['val_clean']:.2f} | "
                          f"{100 * r['val_pgd']:.2f} |" for r in tuning_rows]) + "\n"
print(TUNING_MD if tuning_rows else "no tuning runs")
for method in sorted({r["method"] for r in tuning_rows}):
    best = max((r for r in tuning_rows if r["method"] == method), key=lambda r: r["val_pgd"])
    print(f"{method}: best validation PGD-10 at beta {best['beta']:g} ({100 * best['val_pgd']:.2f} %)")
RESULTS["tuning"] = {r["run"]: r["val_pgd"] for r in tuning_rows}
if WRITE_FIGURES and tuning_rows and (STUDY_DIR / "tuning").is_dir():
    (STUDY_DIR / "tuning" / "summary.md").write_text(TUNING_MD)"""),
    ("code", r"""print("NOTEBOOK_RESULTS " + json.dumps(RESULTS))"""),
]


def build():
    return build_notebook(CELLS)


if __name__ == "__main__":
    write_notebook(build(), "02_fmnist_study.ipynb")
