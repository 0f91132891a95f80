"""Model registry and WideResNet arguments: exact messages for bad sizes, readable Normalize repr."""
import pytest
import torch

from advgkl.errors import UserError
from advgkl.models import Normalize, create_model


def test_normalize_repr_shows_its_per_channel_values():
    # binary fractions: exact in float32, so the repr must show exactly these numbers
    norm = Normalize(mean=[0.5, 0.25, 0.125], std=[0.5, 0.5, 0.25], in_channels=3)
    assert repr(norm) == "Normalize(mean=[0.5, 0.25, 0.125], std=[0.5, 0.5, 0.25])"
    assert repr(Normalize(0.5, 0.25, in_channels=2)) == "Normalize(mean=[0.5, 0.5], std=[0.25, 0.25])"


def test_model_repr_starts_with_its_normalisation():
    model = create_model("tiny_cnn", num_classes=3, in_channels=1, mean=0.25, std=0.5)
    assert repr(model).splitlines()[:2] == ["Sequential(", "  (normalize): Normalize(mean=[0.25], std=[0.5])"]


@pytest.mark.parametrize("width", [0, -4])
def test_wide_resnet_width_must_be_positive(width):
    with pytest.raises(UserError) as err:
        create_model("wrn_28_10", width=width)
    assert str(err.value) == f"WideResNet width must be >= 1, got {width}"


@pytest.mark.parametrize("depth", [4, 12, 33])
def test_wide_resnet_depth_must_be_6n_plus_4(depth):
    with pytest.raises(UserError) as err:
        create_model("wrn_34_10", depth=depth)
    assert str(err.value) == (
        f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 70, ...), got {depth}")


def test_smallest_wide_resnet_has_the_hand_counted_parameters():
    """WRN-10-1 (one block per group), 1 input channel, 3 classes, counted by hand."""
    model = create_model("wrn_28_10", depth=10, width=1, num_classes=3, in_channels=1)
    stem = 1 * 16 * 9
    g0 = 2 * 16 + 16 * 16 * 9 + 2 * 16 + 16 * 16 * 9  # bn1, conv1, bn2, conv2; 16 -> 16: no shortcut
    g1 = 2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 32 * 9 + 16 * 32  # plus the 1x1 projection shortcut
    g2 = 2 * 32 + 32 * 64 * 9 + 2 * 64 + 64 * 64 * 9 + 32 * 64
    head = 2 * 64 + 64 * 3 + 3
    assert sum(p.numel() for p in model.parameters()) == stem + g0 + g1 + g2 + head
    out = model.eval()(torch.rand(2, 1, 16, 16))
    assert out.shape == (2, 3)
