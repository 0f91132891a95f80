"""Training: build a ``TrainState``, restore it, step, end each epoch, finish with AutoAttack.

``train`` reads top to bottom: claim the output folder, ``build`` (data, model, optimiser, attack),
``restore`` a checkpoint, then per epoch ``run_epoch`` (``train_step`` on each batch) and ``end_epoch``
(validation, logging, checkpoint), and ``finish`` (final weights, AutoAttack, results.json).
``train_step`` is the one training step; the benchmarks and tests call it too. What differs between
methods lives in ``advgkl.methods``; AWP and the weight EMA in ``advgkl.weights``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import distributed, evaluate, honesty, preemption, streaming
from .attacks import TRAINING_ATTACKS
from .checkpoint import (FORMAT, RunLock, atomic_torch_save, environment_info, load_checkpoint, rng_state,
                         seed_everything, set_rng_state, write_json)
from .config import Config, config_diff, from_saved, to_yaml
from .data import (STREAMING_DATASETS, BatchLoader, dataset_info, load_dataset, load_generated_npz, split_validation,
                   take_subset)
from .errors import UserError
from .logging import RunLogger
from .losses import ClassPrior
from .methods import Context, Method, get_method
from .runtime import amp_dtype, build_model, data_root, pick_memory_format, resolve_device
from .weights import AWP, EMA


# ------------------------------------------------------------------------------------------ state
@dataclass
class Nets:
    """The model as each caller sees it (the same weights): ``train`` runs the loss forwards (DDP-wrapped
    under torchrun, compiled with runtime.compile); ``attack`` is the bare (compiled) model, which the
    attack uses; ``val`` holds the weights validation reports (the EMA's when enabled)."""

    train: nn.Module
    attack: nn.Module
    val: nn.Module
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun (its no_sync)


@dataclass
class TrainState:
    """Everything a training step or an epoch reads or changes; ``payload`` saves it, ``restore`` loads it."""

    cfg: Config
    world: distributed.World
    device: torch.device
    method: Method
    ctx: Context
    model: nn.Module
    opt: torch.optim.Optimizer
    nets: Nets
    attack: Callable | None
    autocast: Callable
    memory_format: torch.memory_format
    ema: EMA | None = None
    awp: AWP | None = None
    loader: BatchLoader | None = None
    val: tuple | None = None  # (uint8 images, labels) held out for checkpoint selection
    last_path: Path | None = None
    epoch: int = 0
    step: int = 0
    best_val: float = -1.0
    train_time: float = 0.0

    def payload(self, train_time: float | None = None) -> dict:
        """The resumable checkpoint (last.pt) of this state; every rank's RNG is added by ``save_last``."""
        prior = self.ctx.prior
        return {"format": FORMAT, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "ema": self.ema.model.state_dict() if self.ema else None, "optimizer": self.opt.state_dict(),
                "prior": prior.state_dict() if prior else None, "epoch": self.epoch, "step": self.step,
                "loader": self.loader.state_dict(), "rng": rng_state(), "best_val_robust_acc": self.best_val,
                "train_time_s": self.train_time if train_time is None else train_time}

    def eval_model(self) -> nn.Module:
        """The weights a run reports: the EMA's when enabled."""
        return self.ema.model if self.ema else self.model


def make_training_attack(cfg: Config, method: Method, ctx: Context, dtype: torch.dtype | None):
    """``attack.name`` built for ``method``: its objective, and its random start unless the recipe sets one."""
    start = method.random_start if cfg.attack.random_start == "auto" else cfg.attack.random_start
    return TRAINING_ATTACKS[cfg.attack.name](cfg.attack, objective=method.objective(ctx), amp_dtype=dtype,
                                             random_start=None if start == "none" else start)


def step_size_at(cfg: Config, method: Method, eps: float) -> float | None:
    """A configured step size scales with the eps ramp; else the method's default, else (None) the attack's."""
    if cfg.attack.step_size:
        return cfg.attack.step_size * eps / cfg.attack.eps
    return method.step_size(eps)


def build_state(cfg: Config, model: nn.Module, device: torch.device, num_classes: int,
                world: distributed.World | None = None) -> TrainState:
    """Optimiser, EMA, AWP, class prior, teacher, training attack and compiled views around ``model``."""
    world = world or distributed.current()
    method, dtype = get_method(cfg.method.name), amp_dtype(cfg, device)
    memory_format = pick_memory_format(cfg, device)
    model = world.convert_sync_bn(model.to(device, memory_format=memory_format), cfg.runtime.sync_bn)
    opt = make_optimizer(cfg, model, device)
    ema = EMA(model, cfg.ema.decay, cfg.ema.every) if cfg.ema.enabled else None
    awp = AWP(model, cfg.awp.gamma) if cfg.awp.enabled else None
    ctx = Context(opts=cfg.method)
    if method.uses_prior(cfg.method):
        ctx.prior = ClassPrior(num_classes, cfg.method.prior_temperature)
    if method.needs_teacher:
        ctx.teacher = load_teacher(cfg.method.teacher, cfg, device)
    attack = make_training_attack(cfg, method, ctx, dtype) if method.adversarial(cfg.method) else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return TrainState(cfg=cfg, world=world, device=device, method=method, ctx=ctx, model=model, opt=opt,
                      nets=_nets(cfg, model, ema, world), attack=attack, autocast=autocast,
                      memory_format=memory_format, ema=ema, awp=awp)


def _nets(cfg: Config, model: nn.Module, ema: EMA | None, world: distributed.World) -> Nets:
    compile_ = torch.compile if cfg.runtime.compile else (lambda net: net)
    attack = compile_(model)
    # Validation (clean + PGD) runs on the weights it reports, compiled like the training step.
    val = attack if ema is None else compile_(ema.model)
    # DDP wraps the training-loss forwards only: attacks, AWP's proxy and evaluation run the bare module.
    ddp = world.wrap(model) if world.distributed else None
    return Nets(train=compile_(ddp) if ddp is not None else attack, attack=attack, val=val, ddp=ddp)


# ------------------------------------------------------------------------------------------- step
def forward_loss(s: TrainState, net: nn.Module, x, x_adv, y):
    """The method's loss under the run's autocast; the loss comes back in fp32."""
    with s.autocast():
        loss, nat, adv = s.method.loss(net, x, x_adv, y, s.ctx)
    return loss.float(), nat, adv


def train_step(s: TrainState, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float | None,
               lr: float):
    """One optimiser step on (x, y): teacher logits, attack, AWP, loss, update, buffers, EMA, class prior.

    With ``optim.accumulate`` k > 1 the batch goes through in k micro-batches (attack, AWP's ascent and the
    loss, each micro-batch in turn; gradients summed) and the optimiser steps once: the same step as the
    whole batch, up to BatchNorm's per-micro-batch statistics. Returns (loss, natural logits, adversarial
    logits) of the whole batch, detached; a logits entry is None when the method has none."""
    cfg, model = s.cfg, s.model
    for group in s.opt.param_groups:
        group["lr"] = lr
    x = x.contiguous(memory_format=s.memory_format)
    order = _interleaved(len(y), cfg).to(y.device) if cfg.optim.accumulate > 1 and cfg.data.generated_ratio else None
    xs, ys = (x, y) if order is None else (x[order], y[order])
    parts = list(zip(xs.tensor_split(cfg.optim.accumulate), ys.tensor_split(cfg.optim.accumulate)))
    teacher = [_teacher_logits(s, xi) for xi, _ in parts]
    x_adv = [s.attack(s.nets.attack, xi, yi, eps=eps, step_size=step_size, nat_logits=ti)
             if s.attack is not None else None for (xi, yi), ti in zip(parts, teacher)]
    micro = [(xi, ai, yi, ti, len(yi) / len(y)) for (xi, yi), ai, ti in zip(parts, x_adv, teacher)]
    s.ctx.batch_y = y
    awp_on = s.awp is not None and s.epoch >= cfg.awp.warmup_epochs
    if awp_on:
        s.awp.perturb(model, [lambda net, m=m: _micro_loss(s, net, *m)[0] for m in micro])
    s.opt.zero_grad(set_to_none=True)
    loss, nat, adv = _accumulate(s, micro, lr)
    if order is not None:  # back to the loader's row order, which y has
        back = torch.argsort(order)
        nat, adv = (t[back] if t is not None else None for t in (nat, adv))
    if cfg.optim.grad_clip:  # after DDP's all-reduce, so every rank clips the same gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    s.opt.step()
    if awp_on:
        s.awp.restore(model)
    s.world.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere, before EMA copies them
    if s.ema and cfg.ema.every == "step":
        s.ema.update(model, active=s.epoch >= cfg.ema.start_epoch)
    if s.ctx.prior is not None:  # from the global batch, so the prior is the same on every rank
        s.ctx.teacher_logits = torch.cat(teacher) if s.ctx.teacher is not None else None
        logits, labels = s.method.prior_rows(nat, y, s.ctx)
        s.ctx.prior.update(s.world.gather_rows(logits), s.world.gather_rows(labels))
    s.ctx.fraction, s.ctx.batch_y = 1.0, None  # a later forward_loss outside a step is a whole batch
    s.step += 1
    return loss, nat, adv


def _interleaved(n: int, cfg: Config) -> torch.Tensor:
    """Row order that deals a batch out to the micro-batches like cards: the loader puts the generated
    rows after the real ones, and every micro-batch should keep the recipe's real/generated mix."""
    k = cfg.optim.accumulate
    return torch.cat([torch.arange(i, n, k) for i in range(k)])


def _teacher_logits(s: TrainState, x: torch.Tensor) -> torch.Tensor | None:
    if s.ctx.teacher is None:
        return None
    with torch.no_grad(), s.autocast():
        return s.ctx.teacher(x).float()  # once per micro-batch: attack, loss and prior


def _micro_loss(s: TrainState, net: nn.Module, x, x_adv, y, teacher, fraction: float):
    """The method's loss on one micro-batch, scaled by its share of the batch (``fraction``), so that the
    micro-batches' losses sum to the whole batch's loss."""
    s.ctx.teacher_logits, s.ctx.fraction = teacher, fraction
    loss, nat, adv = forward_loss(s, net, x, x_adv, y)
    return loss * fraction, nat, adv


def _accumulate(s: TrainState, micro: list, lr: float):
    """Forward and backward each micro-batch; under DDP gradients are all-reduced once, after the last."""
    total, nats, advs = 0.0, [], []
    for i, m in enumerate(micro):
        last = i == len(micro) - 1
        with s.nets.ddp.no_sync() if s.nets.ddp is not None and not last else contextlib.nullcontext():
            loss, nat, adv = _micro_loss(s, s.nets.train, *m)
            if not s.world.all_finite(loss):
                where = f"; the last good checkpoint is {s.last_path}" if s.last_path and s.last_path.exists() else ""
                raise UserError(f"the loss became {loss.item() / m[-1]} at epoch {s.epoch + 1}, step {s.step} "
                                f"(lr {lr:.4g}){where}")
            loss.backward()
        total = total + loss.detach()
        nats.append(nat.detach() if nat is not None else None)
        advs.append(adv.detach() if adv is not None else None)
    cat = lambda parts: torch.cat(parts) if parts[0] is not None else None  # noqa: E731
    return total, cat(nats), cat(advs)


# ------------------------------------------------------------------------------------------- loop
def train(cfg: Config, out_dir, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir``, evaluate at the end, write results.json; returns the results.

    Under torchrun every process calls this and trains with DistributedDataParallel
    (``advgkl.distributed``); only rank 0 touches ``out_dir``. Bad data settings are refused before
    ``out_dir`` is created; a finished run resumed with the same eval settings is only re-reported.
    """
    out, last_path = Path(out_dir), Path(out_dir) / "checkpoints" / "last.pt"
    if resume and cfg.runtime.resume == "never":  # what config.yaml records: this job resumes
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, resume="auto"))
    resume = cfg.runtime.resume == "auto"
    with distributed.process_group(cfg.runtime.device, cfg.runtime.dist_timeout_s) as world, \
            contextlib.ExitStack() as lock:
        world.on_main(_check_output, out, last_path, resume)  # rank 0's refusal ends every rank
        finished = world.on_main(_finished_results, cfg, out) if resume else None
        if finished is not None:
            return finished
        s = build(cfg, world, last_path=last_path)

        def claim() -> None:  # the folder is created once the recipe and the data have passed every check
            lock.enter_context(RunLock(out))  # creates the folder, checks it is writable

        world.on_main(claim)
        saved = _start_run(cfg, out, resume, world)
        if saved is not None:
            restore(s, saved)
        logger = (RunLogger(out, mode=cfg.logging.wandb, project=cfg.logging.project, name=cfg.name,
                            group=cfg.logging.group, tags=cfg.logging.tags, config=cfg.to_dict(), resume=resume,
                            keep_until_step=s.step if resume else None)
                  if world.is_main else distributed.NullLogger())
        try:
            while s.epoch < cfg.optim.epochs:
                end_epoch(s, run_epoch(s), logger)
            return finish(s, out, logger)
        except BaseException:  # a failed run still closes its W&B run (finish closes it on success)
            logger.finish()
            raise


def _check_output(out: Path, last_path: Path, resume: bool) -> None:
    # metrics.jsonl alone: a run killed before its first checkpoint, whose records a fresh run would extend
    held = [f for f in (last_path, out / "results.json", out / "metrics.jsonl") if f.exists()]
    if not resume and held:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")


def _refuse_changed_recipe(saved: dict, cfg: Config, out: Path) -> None:
    """``saved``: a stored config as this version reads it (``from_saved``), so keys added since are not changes."""
    diff = [f"{key}: {old!r} -> {new!r}" for key, old, new in config_diff(saved, cfg.to_dict(), RESUMABLE_CHANGES)]
    if diff:
        raise UserError(f"cannot resume {out}: the recipe differs from the checkpoint's in " + "; ".join(diff))


def _finished_results(cfg: Config, out: Path) -> dict | None:
    """The results of a finished run in ``out``, re-reported unchanged; None while it has none. Other eval
    settings are refused: evaluating again would replace the run's own results (``advgkl eval`` does it
    in a folder of its own)."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        saved = from_saved(stored["config"]).to_dict()  # as this version reads it
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} cannot be read as a run's results ({type(e).__name__}); move it away to "
                        "evaluate the run again") from None
    _refuse_changed_recipe(saved, cfg, out)
    diff = [f"{k}: {old!r} -> {new!r}" for k, old, new in config_diff(saved["eval"], cfg.to_dict()["eval"], (), "eval.")]
    if diff:
        raise UserError(f"{out} has finished and was evaluated with other settings ({'; '.join(diff)}); to "
                        f"evaluate its weights again, run advgkl eval {out / 'checkpoints' / 'final.pt'}")
    print(f"{out} has finished; its results.json is unchanged", flush=True)
    return {**stored, "wandb_dir": None}


