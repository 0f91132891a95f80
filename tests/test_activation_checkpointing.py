"""Activation checkpointing (models.enable_activation_checkpointing) changes memory, not results: the same
loss, gradients and BatchNorm running statistics after a training step, the same state_dict keys and
eval outputs. Small nets on CPU: PreActResNet-18 on 16x16 and a WRN-10-2 (the wrn_* code at depth 10)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from advgkl.errors import UserError
from advgkl.models import CheckpointableBlock, create_model, enable_activation_checkpointing
from advgkl.models.wide_resnet import WideResNet

torch.set_num_threads(1)

# fp32 on CPU: the recomputed blocks run the same kernels on the same inputs, so the differences are
# rounding at most (measured: 0 here); the bounds leave room for other BLAS builds
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of each gradient tensor's max |value|


def _preact():
    return create_model("preact_resnet18", num_classes=10, in_channels=3)


def _wrn():
    return WideResNet(depth=10, width=2, num_classes=10, in_channels=3)


NETS = {"preact_resnet18": (_preact, 16), "wrn_10_2": (_wrn, 32)}


def _pair(name):
    """(plain, checkpointed) copies of one freshly initialised net, its input size, and a batch of 4."""
    build, size = NETS[name]
    torch.manual_seed(0)
    plain = build().train()
    ckpt = enable_activation_checkpointing(copy.deepcopy(plain), name)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, size, size, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    return plain, ckpt, x, y


def _step(model, x, y):
    """A GKL-AT-shaped step: two training forwards (two BN updates per layer), one backward."""
    x2 = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    loss = F.cross_entropy(model(x), y) + F.mse_loss(model(x2), model(x).detach())
    loss.backward()
    return loss.detach()


def _bn_state(model):
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


@pytest.mark.parametrize("name", list(NETS))
def test_checkpointing_is_enabled_on_every_block_and_keeps_state_dict_keys(name):
    plain, ckpt, _, _ = _pair(name)
    blocks = [m for m in ckpt.modules() if isinstance(m, CheckpointableBlock)]
    assert len(blocks) == (8 if name == "preact_resnet18" else 3) and all(b.checkpointed for b in blocks)
    assert not any(m.checkpointed for m in plain.modules() if isinstance(m, CheckpointableBlock))
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    # checkpoints load either way
    ckpt.load_state_dict(plain.state_dict())
    plain.load_state_dict(ckpt.state_dict())


@pytest.mark.parametrize("name", list(NETS))
def test_checkpointing_recomputes_in_backward(name):
    """The blocks really run again during backward (else the test below compares a model with itself)."""
    _, ckpt, x, y = _pair(name)
    calls = []
    conv = next(m for m in ckpt.modules() if isinstance(m, CheckpointableBlock)).conv1
    conv.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    loss = F.cross_entropy(ckpt(x), y)
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the recomputation


@pytest.mark.parametrize("name", list(NETS))
def test_loss_gradients_and_bn_running_stats_match_without_checkpointing(name):
    plain, ckpt, x, y = _pair(name)
    loss_p, loss_c = _step(plain, x, y), _step(ckpt, x, y)
    assert torch.isfinite(loss_p) and loss_p > 0
    torch.testing.assert_close(loss_c, loss_p, rtol=LOSS_RTOL, atol=0)

    grads_p = dict(plain.named_parameters())
    compared = 0
    for k, p in ckpt.named_parameters():
        ref = grads_p[k].grad
        assert p.grad is not None and ref is not None, k
        scale = ref.abs().max().item()
        assert scale > 0, f"{k}: zero gradient"
        assert (p.grad - ref).abs().max().item() <= GRAD_RTOL * scale, k
        compared += 1
    assert compared == len(grads_p)

    # three forwards in train mode per step: each BatchNorm updated three times, in both models, not six
    bn_p, bn_c = _bn_state(plain), _bn_state(ckpt)
    assert bn_p.keys() == bn_c.keys() and len(bn_p) > 0
    for k in bn_p:
        if k.endswith("num_batches_tracked"):
            assert bn_c[k].item() == bn_p[k].item() == 3, k
        else:
            torch.testing.assert_close(bn_c[k], bn_p[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(bn_p[next(k for k in bn_p if "running_mean" in k)], torch.zeros(1))  # they moved


def test_bn_stats_would_double_without_the_guard(monkeypatch):
    """The guard is what keeps the statistics: with checkpoint's default contexts the recomputation
    updates every checkpointed BatchNorm again."""
    import advgkl.models as models
    from torch.utils.checkpoint import noop_context_fn

    plain, ckpt, x, y = _pair("wrn_10_2")
    monkeypatch.setattr(models, "_bn_stats_kept", lambda module: noop_context_fn())
    _step(plain, x, y)
    _step(ckpt, x, y)
    key = "groups.0.0.bn1.num_batches_tracked"
    assert _bn_state(plain)[key].item() == 3
    assert _bn_state(ckpt)[key].item() > 3


@pytest.mark.parametrize("name", list(NETS))
def test_eval_and_no_grad_run_without_checkpointing_and_match(name, monkeypatch):
    import advgkl.models as models

    frames = []
    real = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda *a, **kw: frames.append(1) or real(*a, **kw))
    plain, ckpt, x, y = _pair(name)
    plain.eval(), ckpt.eval()
    x.requires_grad_(True)  # an attack's forward: eval mode, grad enabled
    out_p, out_c = plain(x), ckpt(x)
    assert torch.equal(out_c, out_p)
    (g_p,) = torch.autograd.grad(out_p.sum(), x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    assert torch.equal(g_c, g_p)
    ckpt.train()
    with torch.no_grad():
        ckpt(x)
    assert frames == []  # neither eval mode nor no_grad went through checkpoint
    F.cross_entropy(ckpt(x), y).backward()
    assert len(frames) == sum(isinstance(m, CheckpointableBlock) for m in ckpt.modules())  # training did


@pytest.mark.parametrize("name", ["tiny_cnn", "small_cnn"])
def test_models_without_residual_blocks_are_a_user_error(name):
    model = create_model(name, num_classes=10, in_channels=1)
    with pytest.raises(UserError, match=rf"model.activation_checkpointing: model {name} has no residual blocks "
                                        r"to checkpoint \(supported: the wrn_\* and preact_resnet\* families\)"):
        enable_activation_checkpointing(model, name)


def test_registry_wrn_gets_checkpointed_through_create_model():
    model = create_model("wrn_28_10", depth=10, width=1)
    assert enable_activation_checkpointing(model, "wrn_28_10") is model
    assert all(m.checkpointed for m in model.modules() if isinstance(m, CheckpointableBlock))


def test_the_recipe_option_reaches_the_model_and_is_checked_at_load():
    from advgkl.config import from_dict
    from advgkl.models import CheckpointableBlock
    from advgkl.runtime import build_model

    cfg = from_dict({"data": {"dataset": "cifar10"}, "model": {"name": "preact_resnet18", "activation_checkpointing": True}})
    blocks = [m for m in build_model(cfg).modules() if isinstance(m, CheckpointableBlock)]
    assert len(blocks) == 8 and all(b.checkpointed for b in blocks)
    with pytest.raises(UserError, match=r"^model.activation_checkpointing: model tiny_cnn has no residual blocks"):
        from_dict({"model": {"name": "tiny_cnn", "activation_checkpointing": True}})
