"""Fashion-MNIST study driver: every (method, seed) run, skipping runs whose results already exist.

    python experiments/fmnist_study/run_study.py [--methods pgd_at trades ...] [--seeds 0 1 2]
        [--set optim.epochs=3 ...] [--results experiments/fmnist_study/results]

Each run is `advgkl train recipes/base.yaml + recipes/<method>.yaml`, written to
results/runs/<method>_s<seed>/; an interrupted run is resumed from its last checkpoint. Then, once per
run (skipped when its file exists):
  * aa<N>/results.json: standard AutoAttack on the first N = --aa-points test points of the final
    weights, when the training job's own standard evaluation used fewer points (older runs used 500);
  * pgd20_full.json: PGD-20 (CE, uniform start, step 2.5 eps/20) on all 10,000 test points, overall and
    per class; not for tune_*.yaml runs, which are judged on the validation split only.

The recipe families, each into its own --results folder:
  headline (default --methods) into results/, standard AutoAttack on 1,000 points, 3 seeds;
  kd_*   robust distillation into a mini_cnn student, --teacher <the best run's final.pt>, into results/kd;
  abl_*  one-change ablations of GKL-AT, fast screening attack on 500 points, into results/ablations;
  tune_* other beta values of TRADES / MART, validation split only, into results/tuning.
At the end results/summary.csv gets one row per finished run (method, seed, clean, AutoAttack on the
most points available, per-attack, PGD-20 on the full test set, time).
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
RECIPES = tuple(sorted(p.stem for p in (HERE / "recipes").glob("*.yaml") if p.stem != "base"))
METHODS = ("pgd_at", "trades", "mart", "gkl_at_g1_t4", "gkl_at_g02_t1", "gkl_at_g1_t4_const")  # the default set


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def recipe(method: str) -> dict:
    base = yaml.safe_load((HERE / "recipes" / "base.yaml").read_text())
    return merge(base, yaml.safe_load((HERE / "recipes" / f"{method}.yaml").read_text()))


def run_one(method: str, seed: int, overrides: list[str], results: Path, teacher: Path | None = None) -> Path:
    from advgkl.config import apply_overrides, from_dict
    from advgkl.errors import UserError
    from advgkl.trainers import train

    out = results / "runs" / f"{method}_s{seed}"
    if (out / "results.json").exists():
        print(f"skip {out.name}: results exist", flush=True)
        return out
    raw = recipe(method)
    if raw["method"]["name"] == "gkl_kd":
        if teacher is None or not teacher.is_file():
            raise UserError(f"{method} distils a teacher: pass --teacher <checkpoint .pt> (got {teacher})")
        raw["method"]["teacher"] = str(teacher)
    raw = apply_overrides(raw, [f"name={method}_s{seed}", f"runtime.seed={seed}", *overrides])
    t0 = time.time()
    train(from_dict(raw), out, resume=True)
    print(f"done {out.name} in {time.time() - t0:.0f}s", flush=True)
    return out


def top_up_autoattack(out: Path, n_points: int) -> None:
    """Standard AutoAttack on the first ``n_points`` test points when the run's own evaluation used fewer."""
    from advgkl.evaluate import evaluate_checkpoint

    done = json.loads((out / "results.json").read_text())
    have, target = done["n_examples"], out / f"aa{n_points}" / "results.json"
    if have >= n_points or target.exists() or done["autoattack_version"] in ("none", "fast"):
        return  # enough points already, or a tuning run (validation only) / a screening run (fast attack)
    ckpt = out / "checkpoints" / "final.pt"
    if not ckpt.exists():
        print(f"WARNING {out.name}: AutoAttack used {have} points and {ckpt} is gone; cannot top up", flush=True)
        return
    t0 = time.time()
    evaluate_checkpoint(ckpt, out=target.parent, n_examples=n_points, version="standard", wandb="disabled")
    print(f"{out.name}: AutoAttack on {n_points} points in {time.time() - t0:.0f}s", flush=True)


