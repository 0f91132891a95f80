"""The loss family in float64: closed form = pairwise definition, KL = DKL in gradients, GKL's parts."""
import pytest
import torch
import torch.nn.functional as F

from advgkl import losses


def _logits(b, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    t = (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    return s, t, g


def _random_prior_weights(b, c, gamma, g):
    prior = losses.ClassPrior(c)
    y = torch.randint(0, c, (4 * c,), generator=g)
    prior.update(torch.randn(4 * c, c, generator=g, dtype=torch.float64) * 2, y)
    prior.finish_epoch()
    yb = torch.randint(0, c, (b,), generator=g)
    return prior.weights(yb, gamma).double()


def _grads(loss, *inputs):
    """Gradients, with zeros for inputs the loss does not use (the teacher when beta = 0)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("b,c", [(1, 2), (7, 2), (16, 10), (32, 100), (5, 100)])
@pytest.mark.parametrize("gamma", [1.0, 0.4, 0.2])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (4.0, 20.0), (1.0, 0.0)])
def test_closed_form_equals_pairwise_values_and_gradients(b, c, gamma, alpha, beta):
    s, t, g = _logits(b, c, seed=b * 1000 + c)
    w = _random_prior_weights(b, c, gamma, g)
    closed = losses.gkl(s, t, w, alpha=alpha, beta=beta)
    pairwise = losses.gkl_pairwise(s, t, w, alpha=alpha, beta=beta)
    assert abs(closed.item() - pairwise.item()) <= 1e-12 * max(1.0, abs(pairwise.item()))
    for a, p in zip(_grads(closed, s, t), _grads(pairwise, s, t)):
        torch.testing.assert_close(a, p, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_closed_form_equals_pairwise_with_temperature(temperature):
    s, t, g = _logits(8, 10, seed=3)
    w = torch.rand(8, 10, generator=g, dtype=torch.float64)
    a = losses.gkl(s, t, w, alpha=2.0, beta=3.0, temperature=temperature)
    p = losses.gkl_pairwise(s, t, w, alpha=2.0, beta=3.0, temperature=temperature)
    assert abs(a.item() - p.item()) < 1e-12


def test_batch_normalisation_is_one_ratio_not_mean_of_ratios():
    # Two samples with different weight mass: a mean of per-sample ratios would differ.
    s = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    got = losses.gkl(s, t, w, alpha=0.0, beta=1.0).item()
    # pair_b = sum_jk w_j w_k (d_j - d_k)^2: sample 0 -> 4 * 1, sample 1 -> 0.01 * 4 * 4 = 0.16
    expected = 0.25 * (4.0 + 0.16) / (3.0 ** 2 + 0.3 ** 2)
    assert got == pytest.approx(expected, rel=1e-12)
    mean_of_ratios = 0.5 * (0.25 * 4.0 / 9.0 + 0.25 * 0.16 / 0.09)
    assert abs(got - mean_of_ratios) > 0.1


@pytest.mark.parametrize("b,c,temperature", [(16, 10, 1.0), (4, 100, 1.0), (8, 10, 4.0)])
def test_kl_and_dkl_have_the_same_gradients_for_both_inputs(b, c, temperature):
    s, t, _ = _logits(b, c, seed=c + b)
    kl = losses.kl(s, t, temperature=temperature)
    dkl = losses.dkl(s, t, temperature=temperature)
    gs_kl, gt_kl = torch.autograd.grad(kl, (s, t))
    gs_dkl, gt_dkl = torch.autograd.grad(dkl, (s, t))
    torch.testing.assert_close(gs_dkl, gs_kl, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gt_dkl, gt_kl, rtol=1e-10, atol=1e-14)
    assert gt_kl.abs().max() > 1e-3  # the teacher branch really gets gradient


def test_kl_matches_torch_kl_div():
    s, t, _ = _logits(16, 10, seed=1)
    ref = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
    assert losses.kl(s, t).item() == pytest.approx(ref.item(), rel=1e-12)


def test_gkl_with_beta_zero_is_the_soft_ce():
    s, t, g = _logits(16, 10, seed=5)
    w = torch.rand(16, 10, generator=g, dtype=torch.float64)
    soft = -(F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1).mean()
    got = losses.gkl(s, t, w, alpha=1.0, beta=0.0)
    assert got.item() == pytest.approx(soft.item(), rel=1e-13)
    gs, gt = torch.autograd.grad(got, (s, t), allow_unused=True)
    assert gt is None or gt.abs().max() == 0  # soft-label target is detached


def test_gkl_wmse_sends_gradient_into_both_branches_and_dkl_only_into_teacher():
    s, t, g = _logits(8, 10, seed=9)
    w = torch.rand(8, 10, generator=g, dtype=torch.float64)
    gs, gt = torch.autograd.grad(losses.gkl(s, t, w, alpha=0.0, beta=1.0), (s, t))
    torch.testing.assert_close(gs, -gt)  # wMSE depends on t - s only
    assert gt.abs().max() > 1e-3
    gs_d, _ = torch.autograd.grad(losses.dkl(s, t, alpha=0.0, beta=1.0), (s, t), allow_unused=True)
    assert torch.equal(gs_d, torch.zeros_like(s))  # the student enters dkl's wMSE detached


def test_with_frozen_teacher_dkl_equals_kl_gradient_for_student():
    # Knowledge distillation: a detached teacher makes wMSE inert in DKL, so DKL == soft CE for the student.
    s, t, _ = _logits(8, 10, seed=11)
    gs_kl = torch.autograd.grad(losses.kl(s, t.detach()), s)[0]
    gs_dkl = torch.autograd.grad(losses.dkl(s, t.detach()), s)[0]
    torch.testing.assert_close(gs_dkl, gs_kl, rtol=1e-10, atol=1e-14)


def test_closed_form_is_stable_for_large_logits():
    s, t, g = _logits(4, 10, seed=2, scale=1e4)
    w = torch.rand(4, 10, generator=g, dtype=torch.float64)
    a = losses.gkl(s, t, w, alpha=0.0).item()
    p = losses.gkl_pairwise(s, t, w, alpha=0.0).item()
    assert a == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        lambda s, t, w: losses.gkl(s[:, :-1], t, w),
        lambda s, t, w: losses.gkl(s, t, w[:, :-1]),
        lambda s, t, w: losses.gkl(s, t, -w),
        lambda s, t, w: losses.gkl(s[0], t[0], w[0]),
        lambda s, t, w: losses.kl(s, t[:-1]),
    ],
)
def test_invalid_inputs_raise_value_error(bad):
    s, t, g = _logits(4, 5, seed=0)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.1
    with pytest.raises(ValueError, match="must"):
        bad(s, t, w)


def test_trades_kl_is_kl_of_natural_to_adversarial():
    adv, nat, _ = _logits(8, 10, seed=4)
    ref = F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="sum") / 8
    assert losses.trades_kl(adv, nat).item() == pytest.approx(ref.item(), rel=1e-12)


def test_mart_matches_its_definition():
    adv, nat, g = _logits(6, 4, seed=6)
    y = torch.randint(0, 4, (6,), generator=g)
    p_adv, p_nat = F.softmax(adv, 1), F.softmax(nat, 1)
    expected = 0.0
    for i in range(6):
        wrong = max(p_adv[i, k].item() for k in range(4) if k != y[i])
        bce = -torch.log(p_adv[i, y[i]]).item() - torch.log(torch.tensor(1 - wrong)).item()
        kl_i = (p_nat[i] * (p_nat[i].log() - p_adv[i].log())).sum().item()
        expected += bce + 6.0 * kl_i * (1 - p_nat[i, y[i]].item())
    assert losses.mart(adv, nat, y, beta=6.0).item() == pytest.approx(expected / 6, rel=1e-9)


def test_ce_label_smoothing():
    logits, _, g = _logits(8, 10, seed=7)
    y = torch.randint(0, 10, (8,), generator=g)
    assert losses.ce(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())
    smooth = losses.ce(logits, y, label_smoothing=0.1).item()
    manual = (0.9 * F.cross_entropy(logits, y) + 0.1 * (-F.log_softmax(logits, 1).mean(1)).mean()).item()
    assert smooth == pytest.approx(manual, rel=1e-12)


def test_class_prior_accumulates_per_true_class_and_normalises_rows():
    prior = losses.ClassPrior(3, temperature=2.0)
    torch.testing.assert_close(prior.weights(torch.tensor([0, 2]), 1.0), torch.full((2, 3), 1 / 3))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [4.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    prior.update(logits, y)
    prior.finish_epoch()
    p = F.softmax(logits / 2.0, 1)
    torch.testing.assert_close(prior.prior[0], ((p[0] + p[2]) / 2).float())
    torch.testing.assert_close(prior.prior[1], p[1].float())
    torch.testing.assert_close(prior.prior[2], torch.full((3,), 1 / 3))  # unseen class stays uniform
    torch.testing.assert_close(prior.prior.sum(1), torch.ones(3))
    w = prior.weights(torch.tensor([1, 0]), gamma=0.2)
    torch.testing.assert_close(w, torch.stack([p[1], (p[0] + p[2]) / 2]).float() ** 0.2)
    assert not w.requires_grad


def test_class_prior_state_round_trip_mid_epoch():
    a = losses.ClassPrior(4)
    a.update(torch.randn(10, 4), torch.randint(0, 4, (10,)))
    a.finish_epoch()
    a.update(torch.randn(5, 4), torch.randint(0, 4, (5,)))
    b = losses.ClassPrior(4)
    b.load_state_dict(a.state_dict())
    a.finish_epoch()
    b.finish_epoch()
    assert torch.equal(a.prior, b.prior)
    with pytest.raises(ValueError, match="expected"):
        losses.ClassPrior(5).load_state_dict(a.state_dict())
