"""Clean accuracy + AutoAttack on the first N test points, and the results.json every job writes."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import distributed, honesty
from .attacks import AutoAttack
from .checkpoint import environment_info, load_checkpoint, write_json
from .config import Config, from_saved
from .data import load_dataset
from .errors import UserError
from .logging import RunLogger
from .runtime import build_model, data_root, pick_memory_format, resolve_device


def load_test_points(cfg: Config, n_examples: int):

    """The first ``n_examples`` test images (float [N, C, H, W] in [0, 1]) and labels; 0 = all."""
    kw = {"image_size": cfg.data.image_size} if cfg.data.dataset == "imagefolder" else {}
    images, labels = load_dataset(cfg.data.dataset, data_root(cfg), train=False, **kw)
    n = len(images) if not n_examples else min(n_examples, len(images))
    return images[:n].float().div_(255), labels[:n]


@torch.no_grad()
def clean_accuracy(model, x, y, device, batch_size: int = 500) -> torch.Tensor:
    """Per-point correctness (bool [N]) in eval mode, fp32."""
    was_training = model.training
    model.eval()
    correct = [model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]
               for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(correct)


def evaluate_model(model, cfg: Config, device, out: Path, tag: str = "final", logger: RunLogger | None = None) -> dict:
    """Clean + AutoAttack accuracy of ``model`` on the first ``cfg.eval.n_examples`` test points.

    AutoAttack state is saved under ``out`` after every chunk, so a killed evaluation resumes. Under
    torchrun every rank calls this: the ranks share AutoAttack's chunks, rank 0 alone prints and saves.
    """
    e = cfg.eval
    eps = e.eps or cfg.attack.eps
    world = distributed.current()
    with world.main_first():  # a first-use download happens once
        x, y = load_test_points(cfg, e.n_examples)
    # AutoAttack always runs in fp32; channels_last weights make the convolutions take the fast path
    model = model.float().eval().to(memory_format=pick_memory_format(cfg, torch.device(device)))
    t0 = time.perf_counter()
    result = {"n_examples": len(x), "eps": eps, "threat_model": cfg.attack.norm}
    if e.version == "none":
        correct = clean_accuracy(model, x, y, device, e.batch_size)
        result.update(clean_acc=correct.float().mean().item(), autoattack_acc=None,
                      per_attack_robust_acc={}, autoattack_version="none")
    else:
        aa = AutoAttack(model, norm=cfg.attack.norm, eps=eps, version=e.version,
                        attacks=e.attacks if e.version == "custom" else None, batch_size=e.batch_size,
                        seed=cfg.runtime.seed, device=device, state_path=out / f"autoattack_state_{tag}.pt",
                        progress=cfg.logging.progress)
        r = aa(x, y)  # under torchrun the ranks share AutoAttack's chunks (attacks.AutoAttack)
        result.update(clean_acc=r.clean_acc, autoattack_acc=r.robust_acc,
                      per_attack_robust_acc=r.per_attack_robust_acc, autoattack_version=r.version,
                      autoattack_attacks=r.attacks, per_point=r.to_dict()["per_point"])
    if e.honesty_checks and world.is_main:  # not sharded yet: rank 0 checks, the others wait
        aa_robust = broken_by = None
        if e.version != "none":
            aa_robust, broken_by = r.robust_correct, result["per_point"].get("broken_by")
        result["honesty"] = honesty.check(model, x, y, eps=eps, norm=cfg.attack.norm, aa_robust=aa_robust,
                                          broken_by=broken_by, attacks=result.get("autoattack_attacks"),
                                          steps=e.honesty_pgd_steps, device=device, batch_size=e.batch_size)
        for w in result["honesty"]["warnings"]:
            print(f"[{tag}] WARNING suspicious robustness number: {w}", flush=True)
    result["eval_wall_time_s"] = time.perf_counter() - t0
    if world.is_main:
        print(f"[{tag}] clean {result['clean_acc']:.4f}  AutoAttack ({result['autoattack_version']}) "
              f"{result['autoattack_acc'] if result['autoattack_acc'] is not None else 'skipped'}  "
              f"on {len(x)} points in {result['eval_wall_time_s']:.1f}s", flush=True)
    if logger is not None:
        logger.log({f"eval/{tag}/clean_acc": result["clean_acc"],
                    **({f"eval/{tag}/autoattack_acc": result["autoattack_acc"]} if result["autoattack_acc"] is not None else {}),
                    **{f"eval/{tag}/{k}": v for k, v in result["per_attack_robust_acc"].items()}})
    return result


def gather_results(cfg: Config, evaluations: dict, *, train_time_s: float | None, evaluated: str) -> dict:
    """The results.json layout: headline numbers of the ``evaluated`` weights, then everything else."""
    head = evaluations[evaluated]
    per_point = {k: v.pop("per_point", None) for k, v in evaluations.items()}
    return {
        "name": cfg.name,
        "dataset": cfg.data.dataset,
        "threat_model": cfg.attack.norm,
        "eps": head["eps"],
        "model": cfg.model.name,
        "method": cfg.method.name,
        "evaluated_weights": evaluated,
        "clean_acc": head["clean_acc"],
        "autoattack_acc": head["autoattack_acc"],
        "per_attack_robust_acc": head["per_attack_robust_acc"],
        "suspicious_gradient_masking": any(v.get("honesty", {}).get("suspicious_gradient_masking", False)
                                           for v in evaluations.values()),
        "warnings": [w for v in evaluations.values() for w in v.get("honesty", {}).get("warnings", [])],
        "n_examples": head["n_examples"],
        "autoattack_version": head["autoattack_version"],
        "seed": cfg.runtime.seed,
        "epochs": cfg.optim.epochs,
        "wall_time_s": {"train": train_time_s, "eval": sum(v["eval_wall_time_s"] for v in evaluations.values())},
        "evaluations": evaluations,
        "per_point": per_point,
        "config": cfg.to_dict(),
    }


def model_from_checkpoint(ckpt: dict, cfg: Config, path) -> tuple[torch.nn.Module, str]:
    """The checkpoint's network (on CPU) with its EMA weights where it has them; returns (model, "ema"|"model")."""
    model = build_model(cfg)
    weights = "ema" if ckpt.get("ema") is not None else "model"
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit model {cfg.model.name} ({str(e).splitlines()[0]})") from None
    return model, weights


