"""Adding a method, a model and a training attack: each is one registered definition plus a recipe.

The three toys below are registered from this file only, as a user's own module would do, and a real
(tiny) Fashion-MNIST run trains with all three. Nothing in advgkl/ knows their names.
"""
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from advgkl import attacks, losses, methods, models, trainers
from advgkl.checkpoint import load_checkpoint
from advgkl.config import from_dict
from advgkl.errors import UserError


# ------------------------------------------------------------------ a new method: one block
@dataclass
class MixOptions(methods.MethodOptions):
    mix: float = 0.5  # weight of the adversarial cross-entropy

    def check(self) -> None:
        if not 0 <= self.mix <= 1:
            raise UserError(f"method.mix: must be in [0, 1], got {self.mix}")


class MixedCE(methods.Method):
    """(1 - mix) * CE(nat) + mix * CE(adv), attacked by PGD-CE with a step of eps / 4."""

    Options = MixOptions

    def step_size(self, eps):
        return eps / 4

    def loss(self, model, x, x_adv, y, ctx):
        nat, adv = model(x), model(x_adv)
        return (1 - ctx.opts.mix) * losses.ce(nat, y) + ctx.opts.mix * losses.ce(adv, y), nat, adv


# ------------------------------------------------------------------ a new model: one function
def probe(num_classes: int, in_channels: int, hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * in_channels, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


# ------------------------------------------------------------------ a new training attack: one factory
class SignNoise:
    """Not an attack worth using: x + step * sign(N(0, I)), clipped to the eps box; counts its calls."""

    calls: list = []

    def __init__(self, settings, *, objective, random_start, amp_dtype):
        self.eps = settings.eps

    def __call__(self, model, x, y, *, eps, step_size, nat_logits=None):
        SignNoise.calls.append((eps, step_size))
        return (x + step_size * torch.randn_like(x).sign()).clamp(0, 1)


@pytest.fixture
def toys():
    """Register the three toys for one test, then remove them again."""
    methods.register_method("mixed_ce")(MixedCE)
    models.register_model("probe")(probe)
    attacks.register_training_attack("sign_noise")(SignNoise)
    SignNoise.calls = []
    yield
    del methods.METHODS["mixed_ce"], models._MODELS["probe"], attacks.TRAINING_ATTACKS["sign_noise"]


RECIPE = {
    "name": "toys", "data": {"dataset": "fashion_mnist", "subset": 256, "batch_size": 32},
    "model": {"name": "probe", "kwargs": {"hidden": 12}},
    "method": {"name": "mixed_ce", "mix": 0.25},
    "attack": {"name": "sign_noise", "eps": 0.1, "steps": 1},
    "optim": {"epochs": 1, "lr": 0.05},
    "eval": {"version": "none", "n_examples": 32, "honesty_checks": False},
    "logging": {"wandb": "disabled", "progress": False},
}


def test_a_run_trains_with_a_registered_method_model_and_attack(toys, fmnist_root, tmp_path):
    cfg = from_dict({**RECIPE, "data": {**RECIPE["data"], "root": str(fmnist_root)}})
    assert cfg.method == MixOptions(name="mixed_ce", mix=0.25)
    results = trainers.train(cfg, tmp_path)
    assert SignNoise.calls == [(0.1, 0.1 / 4)] * 8  # 256 images / 32 per batch; the method's step size
    weights = load_checkpoint(tmp_path / "checkpoints" / "final.pt")["model"]
    assert weights["net.2.weight"].shape == (12, 16)  # model.kwargs reached the constructor
    epoch = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["step"] == 8 and epoch["train_nat_acc"] > 0.1 and epoch["train_adv_acc"] > 0.1
    assert 0.3 < results["clean_acc"] <= 1


def test_train_step_runs_the_registered_method_loss(toys):
    """``trainers.train_step`` minimises exactly the method's loss on the attacked batch."""
    cfg = from_dict(RECIPE)
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    model = models.create_model("probe", num_classes=10, in_channels=1, hidden=12)
    state = trainers.build_state(cfg, model, torch.device("cpu"), num_classes=10)
    torch.manual_seed(1)
    x_adv = (x + 0.025 * torch.randn_like(x).sign()).clamp(0, 1)
    expected = 0.75 * nn.functional.cross_entropy(model(x), y) + 0.25 * nn.functional.cross_entropy(model(x_adv), y)
    torch.manual_seed(1)
    loss, nat, adv = trainers.train_step(state, x, y, eps=0.1, step_size=0.025, lr=0.05)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert state.step == 1 and nat.shape == adv.shape == (16, 10)


def test_registry_names_are_the_recipe_choices(toys):
    from advgkl.config import choices

    assert {"mixed_ce", "probe", "sign_noise"} <= set(choices()["method.name"] + choices()["model.name"]
                                                       + choices()["attack.name"])
    with pytest.raises(UserError, match=r"^method.mix: must be in \[0, 1\], got 2.0$"):
        from_dict({**RECIPE, "method": {"name": "mixed_ce", "mix": 2}})
    with pytest.raises(UserError, match=r"^model 'probe' got unknown options \['depth'\]; it accepts \['hidden'\]$"):
        from_dict({**RECIPE, "model": {"name": "probe", "kwargs": {"depth": 3}}})


def test_a_method_registered_twice_is_refused(toys):
    with pytest.raises(ValueError, match="method 'mixed_ce' is already registered"):
        methods.register_method("mixed_ce")(MixedCE)
    with pytest.raises(ValueError, match="training attack 'sign_noise' is already registered"):
        attacks.register_training_attack("sign_noise")(SignNoise)
