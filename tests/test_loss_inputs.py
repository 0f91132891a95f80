"""advgkl.losses.ClassPrior: argument checks and following the device of the tensors it is fed.

CPU-only: a tensor on the ``meta`` device stands in for "another device" (a CUDA tensor on a GPU box).
"""
import pytest
import torch

from advgkl.losses import ClassPrior


@pytest.mark.parametrize("num_classes", [1, 0, -2])
def test_prior_needs_at_least_two_classes(num_classes):
    with pytest.raises(ValueError) as err:
        ClassPrior(num_classes)
    assert str(err.value) == f"num_classes must be >= 2, got {num_classes}"


@pytest.mark.parametrize("temperature", [0, 0.0, -1.5])
def test_prior_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError) as err:
        ClassPrior(3, temperature=temperature)
    assert str(err.value) == f"temperature must be > 0, got {temperature}"


def test_update_moves_the_prior_to_the_device_of_the_logits():
    prior = ClassPrior(3, temperature=2.0)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 3.0]], device="meta")
    prior.update(logits, torch.tensor([0, 2], device="meta"))
    assert prior.sums.device.type == "meta" and prior.prior.device.type == "meta"
    assert prior.sums.dtype == torch.float64 and prior.sums.shape == (3, 3)


def test_weights_moves_the_prior_to_the_device_of_the_labels():
    prior = ClassPrior(4)
    w = prior.weights(torch.tensor([3, 0, 0], device="meta"), gamma=0.5)
    assert w.device.type == "meta" and w.shape == (3, 4)
    assert prior.prior.device.type == "meta" and prior.sums.device.type == "meta"


def test_update_and_weights_on_one_device_match_a_float64_computation():
    """The values behind the device moves: rows of the true classes, normalised, then ** gamma."""
    prior = ClassPrior(3, temperature=2.0)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 3.0], [2.0, -2.0, 0.0]])
    y = torch.tensor([0, 2, 0])
    prior.update(logits, y)
    prior.finish_epoch()
    p = torch.softmax(logits.double() / 2.0, dim=1)
    row0 = (p[0] + p[2]) / (p[0] + p[2]).sum()
    row2 = p[1] / p[1].sum()
    expected = torch.stack([row0, torch.full((3,), 1 / 3, dtype=torch.float64), row2])  # class 1 unseen: uniform
    w = prior.weights(torch.tensor([0, 1, 2]), gamma=0.5)
    torch.testing.assert_close(w.double(), expected.sqrt(), rtol=1e-6, atol=0)
