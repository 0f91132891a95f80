"""Losses as pure functions of logits, plus the class-prior state GKL-AT keeps between epochs.

Shapes: logits are ``[B, C]`` floats, labels ``[B]`` int64. Every loss returns a scalar.
Naming follows the GKL papers (maths: docs/gkl.md): ``student`` is the adversarial branch in adversarial
training and the student network in distillation; ``teacher`` is the natural branch / frozen teacher.

KL, DKL and GKL are points of one family:
- ``kl``:  KL(softmax(t) || softmax(s)), gradient into both inputs.
- ``dkl``: the same gradients, written as wMSE (gradient into the teacher only) + soft-label CE.
- ``gkl``: wMSE back-propagated into both branches, with caller-given (e.g. class-prior) weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ce", "kl", "dkl", "gkl", "gkl_pairwise", "trades_kl", "mart", "soft_ce", "ClassPrior",
]


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logits must both be [B, C]; got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )


def _check_weights(weights: torch.Tensor, like: torch.Tensor) -> None:
    if weights.shape != like.shape:
        raise ValueError(f"weights must be [B, C] = {tuple(like.shape)}; got {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (they are probabilities raised to gamma)")


def ce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy with optional label smoothing."""
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of -sum_j softmax(t/T)_j * log_softmax(s/T)_j; the teacher side is detached."""
    target = F.softmax(teacher.detach() / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch; gradient flows into both inputs."""
    _check_logits(student, teacher)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def _wmse(d: torch.Tensor, w: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """0.25 * sum_b sum_jk w_bj w_bk (d_bj - d_bk)^2 / sum_b (sum_j w_bj)^2, in O(B*C); ``denominator``
    replaces sum_b (sum_j w_bj)^2 (a micro-batch of a larger batch divides by the whole batch's).

    Uses pair_b = 2 S_b sum_j w_bj (d_bj - mu_b)^2 with mu_b the w-weighted mean of d_b: centring first
    avoids the cancellation of the expanded form 2 S sum w d^2 - 2 (sum w d)^2.
    """
    s = w.sum(dim=1, keepdim=True)  # [B, 1]
    mu = (w * d).sum(dim=1, keepdim=True) / s.clamp_min(torch.finfo(w.dtype).tiny)
    pair = 2.0 * s.squeeze(1) * (w * (d - mu).square()).sum(dim=1)  # [B]
    return 0.25 * pair.sum() / (s.square().sum() if denominator is None else denominator)


def gkl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    symmetric: bool = True,
    denominator: torch.Tensor | None = None,
    ce_temperature: float | None = None,
) -> torch.Tensor:
    """Generalized KL: ``beta * wMSE(t - s; weights) + alpha * soft_ce(s, t)``.

    The wMSE term sends gradient into both ``student`` and ``teacher`` (nothing detached inside it);
    the soft-label CE keeps softmax(t/T) detached. ``weights`` [B, C] must be non-negative and carry no
    gradient (they are detached here). Logits are divided by ``temperature`` in both terms; the
    reference implementation uses T = 1. ``symmetric=False`` restores KL's asymmetry (the student's
    logits are constants inside wMSE), which is how ``dkl`` is built and what the ablation compares.
    ``denominator`` replaces the wMSE's batch normaliser sum_b (sum_j w_bj)^2 (``wmse_denominator``).
    ``ce_temperature`` (None = ``temperature``) sets the soft-label CE's temperature alone: the official
    CIFAR-100 distillation configs run the soft CE at T = 4 and the wMSE on raw logits
    (``temperature=1, ce_temperature=4``; docs/fidelity.md).
    """
    _check_logits(student, teacher)
    _check_weights(weights, student)
    d = (teacher - (student if symmetric else student.detach())) / temperature
    loss = alpha * soft_ce(student, teacher, temperature if ce_temperature is None else ce_temperature)
    if beta != 0:
        loss = loss + beta * _wmse(d, weights.detach(), denominator)
    return loss


def wmse_denominator(weights: torch.Tensor) -> torch.Tensor:
    """The wMSE's batch normaliser sum_b (sum_j w_bj)^2 of ``weights`` [B, C]. A micro-batch that holds
    the fraction f of a batch passes ``f * wmse_denominator(whole batch's weights)`` to ``gkl``: then
    f * gkl(micro-batch) summed over the micro-batches equals gkl(whole batch)."""
    return weights.detach().sum(dim=1).square().sum()


