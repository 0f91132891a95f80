"""Clean accuracy + AutoAttack on the first N test points, and the results.json every job writes."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from . import distributed, honesty
from .attacks import AA_VERSIONS, FAST_VERSION_LABEL, AutoAttack
from .checkpoint import RunLock, environment_info, file_sha256, load_checkpoint, write_json
from .config import Config, config_diff, from_saved
from .data import STREAMING_DATASETS, load_dataset
from .errors import UserError
from .logging import RunLogger
from .runtime import build_model, data_root, pick_memory_format, resolve_device


def check_test_size(cfg: Config) -> None:
    """eval.n_examples must fit the test set: refused before training or before an eval folder is made."""
    if cfg.eval.n_examples and cfg.data.dataset in STREAMING_DATASETS:  # counts files, decodes nothing
        from . import streaming

        streaming.check_test_size(data_root(cfg), cfg.eval.n_examples)
    elif cfg.eval.n_examples:
        load_test_points(cfg, cfg.eval.n_examples)


def load_test_points(cfg: Config, n_examples: int):
    """The first ``n_examples`` test images (float [N, C, H, W] in [0, 1]) and labels; 0 = all."""
    if cfg.data.dataset in STREAMING_DATASETS:  # decoded from disk, only the n points asked for
        from . import streaming

        return streaming.evaluation_points(data_root(cfg), n_examples, cfg.data.image_size, cfg.data.workers)
    kw = {"image_size": cfg.data.image_size} if cfg.data.dataset == "imagefolder" else {}
    images, labels = load_dataset(cfg.data.dataset, data_root(cfg), train=False, **kw)
    if n_examples > len(images):
        raise UserError(f"eval.n_examples={n_examples}: the {cfg.data.dataset} test set has {len(images)} points "
                        "(0 = all)")
    n = n_examples or len(images)
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
                                          steps=e.honesty_pgd_steps, device=device, batch_size=e.batch_size,
                                          progress=cfg.logging.progress)
        for w in result["honesty"]["warnings"]:
            print(f"[{tag}] WARNING suspicious robustness number: {w}", flush=True)
    result["eval_wall_time_s"] = time.perf_counter() - t0
    if world.is_main:
        print(summary_line(tag, result), flush=True)
    if logger is not None:
        logger.log(metrics_record(tag, result))
    return result


def metrics_record(tag: str, result: dict) -> dict:
    """The metrics.jsonl / W&B record of one evaluation."""
    aa = result["autoattack_acc"]
    return {f"eval/{tag}/clean_acc": result["clean_acc"],
            **({f"eval/{tag}/autoattack_acc": aa} if aa is not None else {}),
            **{f"eval/{tag}/{k}": v for k, v in result["per_attack_robust_acc"].items()}}


def summary_line(tag: str, evaluation: dict) -> str:
    """One evaluation (an entry of results.json's ``evaluations``) as the line printed when it ends."""
    aa = evaluation["autoattack_acc"]
    return (f"[{tag}] clean {evaluation['clean_acc']:.4f}  AutoAttack ({evaluation['autoattack_version']}) "
            f"{aa if aa is not None else 'skipped'}  on {evaluation['n_examples']} points in "
            f"{evaluation['eval_wall_time_s']:.1f}s")


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


def _weights_mismatch(model: torch.nn.Module, weights: dict, shown: int = 3) -> str:
    """The keys where ``weights`` do not fit ``model``: a few missing, unexpected and reshaped ones, with shapes."""
    own = model.state_dict()

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")

    def shape(t) -> list:
        return list(getattr(t, "shape", ()))

    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [f"{k} checkpoint {shape(weights[k])} vs model {shape(own[k])}" for k in own
                if k in weights and shape(weights[k]) != shape(own[k])]
    parts = [f"{what} {len(keys)}: {few(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)) if keys]
    return "; ".join(parts)


def model_from_checkpoint(ckpt: dict, cfg: Config, path) -> tuple[torch.nn.Module, str]:
    """The checkpoint's network (on CPU) with its EMA weights where it has them; returns (model, "ema"|"model").

    Weights of another architecture are a one-line ``UserError`` naming the first few missing,
    unexpected and shape-mismatched keys (checkpoint shape vs model shape).
    """
    model = build_model(cfg)
    weights = "ema" if ckpt.get("ema") is not None else "model"
    if not isinstance(ckpt.get(weights), dict):
        raise UserError(f"{path} holds no {weights!r} weights (an advgkl checkpoint keeps them under {weights!r})")
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as e:
        why = _weights_mismatch(model, ckpt[weights]) or str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit model {cfg.model.name} ({why})") from None
    return model, weights


# Settings that may differ between an eval and its --resume without changing the numbers.
_RESUMABLE = ("logging.", "runtime.device", "runtime.threads", "data.root")


def _is_eval_results(saved) -> bool:
    """results.json written by ``advgkl eval``: marked ``"job": "eval"`` (before the mark: it names a checkpoint)."""
    return isinstance(saved, dict) and (saved.get("job") == "eval" or ("job" not in saved and "checkpoint" in saved))


def _read_results(out: Path):
    """``out``/results.json parsed, None when absent, or "unreadable"."""
    path = out / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"


def _refuse_foreign_folder(out: Path, default_out: Path) -> None:
    """A training run's folder, or any results.json an eval did not write, is never an eval's ``--out``."""
    advice = ("choose another --out" if out == default_out
              else f"leave out --out to write to {default_out}, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; {advice}")
    marks = (("checkpoints/", (out / "checkpoints").is_dir()), ("config.yaml", (out / "config.yaml").exists()))
    for mark, present in marks:
        if present:
            raise UserError(f"{out} is a training run's folder (it has {mark}); an eval there would overwrite its "
                            f"results.json; {advice}")
    saved = _read_results(out)
    if saved is not None and not _is_eval_results(saved):
        raise UserError(f"{out} holds a results.json that advgkl eval did not write; {advice}")


def _claim_eval_output(out: Path, resume: bool, identity: dict) -> dict | None:
    """Refuse to overwrite an eval in ``out`` without ``resume``; with it, return a finished eval's saved
    results when it is this evaluation (None: run, resuming AutoAttack's state if there is one)."""
    existing = [n for n in ("results.json", "metrics.jsonl") if (out / n).exists()]
    existing += sorted(p.name for p in out.glob("autoattack_state_*.pt")) if out.is_dir() else []
    if existing and not resume:
        raise UserError(f"{out} already holds an evaluation ({', '.join(existing)}); pass --resume to continue it, "
                        "or choose another --out")
    saved = _read_results(out)
    if saved is None:
        return None
    then = from_saved(saved["config"]).to_dict() if isinstance(saved.get("config"), dict) else {}  # as read today
    diff = [f"{key}: saved {old!r} vs now {new!r}" for key, old, new in config_diff(then, identity["config"], _RESUMABLE)]
    same = (saved["checkpoint_sha256"] == identity["checkpoint_sha256"] if "checkpoint_sha256" in saved
            else Path(str(saved.get("checkpoint"))).name == Path(identity["checkpoint"]).name)  # before the hash
    if not same:
        diff.insert(0, f"checkpoint: saved {saved.get('checkpoint')} vs now {identity['checkpoint']} (other weights)")
    if diff:
        raise UserError(f"{out} holds another evaluation ({'; '.join(diff)}); choose another --out")
    try:
        summary_line("", saved["evaluations"][saved["evaluated_weights"]])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{out / 'results.json'} is not a complete advgkl eval result; delete it or choose "
                        "another --out") from None
    return saved


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _header(path: Path, weights: str, cfg: Config, dev, out: Path, world, resuming: Path | None) -> str:
    """What ``advgkl eval`` is about to do, printed before it starts."""
    e = cfg.eval
    points = f"first {e.n_examples} test points" if e.n_examples else "all test points"
    procs = f" ({world.size} processes)" if world.distributed else ""
    if e.version == "none":
        aa = "AutoAttack: none (clean accuracy only)"
    else:
        label = FAST_VERSION_LABEL if e.version == "fast" else e.version
        attacks = e.attacks if e.version == "custom" else AA_VERSIONS[e.version]
        aa = (f"AutoAttack {label}: {', '.join(attacks)} (batch {e.batch_size}, seed {cfg.runtime.seed}, "
              f"pyautoattack {_package_version('pyautoattack')})")
    checks = (f"then gradient-masking checks (PGD-{e.honesty_pgd_steps})" if e.honesty_checks
              else "no gradient-masking checks")
    lines = [f"advgkl eval {path} ({weights} weights, {cfg.model.name}) -> {out}",
             f"  {cfg.data.dataset}, {points}, threat model {cfg.attack.norm} eps {e.eps or cfg.attack.eps:g}, "
             f"device {dev}{procs}",
             f"  {aa}; {checks}"]
    if resuming is not None:
        lines.append(f"  resuming from {resuming}")
    return "\n".join(lines)


def evaluate_checkpoint(path, *, out=None, n_examples=None, version=None, attacks=None, batch_size=None,
                        device="auto", wandb="offline", data_root=None, resume: bool = False) -> dict:
    """``advgkl eval``: rebuild the model from a checkpoint's own config and evaluate it.

    ``out`` (default ``<run>/eval_<checkpoint>``) is locked for the job. It must not be a training run's
    folder; one that already holds an evaluation needs ``resume``: an interrupted one continues from its
    AutoAttack state, a finished one is re-reported from its results.json without attacking again.
    Under torchrun the ranks share AutoAttack's chunks; rank 0 alone writes ``out``.
    """
    with distributed.process_group(device):
        return _evaluate_checkpoint(path, out=out, n_examples=n_examples, version=version, attacks=attacks,
                                    batch_size=batch_size, device=device, wandb=wandb, data_root=data_root,
                                    resume=resume)


def _rereport(finished: dict, out: Path, identity: dict, tag: str, world) -> dict:
    if world.is_main:
        print(f"advgkl eval: {out} already holds this finished evaluation of {identity['checkpoint']}; "
              "re-reporting its saved results (nothing is re-run)", flush=True)
        print(summary_line(tag, finished["evaluations"][finished["evaluated_weights"]]), flush=True)
    return {**finished, "out": str(out)}


def _eval_config(ckpt: dict, path: Path, eval_options: dict, data_root, wandb: str) -> Config:
    """The checkpoint's own recipe with the command line's eval options, validated like a recipe."""
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} holds no recipe ('config'), so its model cannot be rebuilt")
    raw = ckpt["config"]
    raw["eval"].update({k: v for k, v in eval_options.items() if v is not None})
    if data_root is not None:
        raw["data"]["root"] = data_root
    raw["logging"]["wandb"] = wandb
    return from_saved(raw)


