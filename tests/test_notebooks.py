"""Every notebook executes on CPU without a failing cell; the numbers it prints are checked.

A notebook's only source is notebooks/NN_*.py in jupytext's percent format (`make notebooks` builds and
executes the .ipynb, which git ignores); the tests read it with jupytext and execute it the same way. A
notebook reports what the tests read as one stdout line `NOTEBOOK_RESULTS {json}`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
import torch
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from advgkl import robustbench_io as rbio
from advgkl.data import DEFAULT_ROOT, load_dataset

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
STUDY_DIR = NOTEBOOKS_DIR.parent / "experiments" / "fmnist_study" / "results"
sys.path.insert(0, str(STUDY_DIR.parent))
import run_study  # noqa: E402  (the study driver: its load_run is the rule the notebook must follow)
# what the analysis notebooks read from the environment; unset for the plain runs, which must read the
# committed results and write nothing into the repository
NOTEBOOK_ENV = ("ADVGKL_STUDY_DIR", "ADVGKL_WRITE_FIGURES", "ADVGKL_REPRODUCE_DIR")
# jupyter_client swaps these for sys.executable when it launches the kernel
PYTHON_ALIASES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}


def _runs_this_python(name: str) -> bool:
    try:
        argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
    except NoSuchKernel:
        return False
    return argv0 in PYTHON_ALIASES or os.path.abspath(argv0) == os.path.abspath(sys.executable)


@pytest.fixture(scope="session")
def kernel_name() -> str:
    """`python3` when it starts this interpreter (the venv, with advgkl and torch); otherwise installs a
    kernelspec into sys.prefix (`python3`, or `advgkl-venv` if a user-level `python3` shadows it)."""
    if _runs_this_python("python3"):
        return "python3"
    for name in ("python3", "advgkl-venv"):
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name],
                       check=True, capture_output=True)
        if _runs_this_python(name):
            return name
    pytest.fail(f"no Jupyter kernel runs {sys.executable}; tried python3 and advgkl-venv")


def _execute(path: Path, kernel: str) -> nbformat.NotebookNode:
    nb = jupytext.read(path)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernel inherits it: shared CI cores, no OpenMP spinning
    try:
        client = NotebookClient(nb, timeout=300, kernel_name=kernel,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()  # raises CellExecutionError on the first failing cell, with its traceback
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return nb


def _results(nb: nbformat.NotebookNode) -> dict:
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
             if out.output_type == "stream" for line in out.text.splitlines()
             if line.startswith("NOTEBOOK_RESULTS ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}


def _cell_seconds(nb: nbformat.NotebookNode) -> float:
    """Sum of the cells' execution times (nbclient's timestamps; kernel start-up excluded)."""
    total = 0.0
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
            total += (end - start).total_seconds()
    return total


def check_01_gkl_loss(r: dict, seconds: float) -> None:
    assert 0 < seconds < 60, f"01_gkl_loss must run in < 60 s on CPU, took {seconds:.1f} s"
    assert r["max_grad_diff_kl_dkl"] < 1e-12
    assert r["kl_minus_sce_plus_entropy"] < 1e-12
    assert r["max_rel_value_diff_closed_pairwise"] < 1e-12
    assert r["max_grad_diff_closed_pairwise"] < 1e-12
    # GKL's wMSE reaches both branches, equal and opposite; DKL's reaches only the teacher
    assert r["gkl_wmse_grad_student_norm"] > 1e-3
    assert r["gkl_wmse_grad_teacher_norm"] == pytest.approx(r["gkl_wmse_grad_student_norm"], rel=1e-12)
    assert r["gkl_wmse_student_plus_teacher_grad"] < 1e-15
    assert r["dkl_wmse_grad_student_norm"] == 0.0
    assert r["frozen_teacher_dkl_minus_sce_grad"] < 1e-15
    # smaller gamma flattens the prior; gamma = 0 weighs all 10 classes equally
    eff = r["effective_classes"]
    for t in ("T1", "T4"):
        seq = [eff[f"{t}_gamma{g}"] for g in ("1", "0.4", "0.2", "0")]
        assert all(a < b for a, b in zip(seq, seq[1:])), (t, seq)
        assert seq[-1] == pytest.approx(10.0, rel=1e-5)
    assert eff["T1_gamma1"] < eff["T4_gamma1"]  # a higher prior temperature is flatter too
    assert set(r["timing"]) == {"B128_C10", "B128_C100", "B32_C1000"}
    assert all(v["closed_ms"] > 0 and v["pairwise_ms"] > 0 for v in r["timing"].values())


def _study_runs(study_dir: Path) -> dict[str, dict[str, dict]]:
    """{method: {run folder: results}} by the study driver's convention runs/<method>_s<seed>/; the results
    are the driver's `load_run` (the AutoAttack evaluation on the most points)."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(study_dir.glob("runs/*_s*/results.json")):
        method, seed = path.parent.name.rsplit("_s", 1)
        if seed.isdigit():
            out.setdefault(method, {})[path.parent.name] = run_study.load_run(path.parent)
    return out


