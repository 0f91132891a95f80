"""Gradient-masking checks run after every evaluation: is the robust accuracy we print real?

A model that hides its gradients (input quantisation, non-differentiable outputs, saturated softmax)
looks robust to gradient attacks without being robust. Four cheap symptoms, each measured with PGD
on the same points AutoAttack used (Carlini et al., 2019, "On Evaluating Adversarial Robustness"):

1. PGD breaks points that AutoAttack did not (AutoAttack contains a stronger PGD: it should never lose).
2. Accuracy does not fall to ~0 at a huge eps (every image is reachable there).
3. Accuracy rises with eps (a larger ball contains the smaller one).
4. The black-box Square attack breaks many points the white-box attacks could not.
"""
from __future__ import annotations

import math

import torch

from .attacks import PGD

EPS_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def huge_eps(norm: str, image_shape) -> float:
    """A radius that reaches every image in [0, 1]^d: 1 for Linf, sqrt(d) for L2."""
    return 1.0 if norm == "Linf" else math.sqrt(math.prod(image_shape))


def _slack(n: int) -> float:
    """Allowed excess, as a fraction of points: 1 % plus one point (sampling noise of PGD restarts)."""
    return 0.01 + 1.0 / n


@torch.no_grad()
def pgd_correct(model, x, y, *, eps: float, norm: str, steps: int, device, batch_size: int = 500,
                bar=None) -> torch.Tensor:
    """Per-point correctness (bool [N]) under PGD-``steps`` on CE with a uniform random start.

    ``bar``: a tqdm bar advanced by one per batch, or None.
    """
    atk = PGD(model, eps=eps, steps=steps, norm=norm, random_start="uniform")
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out.append((model(atk(xb, yb)).argmax(1) == yb).cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def check(model, x, y, *, eps: float, norm: str, aa_robust: torch.Tensor | None = None,
          broken_by: list[int] | None = None, attacks: list[str] | None = None, steps: int = 20,
          device="cpu", batch_size: int = 500, progress: bool = False) -> dict:
    """Run the four checks; returns {"suspicious_gradient_masking": bool, "warnings": [...], ...}.

    ``aa_robust`` is AutoAttack's per-point robust flag (bool [N]); ``broken_by``/``attacks`` its
    per-point breaking attack (k = attacks[k-1], -1 robust, 0 wrong when clean). ``progress``: a tqdm
    bar over the PGD batches of every radius (callers pass False on ranks other than 0).
    """
    from tqdm.auto import tqdm

    model.eval()
    n = len(x)
    slack = _slack(n)
    warnings: list[str] = []
    big = huge_eps(norm, x.shape[1:])
    radii = sorted({min(eps * m, big) for m in EPS_MULTIPLIERS} | {big})
    acc = {}
    pgd_at_eps = None
    bar = tqdm(total=len(radii) * math.ceil(n / batch_size), desc="gradient-masking checks", unit="batch",
               disable=not progress)
    for r in radii:
        bar.set_postfix_str(f"PGD-{steps} at eps {r:.3g}")
        correct = pgd_correct(model, x, y, eps=r, norm=norm, steps=steps, device=device, batch_size=batch_size,
                              bar=bar)
        acc[r] = correct.float().mean().item()
        if r == min(eps * 1.0, big):
            pgd_at_eps = correct
    bar.close()
    report = {"pgd_steps": steps, "pgd_acc_by_eps": {f"{r:.6g}": a for r, a in acc.items()},
              "huge_eps": big}

    if acc[big] > 0.05 + 1.0 / n:
        warnings.append(f"PGD accuracy at the huge eps {big:.3g} is {acc[big]:.1%}, not ~0: gradients "
                        "do not lead the attack (masked or obfuscated gradients)")
    for lo, hi in zip(radii, radii[1:]):
        if acc[hi] > acc[lo] + slack:
            warnings.append(f"PGD accuracy rises with eps: {acc[lo]:.1%} at eps {lo:.3g} but {acc[hi]:.1%} "
                            f"at eps {hi:.3g}")
    if aa_robust is not None and pgd_at_eps is not None:
        missed = (aa_robust & ~pgd_at_eps).float().mean().item()
        report["pgd_breaks_aa_robust_frac"] = missed
        if missed > slack:
            warnings.append(f"PGD-{steps} breaks {missed:.1%} of the points AutoAttack left robust: the "
                            "AutoAttack run is weaker than plain PGD here")
    if broken_by is not None and attacks and "square" in attacks:
        k = attacks.index("square") + 1
        by_square = sum(1 for b in broken_by if b == k) / n
        report["square_only_frac"] = by_square
        if by_square > slack:
            warnings.append(f"the black-box Square attack broke {by_square:.1%} of the points that every "
                            "white-box attack failed on: a sign of masked gradients")
    report["warnings"] = warnings
    report["suspicious_gradient_masking"] = bool(warnings)
    return report
