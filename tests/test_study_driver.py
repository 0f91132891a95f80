"""The Fashion-MNIST study driver (recipes through advgkl sweep) on a shrunken recipe: train, AutoAttack
top-up, PGD-20 on all 10,000 test points, the summary CSV, and the refusals."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from advgkl.data import load_dataset

DRIVER = Path(__file__).resolve().parents[1] / "experiments" / "fmnist_study" / "run_study.py"
# a few seconds instead of the study's minutes: tiny model, 1,024 images, one epoch, 20 AutoAttack points
SHRINK = ["model.name=tiny_cnn", "data.subset=1024", "data.val_size=128", "optim.epochs=1", "attack.steps=2",
          "eval.n_examples=20", "eval.batch_size=20", "logging.wandb=disabled", "runtime.threads=1"]


@pytest.fixture(scope="module")
def run_study():
    spec = importlib.util.spec_from_file_location("_run_study_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(run_study, fmnist_root, tmp_path_factory):
    """One pgd_at run trained by the driver, then topped up to 40 AutoAttack points and PGD-20 on 10k."""
    results = tmp_path_factory.mktemp("study")
    run_study.main(["--methods", "pgd_at", "--seeds", "0", "--results", str(results), "--aa-points", "40",
                    "--set", *SHRINK, f"data.root={fmnist_root}"])
    return results


def test_recipes_are_discovered_and_the_default_methods_exist(run_study, tmp_path):
    from advgkl.sweep import plan

    assert set(run_study.METHODS) <= set(run_study.RECIPES)
    assert {"kd_kl_adv", "kd_gkl_adv", "abl_asym", "abl_sample_w"} <= set(run_study.RECIPES)
    assert "base" not in run_study.RECIPES
    (tmp_path / "t.pt").write_bytes(b"")
    recipes = run_study.HERE / "recipes"
    specs = plan([str(recipes / "base.yaml")], [], [], [0], tmp_path, teacher=str(tmp_path / "t.pt"),
                 variants=[str(recipes / f"{name}.yaml") for name in run_study.RECIPES])  # every recipe is valid
    assert [s["name"] for s in specs] == [f"{name}_s0" for name in run_study.RECIPES]
    assert all(s["_raw"]["optim"]["epochs"] == 3 for s in specs)
    kd = [s for s in specs if s["_raw"]["method"]["name"] == "gkl_kd"]
    assert kd and all(s["overrides"][-1] == f"method.teacher={tmp_path / 't.pt'}" for s in kd)


def test_top_up_evaluates_more_points_and_the_summary_uses_them(study, run_study):
    run = study / "runs" / "pgd_at_s0"
    trained = json.loads((run / "results.json").read_text())
    topped = json.loads((run / "aa40" / "results.json").read_text())
    assert trained["n_examples"] == 20 and topped["n_examples"] == 40
    assert topped["autoattack_version"] == "standard"
    # same weights, same test points: the first 20 clean verdicts agree
    clean_20 = trained["per_point"][trained["evaluated_weights"]]["clean_correct"]
    clean_40 = topped["per_point"][topped["evaluated_weights"]]["clean_correct"]
    assert clean_40[:20] == clean_20
    loaded = run_study.load_run(run)
    assert loaded["n_examples"] == 40 and loaded["autoattack_acc"] == topped["autoattack_acc"]
    assert loaded["wall_time_s"]["train"] == trained["wall_time_s"]["train"] > 0
    [row] = list(csv.DictReader((study / "summary.csv").open()))
    assert row["method"] == "pgd_at" and row["n_examples"] == "40"
    assert float(row["autoattack_acc"]) == topped["autoattack_acc"]
    assert float(row["pgd20_acc_full"]) == loaded["pgd20_full"]["pgd20_acc"]
    assert row["n_full"] == "10000"


def test_pgd20_on_the_full_test_set(study, run_study, fmnist_root):
    from advgkl.checkpoint import load_checkpoint
    from advgkl.config import from_dict
    from advgkl.evaluate import model_from_checkpoint

    p = json.loads((study / "runs" / "pgd_at_s0" / "pgd20_full.json").read_text())
    assert p["n_examples"] == 10_000 and p["eps"] == 0.1
    ckpt = load_checkpoint(study / "runs" / "pgd_at_s0" / "checkpoints" / "final.pt")
    model, _ = model_from_checkpoint(ckpt, from_dict(ckpt["config"]), "final.pt")
    x, y = load_dataset("fashion_mnist", fmnist_root, train=False)
    with torch.no_grad():
        clean = (model.eval()(x.float() / 255).argmax(1) == y).float()
    # recomputed independently in NCHW (the driver runs channels_last): at most 2 of 10,000 verdicts may differ
    assert p["clean_acc"] == pytest.approx(clean.mean().item(), abs=2e-4)
    assert p["per_class_clean_acc"] == pytest.approx([clean[y == c].mean().item() for c in range(10)], abs=2e-3)
    # 1,000 test images per class: the overall accuracy is the mean of the per-class ones
    assert p["pgd20_acc"] == pytest.approx(sum(p["per_class_pgd20_acc"]) / 10, abs=1e-6)
    assert 0.05 < p["pgd20_acc"] < p["clean_acc"] - 0.02  # a 1-epoch tiny model: PGD costs it accuracy


def test_second_sitting_skips_finished_work(study, run_study, capsys):
    before = {p: p.stat().st_mtime_ns for p in study.rglob("*.json") if p.name != "sweep.json"}
    assert run_study.main(["--methods", "pgd_at", "--seeds", "0", "--results", str(study), "--aa-points", "40",
                           "--set", *SHRINK]) == 0
    assert f"sweep {study}: 1 run(s), 1 finished, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in study.rglob("*.json") if p.name != "sweep.json"} == before


def test_distillation_recipe_needs_a_teacher(run_study, tmp_path, capsys):
    assert run_study.main(["--methods", "kd_kl_adv", "--seeds", "0", "--results", str(tmp_path / "r")]) == 2
    assert "run kd_kl_adv_s0 (method gkl_kd) distils a teacher: pass --teacher" in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists()


@pytest.mark.parametrize("version, n, top_up, pgd20", [
    ("standard", 20, True, True), ("standard", 40, False, True),
    ("fast", 20, False, True),  # a screening run is not topped up to standard AutoAttack
    ("none", 20, False, False)])  # a tune_* run (validation only) never sees the test set
def test_which_extras_a_run_gets(tmp_path, version, n, top_up, pgd20):
    from advgkl.sweep import needs_pgd20, top_up_target

    run = tmp_path / "runs" / "x_s0"
    run.mkdir(parents=True)
    assert top_up_target(run, 40) is None and not needs_pgd20(run, True)  # not trained yet: nothing to add
    (run / "results.json").write_text(json.dumps({"n_examples": n, "autoattack_version": version}))
    assert (top_up_target(run, 40) == run / "aa40") is top_up and top_up_target(run, 0) is None
    assert needs_pgd20(run, True) is pgd20 and not needs_pgd20(run, False)