def pgd20_full(out: Path) -> None:
    """PGD-20 accuracy of the final weights on the whole test set, overall and per class."""
    import torch

    from advgkl.checkpoint import load_checkpoint, write_json
    from advgkl.config import from_saved
    from advgkl.evaluate import clean_accuracy, load_test_points, model_from_checkpoint
    from advgkl.honesty import pgd_correct
    from advgkl.runtime import pick_memory_format

    target = out / "pgd20_full.json"
    ckpt_path = out / "checkpoints" / "final.pt"
    if target.exists() or not ckpt_path.exists():
        return
    if json.loads((out / "results.json").read_text())["autoattack_version"] == "none":
        return  # a tuning run (tune_*.yaml): it is judged on the validation split only, never on test
    ckpt = load_checkpoint(ckpt_path)
    cfg = from_saved(ckpt["config"])
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = torch.device("cpu")
    model, weights = model_from_checkpoint(ckpt, cfg, ckpt_path)
    model = model.eval().to(memory_format=pick_memory_format(cfg, device))
    x, y = load_test_points(cfg, 0)
    t0 = time.time()
    torch.manual_seed(cfg.runtime.seed)
    clean = clean_accuracy(model, x, y, device)
    robust = pgd_correct(model, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, device=device)
    classes = sorted(set(y.tolist()))
    write_json(target, {
        "attack": "PGD-20, CE, uniform random start, step 2.5 eps / 20", "eps": cfg.attack.eps, "weights": weights,
        "n_examples": len(x), "clean_acc": clean.float().mean().item(), "pgd20_acc": robust.float().mean().item(),
        "per_class_clean_acc": [clean[y == c].float().mean().item() for c in classes],
        "per_class_pgd20_acc": [robust[y == c].float().mean().item() for c in classes],
        "wall_time_s": time.time() - t0})
    print(f"{out.name}: PGD-20 on {len(x)} points {robust.float().mean().item():.4f} in {time.time() - t0:.0f}s",
          flush=True)


def load_run(run: Path) -> dict | None:
    """A finished run's results: its results.json, with the AutoAttack evaluation on the most test points
    (an aa<N>/results.json top-up where one exists) and the training job's seed, epochs and train time;
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


def summarise(results: Path) -> Path:
    rows = []
    for path in sorted((results / "runs").glob("*/results.json")):
        r = load_run(path.parent)
        method, seed = path.parent.name.rsplit("_s", 1)
        row = {"method": method, "seed": int(seed), "clean_acc": r["clean_acc"],
               "autoattack_acc": r["autoattack_acc"], "autoattack_version": r["autoattack_version"],
               "n_examples": r["n_examples"], "epochs": r["epochs"],
               "train_time_s": round(r["wall_time_s"]["train"], 1), "eval_time_s": round(r["wall_time_s"]["eval"], 1),
               "suspicious_gradient_masking": r.get("suspicious_gradient_masking")}
        if r["pgd20_full"] is not None:
            p = r["pgd20_full"]
            row.update(clean_acc_full=p["clean_acc"], pgd20_acc_full=p["pgd20_acc"], n_full=p["n_examples"])
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
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=RECIPES, help="recipes/<name>.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides for every run")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--aa-points", type=int, default=1000,
                   help="top up runs whose AutoAttack used fewer test points (0 = never)")
    p.add_argument("--teacher", type=Path, help="frozen teacher checkpoint of the kd_* (gkl_kd) recipes")
    args = p.parse_args(argv)
    for seed in args.seeds:  # seeds outermost: a partial study still compares every method
        for method in args.methods:
            out = run_one(method, seed, args.set, args.results, args.teacher)
            if args.aa_points:
                top_up_autoattack(out, args.aa_points)
            pgd20_full(out)
    print(f"summary: {summarise(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
