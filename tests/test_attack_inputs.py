"""Input checking, error messages and less-travelled paths of advgkl.attacks (PGD/FGSM, objectives, AutoAttack).

Every bad input must be one UserError (or, for a programming error in a call, one TypeError) whose
message names the culprit; every number is checked against an invariant or an independent computation.
"""
import re

import pytest
import torch
from torch import nn

from advgkl import attacks, losses
from advgkl.attacks import FGSM, PGD, AutoAttack, GKLObjective, make_objective
from advgkl.errors import UserError

AA_KNOWN = "['apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t']"


class ConstantModel(nn.Module):
    """Logits = bias for every input (zero input gradient); records the batch size of every forward."""

    def __init__(self, predicted: int, n_classes: int = 4):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_classes))
        with torch.no_grad():
            self.bias[predicted] = 5.0
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.bias + 0.0 * x.flatten(1).sum(1, keepdim=True)


# ---------------------------------------------------------------- objectives

def test_gkl_objective_repr_names_its_settings():
    obj = GKLObjective(losses.ClassPrior(3), gamma=0.5, alpha=2.0, beta=1.0, temperature=4.0)
    assert repr(obj) == "GKLObjective(gamma=0.5, alpha=2.0, beta=1.0, T=4.0)"


def test_attack_repr_shows_class_settings_and_objective():
    gkl = make_objective("gkl", prior=losses.ClassPrior(3), gamma=0.5)
    assert repr(PGD(eps=0.25, steps=3, norm="L2", random_start=None, restarts=2, objective=gkl)) == (
        "PGD(eps=0.25, steps=3, step_size=None, norm='L2', random_start=None, restarts=2, "
        "objective=GKLObjective(gamma=0.5, alpha=1.0, beta=0.0, T=1.0))")
    assert repr(FGSM(eps=0.125, step_size=0.5, objective="trades")) == (
        "FGSM(eps=0.125, steps=1, step_size=0.5, norm='Linf', random_start='uniform', restarts=1, "
        "objective=trades_objective)")


def test_keywords_with_a_callable_objective_are_refused():
    def my_objective(adv, y, nat):
        return adv.sum()

    assert make_objective(my_objective) is my_objective
    with pytest.raises(UserError) as err:
        make_objective(my_objective, gamma=2.0, beta=1.0)
    assert str(err.value) == "keyword arguments ['beta', 'gamma'] only apply to a named objective"


def test_gkl_objective_without_or_with_a_misspelt_option_is_a_user_error():
    with pytest.raises(UserError) as err:
        make_objective("gkl")
    assert str(err.value) == "objective 'gkl': GKLObjective.__init__() missing 1 required positional argument: 'prior'"
    with pytest.raises(UserError) as err:
        make_objective("gkl", prior=losses.ClassPrior(3), gama=2.0)
    assert str(err.value) == "objective 'gkl': GKLObjective.__init__() got an unexpected keyword argument 'gama'"
    assert isinstance(err.value.__cause__, TypeError)


@pytest.mark.parametrize("name", ["ce", "trades"])
def test_function_objectives_take_no_options(name):
    with pytest.raises(UserError) as err:
        make_objective(name, gamma=1.0)
    assert str(err.value) == f"objective {name!r} takes no arguments, got ['gamma']"


def test_unknown_objective_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        make_objective("cw")
    assert str(err.value) == "unknown attack objective 'cw'; known: ['ce', 'gkl', 'trades']"


# ---------------------------------------------------------------- PGD construction and calls

@pytest.mark.parametrize("steps, restarts", [(0, 1), (1, 0), (-3, 2)])
def test_steps_and_restarts_must_be_positive(steps, restarts):
    with pytest.raises(UserError) as err:
        PGD(eps=0.1, steps=steps, restarts=restarts)
    assert str(err.value) == f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}"


def test_fgsm_rejects_zero_restarts():
    with pytest.raises(UserError) as err:
        FGSM(eps=0.1, restarts=0)
    assert str(err.value) == "steps and restarts must be >= 1, got steps=1, restarts=0"


def test_calls_with_a_wrong_number_of_tensors_are_type_errors():
    model = ConstantModel(0)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    atk = PGD(model, eps=0.1, steps=1)
    for args in [(x,), (x, y, y), (model, x), ()]:
        with pytest.raises(TypeError) as err:
            atk(*args)
        assert str(err.value) == "call as atk(x, y) or atk(model, x, y)", args
    with pytest.raises(TypeError) as err:
        PGD(eps=0.1)(x, y)
    assert str(err.value) == "no model: build the attack with one or call atk(model, x, y)"
    # the label may also come as a keyword, and the model per call
    out = PGD(eps=0.1, steps=1, random_start=None)(model, x, y=y)
    assert out.shape == x.shape and torch.equal(out, x)  # zero gradient: sign(0) = 0, x never moves


