"""Fashion-MNIST study driver: every (method, seed) run, skipping runs whose results already exist.

    python experiments/fmnist_study/run_study.py [--methods pgd_at trades ...] [--seeds 0 1 2]
        [--set optim.epochs=3 ...] [--results experiments/fmnist_study/results]

Each run is `advgkl train recipes/base.yaml + recipes/<method>.yaml`, written to
results/runs/<method>_s<seed>/; an interrupted run is resumed from its last checkpoint. At the end
results/summary.csv gets one row per finished run (method, seed, clean, AutoAttack, per-attack, time).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
METHODS = ("pgd_at", "trades", "mart", "gkl_at_g1_t4", "gkl_at_g02_t1", "gkl_at_g1_t4_const")


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def recipe(method: str) -> dict:
    base = yaml.safe_load((HERE / "recipes" / "base.yaml").read_text())
    return merge(base, yaml.safe_load((HERE / "recipes" / f"{method}.yaml").read_text()))


def run_one(method: str, seed: int, overrides: list[str], results: Path) -> Path:
    from advgkl.config import apply_overrides, from_dict
    from advgkl.trainers import train

    out = results / "runs" / f"{method}_s{seed}"
    if (out / "results.json").exists():
        print(f"skip {out.name}: results exist", flush=True)
        return out
    raw = apply_overrides(recipe(method), [f"name={method}_s{seed}", f"runtime.seed={seed}", *overrides])
    t0 = time.time()
    train(from_dict(raw), out, resume=True)
    print(f"done {out.name} in {time.time() - t0:.0f}s", flush=True)
    return out


def summarise(results: Path) -> Path:
    rows = []
    for path in sorted((results / "runs").glob("*/results.json")):
        r = json.loads(path.read_text())
        method, seed = path.parent.name.rsplit("_s", 1)
        row = {"method": method, "seed": int(seed), "clean_acc": r["clean_acc"],
               "autoattack_acc": r["autoattack_acc"], "autoattack_version": r["autoattack_version"],
               "n_examples": r["n_examples"], "epochs": r["epochs"],
               "train_time_s": round(r["wall_time_s"]["train"], 1), "eval_time_s": round(r["wall_time_s"]["eval"], 1),
               "suspicious_gradient_masking": r.get("suspicious_gradient_masking")}
        row.update({f"aa_{k}": v for k, v in r["per_attack_robust_acc"].items() if k != "clean"})
        rows.append(row)
    out = results / "summary.csv"
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides for every run")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    for seed in args.seeds:  # seeds outermost: a partial study still compares every method
        for method in args.methods:
            run_one(method, seed, args.set, args.results)
    print(f"summary: {summarise(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
