"""Training: one loss function per method, one shared loop, AWP and weight EMA.

A method is an attack objective (what the training-time PGD maximises) plus a loss function
``loss(model, x, x_adv, y, ctx) -> (loss, nat_logits, adv_logits)``; both are listed in ``METHODS``.
The loop in ``train`` is the same for all of them.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, evaluate, honesty, losses
from .attacks import PGD, make_objective
from .checkpoint import (FORMAT, RunLock, atomic_torch_save, environment_info, load_checkpoint, rng_state,
                         seed_everything, set_rng_state, write_json)
from .config import ADVERSARIAL_METHODS, Config, from_dict, to_yaml
from .data import BatchLoader, dataset_info, load_dataset, load_generated_npz, split_validation, take_subset
from .errors import UserError
from .logging import RunLogger
from .runtime import amp_dtype, build_model, data_root, pick_memory_format, resolve_device


@dataclass
class Context:
    """What a method's loss needs besides the batch."""

    cfg: Config
    progress: float = 0.0  # epochs done, fractional (step / steps per epoch)
    prior: losses.ClassPrior | None = None
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None  # this batch's frozen-teacher logits (gkl_kd)


# --------------------------------------------------------------------------------------------- losses
def _pair_weights(ctx: Context, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    m = ctx.cfg.method
    if m.weights == "prior":
        return ctx.prior.weights(y, m.gamma)
    return F.softmax(teacher_logits.detach().float() / temperature, dim=1).pow(m.gamma)


def standard_loss(model, x, x_adv, y, ctx):
    logits = model(x)
    return losses.ce(logits, y, ctx.cfg.method.label_smoothing), logits, None


def pgd_at_loss(model, x, x_adv, y, ctx):
    adv = model(x_adv)
    return losses.ce(adv, y, ctx.cfg.method.label_smoothing), None, adv


def trades_loss(model, x, x_adv, y, ctx):
    nat, adv = model(x), model(x_adv)
    return losses.ce(nat, y) + ctx.cfg.method.beta * losses.trades_kl(adv, nat), nat, adv


def mart_loss(model, x, x_adv, y, ctx):
    nat, adv = model(x), model(x_adv)
    return losses.mart(adv, nat, y, ctx.cfg.method.beta), nat, adv


def gkl_at_loss(model, x, x_adv, y, ctx):
    m = ctx.cfg.method
    nat, adv = model(x), model(x_adv)
    w = _pair_weights(ctx, nat, y, m.prior_temperature)
    reg = losses.gkl(adv.float(), nat.float(), w, alpha=m.alpha, beta=m.beta, symmetric=m.symmetric)
    return losses.ce(nat, y) + reg, nat, adv


def gkl_kd_loss(model, x, x_adv, y, ctx):
    """Distillation from a frozen teacher; with adversarial inputs the student sees x_adv (ARD-style)."""
    m = ctx.cfg.method
    teacher = ctx.teacher_logits
    nat = model(x)
    student = model(x_adv) if x_adv is not None else nat
    # The spec's min(epoch / warmup, 1), made continuous: the KD term starts at 0 and reaches full weight
    # after kd_warmup_epochs. With a frozen teacher the wMSE term regresses the student's raw logits onto
    # the teacher's; for a from-scratch student the study needed this ramp and, at beta 5, optim.grad_clip.
    ramp = min(ctx.progress / m.kd_warmup_epochs, 1.0) if m.kd_warmup_epochs else 1.0
    if m.kd_loss == "kl":
        kd = losses.kl(student.float(), teacher)
    else:
        w = _pair_weights(ctx, teacher, y, m.kd_temperature)
        kd = losses.gkl(student.float(), teacher, w, alpha=m.alpha, beta=m.beta, symmetric=m.symmetric)
    return m.ce_weight * losses.ce(nat, y) + ramp * kd, nat, student if x_adv is not None else None


def _gkl_objective(ctx: Context):
    m, a = ctx.cfg.method, ctx.cfg.attack
    if m.weights == "prior":
        return make_objective("gkl", prior=ctx.prior, gamma=m.gamma, alpha=1.0, beta=a.objective_beta)

    def objective(adv_logits, y, nat_logits):  # per-sample weights: softmax of the natural branch
        w = F.softmax(nat_logits / m.prior_temperature, dim=1).pow(m.gamma)
        return losses.gkl(adv_logits, nat_logits, w, alpha=1.0, beta=a.objective_beta, symmetric=m.symmetric)

    objective.needs_nat = True
    return objective


def _kd_objective(ctx: Context):
    def objective(adv_logits, y, teacher_logits):  # move the student away from the teacher's answer
        return losses.kl(adv_logits, teacher_logits)

    objective.needs_nat = True
    return objective


# name -> (loss function, attack objective factory or None, default random start)
METHODS = {
    "standard": (standard_loss, None, None),
    "pgd_at": (pgd_at_loss, lambda ctx: "ce", "uniform"),
    "trades": (trades_loss, lambda ctx: "trades", "normal"),
    "mart": (mart_loss, lambda ctx: "ce", "uniform"),
    "gkl_at": (gkl_at_loss, _gkl_objective, "normal"),
    "gkl_kd": (gkl_kd_loss, _kd_objective, "uniform"),
}


# ------------------------------------------------------------------------------------- AWP and EMA
class AWP:
    """Adversarial weight perturbation (Wu et al., 2020): one ascent step on a proxy copy of the model,
    then each weight tensor (dim > 1) moves by gamma * ||w|| in the normalised ascent direction for
    the training step, and back afterwards."""

    def __init__(self, model: nn.Module, gamma: float, proxy_lr: float = 0.01):
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=proxy_lr)
        self.diff: dict[str, torch.Tensor] = {}

    def perturb(self, model: nn.Module, loss_fn) -> None:
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        loss = -loss_fn(self.proxy)
        self.proxy_opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.current().average_gradients(self.proxy)  # DDP: every rank takes the global ascent step
        self.proxy_opt.step()
        with torch.no_grad():
            proxy = dict(self.proxy.named_parameters())
            self.diff = {}
            for name, p in model.named_parameters():
                if p.dim() <= 1:
                    continue
                d = proxy[name] - p
                self.diff[name] = self.gamma * d * (p.norm() / (d.norm() + 1e-20))
            self._apply(model, +1.0)

    def restore(self, model: nn.Module) -> None:
        self._apply(model, -1.0)
        self.diff = {}

    @torch.no_grad()
    def _apply(self, model: nn.Module, sign: float) -> None:
        for name, p in model.named_parameters():
            if name in self.diff:
                p.add_(self.diff[name], alpha=sign)