def _evaluate_checkpoint(path, *, out, n_examples, version, attacks, batch_size, device, wandb, data_root,
                         resume) -> dict:
    path = Path(path)
    ckpt = load_checkpoint(path)
    cfg = _eval_config(ckpt, path, {"n_examples": n_examples, "version": version, "attacks": attacks,
                                    "batch_size": batch_size}, data_root, wandb)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    world = distributed.current()
    dev = world.device(resolve_device(device, flag="--device"))
    model, weights = model_from_checkpoint(ckpt, cfg, path)
    model.to(dev)
    with world.main_first():  # a first-use download happens once
        check_test_size(cfg)
    default_out = path.parent.parent / f"eval_{path.stem}"
    out = Path(out) if out else default_out
    tag = path.stem
    identity = {"checkpoint": str(path.resolve()), "checkpoint_sha256": file_sha256(path), "config": cfg.to_dict()}
    with contextlib.ExitStack() as lock:

        def claim() -> dict | None:  # rank 0 only: the other ranks never touch the output folder
            _refuse_foreign_folder(out, default_out)
            locked = (out / ".lock").exists()
            if locked:  # a running eval's folder: say so before anything else
                lock.enter_context(RunLock(out))
            finished = _claim_eval_output(out, resume, identity)
            if finished is None and not locked:
                lock.enter_context(RunLock(out))  # creates the folder and .lock, once nothing stands against the eval
            return finished

        finished = world.on_main(claim)  # rank 0's refusal ends every rank
        if finished is not None:
            return _rereport(finished, out, identity, tag, world)
        state = out / f"autoattack_state_{tag}.pt"
        if world.is_main:
            resuming = state if cfg.eval.version != "none" and state.exists() else None
            print(_header(identity["checkpoint"], weights, cfg, dev, out, world, resuming), flush=True)
        evaluation = evaluate_model(model, cfg, dev, out, tag=tag)
        # the logger starts once the numbers exist: an eval refused by AutoAttack's state leaves no W&B files
        logger = RunLogger(out, mode=cfg.logging.wandb, project=cfg.logging.project, name=f"eval-{cfg.name}",
                           group=cfg.logging.group, tags=cfg.logging.tags, config=cfg.to_dict(),
                           job_type="eval", resume=resume) if world.is_main else distributed.NullLogger()
        logger.log(metrics_record(tag, evaluation))
        results = {"job": "eval", **gather_results(cfg, {weights: evaluation}, train_time_s=None, evaluated=weights)}
        results["checkpoint"] = identity["checkpoint"]
        results["checkpoint_sha256"] = identity["checkpoint_sha256"]
        results["environment"] = environment_info()
        if world.is_main:
            write_json(out / "results.json", results)
        logger.summary({k: results[k] for k in ("clean_acc", "autoattack_acc", "suspicious_gradient_masking")
                        if results[k] is not None})
        logger.save_artifact(out / "results.json", name=f"eval-{cfg.name}")
        logger.finish()
    results["out"] = str(out)
    return results
