"""Fidelity to the official GKL code (docs/fidelity.md): the options that let a recipe train what the
released models trained, checked against this file's own plain-torch transcriptions of the official
formulas (pairwise [B, C, C] form, as the official code writes them), in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from advgkl import losses
from advgkl.config import from_dict
from advgkl.methods import GKLKD, METHODS, Context

torch.set_num_threads(1)


# ------------------------------------------------------------------ transcriptions of the official code
def official_gkl(student, teacher, w, *, T, alpha, beta):
    """GKL as the official KD/AT code computes it: the wMSE over all class pairs on raw logits with pair
    weights w_j w_k, one ratio over the batch; the soft-label CE at temperature T (teacher detached)."""
    pair_t = teacher[:, :, None] - teacher[:, None, :]
    pair_s = student[:, :, None] - student[:, None, :]
    ww = w[:, :, None] * w[:, None, :]
    wmse = 0.25 * ((pair_t - pair_s) ** 2 * ww).sum() / ww.sum()
    sce = -(F.softmax(teacher.detach() / T, dim=1) * F.log_softmax(student / T, dim=1)).sum(dim=1).mean()
    return beta * wmse + alpha * sce


def official_kd_loss(student, teacher, y, prior, epoch, *, T, T2, alpha, beta, gamma, gi, warmup, ce_weight=1.0):
    """The official GKL-KD training loss at (1-based) ``epoch``: ce_weight * CE + min(epoch / warm-up, 1) *
    GKL, pair weights prior[y] ** gamma (GI) or softmax(teacher / T2) ** gamma, no T^2 factor."""
    if gi:
        w = (F.one_hot(y, student.shape[1]).to(prior.dtype) @ prior) ** gamma
    else:
        w = F.softmax(teacher / T2, dim=1) ** gamma
    kd = official_gkl(student, teacher, w, T=T, alpha=alpha, beta=beta)
    return ce_weight * F.cross_entropy(student, y) + min(epoch / warmup, 1.0) * kd


def official_prior(teacher_batches, y_batches, num_classes, T2):
    """The official KD trainer's class prior: rows of softmax(teacher / T2) summed per true class, normalised."""
    acc = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for t, y in zip(teacher_batches, y_batches):
        acc += F.one_hot(y, num_classes).double().t() @ F.softmax(t.double() / T2, dim=1)
    return acc / acc.sum(dim=1, keepdim=True)