class EMA:
    """Exponential moving average of weights (buffers copied); tracks the raw weights before start."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, active: bool) -> None:
        decay = self.decay if active else 0.0
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# -------------------------------------------------------------------------------------- schedules
def lr_at(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Learning rate at optimiser step ``step`` (per-step schedules, so resume needs only the step)."""
    o = cfg.optim
    total = o.epochs * steps_per_epoch
    warm = int(o.warmup_epochs * steps_per_epoch)
    if o.schedule == "onecycle":
        peak = warm or max(1, int(0.3 * total))  # the rise of the cycle; warm-up if given
        return o.lr * (step + 1) / peak if step < peak else o.lr * max(0.0, (total - step) / max(1, total - peak))
    if step < warm:
        return o.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1 + math.cos(math.pi * t))
    if o.schedule == "step":
        epoch = step / steps_per_epoch
        passed = sum(epoch >= (m * o.epochs if m <= 1 else m) for m in o.milestones)
        return o.lr * o.step_gamma ** passed
    return o.lr


def eps_at(epoch: int, cfg: Config) -> float:
    """Training eps of an epoch (0-based); the linear ramp reaches the full eps in the last epoch."""
    a = cfg.attack
    return a.eps * (epoch + 1) / cfg.optim.epochs if a.eps_schedule == "linear" else a.eps