def _start_run(cfg: Config, out: Path, resume: bool, world: distributed.World) -> dict | None:
    """Rank 0 reads the checkpoint to resume (refusing a changed recipe) and writes config.yaml; every
    rank gets the checkpoint by broadcast (the other ranks never read the output folder)."""
    return world.on_main(_resume_state_and_config, cfg, out, resume, world)


def _resume_state_and_config(cfg: Config, out: Path, resume: bool, world: distributed.World) -> dict | None:
    last_path = out / "checkpoints" / "last.pt"
    saved = load_checkpoint(last_path) if resume and last_path.exists() else None
    if saved is not None:
        _refuse_changed_recipe(from_saved(saved["config"]).to_dict(), cfg, out)
    try:
        (out / "config.yaml").write_text(to_yaml(cfg))
    except OSError as e:
        raise UserError(f"cannot write {out / 'config.yaml'} ({e.strerror})") from None
    print(f"advgkl train -> {out}" + (f" ({world.size} processes)" if world.distributed else "")
          + "\n" + summary(cfg) + f"\n  full recipe: {out / 'config.yaml'}", flush=True)
    return saved


def summary(cfg: Config) -> str:
    """The recipe in a few lines for the screen; config.yaml holds all of it."""
    d, m, a, o, e = cfg.data, cfg.method, cfg.attack, cfg.optim, cfg.eval
    options = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(m).items() if k != "name")
    tricks = "".join([", AWP" if cfg.awp.enabled else "", f", EMA {cfg.ema.decay:g}" if cfg.ema.enabled else ""])
    attack = (f"{a.name} {a.norm} eps {a.eps:g}, {a.steps} steps, {a.eps_schedule} eps"
              if get_method(m.name).adversarial(m) else "none: clean inputs")
    evaluation = "none" if e.version == "none" else f"AutoAttack {e.version} on {e.n_examples or 'all'} test points"
    return "\n".join([
        f"  data    {d.dataset}, {d.subset or 'all'} training images, {d.val_size} held out, batch {d.batch_size}, "
        f"augment {d.augment}",
        f"  model   {cfg.model.name}" + (f" {cfg.model.kwargs}" if cfg.model.kwargs else ""),
        f"  method  {m.name}" + (f" ({options})" if options else ""),
        f"  attack  {attack}",
        f"  optim   {o.name}, lr {o.lr:g} {o.schedule}, {o.epochs} epochs{tricks}; seed {cfg.runtime.seed}",
        f"  eval    {evaluation}",
    ])


