"""Fashion-MNIST study driver: its recipes through ``advgkl sweep``, then ``summary.csv``.

    python experiments/fmnist_study/run_study.py [--methods pgd_at trades ...] [--seeds 0 1 2]
        [--set optim.epochs=3 ...] [--results experiments/fmnist_study/results] [--aa-points 1000]
        [--teacher CKPT] [--parallel N]

is ``advgkl sweep recipes/base.yaml --variants recipes/<method>.yaml ... --seeds ... --out RESULTS
--aa-points N --pgd20-full [--teacher CKPT]``: runs in RESULTS/runs/<method>_s<seed>/, finished ones
skipped, interrupted ones resumed, then standard AutoAttack topped up to N points and PGD-20 on all
10,000 test points (never for the validation-only tune_* runs); then ``advgkl summarize`` writes
RESULTS/summary.csv. The families: headline (default --methods) into results/; kd_* (--teacher) into
results/kd; abl_* into results/ablations; tune_* into results/tuning (README.md, "How to rerun").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = tuple(sorted(p.stem for p in (HERE / "recipes").glob("*.yaml") if p.stem != "base"))
METHODS = ("pgd_at", "trades", "mart", "gkl_at_g1_t4", "gkl_at_g02_t1", "gkl_at_g1_t4_const")  # the default set


def load_run(run: Path):
    """``advgkl.summarize.load_run``: a run's results with its AutoAttack evaluation on the most points."""
    from advgkl.summarize import load_run as load

    return load(run)


def summarise(results: Path) -> Path:
    """``results/summary.csv``: one row per finished run (``advgkl summarize --csv``)."""
    from advgkl.summarize import collect, runs_csv

    runs, _ = collect([results / "runs"]) if (results / "runs").is_dir() else ([], [])
    runs_csv(runs, results / "summary.csv")
    return results / "summary.csv"


def main(argv=None) -> int:
    from advgkl.cli import main as advgkl

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=RECIPES, help="recipes/<name>.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides for every run")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--aa-points", type=int, default=1000, help="top up runs whose AutoAttack used fewer test points")
    p.add_argument("--teacher", type=Path, help="frozen teacher checkpoint of the kd_* (gkl_kd) recipes")
    p.add_argument("--parallel", type=int, default=1)
    args = p.parse_args(argv)
    status = advgkl(["sweep", str(HERE / "recipes" / "base.yaml"), *args.set, "--variants",
                     *[str(HERE / "recipes" / f"{m}.yaml") for m in args.methods], "--seeds", *map(str, args.seeds),
                     "--out", str(args.results), "--aa-points", str(args.aa_points), "--pgd20-full",
                     "--parallel", str(args.parallel), *(["--teacher", str(args.teacher)] if args.teacher else [])])
    print(f"summary: {summarise(args.results)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
