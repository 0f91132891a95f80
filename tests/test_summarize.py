"""advgkl summarize: the committed study's tables, CSV and plot rebuilt byte for byte by the command, the
default columns (masking flag), grouping by everything but the seed, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from advgkl import summarize
from advgkl.cli import main

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "fmnist_study" / "results"


def test_the_command_rebuilds_the_committed_study_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(STUDY.parents[2])  # the footnote names the folder as given
    out = {k: tmp_path / f"summary.{k}" for k in ("md", "csv", "png")}
    study = ["--columns", *summarize.STUDY_COLUMNS]
    assert main(["summarize", "experiments/fmnist_study/results", *study, "--md", str(out["md"]),
                 "--csv", str(out["csv"]), "--png", str(out["png"])]) == 0
    md = out["md"].read_text()
    assert md.replace("advgkl summarize", "notebooks/02_fmnist_study.ipynb") == (STUDY / "summary.md").read_text()
    assert out["csv"].read_bytes() == (STUDY / "summary.csv").read_bytes()
    assert out["png"].read_bytes() == (STUDY / "summary.png").read_bytes()
    assert md in capsys.readouterr().out
    for sub in ("kd", "ablations", "tricks", "a4"):
        assert main(["summarize", str(STUDY / sub), "--columns", *summarize.SHORT_COLUMNS, "--no-footnote",
                     "--md", str(tmp_path / f"{sub}.md"), "--csv", str(tmp_path / f"{sub}.csv")]) == 0
        assert (tmp_path / f"{sub}.md").read_text() == (STUDY / sub / "summary.md").read_text()
        assert (tmp_path / f"{sub}.csv").read_bytes() == (STUDY / sub / "summary.csv").read_bytes()


def test_default_columns_show_the_masking_flag_and_pgd20_points():
    done = summarize.summarize([STUDY])
    lines = done["markdown"].splitlines()
    assert lines[0].endswith("| PGD-20 % (all 10k) | AutoAttack version | test points | epochs | model | masking |")
    [mart] = [line for line in lines if line.startswith("| mart |")]
    assert mart.endswith("| 49.14 ± 33.89 | standard | 1000 | 3 | small_cnn | seed 2 |")  # the collapsed seed
    assert sum(line.endswith("| - |") for line in lines) == 5  # the other five methods: none flagged
    assert [len(rs) for rs in done["groups"].values()] == [3] * 6 and done["unfinished"] == []


def _run(folder: Path, name: str, clean: float, aa: float, seed: int | None = None, **config) -> None:
    folder.mkdir(parents=True)
    seed = int(name[-1]) if seed is None else seed
    cfg = {"name": name, "model": {"name": "tiny_cnn"}, "runtime": {"seed": seed}, **config}
    (folder / "results.json").write_text(json.dumps({
        "clean_acc": clean, "autoattack_acc": aa, "n_examples": 100, "seed": seed, "epochs": 1,
        "autoattack_version": "standard", "wall_time_s": {"train": 1.0, "eval": 1.0}, "config": cfg,
        "per_attack_robust_acc": {"clean": clean, "apgd-ce": aa}, "eps": 0.1, "dataset": "fashion_mnist"}))


def test_groups_are_everything_but_the_seed(tmp_path):
    _run(tmp_path / "a_s0", "a_s0", 0.8, 0.5)
    _run(tmp_path / "a_s1", "a_s1", 0.6, 0.3, eval={"n_examples": 7}, logging={"wandb": "online"})  # not the weights
    _run(tmp_path / "a_s2", "a_s2", 0.9, 0.7, optim={"lr": 0.5})  # another setting under the same name
    _run(tmp_path / "b", "b", 0.1, 0.1, seed=1)  # not named <name>_s<seed>: its own group, seed from results.json
    (tmp_path / "c_s0").mkdir()  # still training
    done = summarize.summarize([tmp_path], columns=["method", "runs", "clean", "autoattack", "collapsed"],
                               with_footnote=False, csv_path=tmp_path / "s.csv")
    assert {g: [r["seed"] for r in rs] for g, rs in done["groups"].items()} == {"a#2": [2], "a": [0, 1], "b": [1]}
    assert done["markdown"].splitlines()[2:] == [
        "| a#2 | 1 (2) | 90.00 (n=1, no std) | 70.00 (n=1, no std) | - |",
        "| a | 2 (0, 1) | 70.00 ± 14.14 | 40.00 ± 14.14 | - |",
        "| b | 1 (1) | 10.00 (n=1, no std) | 10.00 (n=1, no std) | seed 1 |"]
    assert done["unfinished"] == ["c_s0"]
    assert (tmp_path / "s.csv").read_text().splitlines()[1] == "a,0,0.8,0.5,standard,100,1,1.0,1.0,,0.5"


@pytest.mark.parametrize("args, message", [
    (["missing"], "missing is not a folder of runs"),
    (["EMPTY"], "no finished runs (folders with results.json) in"),
    (["RUNS", "--columns", "method", "accuracy"], "--columns accuracy: unknown; choose from method, run,"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "runs" / "a_s0", "a_s0", 0.8, 0.5)
    args = [{"EMPTY": str(tmp_path / "empty"), "RUNS": str(tmp_path / "runs")}.get(a, a) for a in args]
    assert main(["summarize", *args, "--md", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "t.md").exists()


def test_the_command_lists_unfinished_runs(tmp_path, capsys):
    _run(tmp_path / "a_s0", "a_s0", 0.8, 0.5)
    (tmp_path / "a_s1").mkdir()
    assert main(["summarize", str(tmp_path), "--columns", "method", "clean", "--no-footnote"]) == 0
    assert capsys.readouterr().out == ("| method | clean % |\n|---|---|\n| a | 80.00 (n=1, no std) |\n"
                                       "not finished (no results.json), left out: a_s1\n")
