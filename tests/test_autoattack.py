"""advgkl's AutoAttack wrapper against plain pyautoattack, on a tiny CNN trained on real Fashion-MNIST."""
import copy
import json

import pytest
import torch

from advgkl import attacks
from advgkl.attacks import FAST_VERSION_LABEL, AutoAttack
from advgkl.errors import UserError

EPS = 0.1  # Fashion-MNIST Linf radius at which the tiny CNN keeps a few robust points
N = 32
BS = 12  # smaller than N: several chunks per attack, and the last one is ragged


@pytest.fixture(scope="module")
def data(trained_tiny_fmnist):
    t = trained_tiny_fmnist
    return t.model, t.x[:N], t.y[:N]


def plain_robust_flags(aa: AutoAttack, x, y):
    """Per-point robust flags from plain ``pyautoattack.run_standard_evaluation`` with the same settings."""
    pa = aa.pyautoattack(10)
    pa.verbose = False
    _, y_adv = pa.run_standard_evaluation(x, y, batch_size=aa.batch_size)
    return y_adv == y  # y_adv is the clean prediction for robust points and the wrong label otherwise


@pytest.fixture(scope="module")
def standard(data):
    model, x, y = data
    aa = AutoAttack(model, eps=EPS, version="standard", batch_size=BS, progress=False)
    return aa, aa(x, y)


def test_custom_equals_plain_pyautoattack(data):
    model, x, y = data
    aa = AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce", "apgd-t"], batch_size=BS, progress=False)
    res = aa(x, y)
    assert torch.equal(res.robust_correct, plain_robust_flags(aa, x, y))
    assert 0.5 < res.clean_acc and res.robust_acc < res.clean_acc - 0.3  # a real attack on a real model


def test_standard_equals_plain_pyautoattack(data, standard):
    model, x, y = data
    aa, res = standard
    assert res.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] and res.version == "standard"
    assert torch.equal(res.robust_correct, plain_robust_flags(aa, x, y))


def test_l2_equals_plain_pyautoattack(data):
    model, x, y = data
    aa = AutoAttack(model, norm="L2", eps=1.0, version="custom", attacks=["apgd-ce"], batch_size=BS, progress=True)
    res = aa(x, y)
    assert res.norm == "L2" and res.robust_acc < res.clean_acc
    assert torch.equal(res.robust_correct, plain_robust_flags(aa, x, y))


def test_result_is_consistent(data, standard):
    model, x, y = data
    _, res = standard
    accs = list(res.per_attack_robust_acc.values())
    assert list(res.per_attack_robust_acc) == ["clean"] + res.attacks
    assert all(a >= b for a, b in zip(accs, accs[1:]))  # attacks only ever remove robust points
    assert res.robust_acc == accs[-1] <= res.clean_acc == accs[0]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert torch.equal(res.clean_correct, clean)
    assert bool((res.robust_correct <= res.clean_correct).all())
    assert res.robust_correct.float().mean().item() == pytest.approx(res.robust_acc)
    assert res.n_examples == N and res.eps == EPS and res.wall_time_s > 0
    # broken_by says which attack broke each point
    assert torch.equal(res.broken_by == -1, res.robust_correct) and torch.equal(res.broken_by == 0, ~clean)
    for k, name in enumerate(res.attacks, start=1):
        assert (res.broken_by <= k).logical_and(res.broken_by >= 0).sum().item() == pytest.approx(
            N * (1 - res.per_attack_robust_acc[name]))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["per_point"]["robust_correct"] == res.robust_correct.int().tolist()
    assert d["per_attack_robust_acc"] == res.per_attack_robust_acc


def test_fast_is_labelled_and_matches_standard_prefix(data, standard):
    model, x, y = data
    res = AutoAttack(model, eps=EPS, version="fast", batch_size=BS, progress=False)(x, y)
    assert res.version == FAST_VERSION_LABEL and "not standard" in res.version
    assert res.attacks == ["apgd-ce", "apgd-t"]
    # the same two attacks with standard's settings: the same numbers as standard after APGD-T
    std = standard[1].per_attack_robust_acc
    assert res.per_attack_robust_acc == {k: std[k] for k in ["clean", "apgd-ce", "apgd-t"]}


