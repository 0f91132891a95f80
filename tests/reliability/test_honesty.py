"""Gradient-masking checks: an honest model passes, deliberately masked models are flagged."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from advgkl import honesty
from advgkl.attacks import AutoAttack


class QuantisedInput(nn.Module):
    """Rounds pixels to 4 levels before the network: zero input gradient almost everywhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 3) / 3)


class HardLabels(nn.Module):
    """Returns scaled one-hot argmax logits: a non-differentiable output."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        # 0 * logits keeps a graph (attacks run) whose gradient is exactly zero
        return 10.0 * F.one_hot(logits.argmax(1), logits.shape[1]).float() + 0.0 * logits


def _run(model, x, y, version="standard"):
    aa = AutoAttack(model, eps=0.1, version=version, batch_size=len(x), progress=False)
    r = aa(x, y)
    return r, honesty.check(model, x, y, eps=0.1, norm="Linf", aa_robust=r.robust_correct,
                            broken_by=r.broken_by.tolist(), attacks=r.attacks, steps=10)


def test_an_honest_model_passes_every_check(trained_tiny_fmnist):
    t = trained_tiny_fmnist
    r, report = _run(t.model, t.x[:48], t.y[:48])
    assert report["suspicious_gradient_masking"] is False, report["warnings"]
    assert report["pgd_acc_by_eps"]["1"] <= 0.05  # every image is reachable at eps 1
    accs = list(report["pgd_acc_by_eps"].values())
    assert accs == sorted(accs, reverse=True)


@pytest.mark.parametrize("wrapper", [QuantisedInput, HardLabels])
def test_masked_models_are_flagged(trained_tiny_fmnist, wrapper):
    t = trained_tiny_fmnist
    model = wrapper(copy.deepcopy(t.model)).eval()
    r, report = _run(model, t.x[:24], t.y[:24])
    assert report["suspicious_gradient_masking"] is True
    text = " ".join(report["warnings"])
    # Zero gradients: PGD cannot move, so a huge eps still leaves accuracy high ...
    assert "huge eps" in text
    # ... and only the black-box attack gets anywhere.
    assert "Square" in text


def test_rising_accuracy_with_eps_is_flagged(trained_tiny_fmnist, monkeypatch):
    t = trained_tiny_fmnist
    fake = {0.025: 0.2, 0.05: 0.1, 0.1: 0.3, 0.2: 0.0, 0.4: 0.0, 1.0: 0.0}

    def pgd_correct(model, x, y, *, eps, **kw):
        n = len(x)
        return torch.arange(n) < round(fake[round(eps, 6)] * n)

    monkeypatch.setattr(honesty, "pgd_correct", pgd_correct)
    report = honesty.check(t.model, t.x[:100], t.y[:100], eps=0.1, norm="Linf")
    assert any("rises with eps" in w for w in report["warnings"])


def test_pgd_beating_autoattack_is_flagged(trained_tiny_fmnist):
    t = trained_tiny_fmnist
    x, y = t.x[:40], t.y[:40]
    everything_robust = torch.ones(40, dtype=torch.bool)  # an AutoAttack run that broke nothing
    report = honesty.check(t.model, x, y, eps=0.1, norm="Linf", aa_robust=everything_robust, steps=10)
    assert report["pgd_breaks_aa_robust_frac"] > 0.3
    assert any("weaker than plain PGD" in w for w in report["warnings"])
