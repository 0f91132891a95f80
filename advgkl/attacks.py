"""Attacks in pixel space on images in [0, 1]: PGD / FGSM with a pluggable objective, and an AutoAttack wrapper.

Threat models: ``norm="Linf"`` (``||x_adv - x||_inf <= eps``) or ``norm="L2"`` (``||x_adv - x||_2 <= eps``
per sample), always intersected with the box [0, 1]. Every attack is an object called as ``atk(x, y)``
(or ``atk(model, x, y)``); it runs the model in eval mode, restores each module's ``training`` flag
afterwards, takes gradients only w.r.t. the input (``p.grad`` of the parameters is never touched) and
returns a detached tensor of the input's shape.

An attack objective is one function ``objective(adv_logits [B, C], y [B], nat_logits [B, C] | None)``
returning a scalar to *maximise*, with an attribute ``needs_nat``; when it is True the attack
computes ``model(x)`` once per call, not once per step.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from advgkl import distributed, losses, preemption
from advgkl.checkpoint import atomic_torch_save
from advgkl.errors import UserError

__all__ = [
    "PGD", "FGSM", "ce_objective", "trades_objective", "GKLObjective", "make_objective", "OBJECTIVES",
    "AutoAttack", "AutoAttackResult", "AA_ATTACKS", "AA_VERSIONS", "FAST_VERSION_LABEL",
]

NORMS = ("Linf", "L2")
RANDOM_STARTS = ("uniform", "normal", None)


# ----------------------------------------------------------------------------------------------------
# Objectives: pure functions of logits, each a scalar to maximise.

def ce_objective(adv_logits: torch.Tensor, y: torch.Tensor, nat_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the adversarial logits (PGD-AT / Madry et al.)."""
    return losses.ce(adv_logits, y)


ce_objective.needs_nat = False


