"""experiments/fmnist_study/analysis.py: the committed study's tables rebuilt byte for byte, and every rule
(collapsed runs, the seed statistics, the summary.csv check, the tuning filter) on small hand-built runs."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY_CODE = Path(__file__).resolve().parents[1] / "experiments" / "fmnist_study"
COMMITTED = STUDY_CODE / "results"
sys.path.insert(0, str(STUDY_CODE))
import analysis  # noqa: E402

from advgkl import summarize  # noqa: E402


def _run(name: str, clean: float, aa: float, *, n: int = 100, full: float | None = None, **res) -> dict:
    """A finished run as ``analysis.load_study_run`` returns it, with only what the summary reads."""
    method, seed = analysis.parse_run_name(name)
    res = {"clean_acc": clean, "autoattack_acc": aa, "n_examples": n, "autoattack_version": "standard",
           "model": "small_cnn", "epochs": 3, "wall_time_s": {"train": 1800.0}, "eps": 0.1,
           "pgd20_full": None if full is None else {"pgd20_acc": full, "n_examples": 10000}, **res}
    return {"name": name, "method": method, "seed": seed, "res": res, "honesty": {}, "epochs": []}


def _write_run(run_dir: Path, clean: float, aa: float, metrics: list[dict] | None = None, **extra) -> None:
    """A run folder with a results.json as the training job writes it (only the keys load_run reads) and an
    optional metrics.jsonl, ending with the partial line a killed run leaves."""
    run_dir.mkdir(parents=True)
    res = {"clean_acc": clean, "autoattack_acc": aa, "n_examples": 10, "seed": 0, "epochs": 3,
           "autoattack_version": "standard", "wall_time_s": {"train": 60.0, "eval": 6.0}, "evaluated_weights": "final",
           "evaluations": {"final": {"honesty": {"huge_eps": 1.0}}}, "per_point": {"final": {}}, **extra}
    (run_dir / "results.json").write_text(json.dumps(res))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"epoch": 9, "tr')


# ---------------------------------------------------------------- the committed study


@pytest.fixture(scope="module")
def committed():
    runs, unfinished, unnamed = analysis.collect_runs(COMMITTED)
    by_method = analysis.group_runs(runs)
    return runs, by_method, {m: analysis.summarise_method(rs) for m, rs in by_method.items()}


def test_committed_runs_grouped_best_autoattack_first(committed):
    runs, by_method, _ = committed
    assert len(runs) == 18
    assert list(by_method) == ["gkl_at_g1_t4_const", "trades", "pgd_at", "gkl_at_g02_t1", "gkl_at_g1_t4", "mart"]
    assert [(r["seed"], r["res"]["clean_acc"], r["res"]["autoattack_acc"]) for r in by_method["mart"]] == [
        (0, 0.785, 0.665), (1, 0.778, 0.658), (2, 0.115, 0.115)]
    assert all(len(r["epochs"]) == 3 for r in runs)
    # the seed-0 runs were first evaluated on 500 points: their aa1000/ top-up (of the checkpoint) counts
    assert {r["name"] for r in runs if r["which"] == "model"} == {f"{m}_s0" for m in by_method}
    assert all(r["res"]["n_examples"] == 1000 for r in runs)


def test_committed_summary_numbers_and_the_collapsed_mart_seed(committed):
    _, _, summary = committed
    assert {m: s["collapsed"] for m, s in summary.items()} == {m: ([2] if m == "mart" else []) for m in summary}
    mart = summary["mart"]
    assert mart["clean_mean"] == pytest.approx(100 * (0.785 + 0.778 + 0.115) / 3, abs=1e-12)
    assert mart["clean_std"] == pytest.approx(100 * np.std([0.785, 0.778, 0.115], ddof=1), abs=1e-12)
    assert mart["aa_test_subset_95"] == pytest.approx(
        100 * 1.959964 * math.sqrt(0.47933333 * 0.52066667 / 1000), abs=1e-6)
    assert (mart["n"], mart["seeds"], mart["n_examples"], mart["epochs"]) == (3, [0, 1, 2], [1000], [3])


def test_committed_tables_are_rebuilt_byte_for_byte(committed):
    table = analysis.comparison_table(COMMITTED, "experiments/fmnist_study/results")
    assert table == (COMMITTED / "summary.md").read_text()
    assert "| mart | 3 (0, 1, 2) | seed 2 | 55.93 ± 38.48 | 47.93 ± 31.55 | ± 3.1 | 49.14 ± 33.89 |" in table
    for sub in analysis.SUBSTUDIES:
        assert analysis.substudy_table(COMMITTED / sub) == (
            COMMITTED / sub / "summary.md").read_text()
    rows = analysis.tuning_rows(COMMITTED)
    assert analysis.tuning_table(rows) == (COMMITTED / "tuning" / "summary.md").read_text()
    assert {m: (r["run"], r["beta"]) for m, r in analysis.best_beta(rows).items()} == {
        "gkl_at": ("abl_b10_s0", 10.0), "gkl_kd": ("tune_kd_gkl_adv_b5_clip5_s0", 5.0),
        "mart": ("tune_mart_b12_s0", 12.0), "trades": ("tune_trades_b12_s0", 12.0)}


def test_readme_tables_are_the_committed_summaries():
    """Every table between <!-- X-table --> markers in the study's README is its folder's summary.md, verbatim."""
    readme = (STUDY_CODE / "README.md").read_text()
    folders = {"study": COMMITTED, "tuning": COMMITTED / "tuning",
               **{sub: COMMITTED / sub for sub in analysis.SUBSTUDIES}}
    marked = re.findall(r"<!-- (\w+)-table -->\n(.*?)<!-- /\1-table -->", readme, re.S)
    assert {name for name, _ in marked} == set(folders)
    for name, table in marked:
        assert table == (folders[name] / "summary.md").read_text(), f"README's {name} table is stale"


def test_committed_summary_csv_agrees(committed):
    runs, by_method, _ = committed
    assert analysis.check_summary_csv(COMMITTED / "summary.csv", runs) == ("consistent", [])
    attacks, means = analysis.per_attack_means(by_method)
    assert attacks == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert means["mart"][0] == pytest.approx((0.785 + 0.778 + 0.115) / 3, abs=1e-12)


# ---------------------------------------------------------------- the rules on hand-built runs


@pytest.mark.parametrize("clean, collapsed", [(0.2, False), (0.19999, True), (0.1, True), (0.85, False)])
def test_collapsed_rule_at_its_threshold(clean, collapsed):
    assert analysis.COLLAPSED_BELOW == 0.2
    assert analysis.is_collapsed({"clean_acc": clean}) is collapsed
    s = analysis.summarise_method([_run("m_s0", 0.8, 0.5), _run("m_s4", clean, 0.1)])
    assert s["collapsed"] == ([4] if collapsed else [])


def test_seed_statistics_and_their_formatting():
    assert analysis.pct_mean_std([0.5, 0.7]) == pytest.approx((60.0, 100 * math.sqrt(0.02)), abs=1e-12)
    assert analysis.pct_mean_std([0.25]) == (25.0, None)
    assert analysis.fmt(60.0, 14.142) == "60.00 ± 14.14" and analysis.fmt(25.0, None) == "25.00 (n=1, no std)"
    assert analysis.joined([3, 1, 3, 2]) == "1, 2, 3"
    assert analysis.subset_halfwidth_95(50.0, 100) == pytest.approx(100 * 1.959964 * 0.05, abs=1e-12)


def test_summary_table_of_hand_built_runs():
    summary = {"a": analysis.summarise_method([_run("a_s0", 0.8, 0.6, full=0.62), _run("a_s1", 0.9, 0.4, full=0.5)]),
               "b": analysis.summarise_method([_run("b_s2", 0.15, 0.05, n=50, full=0.1),
                                               _run("b_s3", 0.75, 0.45, n=80, autoattack_version="fast")])}
    a, b = summary["a"], summary["b"]
    assert (a["clean_mean"], a["aa_mean"], a["pgd20_full_mean"]) == pytest.approx((85.0, 50.0, 56.0), abs=1e-12)
    assert a["aa_std"] == pytest.approx(100 * math.sqrt(0.02), abs=1e-12) and a["train_hours"] == 0.5
    assert b["pgd20_full_mean"] is None  # b_s3 has no PGD-20 on the full test set: no mean of one of two
    assert b["aa_test_subset_95"] == pytest.approx(100 * 1.959964 * math.sqrt(0.25 * 0.75 / 50), abs=1e-12)
    assert b["autoattack_versions"] == ["fast", "standard"] and b["n_examples"] == [50, 80]
    table = "\n".join(summarize.table(summary, summarize.STUDY_COLUMNS).splitlines() + [
        summarize.footnote([_run("a_s0", 0.8, 0.6, full=0.62)], "somewhere/runs/*", "notebooks/02_fmnist_study.ipynb")])
    assert table.splitlines()[2:4] == [
        "| a | 2 (0, 1) | - | 85.00 ± 7.07 | 50.00 ± 14.14 | ± 9.8 | 56.00 ± 8.49 | standard | 100 | 3 "
        "| small_cnn |",
        "| b | 2 (2, 3) | seed 2 | 45.00 ± 42.43 | 25.00 ± 28.28 | ± 12.0 | - | fast, standard | 50, 80 | 3 "
        "| small_cnn |"]
    assert table.endswith("Written by notebooks/02_fmnist_study.ipynb from somewhere/runs/*/results.json.")
    assert analysis.comparability_notes(summary) == [
        "warning: runs of b differ in AutoAttack version or test points: their mean mixes evaluations that are "
        "not comparable", "note: a non-'standard' AutoAttack version is a screening number, not a headline number"]
    [gap] = analysis.gaps_to_best(summary)
    assert gap["method"] == "b" and gap["gap"] == pytest.approx(25.0, abs=1e-12)
    assert gap["se"] == pytest.approx(math.sqrt((200 + 800) / 2), abs=1e-9)  # std² 200 and 800 pp², 2 seeds each
    one_seed = {"a": a, "c": analysis.summarise_method([_run("c_s0", 0.5, 0.3)])}
    assert analysis.gaps_to_best(one_seed) == [{"method": "c", "gap": pytest.approx(20.0), "se": None}]


def test_write_summary_writes_exactly_the_text(tmp_path):
    (tmp_path / "summary.md").write_text("an older, longer table\n" * 5)
    assert analysis.write_summary(tmp_path, "| a |\n|---|\n") == tmp_path / "summary.md"
    assert (tmp_path / "summary.md").read_text() == "| a |\n|---|\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def test_collect_runs_and_the_epoch_log(tmp_path):
    metrics = [{"epoch": 1, "train_loss": 9.0}, {"epoch": 1, "train_loss": 2.0, "val_pgd_acc": 0.3},
               {"epoch": 2, "val_pgd_acc": 0.5, "val_clean_acc": 0.7}, {"note": "no epoch"}]
    _write_run(tmp_path / "runs" / "m_s1", 0.7, 0.5, metrics, config={"attack": {"eps_schedule": "linear"}})
    _write_run(tmp_path / "runs" / "m_s0", 0.6, 0.4)
    (tmp_path / "runs" / "m_s2").mkdir()  # still training
    (tmp_path / "runs" / "m_sx").mkdir()  # not <method>_s<seed>
    runs, unfinished, unnamed = analysis.collect_runs(tmp_path)
    assert [r["name"] for r in runs] == ["m_s0", "m_s1"] and (unfinished, unnamed) == (["m_s2"], ["m_sx"])
    assert runs[1]["epochs"] == metrics[1:3] and runs[1]["honesty"] == {"huge_eps": 1.0}
    assert analysis.validation_summary(runs[1]) == {"epochs": 2, "eps_schedule": "linear", "final_clean": 0.7,
                                                    "final_pgd": 0.5, "best_pgd": 0.5, "best_epoch": 2}
    assert analysis.validation_summary(runs[0]) == {"epochs": 0, "eps_schedule": "?"}
    assert analysis.final_val(tmp_path / "runs" / "m_s1") == (0.7, 0.5)
    assert analysis.final_val(tmp_path / "runs" / "m_s0") == (None, None)


def test_summary_csv_check(tmp_path):
    runs = [_run("a_s0", 0.8, 0.6), _run("a_s1", 0.7, 0.5)]
    path = tmp_path / "summary.csv"
    assert analysis.check_summary_csv(path, runs) == ("absent", [])
    path.write_text("method,seed,clean_acc,autoattack_acc\na,0,0.8000000000001,0.6\na,1,0.7,0.5\n")
    assert analysis.check_summary_csv(path, runs) == ("consistent", [])  # agreement to 1e-9
    path.write_text("method,seed,clean_acc,autoattack_acc\na,0,0.8,0.6000001\nb,0,0.5,0.2\n")
    assert analysis.check_summary_csv(path, runs) == ("mismatch", [
        "a_s0: autoattack_acc 0.6000001 in summary.csv, 0.6 in results.json",
        "a_s1 missing from summary.csv (rerun run_study.py to refresh it)", "b_s0 in summary.csv has no results.json"])


def test_eps_sweep_and_lookup():
    runs = [_run("a_s0", 0.8, 0.3), _run("a_s1", 0.8, 0.3), _run("a_s2", 0.8, 0.3)]
    runs[0]["honesty"] = {"pgd_acc_by_eps": {"0.05": 0.6, "0.1": 0.4}}
    runs[1]["honesty"] = {"pgd_acc_by_eps": {"0.05": 0.8, "0.1": 0.2, "1": 0.0}}
    sweep = analysis.eps_sweep(runs)
    assert (sweep["grid"], sweep["n"]) == ([0.05, 0.1], 2)
    assert sweep["mean"].tolist() == pytest.approx([70.0, 30.0]) and sweep["std"].tolist() == pytest.approx(
        [100 * math.sqrt(0.02)] * 2)
    assert analysis.eps_sweep(runs[1:2])["std"] is None and analysis.eps_sweep(runs[2:]) is None
    by_eps = {"0.0333333": 0.5, "0.1": 0.3}
    assert analysis.at_eps(by_eps, 0.1 / 3) == 0.5 and analysis.at_eps(by_eps, 0.10001) is None
    assert analysis.at_eps(by_eps, None) is None
    runs[1]["res"].update(suspicious_gradient_masking=True)
    runs[1]["honesty"].update(huge_eps=1.0, square_only_frac=0.02)
    assert analysis.masking_row(runs[1]) == {"flagged": True, "aa": 0.3, "pgd_at_eps": 0.2, "pgd_huge_eps": 0.0,
                                             "pgd_breaks_aa_robust": None, "square_only": 0.02}


def test_classwise_accuracy_against_the_labels():
    run = _run("a_s0", 0.75, 0.5, full=0.4)
    run["points"] = {"clean_correct": [1, 1, 0, 1], "robust_correct": [1, 0, 0, 1]}
    run["res"]["pgd20_full"]["per_class_pgd20_acc"] = [0.1, 0.2, 0.3]
    cw = analysis.classwise(run, np.array([0, 1, 0, 2, 2, 2]), 3)  # only the first 4 labels are evaluated
    assert cw == {"counts": [2, 1, 1], "clean": [0.5, 1.0, 1.0], "robust": [0.5, 0.0, 1.0],
                  "per_point_robust_acc": 0.5, "pgd20_full": [0.1, 0.2, 0.3]}
    other = dict(cw, robust=[1.0, 1.0, 0.0], pgd20_full=[0.3, 0.2, 0.1])
    methods, kinds, by_class = analysis.classwise_by_method({"a_s0": cw, "a_s1": other},
                                                            {"a": [run, dict(run, name="a_s1")], "b": []})
    assert (methods, kinds) == (["a"], ["clean", "robust", "pgd20_full"])
    assert by_class["robust"].tolist() == [[0.75, 0.5, 0.5]] and by_class["pgd20_full"].tolist() == [[0.2] * 3]
    del other["pgd20_full"]
    assert analysis.classwise_by_method({"a_s0": cw, "a_s1": other}, {"a": [run, dict(run, name="a_s1")]})[1] == [
        "clean", "robust"]


@pytest.mark.parametrize("change, in_sweep", [({}, True), ({"beta": 2.0}, True), ({"gamma": 0.2}, False),
                                              ({"symmetric": False}, False), ({"weights": "sample"}, False),
                                              ({"eps_schedule": "linear"}, False)])
def test_tuning_keeps_only_the_gkl_beta_sweep(change, in_sweep):
    method = {"name": "gkl_at", "alpha": 1.0, "gamma": 1.0, "prior_temperature": 4.0, "beta": 5.0}
    attack = {"eps_schedule": change.pop("eps_schedule", "constant")}
    assert analysis.in_beta_sweep({"config": {"method": {**method, **change}, "attack": attack}}) is in_sweep


def test_study_dir_and_recipe_names(tmp_path):
    assert analysis.study_dir(tmp_path, None) == tmp_path / "experiments" / "fmnist_study" / "results"
    assert analysis.study_dir(tmp_path, "other/results") == tmp_path / "other" / "results"
    assert analysis.study_dir(tmp_path, "/abs") == Path("/abs")
    assert analysis.study_dir(tmp_path, "~/x") == Path.home() / "x"
    assert analysis.parse_run_name("gkl_at_g1_s12") == ("gkl_at_g1", 12) and analysis.parse_run_name("_s0") is None
    assert analysis.describe_recipe({"name": "gkl_kd", "kd_loss": "gkl", "kd_adversarial": True}) == (
        "gkl_kd (gkl, adversarial inputs)")
    assert analysis.describe_recipe({"name": "trades"}) == "trades" and analysis.describe_recipe({}) == "?"
