# %% [markdown]
# # The Fashion-MNIST study: methods compared under AutoAttack
#
# Tables and plots from the study's committed results; nothing here trains or attacks a model. Each finished
# run is a folder `experiments/fmnist_study/results/runs/<method>_s<seed>/` written by
# `advgkl sweep` (through `experiments/fmnist_study/run_study.py`), with `results.json` (clean and AutoAttack accuracy, per-point
# outcomes, the gradient-masking checks), `metrics.jsonl` (one line per epoch) and `config.yaml`. The notebook
# uses whatever runs exist: the methods are the folder names without `_s<seed>`, and a run without
# `results.json` is still training (or was interrupted) and is listed, not used. Every number is computed by
# `experiments/fmnist_study/analysis.py` (tested in `tests/test_study_analysis.py`), whose tables, CSV and plot are
# `advgkl summarize` (`advgkl/summarize.py`); the cells here print and plot.
#
# * **Mean ± std** is over seeds, with the sample standard deviation (ddof = 1). A method with a single
#   finished seed shows its one value marked `n=1, no std`: until it has more seeds, its difference to
#   another method cannot be compared with the seed-to-seed spread.
# * **AutoAttack** is evaluated on the first `n_examples` test points of each run (the table says how many
#   and which AutoAttack version). The binomial noise of a finite test subset is reported next to it.
# * Robust accuracy vs eps uses the PGD-20 sweep of the gradient-masking checks (0.25–4 × the training eps plus
#   a huge eps that reaches every image), on the same test points as AutoAttack.
#
# Environment variables: `ADVGKL_STUDY_DIR` reads another results folder (relative paths are taken from the
# repository root); `ADVGKL_WRITE_FIGURES=1` also writes `summary.png` (the method comparison plot) and
# `summary.md` (the markdown table printed below) into that folder. To refresh the README's table and plot:
#
#     ADVGKL_WRITE_FIGURES=1 make notebooks
#
# The last cell prints the numbers `tests/test_notebooks.py` checks.

# %%
import io
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to PNG and displayed explicitly
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import advgkl
from advgkl import summarize
from advgkl.data import DEFAULT_ROOT, dataset_info, load_dataset


def find_root() -> Path:
    # the kernel starts in notebooks/ (or wherever Jupyter was launched): look upwards for the study
    for p in (Path.cwd(), *Path.cwd().parents):
        if (p / "experiments" / "fmnist_study").is_dir():
            return p
    return Path(advgkl.__file__).resolve().parents[1]


ROOT = find_root()
# the analysis (every number below) is experiments/fmnist_study/analysis.py, beside the study driver run_study.py
sys.path.insert(0, str(ROOT / "experiments" / "fmnist_study"))
import analysis  # noqa: E402
from analysis import fmt, joined  # noqa: E402

STUDY_DIR = analysis.study_dir(ROOT, os.environ.get("ADVGKL_STUDY_DIR"))
WRITE_FIGURES = os.environ.get("ADVGKL_WRITE_FIGURES") == "1"
RESULTS = {"study_dir": str(STUDY_DIR), "figure_written": None, "table_written": None}  # what the tests read


def show(fig, save_to=None):
    if save_to is not None:
        fig.savefig(save_to, dpi=120, bbox_inches="tight")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


print(f"study results: {STUDY_DIR}")

# %% [markdown]
# ## 1. The runs
#
# A run counts once its `results.json` exists (the driver writes it after the final evaluation). The headline
# numbers are those of the weights the run evaluated (`evaluated_weights`: `final`, or `ema` when EMA is on).
# Where the driver later re-evaluated a run's final weights with standard AutoAttack on more test points
# (`aa<N>/results.json`, for runs first evaluated on fewer), the evaluation on the most points is used, as in
# `summary.csv`; `pgd20_full.json` is PGD-20 on all 10,000 test points.

# %%
runs, unfinished, unnamed = analysis.collect_runs(STUDY_DIR)
by_method = analysis.group_runs(runs)  # one order everywhere: best mean AutoAttack accuracy first
METHODS = list(by_method)
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
RESULTS["unfinished"] = unfinished