def trades_objective(adv_logits: torch.Tensor, y: torch.Tensor, nat_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(nat) || softmax(adv)) / B, the TRADES inner maximisation; ``y`` is unused."""
    return losses.trades_kl(adv_logits, nat_logits.detach())


trades_objective.needs_nat = True


class GKLObjective:
    """GKL-AT attack objective: ``losses.gkl(adv, nat, prior.weights(y, gamma), alpha, beta)``.

    Spec section 2 uses ``alpha=1`` and ``beta=0`` (CIFAR-10) or ``beta=1`` (CIFAR-100). ``prior`` is a
    ``losses.ClassPrior`` (its weights are read at every call, so an attack built once follows the
    prior as it is updated between epochs).
    """

    needs_nat = True

    def __init__(self, prior: losses.ClassPrior, gamma: float = 1.0, alpha: float = 1.0, beta: float = 0.0,
                 temperature: float = 1.0):
        self.prior, self.gamma, self.alpha, self.beta, self.temperature = prior, gamma, alpha, beta, temperature

    def __call__(self, adv_logits: torch.Tensor, y: torch.Tensor, nat_logits: torch.Tensor) -> torch.Tensor:
        weights = self.prior.weights(y, self.gamma).to(adv_logits.dtype)
        return losses.gkl(adv_logits, nat_logits.detach(), weights, alpha=self.alpha, beta=self.beta,
                          temperature=self.temperature)

    def __repr__(self) -> str:
        return f"GKLObjective(gamma={self.gamma}, alpha={self.alpha}, beta={self.beta}, T={self.temperature})"


OBJECTIVES: dict[str, Callable] = {"ce": ce_objective, "trades": trades_objective, "gkl": GKLObjective}


def make_objective(name_or_callable: str | Callable, **kw) -> Callable:
    """``"ce"`` | ``"trades"`` | ``"gkl"`` (``kw`` go to ``GKLObjective``) or any callable objective.

    A callable without ``needs_nat`` is taken as not needing the natural logits.
    """
    if callable(name_or_callable):
        if kw:
            raise UserError(f"keyword arguments {sorted(kw)} only apply to a named objective")
        return name_or_callable
    if name_or_callable not in OBJECTIVES:
        raise UserError(f"unknown attack objective {name_or_callable!r}; known: {sorted(OBJECTIVES)}")
    obj = OBJECTIVES[name_or_callable]
    if isinstance(obj, type):
        try:
            return obj(**kw)
        except TypeError as e:  # a missing or misspelt option, e.g. gkl without prior=
            raise UserError(f"objective {name_or_callable!r}: {e}") from e
    if kw:
        raise UserError(f"objective {name_or_callable!r} takes no arguments, got {sorted(kw)}")
    return obj


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the attacks.

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Puts every submodule in eval mode and restores each one's own ``training`` flag afterwards."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    if modules:
        model.eval()  # through .eval(), so modules that override train() see it
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag  # per module: a frozen-BN submodule in a training model stays frozen


def _per_sample(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a [B] tensor as a [B, 1, 1, ...] tensor broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise UserError(f"per-sample eps/step_size must have {batch} values, got {t.numel()}")
    return t.reshape(batch, *([1] * (like.dim() - 1)))


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm as [B, 1, 1, ...]."""
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Projects onto the eps ball around x, then onto [0, 1] (clipping never leaves the ball)."""
    delta = x_adv - x
    if norm == "Linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta * torch.clamp(eps / (_l2(delta) + 1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


class PGD:
    """Projected gradient ascent on an objective, torchattacks-style: ``PGD(model, eps=8/255)(x, y)``.

    Args (defaults in brackets):
        model: module mapping [B, C, H, W] images in [0, 1] to [B, K] logits; may instead be passed
            per call as ``atk(model, x, y)``.
        eps: radius of the ball (pixel units, e.g. 8/255 for Linf, 0.5 for L2). A float, or per call a
            float or a [B] tensor (per-sample radii, e.g. an eps ramp).
        steps [10]: gradient steps per restart.
        step_size [2.5 * eps / steps]: Linf ``x += step * sign(g)``; L2 ``x += step * g / ||g||_2``.
        norm ["Linf"]: "Linf" or "L2".
        random_start ["uniform"]: "uniform" = uniform in the Linf box; for L2 a uniform direction with
            radius ~ U(0, eps) (not volume-uniform, enough to break symmetry). "normal" = ``x + init_std
            * N(0, I)`` (the GKL-AT start, then projected). None = start at x.
        init_std [0.001]: std of the "normal" start.
        restarts [1]: per sample, the first restart that misclassifies is kept, else the last one.
            Later restarts only run on samples not yet misclassified.
        objective ["ce"]: "ce" | "trades" | "gkl" (needs ``make_objective("gkl", prior=...)``) or a
            callable ``f(adv_logits, y, nat_logits) -> scalar to maximise`` with ``needs_nat``.
        amp_dtype [None]: e.g. torch.bfloat16 runs the forwards under autocast; the objective and the
            input gradient stay fp32 (prefer bf16: fp16 input gradients can underflow without a scaler).
    Call: ``atk(x, y, *, eps=None, steps=None, step_size=None, nat_logits=None) -> x_adv`` [B, C, H, W].
    ``nat_logits`` [B, K] (the natural branch the trainer already computed) saves one forward.
    """

    def __init__(self, model: nn.Module | None = None, *, eps: float, steps: int = 10,
                 step_size: float | None = None, norm: str = "Linf", random_start: str | None = "uniform",
                 init_std: float = 0.001, restarts: int = 1, objective: str | Callable = "ce",
                 amp_dtype: torch.dtype | None = None):
        if norm not in NORMS:
            raise UserError(f"unknown norm {norm!r}; known: {list(NORMS)}")
        if random_start not in RANDOM_STARTS:
            raise UserError(f"unknown random_start {random_start!r}; known: {list(RANDOM_STARTS)}")
        if steps < 1 or restarts < 1:
            raise UserError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
        self.model, self.eps, self.steps, self.step_size, self.norm = model, eps, steps, step_size, norm
        self.random_start, self.init_std, self.restarts, self.amp_dtype = random_start, init_std, restarts, amp_dtype
        self.objective = make_objective(objective)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps}, steps={self.steps}, step_size={self.step_size}, "
                f"norm={self.norm!r}, random_start={self.random_start!r}, restarts={self.restarts}, "
                f"objective={getattr(self.objective, '__name__', self.objective)})")

    def _default_step(self, eps: torch.Tensor, steps: int) -> torch.Tensor:
        return 2.5 * eps / steps

    def __call__(self, *args, y: torch.Tensor | None = None, eps=None, steps: int | None = None,
                 step_size=None, nat_logits: torch.Tensor | None = None) -> torch.Tensor:
        args = list(args)
        model = args.pop(0) if args and not torch.is_tensor(args[0]) else self.model
        if model is None:
            raise TypeError("no model: build the attack with one or call atk(model, x, y)")
        if len(args) == 2:
            x, y = args
        elif len(args) == 1 and y is not None:
            x = args[0]
        else:
            raise TypeError("call as atk(x, y) or atk(model, x, y)")
        x = x.detach()
        steps = self.steps if steps is None else steps
        eps_t = _per_sample(self.eps if eps is None else eps, x.shape[0], x)
        if not bool((eps_t > 0).any()):
            return x.clone()  # eps = 0: the ball is the point itself
        step_size = self.step_size if step_size is None else step_size
        step_t = self._default_step(eps_t, steps) if step_size is None else _per_sample(step_size, x.shape[0], x)
        amp = self._amp(x.device.type)
        with eval_mode(model):
            if getattr(self.objective, "needs_nat", False) and nat_logits is None:
                with torch.no_grad(), amp():
                    nat_logits = model(x).float()  # once per call, never per step
            if nat_logits is not None:
                nat_logits = nat_logits.detach().float()
            x_adv = self._run(model, x, y, eps_t, step_t, steps, nat_logits, amp)
            for _ in range(self.restarts - 1):
                with torch.no_grad(), amp():
                    idx = (model(x_adv).argmax(1) == y).nonzero().flatten()  # keep the first success per sample
                if idx.numel() == 0:
                    break
                nat = None if nat_logits is None else nat_logits[idx]
                x_adv[idx] = self._run(model, x[idx], y[idx], eps_t[idx], step_t[idx], steps, nat, amp)
        return x_adv

    def _amp(self, device_type: str) -> Callable:
        """Factory of fresh contexts: autocast at ``amp_dtype``, or nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type, dtype=self.amp_dtype)

    def _start(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.random_start is None:
            return x.clone()
        if self.random_start == "normal":
            x0 = x + self.init_std * torch.randn_like(x)
        elif self.norm == "Linf":
            x0 = x + (2 * torch.rand_like(x) - 1) * eps
        else:
            u = torch.randn_like(x)
            x0 = x + u / (_l2(u) + 1e-12) * torch.rand_like(eps) * eps  # radius ~ U(0, eps)
        return _project(x0, x, eps, self.norm)

    def _run(self, model, x, y, eps, step, steps, nat_logits, amp) -> torch.Tensor:
        """One restart: ``steps`` ascent steps from the random start; returns detached x_adv."""
        x_adv = self._start(x, eps)
        with torch.enable_grad():  # callers often sit inside no_grad (evaluation loops)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                with amp():
                    logits = model(x_adv)
                loss = self.objective(logits.float(), y, nat_logits)
                (grad,) = torch.autograd.grad(loss, x_adv)  # input only: parameters' .grad stay untouched
                with torch.no_grad():
                    if self.norm == "Linf":
                        x_adv = x_adv + step * grad.sign()
                    else:
                        x_adv = x_adv + step * grad / (_l2(grad) + 1e-12)
                    x_adv = _project(x_adv, x, eps, self.norm)
        return x_adv.detach()


class FGSM(PGD):
    """One signed-gradient step (``steps=1``); same threat models, objectives and call as ``PGD``.

    ``random_start`` defaults to "uniform" with step ``1.25 * eps`` (FGSM-RS, Wong et al. 2020, "Fast is
    better than free"); with ``random_start=None`` it is classic FGSM (Goodfellow et al.) with step
    ``eps``. The result is always projected back onto the eps ball.
    """

    def __init__(self, model: nn.Module | None = None, *, eps: float, step_size: float | None = None,
                 norm: str = "Linf", random_start: str | None = "uniform", init_std: float = 0.001,
                 restarts: int = 1, objective: str | Callable = "ce", amp_dtype: torch.dtype | None = None):
        super().__init__(model, eps=eps, steps=1, step_size=step_size, norm=norm, random_start=random_start,
                         init_std=init_std, restarts=restarts, objective=objective, amp_dtype=amp_dtype)

    def _default_step(self, eps: torch.Tensor, steps: int) -> torch.Tensor:
        return 1.25 * eps if self.random_start is not None else eps


# ----------------------------------------------------------------------------------------------------
# The training attack, ``attack.name`` in a recipe: name -> factory(settings, *, objective, random_start,
# amp_dtype) -> attack, where ``settings`` has eps, steps and norm (``config.AttackConfig``). The trainer
# calls the attack as ``atk(model, x, y, eps=..., step_size=..., nat_logits=...)``.
TRAINING_ATTACKS: dict[str, Callable] = {}


def register_training_attack(name: str):
    """Function decorator adding a training attack factory under ``name``."""

    def add(factory):
        if name in TRAINING_ATTACKS:
            raise ValueError(f"training attack {name!r} is already registered")
        TRAINING_ATTACKS[name] = factory
        return factory

    return add


@register_training_attack("pgd")
def _training_pgd(settings, **kw) -> PGD:
    return PGD(eps=settings.eps, steps=settings.steps, norm=settings.norm, **kw)


@register_training_attack("fgsm")
def _training_fgsm(settings, **kw) -> FGSM:
    """One step whatever attack.steps says (FGSM-RS with a random start, Wong et al. 2020)."""
    return FGSM(eps=settings.eps, norm=settings.norm, **kw)


# ----------------------------------------------------------------------------------------------------
# AutoAttack (Croce & Hein, 2020) driven attack by attack through pyautoattack's attack objects.

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AA_NORMS = ("Linf", "L2", "L1")
FAST_VERSION_LABEL = "fast-screening (not standard AutoAttack)"
AA_VERSIONS: dict[str, list[str] | None] = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "fast": ["apgd-ce", "apgd-t"],  # the first two attacks of "standard", with standard's settings
    "custom": None,  # attacks=[...] with pyautoattack's constructor defaults (APGD-CE with 5 restarts)
}
_STATE_FORMAT = 1