def test_resume_after_interruption(data, tmp_path, monkeypatch):
    model, x, y = data
    kw = dict(eps=EPS, version="custom", attacks=["apgd-ce", "apgd-t"], batch_size=8, progress=False)
    full = AutoAttack(model, **kw)(x, y)
    assert full.clean_acc * N > 16  # APGD-CE has at least three chunks of 8

    real = attacks._run_attack
    calls = []

    def flaky(aa, name, xb, yb):
        calls.append(name)
        if calls.count("apgd-ce") == 2:  # dies in the second chunk of the first attack
            raise KeyboardInterrupt
        return real(aa, name, xb, yb)

    state = tmp_path / "aa_state.pt"
    monkeypatch.setattr(attacks, "_run_attack", flaky)
    with pytest.raises(KeyboardInterrupt):
        AutoAttack(model, state_path=state, **kw)(x, y)
    saved = torch.load(state, weights_only=True)
    assert saved["per_attack"].keys() == {"clean"} and saved["current"] == "apgd-ce"
    assert saved["chunks_done"] == 1 and saved["done"] == [["apgd-ce", 0]]

    calls.clear()
    monkeypatch.setattr(attacks, "_run_attack", lambda *a: (calls.append(a[1]), real(*a))[1])
    resumed = AutoAttack(model, state_path=state, **kw)(x, y)
    n_chunks = -(-int(full.clean_correct.sum()) // 8)
    assert calls.count("apgd-ce") == n_chunks - 1  # the finished chunk is not run again
    assert torch.equal(resumed.robust_correct, full.robust_correct)
    assert torch.equal(resumed.broken_by, full.broken_by)
    assert resumed.per_attack_robust_acc == full.per_attack_robust_acc

    calls.clear()
    again = AutoAttack(model, state_path=state, **kw)(x, y)  # a finished state just returns the result
    assert calls == [] and torch.equal(again.robust_correct, full.robust_correct)

    with pytest.raises(UserError, match="eps"):
        AutoAttack(model, **{**kw, "eps": 0.05}, state_path=state)(x, y)
    with pytest.raises(UserError, match="y_sha"):
        AutoAttack(model, state_path=state, **kw)(x, (y + 1) % 10)
    state.write_bytes(b"not a state")
    with pytest.raises(UserError, match="delete"):
        AutoAttack(model, state_path=state, **kw)(x, y)


def test_resume_between_attacks(data, tmp_path, monkeypatch):
    model, x, y = data
    kw = dict(eps=EPS, version="fast", batch_size=BS, progress=False)
    full = AutoAttack(model, **kw)(x, y)
    real = attacks._run_attack

    def dies_in_apgd_t(aa, name, xb, yb):
        if name == "apgd-t":
            raise RuntimeError("simulated crash")
        return real(aa, name, xb, yb)

    state = tmp_path / "sub" / "aa_state.pt"  # the folder is created
    monkeypatch.setattr(attacks, "_run_attack", dies_in_apgd_t)
    with pytest.raises(RuntimeError, match="simulated"):
        AutoAttack(model, state_path=state, **kw)(x, y)
    monkeypatch.setattr(attacks, "_run_attack", real)
    resumed = AutoAttack(model, state_path=state, **kw)(x, y)
    assert torch.equal(resumed.robust_correct, full.robust_correct)
    assert resumed.per_attack_robust_acc == full.per_attack_robust_acc
    assert [p.name for p in state.parent.iterdir()] == ["aa_state.pt"]  # no temporary files left


def test_model_and_rng_left_as_found(data):
    model, x, y = data
    model = copy.deepcopy(model).train()
    params = list(model.parameters())
    params[1].requires_grad_(False)
    flags = [p.requires_grad for p in params]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce", "fab-t"], batch_size=BS, progress=False)(x[:8], y[:8])
    assert torch.equal(torch.rand(3), expected_next)  # pyautoattack's manual_seed did not leak out
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)  # FAB's .backward() did not reach the parameters


def test_low_precision_model_is_evaluated_in_fp32_and_restored(data):
    model, x, y = data
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    ref = copy.deepcopy(model16).float()  # the same weights, evaluated in fp32
    kw = dict(eps=EPS, version="custom", attacks=["apgd-ce"], batch_size=BS, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast must not leak into the evaluation
        res = AutoAttack(model16, **kw)(x, y)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert all(b.dtype == torch.bfloat16 for b in model16.buffers())
    assert torch.equal(res.robust_correct, AutoAttack(ref, **kw)(x, y).robust_correct)


def test_bad_inputs_are_user_errors(data):
    model, x, y = data
    aa = AutoAttack(model, eps=EPS, version="fast", progress=False)
    bad = {
        "float": ((x * 255).to(torch.uint8), y),
        "\\[0, 1\\]": (x * 2, y),
        "\\[N, C, H, W\\]": (x[:, 0], y),
        "int64": (x, y.to(torch.int32)),
        "int64 tensor \\[32\\]": (x, y[:5]),
        "labels must lie": (x, y + 10),
    }
    for match, (xb, yb) in bad.items():
        with pytest.raises(UserError, match=match):
            aa(xb, yb)
    with pytest.raises(UserError, match="standard"):
        AutoAttack(model, version="std")
    with pytest.raises(UserError, match="apgd-ce"):
        AutoAttack(model, version="custom", attacks=["apgd"])
    with pytest.raises(UserError, match="custom"):
        AutoAttack(model, version="standard", attacks=["apgd-ce"])
    with pytest.raises(UserError, match="norm"):
        AutoAttack(model, norm="Linfinity")