# %% [markdown]
# ## 2. Method comparison
#
# Clean and AutoAttack accuracy in %, mean ± sample std over seeds. The `± test subset` column is the 95 %
# half-width of a binomial proportion over the run's `n_examples` test points: the noise from evaluating on a
# subset, which seeds do not average away (every seed is evaluated on the same points). The markdown table is
# the one the README shows.

# %%
summary = {m: analysis.summarise_method(rs) for m, rs in by_method.items()}
eps_values = sorted({r["res"].get("eps") for r in runs})
TABLE_MD = analysis.comparison_table(  # advgkl summarize, with the study's columns
    STUDY_DIR, STUDY_DIR.relative_to(ROOT) if STUDY_DIR.is_relative_to(ROOT) else STUDY_DIR) if runs else ""
print("README table (markdown):\n")
print(TABLE_MD)
if WRITE_FIGURES and runs:
    RESULTS["table_written"] = str(analysis.write_summary(STUDY_DIR, TABLE_MD))
    print(f"wrote {RESULTS['table_written']}")
for note in analysis.comparability_notes(summary):
    print(note)

# Is a gap larger than the seed-to-seed spread? Welch's standard error of a difference of two means.
if len(METHODS) > 1:
    best = summary[METHODS[0]]
    print(f"\nAutoAttack gap to the best method ({METHODS[0]}), against the seed-to-seed spread:")
    for g in analysis.gaps_to_best(summary):
        if g["se"] is None:
            print(f"  {g['method']:<24} {g['gap']:5.2f} pp   no seed spread yet (a method with one seed)")
        else:
            print(f"  {g['method']:<24} {g['gap']:5.2f} pp   seed std {best['aa_std']:.2f} / "
                  f"{summary[g['method']]['aa_std']:.2f} pp, standard error of the gap {g['se']:.2f} pp: "
                  f"{'more' if g['gap'] > 2 * g['se'] else 'not more'} than 2 standard errors")

attacks, stage_means = analysis.per_attack_means(by_method)
print("\nrobust accuracy % after each AutoAttack stage (mean over seeds; 'clean' = before any attack):")
print(f"{'method':<24}" + "".join(f"{a:>10}" for a in attacks))
for m, vals in stage_means.items():
    print(f"{m:<24}" + "".join(f"{100 * v:>10.2f}" for v in vals))
RESULTS["methods"] = summary
RESULTS["table_rows"] = len(summary)
RESULTS["table_md"] = TABLE_MD


# %%
def comparison_plot():  # advgkl.summarize.plot: the figure `advgkl summarize --png` writes
    fig = summarize.plot(summary, by_method, eps_values)
    save_to = STUDY_DIR / "summary.png" if WRITE_FIGURES else None
    show(fig, save_to)
    if save_to is not None:
        RESULTS["figure_written"] = str(save_to)
        print(f"wrote {save_to}")


comparison_plot() if runs else print("no runs: no plot")


# %% [markdown]
# ## 3. Robust accuracy vs eps
#
# PGD-20 (cross-entropy, random start) accuracy at 0.25, 0.5, 1, 2 and 4 × the training eps and at a huge eps
# that reaches every image, from the gradient-masking check of each run; the band is ± one std over seeds where
# a method has several. The star is AutoAttack at the training eps (dashed line): it should sit at or below the
# PGD curve, and the curve should fall to ~0 at the huge eps.

# %%
def eps_curves():
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in METHODS:
        sweep = analysis.eps_sweep(by_method[m])
        if sweep is None:
            print(f"{m}: no PGD eps sweep in results.json (honesty checks off)")
            continue
        grid, mean, std = sweep["grid"], sweep["mean"], sweep["std"]
        ax.plot(grid, mean, marker="o", color=COLORS[m], label=f"{m} (n={sweep['n']})")
        if std is not None:
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
RESULTS["pgd_acc_by_eps"] = curve

# %% [markdown]
# ## 4. Class-wise accuracy
#
# The evaluated points are the first `n_examples` Fashion-MNIST test images, so each run's per-point outcomes
# (`per_point.robust_correct`, AutoAttack's per-point verdict) are matched with the test labels. A class holds
# about a tenth of the points (about 100 of 1,000), so one point moves its accuracy by ~1 pp: read large
# differences between classes, not small differences between methods. Where every run has `pgd20_full.json`, a
# third panel shows PGD-20 on all 10,000 test points (1,000 per class), the less noisy per-class view. The
# upper-body garments (T-shirt, Pullover, Coat, Shirt) look alike and are where a Fashion-MNIST classifier makes
# most of its mistakes; GKL's class-prior weights are built from exactly these confusions.