@dataclass
class AutoAttackResult:
    """Outcome of one AutoAttack evaluation; accuracies are fractions in [0, 1]."""

    clean_acc: float
    robust_acc: float
    per_attack_robust_acc: dict[str, float]  # "clean" first, then robust accuracy after each attack, in order
    n_examples: int
    version: str  # "standard" | "plus" | "custom" | FAST_VERSION_LABEL
    attacks: list[str]
    eps: float
    norm: str
    clean_correct: torch.Tensor  # bool [N]
    robust_correct: torch.Tensor  # bool [N]
    wall_time_s: float  # summed over resumed runs
    broken_by: torch.Tensor | None = None  # int8 [N]: -1 robust, 0 misclassified clean, k = broken by attacks[k-1]

    def to_dict(self) -> dict:
        """JSON-serialisable; per-point flags as lists of 0/1 under "per_point"."""
        per_point = {"clean_correct": self.clean_correct.int().tolist(),
                     "robust_correct": self.robust_correct.int().tolist()}
        if self.broken_by is not None:
            per_point["broken_by"] = self.broken_by.tolist()
        return {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc,
                "per_attack_robust_acc": dict(self.per_attack_robust_acc), "n_examples": self.n_examples,
                "version": self.version, "attacks": list(self.attacks), "eps": self.eps, "norm": self.norm,
                "wall_time_s": self.wall_time_s, "per_point": per_point}


