"""Training methods: what each one attacks, which loss it minimises, and the options it takes.

A method is a ``Method`` subclass registered with ``@register_method("name")``. The trainer asks the
method, never its name:

- ``Options``: its own dataclass of recipe options (the ``method:`` section), with defaults; ``check``
  refuses impossible values;
- ``loss(model, x, x_adv, y, ctx) -> (loss, nat_logits, adv_logits)`` (a logits entry may be None);
- ``objective(ctx)``: what the training attack maximises, or None for no attack;
- ``random_start`` and ``step_size(eps)``: the training attack's defaults for this method;
- ``uses_prior(opts)``, ``needs_teacher``, ``prior_rows``: the class prior and the teacher it needs;
- ``views``: 2 for a method that trains on two augmented views of each image (``data.augment`` must then
  be a two-view augmentation, which puts the views one after the other in each batch).

Adding a method is one class here (or in your own module, imported before the recipe is loaded) and a
recipe. The maths of the GKL family is in docs/gkl.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .attacks import make_objective
from .errors import UserError, did_you_mean

METHODS: dict[str, "Method"] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("my_at") class MyAT(Method): ...`` makes ``method.name: my_at``."""

    def add(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls()
        return cls

    return add


def get_method(name: str) -> "Method":
    if name not in METHODS:
        raise UserError(f"method.name: {name!r} is not one of {', '.join(METHODS)}{did_you_mean(name, METHODS)}")
    return METHODS[name]


@dataclass
class MethodOptions:
    """Options every method has: its name. Subclasses add theirs, each with a default."""

    name: str = ""

    def check(self) -> None:
        """Raise ``UserError`` for an impossible value, naming the key (``method.<field>``)."""
        _at_least(self, 0.0, *[f.name for f in dataclasses.fields(self) if f.type in ("float", float)])


def _at_least(opts, low: float, *names: str, strict: bool = False) -> None:
    for name in names:
        value = getattr(opts, name)
        if value < low or (strict and value == low):
            raise UserError(f"method.{name}: must be {'>' if strict else '>='} {low:g}, got {value}")


def _one_of(opts, name: str, allowed: tuple) -> None:
    if getattr(opts, name) not in allowed:
        raise UserError(f"method.{name}: {getattr(opts, name)!r} is not one of {', '.join(allowed)}")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class Context:
    """What a method's loss and attack objective need besides the batch."""

    opts: MethodOptions
    progress: float = 0.0  # epochs done, fractional (step / steps per epoch)
    prior: losses.ClassPrior | None = None
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None  # this batch's frozen-teacher logits
    fraction: float = 1.0  # this micro-batch's share of the optimiser step's batch (optim.accumulate)
    batch_y: torch.Tensor | None = None  # the labels of the step's whole batch


class Method:
    """Defaults shared by the methods; a subclass overrides what differs."""

    name = ""
    Options = MethodOptions
    random_start = "uniform"  # the training attack's start unless attack.random_start says otherwise
    needs_teacher = False
    views = 1  # augmented views of each image per batch (advgkl.data.TWO_VIEW_AUGMENTATIONS for 2)

    def adversarial(self, opts) -> bool:
        """Whether training runs the attack (then attack.eps and attack.steps must be > 0)."""
        return True

    def uses_prior(self, opts) -> bool:
        return False

    def step_size(self, eps: float) -> float | None:
        """The attack's step for radius ``eps`` when attack.step_size is 0; None = the attack's own default."""
        return None

    def objective(self, ctx: Context):
        return "ce"

    def prior_rows(self, nat_logits, y, ctx: Context):
        """(logits, labels) the class prior learns from: the natural branch and the batch's labels by default."""
        return nat_logits, y

    def loss(self, model, x, x_adv, y, ctx: Context):
        raise NotImplementedError


# ------------------------------------------------------------------------------------ the baselines
@dataclass
class SmoothingOptions(MethodOptions):
    label_smoothing: float = 0.0

    def check(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"method.label_smoothing: must be in [0, 1), got {self.label_smoothing}")


@register_method("standard")
class Standard(Method):
    """Cross-entropy on clean inputs: no attack."""

    Options = SmoothingOptions

    def adversarial(self, opts) -> bool:
        return False

    def loss(self, model, x, x_adv, y, ctx):
        logits = model(x)
        return losses.ce(logits, y, ctx.opts.label_smoothing), logits, None


@register_method("pgd_at")
class PGDAT(Method):
    """Madry et al.: cross-entropy on the PGD-CE adversarial inputs only."""

    Options = SmoothingOptions

    def loss(self, model, x, x_adv, y, ctx):
        adv = model(x_adv)
        return losses.ce(adv, y, ctx.opts.label_smoothing), None, adv


@dataclass
class BetaOptions(MethodOptions):
    beta: float = 6.0  # weight of the robustness term


@register_method("trades")
class TRADES(Method):
    """Zhang et al.: CE(nat) + beta * KL(nat || adv), attacked by the KL from a small normal start."""

    Options = BetaOptions
    random_start = "normal"

    def objective(self, ctx):
        return "trades"

    def loss(self, model, x, x_adv, y, ctx):
        nat, adv = model(x), model(x_adv)
        return losses.ce(nat, y) + ctx.opts.beta * losses.trades_kl(adv, nat), nat, adv


@dataclass
class MARTOptions(BetaOptions):
    # the boosted CE's log(1 + log_eps - max wrong prob): 0 = log(1 - p); 1e-4 = the reference's log(1.0001 - p)
    log_eps: float = 0.0


@register_method("mart")
class MART(Method):
    """Wang et al.: boosted CE on adv + beta * KL weighted by 1 - p_y(nat), attacked by CE."""

    Options = MARTOptions

    def loss(self, model, x, x_adv, y, ctx):
        nat, adv = model(x), model(x_adv)
        return losses.mart(adv, nat, y, ctx.opts.beta, log_eps=ctx.opts.log_eps), nat, adv


# ---------------------------------------------------------------------------------- the GKL family
@dataclass
class GKLOptions(MethodOptions):
    """The GKL loss's options (docs/gkl.md); the defaults are the Fashion-MNIST study's tuned values."""

    alpha: float = 1.0  # weight of the soft-label CE
    beta: float = 5.0  # weight of the wMSE term
    gamma: float = 1.0  # exponent on the pair weights
    weights: str = "prior"  # pair weights: the class prior, or a per-sample softmax of the teacher branch
    prior_temperature: float = 4.0  # T of the class prior
    symmetric: bool = True  # wMSE into both branches (GKL) or the teacher branch only (as in KL/DKL)

    def check(self) -> None:
        _at_least(self, 0.0, "alpha", "beta", "gamma")
        _at_least(self, 0.0, "prior_temperature", strict=True)
        _one_of(self, "weights", ("prior", "sample"))

    def pair_weights(self, ctx: Context, logits: torch.Tensor, y: torch.Tensor, temperature: float):
        if self.weights == "prior":
            return ctx.prior.weights(y, self.gamma)
        return F.softmax(_upcast(logits.detach()) / temperature, dim=1).pow(self.gamma)

    def denominator(self, ctx: Context):
        """The wMSE normaliser of a micro-batch: the whole batch's, scaled by the micro-batch's share.
        Class-prior weights follow from the labels, so it is exact; per-sample weights follow from logits
        the other micro-batches have not computed yet, so each micro-batch normalises by its own (None)."""
        if ctx.fraction == 1.0 or self.weights != "prior":
            return None
        return ctx.fraction * losses.wmse_denominator(ctx.prior.weights(ctx.batch_y, self.gamma))


@dataclass
class GKLATOptions(GKLOptions):
    sample_temperature: float = 4.0  # T of the per-sample weights (weights: sample)
    attack_beta: float = 0.0  # the attack objective's wMSE weight (0 for CIFAR-10, 1 for CIFAR-100)
    attack_gamma: float = 1.0  # the attack objective's exponent on the pair weights (the reference: 1 always)

    def check(self) -> None:
        super().check()
        _at_least(self, 0.0, "attack_beta", "attack_gamma")
        _at_least(self, 0.0, "sample_temperature", strict=True)


@register_method("gkl_at")
class GKLAT(Method):
    """CE(nat) + GKL(adv, nat); the attack maximises GKL with alpha 1 from a small normal start, step eps/2."""

    Options = GKLATOptions
    random_start = "normal"

    def uses_prior(self, opts) -> bool:
        return opts.weights == "prior"

    def step_size(self, eps: float) -> float:
        return eps / 2

    def objective(self, ctx):
        # The pair weights' exponent is attack_gamma, not gamma: the reference attack raises the prior to 1
        # whatever the training gamma (docs/fidelity.md, row 4).
        o = ctx.opts
        if o.weights == "prior":
            return make_objective("gkl", prior=ctx.prior, gamma=o.attack_gamma, alpha=1.0, beta=o.attack_beta)

        def objective(adv_logits, y, nat_logits):  # per-sample weights: softmax of the natural branch
            w = F.softmax(nat_logits / o.sample_temperature, dim=1).pow(o.attack_gamma)
            return losses.gkl(adv_logits, nat_logits, w, alpha=1.0, beta=o.attack_beta, symmetric=o.symmetric)

        objective.needs_nat = True
        return objective

    def loss(self, model, x, x_adv, y, ctx):
        o = ctx.opts
        nat, adv = model(x), model(x_adv)
        w = o.pair_weights(ctx, nat, y, o.sample_temperature)
        reg = losses.gkl(_upcast(adv), _upcast(nat), w, alpha=o.alpha, beta=o.beta, symmetric=o.symmetric,
                         denominator=o.denominator(ctx))
        return losses.ce(nat, y) + reg, nat, adv


@dataclass
class TwoViewOptions(GKLATOptions):
    view_b_weight: float = 0.5  # weight of the AutoAugment view's GKL term (the reference's --aug_weight)


@register_method("gkl_at_two_view")
class GKLATTwoView(GKLAT):
    """GKL-AT on two views of each image, as the reference's CIFAR-100 AutoAugment model: the batch holds
    the plain views (rows :B) then the AutoAugment views (rows B:); CE over both views, GKL on the plain
    view plus view_b_weight x GKL on the AutoAugment view, each normalised over its own B rows; the class
    prior learns from the plain view only. The attack perturbs both views (docs/fidelity.md, row 2)."""

    Options = TwoViewOptions
    views = 2

    def prior_rows(self, nat_logits, y, ctx):
        b = len(y) // 2
        return nat_logits[:b], y[:b]

    def loss(self, model, x, x_adv, y, ctx):
        o, b = ctx.opts, len(y) // 2
        nat, adv = model(x), model(x_adv)
        reg = 0.0
        for rows, weight in ((slice(None, b), 1.0), (slice(b, None), o.view_b_weight)):
            w = o.pair_weights(ctx, nat[rows], y[rows], o.sample_temperature)
            reg = reg + weight * losses.gkl(_upcast(adv[rows]), _upcast(nat[rows]), w, alpha=o.alpha, beta=o.beta,
                                            symmetric=o.symmetric)
        return losses.ce(nat, y) + reg, nat, adv


@dataclass
class GKLKDOptions(GKLOptions):
    teacher: str = ""  # advgkl checkpoint path, or robustbench:NAME
    kd_loss: str = "gkl"  # gkl | kl (ARD-style)
    kd_temperature: float = 1.0  # T of the per-sample teacher weights (weights: sample)
    kd_adversarial: bool = False  # distil on adversarial inputs (robust distillation)
    kd_warmup_epochs: float = 0.0  # the KD term's weight ramps linearly from 0 to 1 over these epochs
    # continuous: min(progress / warm-up, 1), progress in fractional epochs from 0; epoch: min(e / warm-up, 1)
    # with e the 1-based epoch, constant within it (the reference's)
    kd_warmup_mode: str = "continuous"
    kd_ce_temperature: float = 1.0  # T of the soft-label CE (kd_loss gkl) or the KL (kd_loss kl) only
    kd_ce_t2: bool = False  # multiply that term by kd_ce_temperature^2 (Hinton's KD; the reference does not)
    ce_weight: float = 1.0

    def check(self) -> None:
        super().check()
        _one_of(self, "kd_loss", ("gkl", "kl"))
        _one_of(self, "kd_warmup_mode", ("continuous", "epoch"))
        _at_least(self, 0.0, "kd_warmup_epochs", "ce_weight")
        _at_least(self, 0.0, "kd_temperature", "kd_ce_temperature", strict=True)
        if not self.teacher:
            raise UserError("method.teacher: gkl_kd needs a teacher (checkpoint path or robustbench:NAME)")


@register_method("gkl_kd")
class GKLKD(Method):
    """Distillation from a frozen teacher; with kd_adversarial the student sees x_adv (ARD-style)."""

    Options = GKLKDOptions
    needs_teacher = True

    def adversarial(self, opts) -> bool:
        return opts.kd_adversarial

    def uses_prior(self, opts) -> bool:
        return opts.weights == "prior"

    def prior_rows(self, nat_logits, y, ctx):
        return ctx.teacher_logits, y

    def objective(self, ctx):
        def objective(adv_logits, y, teacher_logits):  # move the student away from the teacher's answer
            return losses.kl(adv_logits, teacher_logits)

        objective.needs_nat = True
        return objective

    @staticmethod
    def ramp(progress: float, o: GKLKDOptions) -> float:
        """The KD term's weight after ``progress`` epochs (fractional, from 0). continuous: the KD term starts
        at 0 and reaches full weight after kd_warmup_epochs. epoch: the reference's min(epoch / warm-up, 1)
        with the 1-based epoch, so 1 / warm-up during the first epoch."""
        if not o.kd_warmup_epochs:
            return 1.0
        done = math.floor(progress) + 1 if o.kd_warmup_mode == "epoch" else progress
        return min(done / o.kd_warmup_epochs, 1.0)

    def loss(self, model, x, x_adv, y, ctx):
        o, teacher = ctx.opts, ctx.teacher_logits
        nat = model(x)
        student = model(x_adv) if x_adv is not None else nat
        # With a frozen teacher the wMSE term regresses the student's raw logits onto the teacher's; for a
        # from-scratch student the study needed the warm-up ramp and, at beta 5, optim.grad_clip.
        ramp = self.ramp(ctx.progress, o)
        t_ce = o.kd_ce_temperature  # the soft CE's (or KL's) temperature; the wMSE stays on raw logits
        scale = t_ce ** 2 if o.kd_ce_t2 else 1.0
        if o.kd_loss == "kl":
            kd = scale * losses.kl(_upcast(student), teacher, t_ce)
        else:
            w = o.pair_weights(ctx, teacher, y, o.kd_temperature)
            kd = losses.gkl(_upcast(student), teacher, w, alpha=o.alpha * scale, beta=o.beta, symmetric=o.symmetric,
                            denominator=o.denominator(ctx), ce_temperature=t_ce)
        return o.ce_weight * losses.ce(nat, y) + ramp * kd, nat, student if x_adv is not None else None