def _epochs_logged(run_dir: Path) -> int:
    """Distinct epochs in metrics.jsonl; a killed run may leave a partial last line, which does not count."""
    path = run_dir / "metrics.jsonl"
    epochs = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            epochs.add(json.loads(line).get("epoch"))
        except json.JSONDecodeError:
            continue
    return len(epochs - {None})


def _check_study(r: dict, study_dir: Path) -> None:
    """The notebook's numbers recomputed from the results.json files and the Fashion-MNIST test labels."""
    assert Path(r["study_dir"]).resolve() == study_dir.resolve()
    expected = _study_runs(study_dir)
    assert set(r["methods"]) == set(expected)
    assert r["n_runs"] == sum(len(runs) for runs in expected.values())
    assert r["table_rows"] == len(expected)
    labels = load_dataset("fashion_mnist", DEFAULT_ROOT, train=False)[1]
    for method, runs in expected.items():
        s = r["methods"][method]
        clean = [100 * x["clean_acc"] for x in runs.values()]
        aa = [100 * x["autoattack_acc"] for x in runs.values()]
        assert s["n"] == len(runs) and s["seeds"] == sorted(int(name.rsplit("_s", 1)[1]) for name in runs)
        assert s["clean_mean"] == pytest.approx(np.mean(clean), abs=1e-9)
        assert s["aa_mean"] == pytest.approx(np.mean(aa), abs=1e-9)
        if len(runs) == 1:  # one seed: a mean and no std, never a std of 0
            assert s["clean_std"] is None and s["aa_std"] is None
        else:
            assert s["clean_std"] == pytest.approx(np.std(clean, ddof=1), abs=1e-9)
            assert s["aa_std"] == pytest.approx(np.std(aa, ddof=1), abs=1e-9)
        assert s["n_examples"] == sorted({x["n_examples"] for x in runs.values()})
        full = [100 * x["pgd20_full"]["pgd20_acc"] for x in runs.values() if x["pgd20_full"]]
        if len(full) == len(runs) and len(runs) > 1:
            assert s["pgd20_full_mean"] == pytest.approx(np.mean(full)) and s["pgd20_full_std"] == pytest.approx(
                np.std(full, ddof=1))
        elif len(full) < len(runs):
            assert s["pgd20_full_mean"] is None
        assert s["autoattack_versions"] == sorted({x["autoattack_version"] for x in runs.values()})
        for name, res in runs.items():
            # class-wise accuracy: the evaluated points are the first n_examples test images
            points = res["per_point"][res["evaluated_weights"]]
            robust = torch.tensor(points["robust_correct"], dtype=torch.float64)
            y = labels[:len(robust)]
            counts = torch.bincount(y, minlength=10)
            cw = r["classwise"][name]
            assert cw["counts"] == counts.tolist() and sum(cw["counts"]) == res["n_examples"]
            assert cw["robust"] == pytest.approx((torch.bincount(y, weights=robust, minlength=10) / counts).tolist())
            assert cw["per_point_robust_acc"] == pytest.approx(res["autoattack_acc"], abs=0.5 / len(robust))
            assert r["epochs_logged"][name] == _epochs_logged(study_dir / "runs" / name)
    assert sorted(r["masking_flagged"]) == sorted(name for runs in expected.values() for name, res in runs.items()
                                                  if res["suspicious_gradient_masking"])


