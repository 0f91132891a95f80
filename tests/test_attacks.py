"""PGD / FGSM on a tiny CNN trained on real Fashion-MNIST (fixture ``trained_tiny_fmnist`` in conftest.py)."""
import copy

import pytest
import torch

from advgkl import attacks, losses
from advgkl.attacks import FGSM, PGD, GKLObjective, make_objective
from advgkl.errors import UserError

NORM_EPS = {"Linf": 0.1, "L2": 1.5}


@pytest.fixture(scope="module")
def setup(trained_tiny_fmnist):
    """(model, x [128, 1, 28, 28] in [0, 1], y [128]) from the shared trained tiny CNN."""
    t = trained_tiny_fmnist
    return t.model, t.x[:128], t.y[:128]


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def dist(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


class CountingModel(torch.nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("random_start", ["uniform", "normal", None])
@pytest.mark.parametrize("cls", [PGD, FGSM])
def test_output_in_ball_and_box(setup, norm, random_start, cls):
    model, x, y = setup
    eps = NORM_EPS[norm]
    torch.manual_seed(0)
    kw = {"steps": 5} if cls is PGD else {}
    x_adv = cls(model, eps=eps, norm=norm, random_start=random_start, **kw)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(dist(x_adv, x, norm).max()) <= eps * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert acc(model, x_adv, y) < acc(model, x, y) - 0.2  # it really attacks


def test_linf_pgd_reaches_the_corners(setup):
    """Sign steps of 2.5 eps / steps saturate most pixels at +-eps (unless clipped by [0, 1])."""
    model, x, y = setup
    x_adv = PGD(model, eps=0.1, random_start=None)(x, y)
    d = (x_adv - x).abs()
    interior = (x > 0.1) & (x < 0.9)
    assert float((d[interior] > 0.1 - 1e-6).float().mean()) > 0.8


@pytest.mark.parametrize("start_mode", ["train", "eval", "mixed"])
def test_model_mode_restored(setup, start_mode):
    model, x, y = setup
    model = copy.deepcopy(model)
    model.train(start_mode != "eval")
    if start_mode == "mixed":
        model.net[0].eval()
    before = [m.training for m in model.modules()]
    seen = []
    hook = model.net.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    PGD(model, eps=0.1, steps=2, objective="trades")(x[:8], y[:8])
    hook.remove()
    assert seen and not any(seen)  # every forward ran in eval mode
    assert [m.training for m in model.modules()] == before


def test_no_grad_leaks_into_parameters(setup):
    model, x, y = setup
    model = copy.deepcopy(model)
    params = list(model.parameters())
    sentinel = torch.full_like(params[0], 7.0)
    params[0].grad = sentinel.clone()
    flags = [p.requires_grad for p in params]
    for atk in [PGD(model, eps=0.1, steps=3), FGSM(model, eps=0.1), PGD(model, eps=0.5, norm="L2", objective="trades")]:
        atk(x[:16], y[:16])
    assert torch.equal(params[0].grad, sentinel)
    assert all(p.grad is None for p in params[1:])
    assert [p.requires_grad for p in params] == flags


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_eps_zero_is_a_no_op(setup, norm):
    model, x, y = setup
    for atk in [PGD(model, eps=0.0, norm=norm), FGSM(model, eps=0.0, norm=norm),
                PGD(model, eps=0.0, norm=norm, random_start="normal", restarts=2)]:
        assert torch.equal(atk(x, y), x)
    # per-sample eps: zero rows stay exactly x, the others move
    eps = torch.tensor([0.0, NORM_EPS[norm]]).repeat(8)
    x_adv = PGD(model, eps=1.0, norm=norm)(x[:16], y[:16], eps=eps)
    assert torch.equal(x_adv[0::2], x[0:16:2])
    assert float(dist(x_adv[1::2], x[1:16:2], norm).min()) > 0


def test_per_sample_eps_tensor(setup):
    model, x, y = setup
    eps = torch.linspace(0.01, 0.2, 32)
    x_adv = PGD(model, eps=0.0)(x[:32], y[:32], eps=eps)
    d = dist(x_adv, x[:32], "Linf")
    assert bool((d <= eps + 1e-6).all())
    assert float(d[-1]) > 0.15  # the larger radii are really used


def test_pgd_beats_fgsm_beats_clean(setup):
    model, x, y = setup
    clean = acc(model, x, y)
    torch.manual_seed(0)
    fgsm = acc(model, FGSM(model, eps=0.1, random_start=None)(x, y), y)
    fgsm_rs = acc(model, FGSM(model, eps=0.1)(x, y), y)
    pgd = acc(model, PGD(model, eps=0.1, steps=10)(x, y), y)
    assert clean > 0.7
    assert pgd <= fgsm <= clean and pgd <= fgsm_rs <= clean
    assert pgd < 0.5 * clean


def test_huge_eps_breaks_everything(setup):
    model, x, y = setup
    torch.manual_seed(0)
    assert acc(model, PGD(model, eps=1.0, steps=10)(x, y), y) <= 0.02


def test_restarts_never_raise_accuracy(setup):
    model, x, y = setup
    eps = 0.03  # small: many points survive one restart, so later restarts have work to do
    torch.manual_seed(0)
    one = PGD(model, eps=eps, steps=5, restarts=1)(x, y)
    torch.manual_seed(0)
    three = PGD(model, eps=eps, steps=5, restarts=3)(x, y)
    with torch.no_grad():
        ok_one, ok_three = model(one).argmax(1) == y, model(three).argmax(1) == y
    assert bool((ok_three <= ok_one).all())  # per sample: a point fooled once stays fooled
    assert float(dist(three, x, "Linf").max()) <= eps + 1e-6


@pytest.mark.parametrize("objective", ["trades", "gkl_beta0", "gkl_beta1", "callable"])
def test_objectives_run_and_attack(setup, objective):
    model, x, y = setup
    if objective.startswith("gkl"):
        prior = losses.ClassPrior(10)
        with torch.no_grad():
            prior.update(model(x), y)
        prior.finish_epoch()
        obj = make_objective("gkl", prior=prior, gamma=0.2, beta=float(objective[-1]))
        assert isinstance(obj, GKLObjective) and obj.needs_nat
    elif objective == "callable":
        def obj(adv_logits, y, nat_logits):  # a margin loss is one function
            true = adv_logits.gather(1, y[:, None]).squeeze(1)
            other = adv_logits.scatter(1, y[:, None], float("-inf")).amax(1)
            return (other - true).sum()
    else:
        obj = objective
    torch.manual_seed(0)
    x_adv = PGD(model, eps=0.1, steps=5, step_size=0.05, random_start="normal", objective=obj)(x, y)
    assert float(dist(x_adv, x, "Linf").max()) <= 0.1 + 1e-6
    assert acc(model, x_adv, y) < acc(model, x, y) - 0.2


def test_nat_logits_computed_once(setup):
    model, x, y = setup
    counting = CountingModel(model)
    PGD(counting, eps=0.1, steps=5, objective="trades")(x[:16], y[:16])
    assert counting.calls == 1 + 5  # one natural forward, then one per step
    counting.calls = 0
    with torch.no_grad():
        nat = model(x[:16])
    PGD(counting, eps=0.1, steps=5, objective="trades")(x[:16], y[:16], nat_logits=nat)
    assert counting.calls == 5
    counting.calls = 0
    PGD(counting, eps=0.1, steps=5)(x[:16], y[:16])
    assert counting.calls == 5  # CE never needs the natural branch


def test_call_forms_and_overrides(setup):
    model, x, y = setup
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    a = PGD(model, eps=0.1, steps=3)(x, y)
    torch.manual_seed(0)
    b = PGD(eps=0.1, steps=3)(model, x, y)
    torch.manual_seed(0)
    c = PGD(model, eps=0.5, steps=7)(x, y=y, eps=0.1, steps=3)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(TypeError):
        PGD(eps=0.1)(x, y)


def test_runs_inside_no_grad(setup):
    model, x, y = setup
    with torch.no_grad():
        x_adv = PGD(model, eps=0.1, steps=3)(x[:32], y[:32])
    assert acc(model, x_adv, y[:32]) < acc(model, x[:32], y[:32])


def test_bf16_autocast(setup):
    model, x, y = setup
    torch.manual_seed(0)
    x_adv = PGD(model, eps=0.1, steps=5, amp_dtype=torch.bfloat16, objective="trades")(x, y)
    assert x_adv.dtype == torch.float32
    assert float(dist(x_adv, x, "Linf").max()) <= 0.1 + 1e-6
    assert acc(model, x_adv, y) < acc(model, x, y) - 0.2


def test_fgsm_steps(setup):
    model, x, y = setup
    x_adv = FGSM(model, eps=0.1, random_start=None)(x, y)
    d = (x_adv - x).abs()
    interior = (x > 0.1) & (x < 0.9)
    assert float((d[interior] > 0.1 - 1e-6).float().mean()) > 0.9  # one full step of eps
    assert FGSM(model, eps=0.1)._default_step(torch.tensor(0.1), 1).item() == pytest.approx(0.125)


def test_bad_arguments_are_user_errors(setup):
    model, x, y = setup
    with pytest.raises(UserError, match="ce.*gkl.*trades"):
        make_objective("nope")
    with pytest.raises(UserError, match="Linf"):
        PGD(model, eps=0.1, norm="L3")
    with pytest.raises(UserError, match="uniform"):
        PGD(model, eps=0.1, random_start="gaussian")
    with pytest.raises(UserError):
        PGD(model, eps=0.1)(x[:4], y[:4], eps=torch.ones(3))
    assert set(attacks.OBJECTIVES) == {"ce", "trades", "gkl"}