def build(cfg: Config, world: distributed.World, last_path: Path | None = None) -> TrainState:
    """The run's torch settings, data, model and everything ``build_state`` adds, seeded like a fresh run."""
    device = world.device(resolve_device(cfg.runtime.device))
    if cfg.runtime.sync_bn and world.distributed and device.type != "cuda":
        raise UserError("runtime.sync_bn needs CUDA: torch's SyncBatchNorm has no CPU kernel for training; "
                        "set runtime.sync_bn=false")
    _configure_torch(cfg, device)
    seed_everything(cfg.runtime.seed)
    loader, val, num_classes = _build_data(cfg, world, device)
    evaluate.check_test_size(cfg)  # refused now, not after training
    s = build_state(cfg, build_model(cfg), device, num_classes, world)
    s.loader, s.val, s.last_path = loader, val, last_path
    if world.rank:  # the weights above are identical on all ranks; random starts from here on are not
        seed_everything(cfg.runtime.seed + world.rank)
    return s


def _configure_torch(cfg: Config, device: torch.device) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuned kernels win


def _build_data(cfg: Config, world: distributed.World, device: torch.device):
    """The training loader (this rank's share of each global batch), the validation split, the class count."""
    d = cfg.data
    local = distributed.local_batch_size(d.batch_size, world)  # data.batch_size is global: it must split evenly
    if local % cfg.optim.accumulate:
        raise UserError(f"optim.accumulate={cfg.optim.accumulate} must divide each process's batch of {local} "
                        f"(data.batch_size={d.batch_size} over {world.size} processes)")
    if d.dataset in STREAMING_DATASETS:  # too large for memory: decoded batch by batch
        with world.main_first():
            folder, train_idx, val_idx = streaming.training_split(data_root(cfg), d.subset, d.val_size,
                                                                  cfg.runtime.seed)
        loader = streaming.StreamingLoader(folder, train_idx, d.batch_size, augment=d.augment,
                                           image_size=d.image_size, seed=cfg.runtime.seed, device=device,
                                           rank=world.rank, world_size=world.size, workers=d.workers)
        num_classes = dataset_info(d.dataset, image_size=d.image_size).num_classes
        return loader, streaming.held_out(folder, val_idx, d.image_size, d.workers), num_classes
    with world.main_first():  # a first-use download happens once, not once per rank
        (train_x, train_y), val = load_training_data(cfg)
    info = dataset_info(d.dataset, root=data_root(cfg), image_size=d.image_size)
    generated = (load_generated_npz(d.generated, num_classes=info.num_classes, image_shape=info.image_shape)
                 if d.generated else None)
    real_per_batch = d.batch_size - (round(d.generated_ratio * d.batch_size) if generated else 0)
    if real_per_batch > len(train_x):
        raise UserError(f"data.batch_size={d.batch_size} needs {real_per_batch} training images per batch, "
                        f"but the training set has {len(train_x)}")
    loader = BatchLoader(train_x, train_y, d.batch_size, shuffle=True, drop_last=True, augment=d.augment,
                         seed=cfg.runtime.seed, device=device, generated=generated,
                         generated_ratio=d.generated_ratio, rank=world.rank, world_size=world.size)
    return loader, val, info.num_classes