def check_02_fmnist_study(r: dict, seconds: float) -> None:
    assert 0 < seconds < 60, f"02_fmnist_study must run in < 60 s on CPU, took {seconds:.1f} s"
    _check_study(r, STUDY_DIR)
    assert r["figure_written"] is None and r["table_written"] is None  # tests write nothing into the repo
    assert r["summary_csv"] == "consistent"
    assert r["table_md"] == (STUDY_DIR / "summary.md").read_text()  # the committed table is the notebook's
    assert {m: s["collapsed"] for m, s in r["methods"].items()} == {m: [2] if m == "mart" else [] for m in r["methods"]}


GKL_ENTRIES = {  # the published numbers (docs/robustbench.md): (dataset, RobustBench name) -> (clean %, AutoAttack %)
    ("cifar10", "Cui2023Decoupled_WRN-34-10"): (85.31, 57.09),
    ("cifar10", "Cui2023Decoupled_WRN-28-10"): (92.16, 67.73),
    ("cifar100", "Cui2023Decoupled_WRN-34-10"): (65.76, 31.91),
    ("cifar100", "Cui2023Decoupled_WRN-34-10_autoaug"): (65.93, 32.52),
    ("cifar100", "Cui2023Decoupled_WRN-28-10"): (73.85, 39.18),
}


def check_03_reproduce_robustbench(r: dict, seconds: float) -> None:
    assert 0 < seconds < 60, f"03_reproduce_robustbench must run in < 60 s on CPU, took {seconds:.1f} s"
    assert r["leaderboard_sizes"] == {f"{d}/{t}": len(rbio.leaderboard(d, t))
                                      for d, t in (("cifar10", "Linf"), ("cifar10", "L2"), ("cifar100", "Linf"))}
    assert sorted(r["cui2023_entries"]) == sorted(f"{d}/Linf/{n}" for d, n in GKL_ENTRIES)
    assert len(r["published"]) == 5
    for (dataset, name), (clean, aa) in GKL_ENTRIES.items():
        p = r["published"][f"{dataset}/{name}"]
        assert p["matches"] and (p["meta_clean"], p["meta_aa"]) == (clean, aa) and p["eps"] == "8/255"
        assert 1 <= p["rank_same_arch"] <= p["rank_same_data"] <= p["rank"] <= p["of"]
    report_dir = Path(r["report_dir"])
    assert report_dir == NOTEBOOKS_DIR.parent / "runs" / "reproduce_gkl"
    n = len(list(report_dir.rglob(rbio.REPORT_NAME))) if report_dir.is_dir() else 0
    assert r["n_reports"] == n  # none until someone reproduces on a GPU; then every one of them
    if n == 0:
        assert r["reports_message"].startswith("no reproduce reports found")


CHECKS = {"01_gkl_loss": check_01_gkl_loss, "02_fmnist_study": check_02_fmnist_study,
          "03_reproduce_robustbench": check_03_reproduce_robustbench}


def _errors(nb: nbformat.NotebookNode) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == "error"]


