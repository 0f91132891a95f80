"""Model registry: every registered model builds, runs, has the published size, and keeps its
normalisation inside as buffers. Big models are only built on the meta device (no memory, no compute)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advgkl.data import BatchLoader, load_dataset, take_subset
from advgkl.errors import UserError
from advgkl.models import (Normalize, count_params, create_model, list_models, model_info,
                           register_model)
from advgkl.models.wide_resnet import convert_reference_state_dict

# (name, input shape) -> exact parameter count for 10 classes
PARAMS = {
    ("tiny_cnn", (1, 28, 28)): 3_818,
    ("tiny_cnn", (3, 32, 32)): 3_962,
    ("small_cnn", (1, 28, 28)): 406_832,
    ("mini_cnn", (1, 28, 28)): 75_056,
    ("mini_cnn", (3, 32, 32)): 75_344,
    ("preact_resnet18", (3, 32, 32)): 11_172_170,  # 11.17 M (with the final BN before the classifier)
    ("wrn_28_10", (3, 32, 32)): 36_479_194,
    ("wrn_28_10_swish", (3, 32, 32)): 36_479_194,
    ("wrn_34_10", (3, 32, 32)): 46_160_474,
    ("wrn_70_16", (3, 32, 32)): 266_796_506,
    ("wrn_70_16_swish", (3, 32, 32)): 266_796_506,
}
GFLOPS = {"wrn_34_10": 13.3, "wrn_28_10": 10.5, "preact_resnet18": 1.11}  # per 32x32 image: docs/speed.md
SHRUNK = {"depth": 10, "width": 1}  # WideResNets are exercised on CPU at this size


def test_registry_has_the_documented_models():
    names = list_models()
    assert names == sorted(names)
    assert {"tiny_cnn", "small_cnn", "mini_cnn", "preact_resnet18", "wrn_34_10", "wrn_28_10", "wrn_28_10_swish",
            "wrn_70_16", "wrn_70_16_swish"} <= set(names)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_shape_on_meta(name, shape):
    if name == "resnet50" and shape[0] == 1:  # RGB only
        with pytest.raises(UserError, match="model resnet50 takes RGB images"):
            create_model(name, num_classes=7, in_channels=1)
        return
    with torch.device("meta"):
        model = create_model(name, num_classes=7, in_channels=shape[0]).eval()
        out = model(torch.empty(2, *shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_on_cpu(name):
    """Real numbers: finite logits, and a gradient w.r.t. the input (what every attack needs)."""
    torch.manual_seed(0)
    kw = SHRUNK if name.startswith("wrn") else {}
    model = create_model(name, num_classes=10, in_channels=3, **kw).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,shape", sorted(PARAMS))
def test_parameter_counts(name, shape):
    info = model_info(name, num_classes=10, image_shape=shape)
    assert info.params == PARAMS[name, shape]


@pytest.mark.parametrize("name", sorted(GFLOPS))
def test_flops_match_published(name):
    info = model_info(name)
    assert info.flops == 2 * info.macs
    assert info.flops / 1e9 == pytest.approx(GFLOPS[name], rel=0.01)


def test_count_params_on_meta_matches_cpu():
    model = create_model("small_cnn", in_channels=1)
    with torch.device("meta"):
        meta = create_model("small_cnn", in_channels=1)
    assert count_params(model) == count_params(meta) == 406_832


def test_normalize_lives_in_state_dict_and_is_applied():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    model = create_model("tiny_cnn", mean=mean, std=std).eval()
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor(std))
    x = torch.rand(4, 3, 32, 32)
    expected = model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), expected)
    # default is the identity, and the buffers are not parameters (optimisers must not touch them)
    plain = create_model("tiny_cnn")
    assert torch.equal(plain.normalize(x), x)
    assert all(not n.startswith("normalize") for n, _ in plain.named_parameters())


def test_normalize_broadcasts_single_values_and_rejects_bad_ones():
    assert Normalize(0.5, 0.25, in_channels=3).mean.shape == (1, 3, 1, 1)
    with pytest.raises(UserError, match="in_channels=3"):
        create_model("tiny_cnn", mean=(0.1, 0.2))
    with pytest.raises(UserError, match="positive"):
        create_model("tiny_cnn", std=0.0)


def test_unknown_model_lists_known_names():
    with pytest.raises(UserError) as err:
        create_model("resnet9000")
    assert "resnet9000" in str(err.value)
    assert ", ".join(list_models()) in str(err.value)


def test_unknown_option_is_an_error():
    with pytest.raises(UserError, match="depthh"):
        create_model("wrn_34_10", depthh=28)
    with pytest.raises(UserError, match="depth"):
        create_model("wrn_34_10", depth=33)
    with pytest.raises(UserError, match="activation"):
        create_model("wrn_28_10", activation="gelu", **SHRUNK)


def test_register_model_adds_a_name(monkeypatch):
    import advgkl.models as models

    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))  # keep the real registry untouched

    @register_model("linear_probe")
    def linear_probe(num_classes=10, in_channels=3, size: int = 8):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * size * size, num_classes))

    assert "linear_probe" in list_models()
    assert create_model("linear_probe", num_classes=3, size=8)(torch.rand(5, 3, 8, 8)).shape == (5, 3)
    with pytest.raises(ValueError, match="twice"):
        register_model("linear_probe")(linear_probe)


def test_swish_variants_use_swish_and_same_padding():
    """Swish WRNs pad stride-2 convs like TF's SAME (0 before, 1 after), as DeepMind's checkpoints expect."""
    seen = {}
    for name in ("wrn_28_10_swish", "wrn_28_10"):
        model = create_model(name, **SHRUNK).eval()
        conv = model.net.groups[1][0].conv1  # first stride-2 conv: 32x32 map in, 16x16 out
        hook = conv.register_forward_hook(lambda m, inp, out, name=name: seen.update({name: (inp[0].shape, out.shape)}))
        model(torch.rand(1, 3, 32, 32))
        hook.remove()
    assert seen["wrn_28_10_swish"][0][-2:] == (33, 33) and seen["wrn_28_10"][0][-2:] == (32, 32)
    assert seen["wrn_28_10_swish"][1][-2:] == seen["wrn_28_10"][1][-2:] == (16, 16)
    swish = create_model("wrn_28_10_swish", **SHRUNK)
    assert any(isinstance(m, torch.nn.SiLU) for m in swish.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in swish.modules())


def _reference_keys(style: str, depth: int = 10, width: int = 1) -> list[str]:
    """State-dict keys of the TRADES / DeepMind WideResNet implementations (their published layout)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    widths = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    keys = ["conv1.weight"] if style == "trades" else ["mean", "std", "init_conv.weight"]
    for g in range(3):
        for i in range(n):
            cin = widths[g] if i == 0 else widths[g + 1]
            if style == "trades":
                p = f"block{g + 1}.layer.{i}."
                names = ["bn1." + b for b in bn] + ["conv1.weight"] + ["bn2." + b for b in bn] + ["conv2.weight"]
                names += ["convShortcut.weight"] if cin != widths[g + 1] else []
            else:
                p = f"layer.{g}.block.{i}."
                names = ["batchnorm_0." + b for b in bn] + ["conv_0.weight"] + ["batchnorm_1." + b for b in bn]
                names += ["conv_1.weight"] + (["shortcut.weight"] if cin != widths[g + 1] else [])
            keys += [p + k for k in names]
    if style == "trades":
        keys += ["bn1." + b for b in bn] + ["fc.weight", "fc.bias"]
    else:
        keys += ["batchnorm." + b for b in bn] + ["logits.weight", "logits.bias"]
    return keys