def restore(s: TrainState, saved: dict) -> None:
    """Continue from a last.pt: weights, optimiser, EMA, prior, data position, counters and RNG streams."""
    world = s.world
    s.model.load_state_dict(saved["model"])
    s.opt.load_state_dict(saved["optimizer"])
    if s.ema:
        s.ema.model.load_state_dict(saved["ema"])
    if s.ctx.prior:
        s.ctx.prior.load_state_dict(saved["prior"])
    s.loader.load_state_dict(saved["loader"])
    s.epoch, s.step, s.best_val = saved["epoch"], saved["step"], saved["best_val_robust_acc"]
    s.train_time = saved["train_time_s"]
    rngs = saved.get("rng_ranks") or [saved["rng"]]
    set_rng_state(rngs[world.rank] if len(rngs) == world.size else saved["rng"])
    if len(rngs) != world.size and world.rank:
        seed_everything(s.cfg.runtime.seed + world.rank)
    if world.is_main:
        print(f"resumed from {s.last_path} at epoch {s.epoch}, batch {saved['loader']['batch']}", flush=True)
        if len(rngs) != world.size:
            print(f"note: the checkpoint was written by {len(rngs)} process(es), this job has {world.size}: "
                  "data order and weights continue exactly, the attacks' random starts do not", flush=True)