def dkl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled KL: with alpha = beta = 1 it has exactly the gradients of ``kl`` w.r.t. both inputs.

    wMSE uses weights softmax(t/T) (detached) and treats the student's logits as constants, so it
    pushes gradient only into the teacher; the soft-label CE gives the student KL's gradient.
    """
    weights = F.softmax(teacher.detach() / temperature, dim=1)
    return gkl(student, teacher, weights, alpha=alpha, beta=beta, temperature=temperature, symmetric=False)


def gkl_pairwise(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The pairwise definition of ``gkl`` (docs/gkl.md#gkl), building [B, C, C]: for tests and benchmarks only."""
    _check_logits(student, teacher)
    _check_weights(weights, student)
    w = weights.detach()
    d = (teacher - student) / temperature
    diff = d.unsqueeze(2) - d.unsqueeze(1)  # [B, C, C]
    pair = (w.unsqueeze(2) * w.unsqueeze(1) * diff.square()).sum(dim=(1, 2))
    wmse = 0.25 * pair.sum() / w.sum(dim=1).square().sum()
    return beta * wmse + alpha * soft_ce(student, teacher, temperature)


def trades_kl(adv_logits: torch.Tensor, nat_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robustness term KL(softmax(nat) || softmax(adv)) / B, gradient into both branches."""
    return kl(adv_logits, nat_logits)


def mart(adv_logits: torch.Tensor, nat_logits: torch.Tensor, y: torch.Tensor, beta: float = 6.0,
         log_eps: float = 0.0) -> torch.Tensor:
    """MART (Wang et al., 2020): boosted CE on adversarial logits + beta * KL weighted by 1 - p_nat(y).

    Boosted CE = -log p_adv(y) - log(1 + log_eps - max_{k != y} p_adv(k) + 1e-12). The reference code
    (YisenWang/MART, mart.py) writes log(1.0001 - p + 1e-12), i.e. ``log_eps=1e-4``, which bounds the
    term's gradient by 1 / log_eps; the default 0 is advgkl's original log(1 - p + 1e-12).
    """
    _check_logits(adv_logits, nat_logits)
    p_adv = F.softmax(adv_logits, dim=1)
    # Largest wrong-class probability: mask the true class out before taking the max.
    wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).amax(dim=1)
    bce = F.cross_entropy(adv_logits, y) - torch.log1p(log_eps - wrong + 1e-12).mean()
    p_nat = F.softmax(nat_logits, dim=1)
    kl_per = (p_nat * (F.log_softmax(nat_logits, dim=1) - F.log_softmax(adv_logits, dim=1))).sum(dim=1)
    true_prob = p_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    return bce + beta * (kl_per * (1.0 - true_prob)).mean()


class ClassPrior:
    """Class-wise prior for GKL's global-information weights.

    During an epoch, ``update`` accumulates softmax(logits_nat / T) per true class; ``finish_epoch``
    turns the sums into a row-normalised [C, C] prior used during the next epoch. Before the first
    epoch has finished every row is uniform 1/C. A class never seen in an epoch keeps its old row.
    """

    def __init__(self, num_classes: int, temperature: float = 1.0):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_classes = num_classes
        self.temperature = temperature
        self.prior = torch.full((num_classes, num_classes), 1.0 / num_classes)
        # float64 sums: an epoch adds ~50k rows, float32 would drift in the low digits.
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def to(self, device) -> "ClassPrior":
        self.prior = self.prior.to(device)
        self.sums = self.sums.to(device)
        return self

    @torch.no_grad()
    def update(self, logits_nat: torch.Tensor, y: torch.Tensor) -> None:
        """Add softmax(logits_nat / T) of a batch to the rows of the true classes ``y``."""
        if self.sums.device != logits_nat.device:
            self.to(logits_nat.device)
        probs = F.softmax(logits_nat.detach().float() / self.temperature, dim=1)
        self.sums.index_add_(0, y, probs.double())

    @torch.no_grad()
    def finish_epoch(self) -> None:
        totals = self.sums.sum(dim=1, keepdim=True)
        seen = totals.squeeze(1) > 0
        self.prior[seen] = (self.sums[seen] / totals[seen]).to(self.prior.dtype)
        self.sums.zero_()

    def weights(self, y: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
        """``prior[y] ** gamma`` as [B, C], no gradient; gamma < 1 flattens the weights."""
        if self.prior.device != y.device:
            self.to(y.device)
        return self.prior[y].pow(gamma)

    def state_dict(self) -> dict:
        return {"prior": self.prior.clone(), "sums": self.sums.clone(), "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["prior"].shape) != (self.num_classes, self.num_classes):
            raise ValueError(
                f"class prior in the checkpoint is {tuple(state['prior'].shape)}, "
                f"expected {(self.num_classes, self.num_classes)}"
            )
        self.prior = state["prior"].clone().to(self.prior.device)
        self.sums = state["sums"].clone().to(self.sums.device)
        self.temperature = float(state["temperature"])