@pytest.mark.parametrize("style", ["trades", "dm"])
def test_convert_reference_state_dict_covers_every_key(style):
    ours = set(create_model("wrn_28_10", **SHRUNK).state_dict())
    ref = {("module." if style == "trades" else "") + k: torch.zeros(3) for k in _reference_keys(style)}
    converted = convert_reference_state_dict(ref)
    expected = ours if style == "dm" else ours - {"normalize.mean", "normalize.std"}
    assert set(converted) == expected
    if style == "dm":
        assert converted["normalize.mean"].shape == (1, 3, 1, 1)
    with pytest.raises(UserError, match="not in a WideResNet"):
        convert_reference_state_dict({**ref, "extra.weight": torch.zeros(1)})


def test_tiny_cnn_learns_fashion_mnist(fmnist_root, fmnist_test_small):
    """A few seconds of training on 2,000 real images must beat chance by far."""
    torch.manual_seed(0)
    images, labels = take_subset(*load_dataset("fashion_mnist", fmnist_root), 2000, seed=0)
    model = create_model("tiny_cnn", in_channels=1, mean=0.2860, std=0.3530)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = BatchLoader(images, labels, 64, seed=0)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    x_test, y_test = fmnist_test_small
    with torch.no_grad():
        acc = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.7  # 0.78-0.81 over model seeds 0-3