def run_epoch(s: TrainState) -> dict:
    """Train one epoch (from a mid-epoch resume's batch on); returns the epoch's metrics record."""
    cfg, epoch, loader = s.cfg, s.epoch, s.loader
    eps = eps_at(epoch, cfg)
    step_size = step_size_at(cfg, s.method, eps)
    if loader.state_dict()["epoch"] != epoch:  # a mid-epoch resume keeps its batch position
        loader.set_epoch(epoch)
    s.model.train()
    graphs_before = compiled_graphs()
    sums = torch.zeros(6, device=s.device)  # loss, samples, natural correct and count, adversarial ditto
    t0 = time.perf_counter()
    batches = _progress(loader, cfg, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}") if s.world.is_main else loader
    lr = lr_at(s.step, len(loader), cfg)
    for x, y in batches:
        lr = lr_at(s.step, len(loader), cfg)
        s.ctx.progress = s.step / len(loader)
        loss, nat, adv = train_step(s, x, y, eps=eps, step_size=step_size, lr=lr)
        with torch.no_grad():
            sums += torch.stack([loss.detach().float() * len(y), torch.tensor(float(len(y)), device=s.device),
                                 *_correct(nat, y), *_correct(adv, y)])
        every = cfg.runtime.checkpoint_every_steps
        # Not after the epoch's last batch: the end-of-epoch checkpoint (with the finished prior) follows.
        mid_epoch = loader.state_dict()["epoch"] == epoch
        stop = mid_epoch and preemption.requested(s.world)  # a SLURM / user signal: save now, exit, requeue
        if mid_epoch and (stop or every and s.step % every == 0):
            save_last(s, s.train_time + time.perf_counter() - t0)
        if stop:
            raise preemption.Preempted(f"{stop} at epoch {epoch + 1}, step {s.step}; state saved in {s.last_path}")
    if s.ctx.prior is not None:
        s.ctx.prior.finish_epoch()
    epoch_time = time.perf_counter() - t0
    s.train_time += epoch_time
    loss_sum, n, nat_c, nat_n, adv_c, adv_n = s.world.sum_(sums).tolist()
    record = {"epoch": epoch + 1, "step": s.step, "lr": lr, "eps": eps, "train_loss": loss_sum / n,
              "train_nat_acc": nat_c / nat_n if nat_n else None, "train_adv_acc": adv_c / adv_n if adv_n else None,
              "images_per_s": n / epoch_time, "epoch_time_s": epoch_time}
    if cfg.runtime.compile:  # graphs torch.compile built this epoch: 0 after the first means no recompiles
        record["compiled_graphs"] = compiled_graphs() - graphs_before
    return record