def official_mart(adv, nat, y, beta):
    """YisenWang/MART mart_loss after the attack: boosted CE with log(1.0001 - p + 1e-12) on the runner-up
    class, plus beta * mean(KL(nat || adv) with log(p_adv + 1e-12), weighted by 1.0000001 - p_nat(y))."""
    p_adv = F.softmax(adv, dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
    p_nat = F.softmax(nat, dim=1)
    kl = (p_nat * (torch.log(p_nat) - torch.log(p_adv + 1e-12))).sum(dim=1)
    true = p_nat.gather(1, y[:, None]).squeeze(1)
    return bce + beta * (kl * (1.0000001 - true)).mean()


# --------------------------------------------------------------------------------------------- helpers
def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _prior(num_classes, gen, temperature=4.0):
    """A ClassPrior holding a random row-stochastic float64 matrix (advgkl stores float32; float64 here so
    that the comparison is exact to round-off)."""
    prior = losses.ClassPrior(num_classes, temperature)
    rows = torch.rand(num_classes, num_classes, generator=gen, dtype=torch.float64) + 0.05
    prior.prior = rows / rows.sum(dim=1, keepdim=True)
    return prior


def _kd_setup(num_classes=7, batch=6, seed=0):
    g = _gen(seed)
    model = torch.nn.Linear(5, num_classes, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    teacher = 3.0 * torch.randn(batch, num_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return model, x, teacher, y, _prior(num_classes, g)


def _kd_opts(**kw):
    return from_dict({"method": {"name": "gkl_kd", "teacher": "t.pt", **kw}}).method


def _close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


# -------------------------------------------------------------------------------------- KD temperature
# The official CIFAR-100 KD configs (DKLv2/KD-dkl/cifar100_config_gkl/*.yaml): T 4 (soft CE), T2 4 (pair
# weights and class prior), WARMUP 20; alpha, beta, gamma, GI vary per teacher-student pair.
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("gi", [True, False])
@pytest.mark.parametrize("progress,epoch", [(0.0, 1), (2.5, 3), (19.99, 20), (31.0, 32)])
def test_kd_loss_matches_the_official_kd_loss(T, gi, progress, epoch):
    model, x, teacher, y, prior = _kd_setup()
    alpha, beta, gamma = 3.0, 12.0, 0.3
    opts = _kd_opts(alpha=alpha, beta=beta, gamma=gamma, weights="prior" if gi else "sample", prior_temperature=4.0,
                    kd_temperature=4.0, kd_ce_temperature=T, kd_warmup_epochs=20, kd_warmup_mode="epoch")
    ctx = Context(opts=opts, progress=progress, prior=prior, teacher_logits=teacher)
    loss, nat, adv = METHODS["gkl_kd"].loss(model, x, None, y, ctx)
    assert loss.dtype == torch.float64 and adv is None
    grads = torch.autograd.grad(loss, list(model.parameters()))

    student = model(x)
    expected = official_kd_loss(student, teacher, y, prior.prior, epoch, T=T, T2=4.0, alpha=alpha, beta=beta,
                                gamma=gamma, gi=gi, warmup=20)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert _close(loss.item(), expected.item(), 1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_the_official_temperatures_differ_from_one_temperature_for_both_terms():
    """Why the option exists: losses.gkl's `temperature` divides both terms, which is not the official loss."""
    _, _, teacher, y, prior = _kd_setup()
    student = torch.randn(teacher.shape, generator=_gen(1), dtype=torch.float64)
    w = prior.weights(y, 0.3)
    official = official_gkl(student, teacher, w, T=4.0, alpha=3.0, beta=12.0)
    split = losses.gkl(student, teacher, w, alpha=3.0, beta=12.0, ce_temperature=4.0)
    both = losses.gkl(student, teacher, w, alpha=3.0, beta=12.0, temperature=4.0)
    assert _close(split.item(), official.item(), 1e-12)
    assert not _close(both.item(), official.item(), 1e-3)


def test_gkl_ce_temperature_defaults_to_temperature():
    _, _, teacher, y, prior = _kd_setup()
    student = torch.randn(teacher.shape, generator=_gen(2), dtype=torch.float64)
    w = prior.weights(y)
    for T in (1.0, 2.0):
        assert torch.equal(losses.gkl(student, teacher, w, temperature=T),
                           losses.gkl(student, teacher, w, temperature=T, ce_temperature=None))


def test_kd_defaults_keep_the_previous_loss():
    """Defaults: soft CE at T = 1, no T^2, the continuous warm-up from progress 0."""
    model, x, teacher, y, prior = _kd_setup()
    opts = _kd_opts(alpha=2.0, beta=5.0, gamma=1.0, kd_warmup_epochs=4.0)
    assert (opts.kd_ce_temperature, opts.kd_ce_t2, opts.kd_warmup_mode) == (1.0, False, "continuous")
    ctx = Context(opts=opts, progress=1.0, prior=prior, teacher_logits=teacher)
    loss, _, _ = METHODS["gkl_kd"].loss(model, x, None, y, ctx)
    student = model(x)
    expected = F.cross_entropy(student, y) + 0.25 * losses.gkl(student, teacher, prior.weights(y), alpha=2.0, beta=5.0)
    assert loss.item() == expected.item()


def test_kd_ce_t2_multiplies_the_soft_ce_by_t_squared():
    """The official loss has no T^2 factor (kd_ce_t2: false); kd_ce_t2: true is Hinton's convention."""
    model, x, teacher, y, prior = _kd_setup()
    losses_by_flag = {}
    for flag in (False, True):
        opts = _kd_opts(alpha=1.5, beta=0.0, kd_ce_temperature=4.0, kd_ce_t2=flag)
        ctx = Context(opts=opts, progress=0.0, prior=prior, teacher_logits=teacher)
        losses_by_flag[flag] = METHODS["gkl_kd"].loss(model, x, None, y, ctx)[0].item()
    student = model(x)
    ce, sce = F.cross_entropy(student, y).item(), losses.soft_ce(student, teacher, 4.0).item()
    assert _close(losses_by_flag[False], ce + 1.5 * sce, 1e-12)
    assert _close(losses_by_flag[True], ce + 16 * 1.5 * sce, 1e-12)


def test_kd_ce_temperature_also_sets_the_kl_distillation_temperature():
    model, x, teacher, y, _ = _kd_setup()
    opts = _kd_opts(kd_loss="kl", kd_ce_temperature=4.0, kd_ce_t2=True)
    loss, _, _ = METHODS["gkl_kd"].loss(model, x, None, y, Context(opts=opts, teacher_logits=teacher))
    student = model(x)
    p, log_q = F.softmax(teacher / 4, dim=1), F.log_softmax(student / 4, dim=1)
    expected = F.cross_entropy(student, y) + 16 * (p * (p.log() - log_q)).sum(dim=1).mean()
    assert _close(loss.item(), expected.item(), 1e-12)


@pytest.mark.parametrize("progress,epoch_ramp,continuous_ramp", [
    (0.0, 1 / 20, 0.0), (0.999, 1 / 20, 0.999 / 20), (1.0, 2 / 20, 1 / 20), (18.5, 19 / 20, 18.5 / 20),
    (19.0, 1.0, 19 / 20), (25.0, 1.0, 1.0),
])
def test_kd_warmup_modes(progress, epoch_ramp, continuous_ramp):
    """epoch: the official min(epoch / 20, 1), epoch counted from 1 and constant within it."""
    epoch = _kd_opts(kd_warmup_epochs=20, kd_warmup_mode="epoch")
    continuous = _kd_opts(kd_warmup_epochs=20)
    assert GKLKD.ramp(progress, epoch) == pytest.approx(epoch_ramp, rel=1e-15)
    assert GKLKD.ramp(progress, continuous) == pytest.approx(continuous_ramp, rel=1e-15)
    assert GKLKD.ramp(progress, _kd_opts(kd_warmup_mode="epoch")) == 1.0  # no warm-up


def test_kd_class_prior_is_the_official_prior_at_t2():
    """prior_temperature = T2: ClassPrior fed the teacher's logits builds the official KD trainer's prior
    (rows of softmax(teacher / T2) per true class, normalised). advgkl stores it in float32: 1e-6."""
    g = _gen(3)
    teachers = [3.0 * torch.randn(16, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 7, (16,), generator=g) for _ in range(3)]
    prior = losses.ClassPrior(7, 4.0)
    for t, y in zip(teachers, ys):
        prior.update(t, y)
    prior.finish_epoch()
    torch.testing.assert_close(prior.prior.double(), official_prior(teachers, ys, 7, 4.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad,message", [
    ({"kd_ce_temperature": 0.0}, "method.kd_ce_temperature: must be > 0"),
    ({"kd_warmup_mode": "step"}, "method.kd_warmup_mode: 'step' is not one of continuous, epoch"),
])
def test_kd_options_are_checked(bad, message):
    from advgkl.errors import UserError

    with pytest.raises(UserError, match=message):
        _kd_opts(**bad)


# ------------------------------------------------------------------------------------ attack gamma
def _gkl_at_objective(prior, **method):
    opts = from_dict({"method": {"name": "gkl_at", **method}}).method
    return METHODS["gkl_at"].objective(Context(opts=opts, prior=prior))


def test_attack_objective_uses_attack_gamma_not_gamma_exact_numbers():
    """One sample, two classes, prior row (3/4, 1/4), t = (1, 0), s = (0, 1), so d = t - s = (1, -1).
    wMSE = 1/4 * 2 w1 w2 (d1 - d2)^2 / (w1 + w2)^2: 3/8 at exponent 1, 2 sqrt(3) - 3 at exponent 1/2.
    soft CE = -sum softmax(t) log softmax(s) = log(1 + e) - 1 / (1 + e)."""
    prior = losses.ClassPrior(2, 4.0)
    prior.prior = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    adv, nat = torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    sce = math.log(1 + math.e) - 1 / (1 + math.e)
    default = _gkl_at_objective(prior, gamma=0.5, attack_beta=1.0)  # attack_gamma defaults to 1
    assert default(adv, y, nat).item() == pytest.approx(3 / 8 + sce, rel=1e-14)
    at_half = _gkl_at_objective(prior, gamma=1.0, attack_beta=1.0, attack_gamma=0.5)
    assert at_half(adv, y, nat).item() == pytest.approx(2 * math.sqrt(3) - 3 + sce, rel=1e-14)


@pytest.mark.parametrize("weights", ["prior", "sample"])
def test_attack_objective_matches_the_official_attack_at_gamma_one(weights):
    """The official attack: GKL(adv, nat) with alpha 1, beta 0 / 1, pair weights to the power 1 whatever the
    training gamma (train_dkl_cifar10.py / train_dkl_cifar100.py, perturb_input(..., gamma=1.0))."""
    g = _gen(4)
    prior = _prior(6, g)
    adv, nat = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (5,), generator=g)
    objective = _gkl_at_objective(prior, gamma=0.2, attack_beta=1.0, weights=weights, sample_temperature=2.0)
    w = prior.prior[y] if weights == "prior" else F.softmax(nat / 2.0, dim=1)
    expected = official_gkl(adv, nat, w, T=1.0, alpha=1.0, beta=1.0)
    assert _close(objective(adv, y, nat).item(), expected.item(), 1e-12)
    at_train_gamma = official_gkl(adv, nat, w ** 0.2, T=1.0, alpha=1.0, beta=1.0)
    assert not _close(objective(adv, y, nat).item(), at_train_gamma.item(), 1e-6)


def test_attack_gamma_is_checked():
    from advgkl.errors import UserError

    with pytest.raises(UserError, match="method.attack_gamma: must be >= 0"):
        from_dict({"method": {"name": "gkl_at", "attack_gamma": -1.0}})


# --------------------------------------------------------------------------------------------- MART
def _mart_setup(seed=5):
    g = _gen(seed)
    model = torch.nn.Linear(4, 5, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(2.0 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x_adv = x + 0.3 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=g)
    return model, x, x_adv, y


def test_mart_log_eps_gives_the_official_boosted_ce():
    """log_eps 1e-4: the boosted CE is the reference's log(1.0001 - p + 1e-12) term exactly (beta 0)."""
    model, x, x_adv, y = _mart_setup()
    opts = from_dict({"method": {"name": "mart", "beta": 0.0, "log_eps": 1e-4}}).method
    loss, _, _ = METHODS["mart"].loss(model, x, x_adv, y, Context(opts=opts))
    assert _close(loss.item(), official_mart(model(x_adv), model(x), y, 0.0).item(), 1e-12)


def test_mart_with_the_kl_term_matches_the_official_loss_up_to_its_tiny_constants():
    """With beta > 0 the reference also writes log(p_adv + 1e-12) and 1.0000001 - p_nat(y) in the KL term;
    advgkl does not: they move the loss by about 1e-7 relative."""
    model, x, x_adv, y = _mart_setup()
    opts = from_dict({"method": {"name": "mart", "beta": 6.0, "log_eps": 1e-4}}).method
    loss, _, _ = METHODS["mart"].loss(model, x, x_adv, y, Context(opts=opts))
    assert _close(loss.item(), official_mart(model(x_adv), model(x), y, 6.0).item(), 1e-6)


def test_mart_default_log_eps_keeps_the_previous_loss():
    model, x, x_adv, y = _mart_setup()
    opts = from_dict({"method": {"name": "mart", "beta": 6.0}}).method
    assert opts.log_eps == 0.0
    adv, nat = model(x_adv), model(x)
    p_adv = F.softmax(adv, dim=1)
    wrong = p_adv.masked_fill(F.one_hot(y, 5).bool(), float("-inf")).amax(dim=1)
    p_nat = F.softmax(nat, dim=1)
    kl = (p_nat * (F.log_softmax(nat, 1) - F.log_softmax(adv, 1))).sum(1)
    before = (F.cross_entropy(adv, y) - torch.log1p(-wrong + 1e-12).mean()
              + 6.0 * (kl * (1 - p_nat.gather(1, y[:, None]).squeeze(1))).mean())
    assert METHODS["mart"].loss(model, x, x_adv, y, Context(opts=opts))[0].item() == before.item()
