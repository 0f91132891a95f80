"""Model registry: every network takes images in [0, 1]; input normalisation lives inside the model.

    model = create_model("wrn_34_10", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    model.normalize   # Normalize: mean/std buffers, saved in the state_dict
    model.net         # the bare network registered under the name

A new architecture is one factory `fn(num_classes, in_channels, **kw) -> nn.Module` decorated with
`@register_model("name")`; its keyword arguments are the only extra ones `create_model` accepts.

    enable_activation_checkpointing(model, "wrn_34_10")   # recompute the residual blocks in backward
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from advgkl.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register `fn(num_classes, in_channels, **kw) -> nn.Module` under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


class Normalize(nn.Module):
    """(x - mean) / std per channel; x: [B, C, H, W] in [0, 1]. mean/std are buffers, shape [1, C, 1, 1]."""

    def __init__(self, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 in_channels: int = 3):
        super().__init__()
        self.register_buffer("mean", _per_channel(mean, in_channels, "mean"))
        self.register_buffer("std", _per_channel(std, in_channels, "std"))
        # buffers rather than constants: the normalisation travels with every checkpoint
        if self.std.device.type != "meta" and bool((self.std <= 0).any()):
            raise UserError(f"std must be positive, got {std}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _per_channel(value, in_channels: int, what: str) -> torch.Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) == 1:
        values = values * in_channels
    if len(values) != in_channels:
        raise UserError(f"{what} has {len(values)} values but the model has in_channels={in_channels}")
    return torch.tensor(values, dtype=torch.float32).view(1, in_channels, 1, 1)


def check_options(name: str, options: dict) -> None:
    """``UserError`` unless ``name`` is registered and takes every keyword in ``options`` (model.kwargs)."""
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    allowed = [p for p in inspect.signature(_MODELS[name]).parameters if p not in ("num_classes", "in_channels")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"model {name!r} got unknown options {unknown}; it accepts {sorted(allowed)}")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0,
                 **kw) -> nn.Sequential:
    """Build `Sequential(normalize=Normalize(mean, std), net=<registered net>)`.

    Input [B, in_channels, H, W] in [0, 1]; output logits [B, num_classes]. mean/std default to the
    identity (0, 1). Unknown names and unknown keyword arguments raise `UserError`.
    Build inside `with torch.device("meta"):` to count parameters without allocating them.
    """
    check_options(name, kw)
    net = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kw)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std, in_channels), net=net))


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded); works on meta-device models."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelInfo:
    """Size and cost of one forward pass of one image: params, macs (multiply-adds), flops = 2 * macs."""

    name: str
    params: int
    macs: int
    flops: int
    image_shape: tuple[int, int, int]


def model_info(name: str, num_classes: int = 10, image_shape: tuple[int, int, int] = (3, 32, 32),
               **kw) -> ModelInfo:
    """Parameter count and conv/linear MACs per image, computed on the meta device (no memory, ~instant).

    Only Conv2d and Linear are counted (BatchNorm, activations and pooling are <1% of the total).
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=image_shape[0], **kw)
        macs = 0

        def hook(module, inputs, output):
            nonlocal macs
            if isinstance(module, nn.Conv2d):
                kh, kw_ = module.kernel_size
                macs += output[0].numel() * (module.in_channels // module.groups) * kh * kw_
            else:
                macs += module.in_features * module.out_features
        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        model.eval()
        model(torch.empty(1, *image_shape))
        for h in handles:
            h.remove()
    return ModelInfo(name, count_params(model), macs, 2 * macs, tuple(image_shape))


ACTIVATIONS = ("relu", "swish")


def make_activation(name: str) -> nn.Module:
    """`relu` or `swish` (= SiLU, x * sigmoid(x), what the generated-data WRNs use)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "swish":
        return nn.SiLU()  # not in place: SiLU's backward needs its input
    raise UserError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


class CheckpointableBlock(nn.Module):
    """A residual block that can recompute its activations in the backward pass instead of storing them.

    Subclasses implement ``block(x)``. ``forward`` runs it directly, unless ``checkpointed`` is set
    (``enable_activation_checkpointing``) and the block is training with grad enabled: then it runs under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which keeps only the block's input and
    runs the block again during backward. The flag is a plain attribute: state_dict keys do not change.
    """

    checkpointed = False

    def block(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.checkpointed and self.training and torch.is_grad_enabled()):
            return self.block(x)
        if torch.compiler.is_compiling():
            # compile takes no plain context managers; its recomputation is functional (the running-stat
            # update is applied once, after the forward graph), so it needs no guard
            return checkpoint(self.block, x, use_reentrant=False)
        return checkpoint(self.block, x, use_reentrant=False, context_fn=functools.partial(_bn_stats_kept, self))


def _bn_stats_kept(module: nn.Module):
    """checkpoint's context_fn: nothing around the forward; around the recomputation, the BatchNorm
    buffers (running mean/var, num_batches_tracked) are saved and put back, so that running the block's
    BatchNorms again in train mode does not update their running statistics a second time."""

    @contextlib.contextmanager
    def kept():
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [[b.clone() for b in m.buffers(recurse=False)] for m in bns]
        try:
            yield
        finally:  # also when checkpoint stops the recomputation early (it raises to stop)
            with torch.no_grad():
                for m, values in zip(bns, saved):
                    for b, v in zip(m.buffers(recurse=False), values):
                        b.copy_(v)

    return contextlib.nullcontext(), kept()


def enable_activation_checkpointing(model: nn.Module, name: str | None = None) -> nn.Module:
    """Make every residual block of ``model`` recompute its activations in backward; returns ``model``.

    Applies to training forwards with grad enabled (eval mode and no_grad run as before, e.g. the
    attacks, which run in eval mode). Costs about one extra forward of the blocks per backward; saves
    most of the activation memory of the training loss. Results are unchanged: same loss, same
    gradients (up to float rounding), same BatchNorm running statistics, same state_dict keys.
    ``UserError`` for a model without residual blocks; ``name`` (the registry name) is for that message.
    """
    blocks = [m for m in model.modules() if isinstance(m, CheckpointableBlock)]
    if not blocks:
        raise UserError(f"model.activation_checkpointing: model {name or type(model).__name__} has no residual "
                        "blocks to checkpoint (supported: the wrn_* and preact_resnet* families)")
    for b in blocks:
        b.checkpointed = True
    return model


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics come from shards of ``ghost_batch`` rows, as under
    ``nn.DataParallel``: each shard is normalised with its own mean and variance, and the running
    statistics are updated from the first shard only (DataParallel keeps the device-0 replica's buffers
    and drops the others'). Eval mode, and batches of at most ``ghost_batch`` rows, are plain BatchNorm."""

    ghost_batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        shards = x.split(self.ghost_batch)
        first = super().forward(shards[0])  # the only shard that moves the running statistics
        rest = [F.batch_norm(s, None, None, self.weight, self.bias, True, 0.0, self.eps) for s in shards[1:]]
        return torch.cat([first, *rest])


def use_ghost_batchnorm(model: nn.Module, ghost_batch: int, name: str | None = None) -> nn.Module:
    """Turn every BatchNorm2d of ``model`` into a ``GhostBatchNorm2d`` over shards of ``ghost_batch`` rows;
    returns ``model``. Parameters, buffers and state_dict keys are unchanged (only the class changes), so
    checkpoints load either way. ``UserError`` for a model without BatchNorm; ``name`` is for that message."""
    bns = [m for m in model.modules() if type(m) in (nn.BatchNorm2d, GhostBatchNorm2d)]
    if not bns:
        raise UserError(f"model.ghost_batch: model {name or type(model).__name__} has no BatchNorm2d layers")
    for m in bns:
        m.__class__ = GhostBatchNorm2d  # in place: the module keeps its tensors and its place in the model
        m.ghost_batch = ghost_batch
    return model


# importing the architecture modules fills the registry
from advgkl.models import preact_resnet, resnet, small, wide_resnet  # noqa: E402,F401

__all__ = ["ACTIVATIONS", "CheckpointableBlock", "GhostBatchNorm2d", "ModelInfo", "Normalize", "count_params",
           "create_model", "enable_activation_checkpointing", "list_models", "make_activation", "model_info",
           "register_model", "use_ghost_batchnorm"]