def _correct(logits: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) for one branch's logits; (0, 0) for a branch the method does not have."""
    if logits is None:
        zero = torch.zeros((), device=y.device)
        return zero, zero
    return (logits.argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=y.device)


def end_epoch(s: TrainState, record: dict, logger) -> None:
    """Validation (and best.pt), the metrics record, the end-of-epoch checkpoint; the epoch is done."""
    cfg, world = s.cfg, s.world
    if s.ema and cfg.ema.every == "epoch":  # every rank: the weights are the same everywhere
        s.ema.update(s.model, active=s.epoch >= cfg.ema.start_epoch)
    s.epoch += 1
    last = s.epoch == cfg.optim.epochs
    if world.is_main and s.val is not None and (s.epoch % cfg.eval.val_every == 0 or last):  # rank 0: cheap
        v_clean, v_rob = robust_accuracy_pgd(s.nets.val, s.val[0], s.val[1], cfg, s.device, cfg.eval.val_pgd_steps)
        record.update(val_clean_acc=v_clean, val_pgd_acc=v_rob)
        if v_rob > s.best_val:
            s.best_val = v_rob
            atomic_torch_save({"format": FORMAT, "config": cfg.to_dict(), "model": s.eval_model().state_dict(),
                               "ema": None, "epoch": s.epoch, "val_pgd_acc": v_rob}, s.last_path.parent / "best.pt")
    record = {k: v for k, v in record.items() if v is not None}
    logger.log(record, step=s.step)
    if world.is_main:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
    if s.epoch % cfg.runtime.checkpoint_every == 0 or last:
        save_last(s)