def evaluate_checkpoint(path, *, out=None, n_examples=None, version=None, attacks=None, batch_size=None,
                        device="auto", wandb="offline", data_root=None) -> dict:
    """``advgkl eval``: rebuild the model from a checkpoint's own config and evaluate it.

    Under torchrun the ranks share AutoAttack's chunks; rank 0 alone writes ``out``.
    """
    with distributed.process_group(device):
        return _evaluate_checkpoint(path, out=out, n_examples=n_examples, version=version, attacks=attacks,
                                    batch_size=batch_size, device=device, wandb=wandb, data_root=data_root)


def _evaluate_checkpoint(path, *, out, n_examples, version, attacks, batch_size, device, wandb, data_root) -> dict:
    path = Path(path)
    ckpt = load_checkpoint(path)
    raw = ckpt["config"]
    for key, value in (("n_examples", n_examples), ("version", version), ("attacks", attacks),
                       ("batch_size", batch_size)):
        if value is not None:
            raw["eval"][key] = value
    if data_root is not None:
        raw["data"]["root"] = data_root
    raw["logging"]["wandb"] = wandb
    cfg = from_saved(raw)  # validates the overrides like a recipe
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    world = distributed.current()
    dev = world.device(resolve_device(device, flag="--device"))
    model, weights = model_from_checkpoint(ckpt, cfg, path)
    model.to(dev)
    out = Path(out) if out else path.parent.parent / f"eval_{path.stem}"
    if world.is_main:  # the other ranks never touch the output folder
        out.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out, mode=cfg.logging.wandb, project=cfg.logging.project, name=f"eval-{cfg.name}",
                       group=cfg.logging.group, tags=cfg.logging.tags, config=cfg.to_dict(),
                       job_type="eval") if world.is_main else distributed.NullLogger()
    evaluation = evaluate_model(model, cfg, dev, out, tag=path.stem, logger=logger)
    results = gather_results(cfg, {weights: evaluation}, train_time_s=None, evaluated=weights)
    results["checkpoint"] = str(path)
    results["environment"] = environment_info()
    if world.is_main:
        write_json(out / "results.json", results)
    logger.summary({k: results[k] for k in ("clean_acc", "autoattack_acc", "suspicious_gradient_masking")
                    if results[k] is not None})
    logger.save_artifact(out / "results.json", name=f"eval-{cfg.name}")
    logger.finish()
    results["out"] = str(out)
    return results