def test_the_notebooks_are_the_three_checked_ones():
    assert [p.stem for p in NOTEBOOKS] == list(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, kernel_name: str, monkeypatch):
    for var in NOTEBOOK_ENV:
        monkeypatch.delenv(var, raising=False)
    nb = _execute(path, kernel_name)
    errors = _errors(nb)
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    results = _results(nb)
    assert results, f"{path.name} printed no NOTEBOOK_RESULTS line"
    CHECKS[path.stem](results, _cell_seconds(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source_is_canonical_percent_format(path: Path):
    """The .py is what jupytext writes back (no header, no cell metadata): the .ipynb built from it and the .py
    cannot drift apart, and a notebook saved from Jupyter through jupytext leaves no diff noise."""
    text = path.read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    nbformat.validate(nb)
    assert jupytext.writes(nb, fmt="py:percent") == text
    assert text.startswith("# %% [markdown]\n# # ")  # opens with its title
    assert [c.cell_type for c in nb.cells].count("markdown") >= 2
    assert nb.cells[-1].cell_type == "code"
    assert 'print("NOTEBOOK_RESULTS " + json.dumps(RESULTS))' in nb.cells[-1].source


# ---------------------------------------------------------------- the analysis notebooks on other inputs

def _write_study_run(run_dir: Path, method: str, seed: int, clean: list[int], robust: list[int], *,
                     flagged: bool = False, epochs: int = 3, metrics: bool = True) -> None:
    """One finished study run in the layout of `evaluate.gather_results` (results.json) and the training
    loop's metrics.jsonl; clean/robust are 0/1 outcomes on the first len(clean) Fashion-MNIST test points."""
    n, eps = len(clean), 0.1
    clean_acc, robust_acc = sum(clean) / n, sum(robust) / n
    sweep = {f"{eps * m:.6g}": max(0.0, robust_acc * (1.2 - 0.4 * m)) for m in (0.25, 0.5, 1.0, 2.0, 4.0)}
    honesty = {"pgd_steps": 20, "pgd_acc_by_eps": {**sweep, "1": 0.0}, "huge_eps": 1.0,
               "pgd_breaks_aa_robust_frac": 0.0, "square_only_frac": 0.02 if flagged else 0.0,
               "warnings": ["the black-box Square attack broke 2.0% of the points"] if flagged else [],
               "suspicious_gradient_masking": flagged}
    per_attack = {"clean": clean_acc, "apgd-ce": robust_acc, "apgd-t": robust_acc, "fab-t": robust_acc,
                  "square": robust_acc}
    res = {"name": run_dir.name, "dataset": "fashion_mnist", "threat_model": "Linf", "eps": eps, "model": "small_cnn",
           "method": method, "evaluated_weights": "final", "clean_acc": clean_acc, "autoattack_acc": robust_acc,
           "per_attack_robust_acc": per_attack, "suspicious_gradient_masking": flagged,
           "warnings": honesty["warnings"], "n_examples": n, "autoattack_version": "standard", "seed": seed,
           "epochs": epochs, "wall_time_s": {"train": 100.0, "eval": 50.0},
           "evaluations": {"final": {"n_examples": n, "eps": eps, "threat_model": "Linf", "clean_acc": clean_acc,
                                     "autoattack_acc": robust_acc, "per_attack_robust_acc": per_attack,
                                     "autoattack_version": "standard", "honesty": honesty}},
           "per_point": {"final": {"clean_correct": clean, "robust_correct": robust,
                                   "broken_by": [-1 if rc else (1 if c else 0) for c, rc in zip(clean, robust)]}},
           "config": {"data": {"dataset": "fashion_mnist"},
                      "attack": {"eps": eps, "norm": "Linf", "eps_schedule": "linear"}}}
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(res))
    if metrics:
        rows = [{"epoch": e, "eps": eps * e / epochs, "train_loss": 2.0 / e, "val_clean_acc": 0.6 + 0.05 * e,
                 "val_pgd_acc": 0.3 + 0.05 * e} for e in range(1, epochs + 1)]
        rows.insert(1, dict(rows[0], train_loss=9.0))  # a resumed run logs epoch 1 twice: the last one counts
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"epoch": 4, "tr')


@pytest.mark.slow
def test_study_notebook_on_any_set_of_runs(tmp_path, kernel_name, monkeypatch):
    """Methods the notebook has never heard of, 3 seeds / 1 seed, an unfinished run, a flagged run, a run
    without metrics.jsonl, the driver's summary.csv; ADVGKL_WRITE_FIGURES=1 writes into the study folder."""
    rng = np.random.default_rng(0)
    for method, seeds, p_robust in (("zeta_at", (0, 1, 2), 0.6), ("alpha", (0,), 0.4)):
        for seed in seeds:
            clean = (rng.random(300) < 0.85).astype(int)
            robust = clean * (rng.random(300) < p_robust)
            _write_study_run(tmp_path / "runs" / f"{method}_s{seed}", method, seed, clean.tolist(), robust.tolist(),
                             flagged=method == "alpha", metrics=seed != 2)
    for seed, p_clean in ((0, 0.8), (1, 0.1)):  # omega's seed 1 collapsed to chance accuracy
        clean = (rng.random(300) < p_clean).astype(int)
        _write_study_run(tmp_path / "runs" / f"omega_s{seed}", "omega", seed, clean.tolist(),
                         (clean * (rng.random(300) < 0.5)).tolist(), metrics=False)
    (tmp_path / "runs" / "zeta_at_s3").mkdir()  # still training: config.yaml only
    for seed in (0, 1, 2):  # PGD-20 on the full test set for every zeta_at run, none for alpha
        per_class = (0.3 + 0.05 * rng.random(10)).tolist()
        (tmp_path / "runs" / f"zeta_at_s{seed}" / "pgd20_full.json").write_text(json.dumps(
            {"n_examples": 10000, "clean_acc": 0.8, "pgd20_acc": float(np.mean(per_class)),
             "per_class_pgd20_acc": per_class}))
    clean = (rng.random(600) < 0.85).astype(int)  # zeta_at_s1 re-evaluated on more points: that one counts
    _write_study_run(tmp_path / "runs" / "zeta_at_s1" / "aa600", "zeta_at", 1, clean.tolist(),
                     (clean * (rng.random(600) < 0.5)).tolist(), metrics=False)
    clean = (rng.random(100) < 0.7).astype(int)  # a distillation sub-study beside the main one
    _write_study_run(tmp_path / "kd" / "runs" / "kd_x_s0", "gkl_kd", 0, clean.tolist(),
                     (clean * (rng.random(100) < 0.5)).tolist(), metrics=False)
    (tmp_path / "runs" / "zeta_at_s3" / "config.yaml").write_text("name: zeta_at_s3\n")
    run_study.summarise(tmp_path)

    monkeypatch.setenv("ADVGKL_STUDY_DIR", str(tmp_path))
    monkeypatch.setenv("ADVGKL_WRITE_FIGURES", "1")
    nb = _execute(NOTEBOOKS_DIR / "02_fmnist_study.py", kernel_name)
    assert not _errors(nb), _errors(nb)[0]["evalue"]
    r = _results(nb)
    _check_study(r, tmp_path)
    assert r["methods"]["zeta_at"]["n"] == 3 and r["methods"]["alpha"]["aa_std"] is None
    assert r["methods"]["zeta_at"]["n_examples"] == [300, 600]  # the top-up of zeta_at_s1 is used
    assert r["methods"]["zeta_at"]["pgd20_full_std"] is not None and r["methods"]["alpha"]["pgd20_full_mean"] is None
    kd = json.loads((tmp_path / "kd" / "runs" / "kd_x_s0" / "results.json").read_text())
    assert r["substudies"] == {"kd": {"kd_x_s0": kd["autoattack_acc"]}}
    assert f"| kd_x | ? | 0 | {100 * kd['clean_acc']:.2f} (n=1, no std) |" in (tmp_path / "kd" / "summary.md").read_text()
    assert r["unfinished"] == ["zeta_at_s3"] and r["masking_flagged"] == ["alpha_s0"]
    assert r["epochs_logged"] == {"alpha_s0": 3, "omega_s0": 0, "omega_s1": 0, "zeta_at_s0": 3, "zeta_at_s1": 3,
                                  "zeta_at_s2": 0}
    assert r["summary_csv"] == "consistent"
    assert r["figure_written"] == str(tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "summary.md").read_text()
    assert r["table_written"] == str(tmp_path / "summary.md") and r["table_md"] == table
    zeta, alpha = r["methods"]["zeta_at"], r["methods"]["alpha"]
    assert f"| zeta_at | 3 (0, 1, 2) | - | {zeta['clean_mean']:.2f} ± {zeta['clean_std']:.2f} |" in table
    assert "| omega | 2 (0, 1) | seed 1 | " in table and r["methods"]["omega"]["collapsed"] == [1]
    assert f"| {alpha['aa_mean']:.2f} (n=1, no std) |" in table
    assert table.index("| zeta_at |") < table.index("| alpha |")  # ordered by AutoAttack accuracy


def _write_report(out: Path, name: str, dataset: str, n: int, k_clean: int, k_robust: int,
                  claimed: tuple[float, float] | None = None) -> None:
    """A reproduce_report.json in the layout `robustbench_io.reproduce` writes (accuracies in %)."""
    entry = rbio.leaderboard_entry(name, dataset, "Linf")
    claim_clean, claim_aa = claimed or (float(entry["clean_acc"]), float(entry["autoattack_acc"]))
    pct = lambda x: round(100.0 * x, 4)
    clean_ci = [pct(v) for v in rbio.wilson_interval(k_clean, n)]
    aa_ci = [pct(v) for v in rbio.wilson_interval(k_robust, n)]
    word, detail = rbio.verdict(claim_clean, clean_ci, claim_aa, aa_ci)
    report = {
        "model_name": name, "dataset": dataset, "threat_model": "Linf", "eps": 8 / 255, "eps_str": "8/255",
        "autoattack_version": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "seed": 0,
        "n_examples": n, "n_test_set": 10_000, "units": "percent", "architecture": entry["architecture"],
        "paper": entry["name"], "link": entry["link"],
        "claimed": {"clean_acc": claim_clean, "autoattack_acc": claim_aa, "source": "test"},
        "measured": {"clean_acc": pct(k_clean / n), "autoattack_acc": pct(k_robust / n), "clean_correct": k_clean,
                     "robust_correct": k_robust, "clean_acc_ci95": clean_ci, "autoattack_acc_ci95": aa_ci},
        "difference": {"clean_acc": round(pct(k_clean / n) - claim_clean, 4),
                       "autoattack_acc": round(pct(k_robust / n) - claim_aa, 4)},
        "ci_method": "Wilson score interval, 95% two-sided",
        "per_attack_robust_acc": {"clean": pct(k_clean / n), "apgd-ce": pct(k_robust / n), "apgd-t": pct(k_robust / n)},
        "wall_time_s": 3600.0, "this_call_wall_time_s": 3600.0, "resumed": False, "device": "cuda:0",
        "batch_size": 500, "verdict": word, "verdict_detail": detail,
        "notes": [f"measured on the first {n} of 10000 test points; the claim is for all 10000"],
        "checkpoint": None, "environment": {},
    }
    out.mkdir(parents=True)
    (out / rbio.REPORT_NAME).write_text(json.dumps(report))


@pytest.mark.slow
def test_robustbench_notebook_reads_reproduce_reports(tmp_path, kernel_name, monkeypatch):
    _write_report(tmp_path / "cifar10_Linf_Cui2023Decoupled_WRN-34-10_n1000_standard",
                  "Cui2023Decoupled_WRN-34-10", "cifar10", 1000, 853, 571)  # consistent with 85.31 / 57.09
    _write_report(tmp_path / "older" / "cifar100_WRN-28-10", "Cui2023Decoupled_WRN-28-10", "cifar100", 500, 300, 150)
    _write_report(tmp_path / "stale", "Cui2023Decoupled_WRN-34-10_autoaug", "cifar100", 200, 132, 65,
                  claimed=(66.00, 32.52))  # made against metadata that has changed since
    (tmp_path / "stale" / "reproduce_config.json").write_text("{}")  # other files in a report folder are ignored
    monkeypatch.setenv("ADVGKL_REPRODUCE_DIR", str(tmp_path))
    nb = _execute(NOTEBOOKS_DIR / "03_reproduce_robustbench.py", kernel_name)
    assert not _errors(nb), _errors(nb)[0]["evalue"]
    r = _results(nb)
    assert r["report_dir"] == str(tmp_path) and r["n_reports"] == 3
    by_name = {(x["dataset"], x["model_name"]): x for x in r["reports"]}
    ok = by_name[("cifar10", "Cui2023Decoupled_WRN-34-10")]
    assert (ok["measured_clean"], ok["measured_aa"], ok["n_examples"]) == (85.3, 57.1, 1000)
    assert ok["verdict"] == "consistent" and ok["inside_ci"] == {"clean_acc": True, "autoattack_acc": True}
    assert ok["claim_matches_metadata"] is True
    bad = by_name[("cifar100", "Cui2023Decoupled_WRN-28-10")]
    assert bad["path"] == "older/cifar100_WRN-28-10/reproduce_report.json"
    assert bad["verdict"] == "not consistent" and bad["inside_ci"] == {"clean_acc": False, "autoattack_acc": False}
    assert by_name[("cifar100", "Cui2023Decoupled_WRN-34-10_autoaug")]["claim_matches_metadata"] is False

