"""Weights the training step perturbs or averages: adversarial weight perturbation (AWP) and weight EMA."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import distributed


class AWP:
    """Adversarial weight perturbation (Wu et al., 2020): one ascent step on a proxy copy of the model,
    then each weight tensor (dim > 1) moves by gamma * ||w|| in the normalised ascent direction for
    the training step, and back afterwards."""

    def __init__(self, model: nn.Module, gamma: float, proxy_lr: float = 0.01):
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=proxy_lr)
        self.diff: dict[str, torch.Tensor] = {}

    def perturb(self, model: nn.Module, loss_fns) -> None:
        """``loss_fns``: one function ``net -> loss`` per micro-batch (their losses sum to the batch's);
        the ascent step follows the gradient of the sum."""
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        self.proxy_opt.zero_grad(set_to_none=True)
        for loss_fn in loss_fns:
            (-loss_fn(self.proxy)).backward()
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
    """Exponential moving average of the weights; before it becomes active it tracks the raw weights.

    every="step" (updated after each optimiser step): parameters averaged, buffers copied, since
    BatchNorm's running statistics are already averages. every="epoch" (updated after each epoch): every
    floating-point entry of the state dict averaged, BatchNorm buffers included, as the averaging script
    behind the released GKL models does (docs/fidelity.md, row 1); integer buffers (batch counters) copied.
    """

    def __init__(self, model: nn.Module, decay: float, every: str = "step"):
        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, active: bool) -> None:
        """average = decay * average + (1 - decay) * weights when ``active``, else average = weights."""
        weight = 1.0 - (self.decay if active else 0.0)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), weight)
        for e, b in zip(self.model.buffers(), model.buffers()):
            if self.every == "epoch" and e.is_floating_point():
                e.lerp_(b, weight)
            else:
                e.copy_(b)