# %%
CLASSES = list(dataset_info("fashion_mnist").class_names)
test_labels = load_dataset("fashion_mnist", DEFAULT_ROOT, train=False)[1].numpy()

classwise = {}  # run name -> per-class clean / robust accuracy and counts
for r in runs:
    if analysis.run_dataset(r["res"]) != "fashion_mnist":
        print(f"{r['name']}: not a Fashion-MNIST run, left out")
        continue
    cw = classwise[r["name"]] = analysis.classwise(r, test_labels, len(CLASSES))
    if abs(cw["per_point_robust_acc"] - r["res"]["autoattack_acc"]) > 0.5 / sum(cw["counts"]):
        print(f"warning: {r['name']}: per-point robust accuracy {cw['per_point_robust_acc']:.4f} differs from the "
              f"headline {r['res']['autoattack_acc']:.4f}")
class_methods, KINDS, by_class = analysis.classwise_by_method(classwise, by_method)
TITLES = {"clean": "clean accuracy % per class", "robust": "AutoAttack accuracy % per class (first n points)",
          "pgd20_full": "PGD-20 accuracy % per class (all 10,000)"}


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
RESULTS["classwise_robust_by_method"] = {m: row.tolist() for m, row in zip(class_methods, by_class["robust"])}


# %% [markdown]
# ## 5. Training curves
#
# From each run's `metrics.jsonl`: training loss, and clean / PGD accuracy on the held-out validation split at
# the end of each epoch (the validation PGD is the cheap one configured in `eval.val_pgd_steps`, not
# AutoAttack). The training losses of different methods are different functions (CE on adversarial inputs,
# TRADES, MART, GKL) and are only comparable within a method; with `attack.eps_schedule: linear` the training eps
# grows during the first epochs, so the loss can rise while the model improves.

# %%
def training_curves():
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


def validation_table():
    print(f"{'run':<28}{'epochs':>7}{'eps sched.':>11}{'final val clean':>17}{'final val PGD':>15}"
          f"{'best PGD (epoch)':>18}")
    for r in runs:
        v = analysis.validation_summary(r)
        if "best_pgd" not in v:
            print(f"{r['name']:<28}{v['epochs']:>7}{v['eps_schedule']:>11}   (no validation metrics in metrics.jsonl)")
            continue
        print(f"{r['name']:<28}{v['epochs']:>7}{v['eps_schedule']:>11}{100 * v['final_clean']:>16.1f}%"
              f"{100 * v['final_pgd']:>14.1f}%{100 * v['best_pgd']:>11.1f}% ({v['best_epoch']})")


if runs:
    training_curves()
    validation_table()
else:
    print("no runs: no curves")
RESULTS["epochs_logged"] = {r["name"]: len(r["epochs"]) for r in runs}


# %% [markdown]
# ## 6. Gradient-masking checks
#
# Every evaluation runs four cheap checks (`advgkl/honesty.py`): PGD-20 must not break points AutoAttack left
# robust, accuracy must fall to ~0 at the huge eps, must not rise with eps, and the black-box Square attack must
# not break points every white-box attack failed on. A flagged run's robust accuracy is not to be trusted.

# %%
def pct(v):
    return f"{100 * v:.1f}" if v is not None else "-"


print("all numbers in % of the evaluated test points")
print(f"{'run':<28}{'flag':>6}{'AA':>7}{'PGD-20':>8}{'huge eps':>10}{'PGD breaks AA-robust':>22}{'Square only':>13}")
flagged = []
for r in runs:
    row = analysis.masking_row(r)
    flagged += [r["name"]] if row["flagged"] else []
    print(f"{r['name']:<28}{'YES' if row['flagged'] else 'no':>6}{pct(row['aa']):>7}{pct(row['pgd_at_eps']):>8}"
          f"{pct(row['pgd_huge_eps']):>10}{pct(row['pgd_breaks_aa_robust']):>22}{pct(row['square_only']):>13}")
    for w in r["res"].get("warnings", []):
        print(f"    warning: {w}")
    if not r["honesty"]:
        print("    (no honesty checks in results.json)")