def save_last(s: TrainState, train_time: float | None = None) -> None:
    """last.pt on rank 0, holding every rank's RNG state so each rank resumes its own random stream."""
    rngs = s.world.gather_object(rng_state()) if s.world.size > 1 else None  # a collective: all ranks call it
    if s.world.is_main:
        _checkpoint(s.last_path, {**s.payload(train_time), "rng_ranks": rngs})


def _checkpoint(path: Path, payload: dict) -> None:
    atomic_torch_save(payload, path)


def finish(s: TrainState, out: Path, logger) -> dict:
    """final.pt, AutoAttack on the reported weights (and on best.pt if asked), results.json; ends the logger."""
    cfg, world, ckpt_dir = s.cfg, s.world, s.last_path.parent
    if world.is_main:
        atomic_torch_save({"format": FORMAT, "config": cfg.to_dict(), "model": s.model.state_dict(),
                           "ema": s.ema.model.state_dict() if s.ema else None, "epoch": cfg.optim.epochs},
                          ckpt_dir / "final.pt")
    reported = "ema" if s.ema else "final"
    # under torchrun every rank evaluates: AutoAttack's chunks are shared out (attacks.AutoAttack)
    evaluations = {reported: evaluate.evaluate_model(s.eval_model(), cfg, s.device, out, tag="final", logger=logger)}
    best_weights = None
    if world.is_main and cfg.eval.evaluate_best and (ckpt_dir / "best.pt").exists():
        best_weights = load_checkpoint(ckpt_dir / "best.pt")["model"]
    best_weights = world.broadcast(best_weights)
    if best_weights is not None:
        best = build_model(cfg).to(s.device)
        best.load_state_dict(best_weights)
        evaluations["best"] = evaluate.evaluate_model(best, cfg, s.device, out, tag="best", logger=logger)
    results = evaluate.gather_results(cfg, evaluations, train_time_s=s.train_time, evaluated=reported)
    results["environment"] = environment_info()
    if cfg.optim.accumulate > 1:  # BatchNorm saw micro-batches: its statistics are not the whole batch's
        micro = cfg.data.batch_size // world.size // cfg.optim.accumulate
        results["accumulate"] = {"micro_batches": cfg.optim.accumulate, "micro_batch_size": micro,
                                 "batchnorm": f"statistics over micro-batches of {micro} images per process"}
    if world.is_main:
        write_json(out / "results.json", results)
    logger.summary({k: results[k] for k in ("clean_acc", "autoattack_acc", "suspicious_gradient_masking")
                    if results.get(k) is not None})
    logger.save_artifact(out / "results.json", name=f"results-{cfg.name}")
    results["wandb_dir"] = logger.wandb_dir
    logger.finish()
    return results


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


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _progress(loader, cfg: Config, desc: str):
    if not cfg.logging.progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=len(loader), desc=desc, leave=False, mininterval=1.0)


# -------------------------------------------------------------------------------------- set-up
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


def load_teacher(spec: str, cfg: Config, device: torch.device) -> nn.Module:
    """A frozen teacher: an advgkl checkpoint (its EMA weights if it has them) or ``robustbench:NAME``."""
    if spec.startswith("robustbench:"):
        from .robustbench_io import load_leaderboard_model

        name = spec.split(":", 1)[1]
        teacher = load_leaderboard_model(name, cfg.data.dataset, cfg.attack.norm, "models", device=device)
    else:
        ckpt = load_checkpoint(spec)
        teacher = build_model(from_saved(ckpt["config"]))
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
    if d.val_size >= len(train_y):
        raise UserError(f"data.val_size={d.val_size}: the {d.dataset} training set has {len(train_y)} images")
    if d.subset > len(train_y) - d.val_size:
        raise UserError(f"data.subset={d.subset}: the {d.dataset} training set has {len(train_y) - d.val_size} images"
                        + (f" after data.val_size={d.val_size}" if d.val_size else "") + " (0 = all)")
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