def _run_attack(aa, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One pyautoattack attack on one chunk, set up exactly as ``run_standard_evaluation`` does it."""
    if name in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if name == "apgd-ce" else "dlr"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)
    if name == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if name in ("fab", "fab-t"):
        aa.fab.targeted = name == "fab-t"
        if name == "fab-t":
            aa.fab.n_restarts = 1  # pyautoattack does this too (and never undoes it)
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    if name == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    raise UserError(f"unknown AutoAttack attack {name!r}; known: {list(AA_ATTACKS)}")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def _fp32_frozen(model: nn.Module, allow_tf32: bool):
    """fp32 parameters/buffers without requires_grad, TF32 as asked, no autocast; all restored on exit."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    dtypes = {n: t.dtype for n, t in named if t.is_floating_point() and t.dtype != torch.float32}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    tf32 = {(torch.backends.cuda.matmul, "allow_tf32"): torch.backends.cuda.matmul.allow_tf32,
            (torch.backends.cudnn, "allow_tf32"): torch.backends.cudnn.allow_tf32}
    if dtypes:
        model.float()
    for p, _ in grad_flags:
        p.requires_grad_(False)  # FAB calls .backward(): without this it would fill p.grad
    for (mod, attr), old in tf32.items():
        if old != allow_tf32:
            setattr(mod, attr, allow_tf32)
    try:
        yield
    finally:
        for (mod, attr), old in tf32.items():
            if getattr(mod, attr) != old:
                setattr(mod, attr, old)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for name, dtype in dtypes.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            t = getattr(owner, attr)
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(dtype)
            else:
                setattr(owner, attr, t.to(dtype))