def test_later_restarts_run_only_on_points_still_classified_correctly():
    """Restart k > 1 attacks only the points no earlier restart broke; none left = no more forwards."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 4, 4)
    model = ConstantModel(predicted=0)  # predicts class 0 whatever the input: no attack can change that
    atk = PGD(model, eps=0.1, steps=3, restarts=4)

    y_all_wrong = torch.tensor([1, 2, 3, 1, 2, 3])
    x_adv = atk(x, y_all_wrong)
    # 3 steps of the first restart, one check that finds nothing left to attack, then stop
    assert model.batch_sizes == [6, 6, 6, 6]
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-7 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1

    model.batch_sizes.clear()
    y_two_right = torch.tensor([1, 0, 3, 0, 2, 3])  # points 1 and 3 stay correct through every restart
    x_adv = atk(x, y_two_right)
    assert model.batch_sizes == [6, 6, 6] + [6, 2, 2, 2] * 3
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-7


# ---------------------------------------------------------------- AutoAttack: settings

@pytest.mark.parametrize("kw, message", [
    (dict(version="std"), "unknown AutoAttack version 'std'; known: ['standard', 'plus', 'fast', 'custom']"),
    (dict(norm="linf"), "unknown AutoAttack norm 'linf'; known: ['Linf', 'L2', 'L1']"),
    (dict(version="custom"), f"version='custom' needs attacks=[...] out of {AA_KNOWN}"),
    (dict(version="custom", attacks=[]), f"version='custom' needs attacks=[...] out of {AA_KNOWN}"),
    (dict(version="custom", attacks=["apgd-ce", "pgd", "cw"]),
     f"unknown AutoAttack attacks ['pgd', 'cw']; known: {AA_KNOWN}"),
    (dict(version="custom", attacks=["apgd-ce", "square", "apgd-ce"]),
     "attacks must not repeat, got ['apgd-ce', 'square', 'apgd-ce']"),
    (dict(version="fast", attacks=["apgd-ce"]),
     "attacks=... only goes with version='custom' (version 'fast' fixes them)"),
    (dict(eps=0.0), "AutoAttack needs eps > 0 and batch_size >= 1, got eps=0.0, batch_size=500"),
    (dict(eps=-0.1), "AutoAttack needs eps > 0 and batch_size >= 1, got eps=-0.1, batch_size=500"),
    (dict(eps=float("nan")), "AutoAttack needs eps > 0 and batch_size >= 1, got eps=nan, batch_size=500"),
    (dict(batch_size=0), "AutoAttack needs eps > 0 and batch_size >= 1, got eps=0.1, batch_size=0"),
])
def test_autoattack_settings_are_checked_at_construction(kw, message):
    with pytest.raises(UserError) as err:
        AutoAttack(ConstantModel(0), **{"eps": 0.1, **kw})
    assert str(err.value) == message


def test_autoattack_defaults_to_the_models_device_or_cpu():
    assert AutoAttack(ConstantModel(0)).device == torch.device("cpu")

    class NoParams(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4]

    aa = AutoAttack(NoParams(), version="custom", attacks=["square", "apgd-ce"])
    assert aa.device == torch.device("cpu") and aa.attacks == ["square", "apgd-ce"] and aa.label == "custom"


def test_unknown_attack_name_in_the_runner_is_a_user_error():
    """``_run_attack`` guards against names the constructor would have refused (defensive: unreachable
    through ``AutoAttack``, which validates ``attacks`` first)."""
    with pytest.raises(UserError) as err:
        attacks._run_attack(None, "apgd", torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long))
    assert str(err.value) == f"unknown AutoAttack attack 'apgd'; known: {AA_KNOWN}"


# ---------------------------------------------------------------- AutoAttack: inputs and state files

def test_empty_input_is_a_user_error():
    aa = AutoAttack(ConstantModel(0), eps=0.1, version="fast", progress=False)
    with pytest.raises(UserError) as err:
        aa(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long))
    assert str(err.value) == "x is empty"


@pytest.fixture
def tiny(trained_tiny_fmnist):
    """The shared trained tiny CNN, 4 test points, and labels it gets all wrong (nothing to attack)."""
    t = trained_tiny_fmnist
    x, y = t.x[:4], t.y[:4]
    with torch.no_grad():
        wrong = (t.model(x).argmax(1) + 1) % 10
    return t.model, x, y, wrong


def test_a_torn_state_file_is_a_user_error(tiny, tmp_path):
    model, x, _, wrong = tiny
    state = tmp_path / "aa_state.pt"
    state.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(UserError) as err:
        AutoAttack(model, eps=0.1, version="fast", state_path=state, progress=False)(x, wrong)
    msg = str(err.value)
    assert msg == (f"cannot read AutoAttack state {state} (PytorchStreamReader failed reading zip archive: not a ZIP "
                   "archive); delete it or choose another --out")
    assert state.read_bytes() == b"PK\x03\x04 truncated zip"  # never overwritten behind the user's back


@pytest.mark.parametrize("content", [[1, 2, 3], {"format": 99, "fingerprint": {}}, {"clean_correct": None},
                                     {"format": 1, "clean_correct": None}])  # format 1, no fingerprint
def test_a_foreign_torch_file_is_not_taken_for_a_state(tiny, tmp_path, content):
    model, x, _, wrong = tiny
    state = tmp_path / "aa_state.pt"
    torch.save(content, state)
    with pytest.raises(UserError) as err:
        AutoAttack(model, eps=0.1, version="fast", state_path=state, progress=False)(x, wrong)
    assert str(err.value) == f"{state} is not an advgkl AutoAttack state; delete it or choose another --out"


def test_a_state_of_another_evaluation_names_every_difference(tiny, tmp_path):
    model, x, _, wrong = tiny
    state = tmp_path / "aa_state.pt"
    kw = dict(version="custom", attacks=["apgd-ce"], progress=False, state_path=state)
    first = AutoAttack(model, eps=0.1, **kw)(x, wrong)  # every point wrong when clean: no attack runs
    assert first.clean_acc == 0.0 and first.robust_acc == 0.0 and state.is_file()
    again = AutoAttack(model, eps=0.1, **kw)(x, wrong)  # the same evaluation resumes (here: is done)
    assert torch.equal(again.robust_correct, first.robust_correct)
    with pytest.raises(UserError) as err:
        AutoAttack(model, eps=0.05, batch_size=7, **kw)(x, wrong)
    assert str(err.value) == (f"AutoAttack state {state} belongs to a different evaluation (eps: state 0.1 vs now "
                              "0.05; batch_size: state 500 vs now 7); delete it or choose another --out")


def test_verbose_prints_each_attacks_robust_accuracy(tiny, capsys):
    model, x, y, _ = tiny
    res = AutoAttack(model, eps=0.1, version="custom", attacks=["apgd-ce"], verbose=True, progress=False)(x, y)
    with torch.no_grad():
        clean = model(x).argmax(1) == y  # independent of AutoAttack
    assert torch.equal(res.clean_correct, clean)
    assert bool((res.robust_correct <= clean).all())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("AutoAttack apgd-ce:")]
    assert len(lines) == 1
    m = re.fullmatch(r"AutoAttack apgd-ce: robust accuracy (\d+\.\d\d)% \((\d+\.\d) s\)", lines[0])
    assert m, lines[0]
    assert m[1] == f"{100 * res.robust_correct.sum().item() / len(x):.2f}"


# ---------------------------------------------------------------- AutoAttack's fp32 context

def test_fp32_context_casts_freezes_and_restores_a_bf16_model_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(torch.bfloat16)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)  # a non-trivial floating buffer
    model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    with attacks._fp32_frozen(model, allow_tf32=not tf32[0]):
        assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
        assert model[1].num_batches_tracked.dtype == torch.int64  # integer buffers are left alone
        assert not any(p.requires_grad for p in model.parameters())
        assert torch.backends.cuda.matmul.allow_tf32 == (not tf32[0])
        out = model.eval()(torch.ones(2, 3))
        assert out.dtype == torch.float32

    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    assert [p.requires_grad for p in params] == flags
    assert all(a is b for a, b in zip(model.parameters(), params))  # the same Parameter objects (optimizers)
    after = model.state_dict()
    for k, v in before.items():  # bf16 -> fp32 -> bf16 is exact
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_fp32_context_leaves_an_fp32_model_untouched():
    model = nn.Linear(3, 2)
    weight = model.weight
    with attacks._fp32_frozen(model, allow_tf32=False):
        assert model.weight is weight and not weight.requires_grad
    assert model.weight is weight and weight.requires_grad and weight.dtype == torch.float32