# ----------------------------------------------------------------------------------------- set-up
def load_teacher(spec: str, cfg: Config, device: torch.device) -> nn.Module:
    if spec.startswith("robustbench:"):
        from .robustbench_io import load_leaderboard_model

        name = spec.split(":", 1)[1]
        teacher = load_leaderboard_model(name, cfg.data.dataset, cfg.attack.norm, "models", device=device)
    else:
        ckpt = load_checkpoint(spec)
        tcfg = from_dict(ckpt["config"])
        teacher = build_model(tcfg)
        teacher.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_optimizer(cfg: Config, model: nn.Module, device: torch.device):
    o = cfg.optim
    # One fused kernel per step for all parameters; torch has them for CUDA and, since 2.4, for CPU.
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, **fused)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, **fused)


def load_training_data(cfg: Config):
    """Train, validation and test tensors: (images uint8 [N, C, H, W], labels int64 [N]) each."""
    d = cfg.data
    kw = {"image_size": d.image_size} if d.dataset == "imagefolder" else {}
    train_x, train_y = load_dataset(d.dataset, data_root(cfg), train=True, **kw)
    val = None
    if d.val_size:
        (train_x, train_y), val = split_validation(train_x, train_y, d.val_size, cfg.runtime.seed)
    if d.subset:
        train_x, train_y = take_subset(train_x, train_y, d.subset, cfg.runtime.seed)
    return (train_x, train_y), val


# Config sections that may change between a run and its resume without changing the weights.
RESUMABLE_CHANGES = ("eval.", "logging.", "runtime.resume", "runtime.device", "runtime.threads",
                     "runtime.checkpoint_every", "name",
                     # like the number of processes, which a resume may also change
                     "runtime.dist_timeout_s", "runtime.sync_bn")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _config_diff(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k) and not key.startswith(RESUMABLE_CHANGES):
            keys.append(f"{key}: {a.get(k)!r} -> {b.get(k)!r}")
    return keys


# ------------------------------------------------------------------------------------------- loop
@torch.no_grad()
def robust_accuracy_pgd(model, images, labels, cfg: Config, device, steps: int, batch_size: int = 500):
    """(clean, PGD-``steps`` CE) accuracy on uint8 images, for validation-based checkpoint selection."""
    was_training = model.training
    model.eval()
    x = images.float().div_(255)
    clean = evaluate.clean_accuracy(model, x, labels, device, batch_size).float().mean().item()
    robust = honesty.pgd_correct(model, x, labels, eps=cfg.eval.eps or cfg.attack.eps, norm=cfg.attack.norm,
                                 steps=steps, device=device, batch_size=batch_size).float().mean().item()
    model.train(was_training)
    return clean, robust


def _checkpoint(path: Path, cfg, model, ema, opt, prior, epoch, step, loader, best_val, train_time, rngs=None):
    atomic_torch_save({
        "format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
        "ema": ema.model.state_dict() if ema else None, "optimizer": opt.state_dict(),
        "prior": prior.state_dict() if prior else None, "epoch": epoch, "step": step,
        "loader": loader.state_dict(), "rng": rng_state(), "best_val_robust_acc": best_val,
        "train_time_s": train_time, "rng_ranks": rngs,
    }, path)


def _save_last(world, *args) -> None:
    """``_checkpoint`` on rank 0, holding every rank's RNG state so each rank resumes its own random stream."""
    rngs = world.gather_object(rng_state()) if world.size > 1 else None  # a collective: all ranks call it
    if world.is_main:
        _checkpoint(*args, rngs=rngs)