class AutoAttack:
    """AutoAttack evaluation on top of ``pyautoattack``, resumable and always in fp32.

    Runs attack by attack over chunks of ``batch_size`` still-robust points (exactly the schedule and
    seeding of ``pyautoattack.AutoAttack.run_standard_evaluation``, so per-point results are equal),
    dropping broken points so each point meets each attack at most once.

    Args (defaults in brackets):
        model: logits model on images in [0, 1].
        norm ["Linf"]: "Linf" | "L2" | "L1".  eps [8/255]: radius in pixel units.
        version ["standard"]: "standard" (APGD-CE, APGD-T, FAB-T, Square) | "plus" | "custom" (needs
            ``attacks``) | "fast" (APGD-CE + APGD-T with the standard settings; labelled
            ``FAST_VERSION_LABEL`` in results, it is a screening number, not standard AutoAttack).
        attacks [None]: for "custom", a list out of ``AA_ATTACKS``.
        batch_size [500]: chunk size (part of the schedule: results depend on it, as in pyautoattack).
        seed [0]: pyautoattack's seed (re-applied before every chunk). The caller's RNG state is restored.
        device [None]: where chunks run; default the model's parameters' device.
        state_path [None]: file checkpointed (atomically) after every chunk; a later call with the same
            inputs, model and settings resumes from it (a finished state returns its result at once), a
            different one raises UserError naming what differs.
        progress [True]: tqdm bar over attacks.  allow_tf32 [False]: TF32 matmul/conv during the run.
        Targeted attacks use min(9, n_classes - 1) target classes (pyautoattack's 9 fails below 10 classes).
    Call: ``aa(x [N, C, H, W] float in [0, 1], y [N] int64) -> AutoAttackResult``.
    """

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float = 8 / 255, version: str = "standard",
                 attacks: list[str] | None = None, batch_size: int = 500, seed: int | None = 0,
                 device: torch.device | str | None = None, verbose: bool = False,
                 state_path: str | os.PathLike | None = None, progress: bool = True, allow_tf32: bool = False):
        if version not in AA_VERSIONS:
            raise UserError(f"unknown AutoAttack version {version!r}; known: {list(AA_VERSIONS)}")
        if norm not in AA_NORMS:
            raise UserError(f"unknown AutoAttack norm {norm!r}; known: {list(AA_NORMS)}")
        if version == "custom":
            if not attacks:
                raise UserError(f"version='custom' needs attacks=[...] out of {list(AA_ATTACKS)}")
            unknown = [a for a in attacks if a not in AA_ATTACKS]
            if unknown:
                raise UserError(f"unknown AutoAttack attacks {unknown}; known: {list(AA_ATTACKS)}")
            if len(set(attacks)) != len(attacks):
                raise UserError(f"attacks must not repeat, got {list(attacks)}")
        elif attacks is not None:
            raise UserError(f"attacks=... only goes with version='custom' (version {version!r} fixes them)")
        if not eps > 0 or batch_size < 1:
            raise UserError(f"AutoAttack needs eps > 0 and batch_size >= 1, got eps={eps}, batch_size={batch_size}")
        self.model, self.norm, self.eps, self.version = model, norm, float(eps), version
        self.attacks = list(attacks) if version == "custom" else list(AA_VERSIONS[version])
        self.label = FAST_VERSION_LABEL if version == "fast" else version
        self.batch_size, self.seed, self.verbose, self.progress = batch_size, seed, verbose, progress
        self.state_path = None if state_path is None else Path(state_path)
        self.allow_tf32 = allow_tf32
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)

    def pyautoattack(self, n_classes: int = 10):
        """A fresh ``pyautoattack.AutoAttack`` set up as this evaluation (fresh: pyautoattack mutates it)."""
        import pyautoattack

        pa_version = "standard" if self.version == "fast" else self.version
        aa = pyautoattack.AutoAttack(self.model, attacks=self.attacks if self.version == "custom" else None,
                                     device=self.device, eps=self.eps, norm=self.norm, seed=self.seed,
                                     version=pa_version)
        aa.attacks_to_run = list(self.attacks)
        aa.verbose = self.verbose
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
        return aa

    def _check_inputs(self, x, y) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 4:
            raise UserError(f"x must be a float tensor [N, C, H, W]; got {getattr(x, 'dtype', type(x))} "
                            f"{tuple(getattr(x, 'shape', ()))}")
        if x.shape[0] == 0:
            raise UserError("x is empty")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise UserError("x must hold finite values in [0, 1] (normalisation belongs inside the model)")
        if not torch.is_tensor(y) or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise UserError(f"y must be an int64 tensor [{x.shape[0]}]; got {getattr(y, 'dtype', type(y))} "
                            f"{tuple(getattr(y, 'shape', ()))}")

    def _fingerprint(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        flat = x.reshape(-1)
        probe = flat[torch.linspace(0, flat.numel() - 1, min(4096, flat.numel())).long()].float()
        params = [p.detach().reshape(-1)[:8].float().cpu() for p in self.model.parameters()]
        model_probe = torch.cat(params) if params else torch.zeros(0)
        return {"n": int(x.shape[0]), "shape": list(x.shape), "eps": self.eps, "norm": self.norm,
                "version": self.label, "attacks": list(self.attacks), "seed": self.seed,
                "batch_size": self.batch_size, "y_sha": _sha(y), "x_sha": _sha(probe), "model_sha": _sha(model_probe)}

    def _load_state(self, fingerprint: dict) -> dict | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: say which in one line, never torch's weights_only advice
            first = str(e).strip().splitlines()[0] if str(e).strip() else "the file is empty or cut short"
            why = ("safe loading refused it: not a tensor file that advgkl wrote"
                   if first.startswith("Weights only load failed") else first.split(". ")[0])
            raise UserError(f"cannot read AutoAttack state {self.state_path} ({why}); "
                            "delete it or choose another --out") from e
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or not isinstance(
                state.get("fingerprint"), dict):
            raise UserError(f"{self.state_path} is not an advgkl AutoAttack state; delete it or choose another --out")
        old = state["fingerprint"]
        diff = [f"{k}: state {old.get(k)!r} vs now {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if diff:
            raise UserError(f"AutoAttack state {self.state_path} belongs to a different evaluation ("
                            + "; ".join(diff) + "); delete it or choose another --out")
        return state

    def _save(self, state: dict, world: "distributed.World") -> None:
        if self.state_path is not None and world.is_main:  # rank 0 alone writes the state
            atomic_torch_save(state, self.state_path)  # a kill mid-write leaves the previous state

    def __call__(self, x: torch.Tensor, y: torch.Tensor, world: "distributed.World | None" = None) -> AutoAttackResult:
        """Clean and robust accuracy of the model on (x, y); see the class docstring.

        Under a process group (``world``, default: the running one, if any) the ranks share the work:
        AutoAttack splits the points still robust when an attack starts into chunks of ``batch_size``
        and seeds every chunk alike, so a point's outcome depends on its chunk. In round j rank r attacks
        chunk ``j * size + r`` and an OR over ranks merges the broken points, so after every round all
        ranks hold the single-process state and per-point results equal one process's exactly. Rank 0
        alone reads and writes ``state_path``, in one format for any number of processes: a killed job
        resumes with any number of processes, or with one. Every rank passes the same x and y.
        """
        from pyautoattack import checks
        from tqdm.auto import tqdm

        world = world or distributed.current()
        self._check_inputs(x, y)
        t0 = time.time()
        dev = self.device
        x = x.detach().float()
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(_fp32_frozen(self.model, self.allow_tf32))
            stack.enter_context(torch.autocast(dev.type, enabled=False))  # AutoAttack is always fp32
            stack.enter_context(torch.no_grad())  # as pyautoattack; its attacks enable grad where needed
            # pyautoattack calls torch.manual_seed per chunk: keep the caller's RNG stream untouched
            stack.enter_context(torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))

            n_classes = self._n_classes(x, y)
            state = self._initial_state(x, y, world)
            wall_before = state["wall_time_s"]  # the time of the runs this one resumes
            aa = self.pyautoattack(n_classes)
            if state["clean_correct"] is None:
                self._clean_pass(x, y, state, aa, world)

            bar = tqdm(total=len(self.attacks), desc="AutoAttack", unit="attack",
                       disable=not (self.progress and world.is_main))
            for k, name in enumerate(self.attacks):
                if name in state["per_attack"]:  # finished before a resume
                    bar.update(1)
                    continue
                self._attack(k, name, x, y, state, aa, world, bar, lambda: wall_before + time.time() - t0)
            bar.close()
            if world.is_main:
                checks.check_square_sr(state["per_attack"], logger=aa.logger)
        return self._result(state, x.shape[0])

    def _n_classes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """The model's number of outputs, after checking that the labels ``y`` fit it."""
        n_classes = self.model(x[:1].to(self.device)).shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise UserError(f"labels must lie in [0, {n_classes - 1}] (the model has {n_classes} outputs); "
                            f"got [{int(y.min())}, {int(y.max())}]")
        return n_classes

    def _initial_state(self, x: torch.Tensor, y: torch.Tensor, world: "distributed.World") -> dict:
        """The state rank 0 loads from ``state_path``, on every rank, or a fresh one.

        A state of another evaluation raises its UserError on every rank (``World.on_main``).
        """
        fingerprint = self._fingerprint(x, y)
        state = world.on_main(self._load_state, fingerprint)
        if state is None:
            state = {"format": _STATE_FORMAT, "fingerprint": fingerprint, "clean_correct": None,
                     "robust": None, "broken_by": None, "per_attack": {}, "current": None,
                     "start_robust": None, "chunks_done": 0, "done": [], "wall_time_s": 0.0}
        return state

    def _clean_pass(self, x: torch.Tensor, y: torch.Tensor, state: dict, aa, world: "distributed.World") -> None:
        """Clean accuracy into ``state`` (chunk c on rank c % size), saved; everything robust so far."""
        from pyautoattack import checks

        model, dev, n, bs = self.model, self.device, x.shape[0], self.batch_size
        if world.is_main:  # pyautoattack's sanity warnings, once
            chunk0 = x[:bs].to(dev)
            checks.check_randomized(model, chunk0, y[:bs].to(dev), bs=bs, logger=aa.logger)
            checks.check_range_output(model, chunk0, logger=aa.logger)
        yc = y.cpu()
        clean = torch.zeros(n, dtype=torch.bool)
        for c, i in enumerate(range(0, n, bs)):
            if c % world.size == world.rank:
                clean[i:i + bs] = model(x[i:i + bs].to(dev)).max(dim=1)[1].cpu() == yc[i:i + bs]
        clean = world.any(clean)
        state.update(clean_correct=clean, robust=clean.clone(),
                     broken_by=torch.where(clean, -1, 0).to(torch.int8))
        state["per_attack"]["clean"] = clean.sum().item() / n
        self._save(state, world)

    def _attack(self, k: int, name: str, x: torch.Tensor, y: torch.Tensor, state: dict, aa,
                world: "distributed.World", bar, wall_time: Callable[[], float]) -> None:
        """Attack ``name`` (``attacks[k]``) on the points robust when it started, resuming ``state["current"]``.

        Round by round (rank r attacks chunk ``first + r``), each merged over ranks and saved.
        """
        model, dev, n, bs = self.model, self.device, x.shape[0], self.batch_size
        robust, broken_by, yc = state["robust"], state["broken_by"], y.cpu()
        if state["current"] != name:  # chunks are fixed by the robust set when the attack starts
            state.update(current=name, start_robust=robust.clone(), chunks_done=0)
        # split() of an empty index still yields one empty chunk: nothing robust, nothing to attack
        chunks = [c for c in state["start_robust"].nonzero().flatten().split(bs) if len(c)]
        for first in range(state["chunks_done"], len(chunks), world.size):
            c = first + world.rank  # this rank's chunk of the round; one process: every chunk in turn
            broken = torch.zeros(n, dtype=torch.bool)
            if c < len(chunks):
                idx = chunks[c]
                adv = _run_attack(aa, name, x[idx].to(dev), y[idx].to(dev))
                broken[idx[model(adv).max(dim=1)[1].cpu() != yc[idx]]] = True
            broken = world.any(broken)
            robust[broken] = False
            broken_by[broken] = k + 1
            done = min(first + world.size, len(chunks))
            state["done"] += [[name, j] for j in range(first, done)]
            state.update(chunks_done=done, wall_time_s=wall_time())
            self._save(state, world)
            stop = preemption.requested(world)  # a SLURM / user signal: the state above is the resume point
            if stop:
                raise preemption.Preempted(f"{stop} during AutoAttack {name}; state saved in {self.state_path}")
            bar.set_postfix_str(f"{name} chunk {done}/{len(chunks)} robust {robust.float().mean():.2%}")
        state["per_attack"][name] = robust.sum().item() / n
        state.update(current=None, start_robust=None, chunks_done=0, wall_time_s=wall_time())
        self._save(state, world)
        bar.update(1)
        if self.verbose and world.is_main:
            print(f"AutoAttack {name}: robust accuracy {state['per_attack'][name]:.2%} "
                  f"({state['wall_time_s']:.1f} s)", flush=True)

    def _result(self, state: dict, n: int) -> AutoAttackResult:
        """The result of a finished ``state`` over ``n`` points; tensors are copies."""
        robust = state["robust"]
        per_attack = {"clean": state["per_attack"]["clean"]}
        per_attack.update({a: state["per_attack"][a] for a in self.attacks})
        return AutoAttackResult(
            clean_acc=per_attack["clean"], robust_acc=robust.sum().item() / n, per_attack_robust_acc=per_attack,
            n_examples=n, version=self.label, attacks=list(self.attacks), eps=self.eps, norm=self.norm,
            clean_correct=state["clean_correct"].clone(), robust_correct=robust.clone(),
            wall_time_s=state["wall_time_s"], broken_by=state["broken_by"].clone())