print(f"\n{len(flagged)} of {len(runs)} run(s) flagged for gradient masking"
      + (f": {', '.join(flagged)}" if flagged else ""))
RESULTS["masking_flagged"] = flagged

# %% [markdown]
# ## 7. `summary.csv`
#
# `run_study.py` writes `results/summary.csv` (one row per finished run) at the end of a sitting. Everything above
# is computed from the per-run `results.json`; the CSV, when it exists, must agree with them.

# %%
RESULTS["summary_csv"], problems = analysis.check_summary_csv(STUDY_DIR / "summary.csv", runs)
if RESULTS["summary_csv"] == "absent":
    print("no summary.csv: the numbers above come from the per-run results.json")
else:
    print("\n".join(problems) if problems else f"summary.csv agrees with the {len(runs)} results.json file(s)")

# %% [markdown]
# ## 8. Robust distillation, GKL ablations, equal tricks, tuned GKL-AT
#
# Smaller studies live beside the main one, each in a subfolder with the same layout (`runs/<name>_s<seed>/`):
# `kd/` distils the robust small_cnn teacher into the mini_cnn student (KL vs GKL, natural vs adversarial inputs,
# and the student trained with PGD-AT alone as the reference), evaluated with standard AutoAttack; `ablations/`
# changes one thing at a time in GKL-AT and is evaluated with the labelled fast screening attack (APGD-CE +
# APGD-T) on fewer points, so its AutoAttack column is not comparable with the main table's; PGD-20 on all 10,000
# test points is the comparable column there. `tricks/` trains the tuned GKL-AT, TRADES and PGD-AT with the
# same AWP, weight EMA and constant eps, so that the loss is the only difference; `a4/` is the tuned GKL-AT
# (alpha 4) without them, both evaluated like the main table. With `ADVGKL_WRITE_FIGURES=1` each table is also
# written to `<subfolder>/summary.md`.

# %%
RESULTS["substudies"] = {}
for sub in analysis.SUBSTUDIES:
    rows = analysis.substudy_runs(STUDY_DIR / sub)
    if not rows:
        print(f"{sub}/: no finished runs")
        continue
    table = analysis.substudy_table(STUDY_DIR / sub)
    print(f"### {sub}/\n\n{table}")
    teachers = sorted({r["recipe"].get("teacher") for r in rows if r["recipe"].get("teacher")})
    if teachers:
        print("teacher checkpoint(s): " + ", ".join(teachers) + "\n")
    RESULTS["substudies"][sub] = {r["name"] + f"_s{r['seed']}": r["res"]["autoattack_acc"] for r in rows}
    if WRITE_FIGURES:
        analysis.write_summary(STUDY_DIR / sub, table)

# %% [markdown]
# ## 9. Tuning on the validation split
#
# `tuning/` trains other values of TRADES' and MART's beta with the study's budget and evaluates them on the
# validation split only (2,000 held-out training images, PGD-10 after the last epoch, from `metrics.jsonl`); the
# seed-0 main runs (beta 6) and the GKL-AT beta ablations (`ablations/`, beta 2 / 10 vs the main run's 5) are
# listed with their validation numbers beside them. The test set plays no part in this table.

# %%
tuning_rows = analysis.tuning_rows(STUDY_DIR)
TUNING_MD = analysis.tuning_table(tuning_rows)
print(TUNING_MD if tuning_rows else "no tuning runs")
for method, best in analysis.best_beta(tuning_rows).items():
    print(f"{method}: best validation PGD-10 at beta {best['beta']:g} ({100 * best['val_pgd']:.2f} %)")
RESULTS["tuning"] = {r["run"]: r["val_pgd"] for r in tuning_rows}
if WRITE_FIGURES and tuning_rows and (STUDY_DIR / "tuning").is_dir():
    analysis.write_summary(STUDY_DIR / "tuning", TUNING_MD)

# %%
print("NOTEBOOK_RESULTS " + json.dumps(RESULTS))