def train(cfg: Config, out_dir, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir``, evaluate at the end, write results.json; returns the results.

    Under torchrun every process calls this and trains with DistributedDataParallel
    (``advgkl.distributed``); only rank 0 touches ``out_dir``.
    """
    out = Path(out_dir)
    resume = resume or cfg.runtime.resume == "auto"
    ckpt_dir = out / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    with distributed.process_group(cfg.runtime.device, cfg.runtime.dist_timeout_s) as world, \
            contextlib.ExitStack() as lock:
        error = None
        if world.is_main:
            try:
                _claim_output(out, last_path, resume)
                lock.enter_context(RunLock(out))
            except UserError as e:
                error = e
        world.agree(error)  # rank 0's refusal ends every rank
        return _train_locked(cfg, out, ckpt_dir, last_path, resume)


def _claim_output(out: Path, last_path: Path, resume: bool) -> None:
    if not resume and (last_path.exists() or (out / "results.json").exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {out} is not writable ({e.strerror})") from None


def _train_locked(cfg: Config, out: Path, ckpt_dir: Path, last_path: Path, resume: bool) -> dict:
    world = distributed.current()
    state, error = None, None
    if world.is_main:  # the other ranks never read the output folder: they get the checkpoint by broadcast
        try:
            state = load_checkpoint(last_path) if resume and last_path.exists() else None
            diff = _config_diff(state["config"], cfg.to_dict()) if state is not None else []
            if diff:
                raise UserError(f"cannot resume {out}: the recipe differs from the checkpoint's in "
                                + "; ".join(diff))
        except UserError as e:
            error = e
        if error is None:
            print(f"advgkl train -> {out}" + (f" ({world.size} processes)" if world.distributed else "")
                  + f"\n{to_yaml(cfg)}", flush=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
    world.agree(error)
    state = world.broadcast(state)

    device = world.device(resolve_device(cfg.runtime.device))
    if cfg.runtime.sync_bn and world.distributed and device.type != "cuda":
        raise UserError("runtime.sync_bn needs CUDA: torch's SyncBatchNorm has no CPU kernel for training; "
                        "set runtime.sync_bn=false")
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels win
    seed_everything(cfg.runtime.seed)
    dtype = amp_dtype(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    memory_format = pick_memory_format(cfg, device)

    with world.main_first():  # a first-use download happens once, not once per rank
        (train_x, train_y), val = load_training_data(cfg)
    info = dataset_info(cfg.data.dataset, root=data_root(cfg), image_size=cfg.data.image_size)
    generated = (load_generated_npz(cfg.data.generated, num_classes=info.num_classes, image_shape=info.image_shape)
                 if cfg.data.generated else None)
    distributed.local_batch_size(cfg.data.batch_size, world)  # data.batch_size is global: it must split evenly
    real_per_batch = cfg.data.batch_size - (round(cfg.data.generated_ratio * cfg.data.batch_size) if generated else 0)
    if real_per_batch > len(train_x):
        raise UserError(f"data.batch_size={cfg.data.batch_size} needs {real_per_batch} training images per batch, "
                        f"but the training set has {len(train_x)}")
    loader = BatchLoader(train_x, train_y, cfg.data.batch_size, shuffle=True, drop_last=True,
                         augment=cfg.data.augment, seed=cfg.runtime.seed, device=device,
                         generated=generated, generated_ratio=cfg.data.generated_ratio,
                         rank=world.rank, world_size=world.size)

    model = build_model(cfg).to(device, memory_format=memory_format)
    model = world.convert_sync_bn(model, cfg.runtime.sync_bn)
    opt = make_optimizer(cfg, model, device)
    ema = EMA(model, cfg.ema.decay) if cfg.ema.enabled else None
    awp = AWP(model, cfg.awp.gamma) if cfg.awp.enabled else None
    m = cfg.method
    uses_prior = m.name in ("gkl_at", "gkl_kd") and m.weights == "prior"
    num_classes = info.num_classes
    prior = losses.ClassPrior(num_classes, m.prior_temperature) if uses_prior else None
    ctx = Context(cfg=cfg, prior=prior)
    if m.name == "gkl_kd":
        ctx.teacher = load_teacher(m.teacher, cfg, device)
    loss_fn, objective_factory, default_start = METHODS[m.name]
    adversarial_inputs = m.name in ADVERSARIAL_METHODS or (m.name == "gkl_kd" and m.kd_adversarial)
    attack = None
    if adversarial_inputs:
        start = default_start if cfg.attack.random_start == "auto" else cfg.attack.random_start
        attack = PGD(eps=cfg.attack.eps, steps=cfg.attack.steps, norm=cfg.attack.norm,
                     random_start=None if start == "none" else start, objective=objective_factory(ctx),
                     amp_dtype=dtype)
    compiled = torch.compile(model) if cfg.runtime.compile else model
    # Validation (clean + PGD) runs on the weights it reports, compiled like the training step.
    val_net = ema.model if ema else model
    val_net = compiled if val_net is model else torch.compile(val_net) if cfg.runtime.compile else val_net
    # DDP wraps the training-loss forwards only: attacks, AWP's proxy and evaluation run the bare module
    train_net = compiled
    if world.distributed:
        train_net = world.wrap(model)
        train_net = torch.compile(train_net) if cfg.runtime.compile else train_net
    if world.rank:  # the weights above are identical on all ranks; random starts from here on are not
        seed_everything(cfg.runtime.seed + world.rank)

    start_epoch, step, best_val, train_time = 0, 0, -1.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema:
            ema.model.load_state_dict(state["ema"])
        if prior:
            prior.load_state_dict(state["prior"])
        loader.load_state_dict(state["loader"])
        start_epoch, step, best_val = state["epoch"], state["step"], state["best_val_robust_acc"]
        train_time = state["train_time_s"]
        rngs = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(rngs[world.rank] if len(rngs) == world.size else state["rng"])
        if len(rngs) != world.size and world.rank:
            seed_everything(cfg.runtime.seed + world.rank)
        if world.is_main:
            print(f"resumed from {last_path} at epoch {start_epoch}, batch {state['loader']['batch']}", flush=True)
            if len(rngs) != world.size:
                print(f"note: the checkpoint was written by {len(rngs)} process(es), this job has {world.size}: "
                      "data order and weights continue exactly, the attacks' random starts do not", flush=True)

    logger = RunLogger(out, mode=cfg.logging.wandb, project=cfg.logging.project, name=cfg.name,
                       group=cfg.logging.group, tags=cfg.logging.tags, config=cfg.to_dict(),
                       resume=resume, keep_until_step=step if resume else None) if world.is_main else distributed.NullLogger()
    steps_per_epoch = len(loader)
    for epoch in range(start_epoch, cfg.optim.epochs):
        eps = eps_at(epoch, cfg)
        # A configured step size scales with the eps ramp; GKL-AT's default is eps_t / 2.
        step_size = (cfg.attack.step_size * eps / cfg.attack.eps if cfg.attack.step_size
                     else eps / 2 if m.name == "gkl_at" else 2.5 * eps / cfg.attack.steps)
        awp_on = awp is not None and epoch >= cfg.awp.warmup_epochs
        if loader.state_dict()["epoch"] != epoch:  # a mid-epoch resume keeps its batch position
            loader.set_epoch(epoch)
        model.train()
        graphs_before = compiled_graphs()
        sums = torch.zeros(4, device=device)  # loss, nat correct, adv correct, samples
        t0 = time.perf_counter()
        bar = (_progress(loader, cfg, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}")
               if world.is_main else loader)
        for x, y in bar:
            lr = lr_at(step, steps_per_epoch, cfg)
            ctx.progress = step / steps_per_epoch
            for group in opt.param_groups:
                group["lr"] = lr
            x = x.contiguous(memory_format=memory_format)
            x_adv = None
            if ctx.teacher is not None:
                with torch.no_grad(), autocast():
                    ctx.teacher_logits = ctx.teacher(x).float()  # once per batch: attack, loss and prior
            if attack is not None:
                x_adv = attack(compiled, x, y, eps=eps, step_size=step_size, nat_logits=ctx.teacher_logits)
            if awp_on:
                awp.perturb(model, lambda net: _forward_loss(loss_fn, net, x, x_adv, y, ctx, autocast)[0])
            loss, nat_logits, adv_logits = _forward_loss(loss_fn, train_net, x, x_adv, y, ctx, autocast)
            if not world.all_finite(loss):
                logger.finish()
                raise UserError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step} "
                                f"(lr {lr:.4g}); the last good checkpoint is {last_path}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:  # after DDP's all-reduce, so every rank clips the same gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            if awp_on:
                awp.restore(model)
            world.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere, before EMA copies them
            if ema:
                ema.update(model, active=epoch >= cfg.ema.start_epoch)
            if prior is not None:  # from the global batch, so the prior is the same on every rank
                prior.update(world.gather_rows(nat_logits if m.name == "gkl_at" else ctx.teacher_logits),
                             world.gather_rows(y))
            with torch.no_grad():
                sums += torch.stack([
                    loss.detach().float() * len(y),
                    (nat_logits.argmax(1) == y).sum() if nat_logits is not None else torch.zeros((), device=device),
                    (adv_logits.argmax(1) == y).sum() if adv_logits is not None else torch.zeros((), device=device),
                    torch.tensor(float(len(y)), device=device)])
            step += 1
            every = cfg.runtime.checkpoint_every_steps
            # Not after the epoch's last batch: the end-of-epoch checkpoint (with the finished prior) follows.
            if every and step % every == 0 and loader.state_dict()["epoch"] == epoch:
                _save_last(world, last_path, cfg, model, ema, opt, prior, epoch, step, loader, best_val,
                           train_time + time.perf_counter() - t0)
        if prior is not None:
            prior.finish_epoch()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        loss_sum, nat_c, adv_c, n = world.sum_(sums).tolist()
        record = {"epoch": epoch + 1, "step": step, "lr": lr, "eps": eps, "train_loss": loss_sum / n,
                  "train_nat_acc": nat_c / n if m.name != "pgd_at" else None,
                  "train_adv_acc": adv_c / n if attack is not None else None,
                  "images_per_s": n / epoch_time, "epoch_time_s": epoch_time}
        if world.is_main and val is not None and ((epoch + 1) % cfg.eval.val_every == 0
                                                  or epoch + 1 == cfg.optim.epochs):  # rank 0 only: cheap
            v_clean, v_rob = robust_accuracy_pgd(val_net, val[0], val[1], cfg, device, cfg.eval.val_pgd_steps)
            record.update(val_clean_acc=v_clean, val_pgd_acc=v_rob)
            if v_rob > best_val:
                best_val = v_rob
                net = ema.model if ema else model
                atomic_torch_save({"format": FORMAT, "config": cfg.to_dict(), "model": net.state_dict(),
                                   "ema": None, "epoch": epoch + 1, "val_pgd_acc": v_rob}, ckpt_dir / "best.pt")
        if cfg.runtime.compile:  # graphs torch.compile built this epoch: 0 after the first means no recompiles
            record["compiled_graphs"] = compiled_graphs() - graphs_before
        logger.log({k: v for k, v in record.items() if v is not None}, step=step)
        if world.is_main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if v is not None), flush=True)
        if (epoch + 1) % cfg.runtime.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs:
            _save_last(world, last_path, cfg, model, ema, opt, prior, epoch + 1, step, loader, best_val, train_time)

    final = {"format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
             "ema": ema.model.state_dict() if ema else None, "epoch": cfg.optim.epochs}
    if world.is_main:
        atomic_torch_save(final, ckpt_dir / "final.pt")

    evaluations = {}
    net = ema.model if ema else model
    # under torchrun every rank evaluates: AutoAttack's chunks are shared out (attacks.AutoAttack)
    evaluations["ema" if ema else "final"] = evaluate.evaluate_model(net, cfg, device, out, tag="final", logger=logger)
    best_weights = None
    if world.is_main and cfg.eval.evaluate_best and (ckpt_dir / "best.pt").exists():
        best_weights = load_checkpoint(ckpt_dir / "best.pt")["model"]
    best_weights = world.broadcast(best_weights)
    if best_weights is not None:
        best = build_model(cfg).to(device)
        best.load_state_dict(best_weights)
        evaluations["best"] = evaluate.evaluate_model(best, cfg, device, out, tag="best", logger=logger)
    results = evaluate.gather_results(cfg, evaluations, train_time_s=train_time, evaluated="ema" if ema else "final")
    results["environment"] = environment_info()
    if world.is_main:
        write_json(out / "results.json", results)
    logger.summary({k: results[k] for k in ("clean_acc", "autoattack_acc", "suspicious_gradient_masking")
                    if results.get(k) is not None})
    logger.save_artifact(out / "results.json", name=f"results-{cfg.name}")
    results["wandb_dir"] = logger.wandb_dir
    logger.finish()
    return results


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _forward_loss(loss_fn, net, x, x_adv, y, ctx, autocast):
    with autocast():
        loss, nat, adv = loss_fn(net, x, x_adv, y, ctx)
    return loss.float(), nat, adv


def _progress(iterable, cfg: Config, total: int, desc: str):
    if not cfg.logging.progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0)
