"""Fidelity rows 1, 2 and 9 (docs/fidelity.md): the released models' per-epoch weight average, the
two-view AutoAugment method and ghost BatchNorm, each against this file's own transcription of what the
official code computes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advgkl import distributed, trainers
from advgkl.config import apply_overrides, from_dict
from advgkl.data import BatchLoader, _autoaugment, random_crop_flip
from advgkl.errors import UserError
from advgkl.losses import ClassPrior
from advgkl.methods import METHODS, Context
from advgkl.models import GhostBatchNorm2d, use_ghost_batchnorm
from conftest import tiny_recipe

torch.set_num_threads(1)
TINY_WRN = {"name": "wrn_28_10", "kwargs": {"depth": 10, "width": 1}}  # WRN-10-1: BatchNorm, 78 k parameters


def train_epochs(cfg, tmp_path):
    """Train ``cfg`` epoch by epoch; returns the state and a copy of the model's state_dict after each epoch."""
    s = trainers.build(cfg, distributed.current(), last_path=tmp_path / "last.pt")
    after = []
    while s.epoch < cfg.optim.epochs:
        trainers.end_epoch(s, trainers.run_epoch(s), distributed.NullLogger())
        after.append({k: v.clone() for k, v in s.model.state_dict().items()})
    return s, after


# ------------------------------------------------------------------ row 1: the final weight average
def official_swa(state_dicts, tau, start):
    """The official averaging script: the checkpoint of (1-based) epoch ``start`` as is, then every later
    epoch's with new = (1 - tau) * epoch + tau * new, over every state_dict entry."""
    new = {}
    for i, sd in enumerate(state_dicts, start=1):
        if i == start:
            new = dict(sd)
        elif i > start:
            new = {k: (1 - tau) * v + tau * new[k] for k, v in sd.items()}
    return new


def test_epoch_average_equals_the_official_average_of_three_epoch_checkpoints(tmp_path):
    cfg = tiny_recipe(tmp_path, model=TINY_WRN, optim={"epochs": 3},
                      ema={"enabled": True, "every": "epoch", "decay": 0.9, "start_epoch": 1})
    s, after = train_epochs(cfg, tmp_path)
    got = s.ema.model.state_dict()
    want = official_swa(after, tau=0.9, start=1)
    w1, w2, w3 = (sd["net.fc.weight"] for sd in after)
    torch.testing.assert_close(got["net.fc.weight"], 0.81 * w1 + 0.09 * w2 + 0.1 * w3, rtol=1e-5, atol=1e-7)
    floats = [k for k, v in got.items() if v.is_floating_point()]
    assert any("running_var" in k for k in floats)  # BatchNorm buffers are averaged too
    for k in floats:
        torch.testing.assert_close(got[k], want[k].to(got[k].dtype), rtol=1e-5, atol=1e-7)
    # the average is not the last epoch's weights, so the comparison above can fail
    assert (got["net.fc.weight"] - w3).abs().max() > 1e-3
    assert (got["net.bn.running_mean"] - after[2]["net.bn.running_mean"]).abs().max() > 1e-4
    # the batch counter (an integer) is the last epoch's; the official script turns it into a float average
    assert got["net.bn.num_batches_tracked"] == after[2]["net.bn.num_batches_tracked"]


def test_step_ema_averages_parameters_and_copies_buffers(tmp_path):
    cfg = tiny_recipe(tmp_path, model=TINY_WRN, optim={"epochs": 1}, ema={"enabled": True, "decay": 0.9})
    s, after = train_epochs(cfg, tmp_path)
    got = s.ema.model.state_dict()
    assert torch.equal(got["net.bn.running_mean"], after[0]["net.bn.running_mean"])
    assert (got["net.fc.weight"] - after[0]["net.fc.weight"]).abs().max() > 1e-4


def test_epoch_average_needs_a_trained_start():
    with pytest.raises(UserError, match=r"ema.start_epoch: must be >= 1 with ema.every=epoch"):
        tiny_recipe(ema={"enabled": True, "every": "epoch", "start_epoch": 0})
    with pytest.raises(UserError, match=r"ema.every: 'epochs' is not one of step, epoch"):
        tiny_recipe(ema={"enabled": True, "every": "epochs"})


# ------------------------------------------------------------------ row 9: ghost BatchNorm
def test_ghost_batchnorm_is_data_parallel_batchnorm_over_shards():
    """4-GPU DataParallel at batch 128: each shard of 32 normalised with its own statistics; the running
    statistics move once, from shard 0 (the replica whose buffers are the module's)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).double()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    ghost = use_ghost_batchnorm(nn.Sequential(copy.deepcopy(bn)), 32)[0]
    x = torch.randn(128, 3, 5, 5, dtype=torch.float64) * 3 + 1
    out = ghost(x)
    replicas = [copy.deepcopy(bn) for _ in range(4)]
    want = torch.cat([r(shard) for r, shard in zip(replicas, x.split(32))])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ghost.running_mean, replicas[0].running_mean)
    torch.testing.assert_close(ghost.running_var, replicas[0].running_var)
    assert ghost.num_batches_tracked == 1
    # whole-batch BatchNorm differs, so the shards matter
    assert (copy.deepcopy(bn)(x) - out).abs().max() > 1e-2
    ghost.eval()
    torch.testing.assert_close(ghost(x), replicas[0].eval()(x))


def test_ghost_batch_from_the_recipe_keeps_the_state_dict(tmp_path):
    from advgkl.runtime import build_model

    plain = build_model(tiny_recipe(tmp_path, model=TINY_WRN))
    ghost = build_model(tiny_recipe(tmp_path, model={**TINY_WRN, "ghost_batch": 16}))
    bns = [m for m in ghost.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is GhostBatchNorm2d and m.ghost_batch == 16 for m in bns)
    assert list(plain.state_dict()) == list(ghost.state_dict())
    cfg = tiny_recipe(tmp_path, model={**TINY_WRN, "ghost_batch": 16})
    s, _ = train_epochs(cfg, tmp_path)  # batches of 32: two shards per forward
    assert all(torch.isfinite(v).all() for v in s.model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("sections, message", [
    ({"model": {"name": "tiny_cnn", "ghost_batch": 16}}, r"model.ghost_batch: model tiny_cnn has no BatchNorm2d"),
    ({"model": {**TINY_WRN, "ghost_batch": 16}, "runtime": {"sync_bn": True}}, r"model.ghost_batch and runtime.sync_bn"),
    ({"model": {**TINY_WRN, "ghost_batch": -1}}, r"model.ghost_batch"),
])
def test_ghost_batch_refusals(sections, message):
    with pytest.raises(UserError, match=message):
        tiny_recipe(**sections)


# ------------------------------------------------------------------ row 2: two-view AutoAugment
def official_dkl_loss(nat, adv, sample_weight, alpha, beta):
    """The reference's GKL-AT loss on one view: pairwise wMSE divided by the view's batch size, plus the
    soft-label CE against the detached natural softmax."""
    c = nat.shape[1]
    dn = nat.view(-1, c, 1) - nat.view(-1, 1, c)
    da = adv.view(-1, c, 1) - adv.view(-1, 1, c)
    mse = 0.25 * ((dn - da) ** 2 * sample_weight).sum() / nat.shape[0]
    sce = -(F.softmax(nat, dim=1).detach() * F.log_softmax(adv, dim=-1)).sum(1).mean()
    return beta * mse + alpha * sce


def test_two_view_loss_matches_the_reference_in_float64():
    torch.manual_seed(0)
    b, c, d = 6, 5, 7
    model = nn.Linear(d, c).double()
    x, x_adv = torch.randn(2 * b, d, dtype=torch.float64), torch.randn(2 * b, d, dtype=torch.float64)
    y = torch.randint(0, c, (b,)).repeat(2)
    prior = ClassPrior(c, 4.0)
    prior.update(torch.randn(50, c), torch.randint(0, c, (50,)))
    prior.finish_epoch()
    prior.prior = prior.prior.double()
    opts = from_dict({"method": {"name": "gkl_at_two_view", "alpha": 4.0, "beta": 20.0},
                      "data": {"augment": "two_view_autoaugment"}}).method
    method = METHODS["gkl_at_two_view"]
    loss, nat, adv = method.loss(model, x, x_adv, y, Context(opts=opts, prior=prior))

    nat_r, adv_r = model(x), model(x_adv)
    s_n = F.one_hot(y, c).double() @ prior.prior
    sample_weight = s_n.view(-1, c, 1) @ s_n.view(-1, 1, c)
    want = (F.cross_entropy(nat_r, y)
            + official_dkl_loss(nat_r[:b], adv_r[:b], sample_weight[:b], 4.0, 20.0)
            + 0.5 * official_dkl_loss(nat_r[b:], adv_r[b:], sample_weight[b:], 4.0, 20.0))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    # view B's weight matters
    opts.view_b_weight = 1.0
    assert abs(method.loss(model, x, x_adv, y, Context(opts=opts, prior=prior))[0] - want) > 1e-3
    logits, labels = method.prior_rows(nat, y, Context(opts=opts))
    assert torch.equal(logits, nat[:b]) and torch.equal(labels, y[:b])  # the prior learns from view A only


def test_two_view_loader_rows_are_plain_views_then_grey_filled_autoaugment_views():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    loader = BatchLoader(images, labels, 8, shuffle=False, augment="two_view_autoaugment", seed=3)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and torch.equal(y, torch.cat([labels[:8], labels[:8]]))
    # two ranks: each gets its rows of both views, in the same [plain; autoaugment] layout
    parts = [next(iter(BatchLoader(images, labels, 8, shuffle=False, augment="two_view_autoaugment", seed=3,
                                   rank=r, world_size=2))) for r in range(2)]
    for r, (xr, yr) in enumerate(parts):
        torch.testing.assert_close(xr, torch.cat([x[:8][r::2], x[8:][r::2]]))
        assert torch.equal(yr, torch.cat([labels[:8][r::2]] * 2))

    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    grey, black = _autoaugment(white, 5, 4, fill=128), _autoaugment(white, 5, 4, fill=None)
    changed = grey != black
    assert changed.any()  # rotations, shears and translations uncover pixels ...
    # ... filled grey, not black (a later operation of the same sub-policy may still change a few of them)
    assert (grey[changed] == 128).float().mean() > 0.95 and (black[changed] == 0).float().mean() > 0.95
    plain = random_crop_flip(white, torch.Generator().manual_seed(5), 4)
    assert not (plain == 128).any()


def test_two_view_method_trains_end_to_end(tmp_path):
    cfg = tiny_recipe(tmp_path, method={"name": "gkl_at_two_view"}, data={"augment": "two_view_autoaugment"})
    s, _ = train_epochs(cfg, tmp_path)
    assert s.ctx.prior.prior.sum(1).allclose(torch.ones(10))
    assert not torch.allclose(s.ctx.prior.prior, torch.full((10, 10), 0.1))  # learnt from the plain views


@pytest.mark.parametrize("overrides, message", [
    (["method.name=gkl_at_two_view"], r"method gkl_at_two_view trains on two views of each image: set data.augment"),
    (["data.augment=two_view_autoaugment"], r"method gkl_at does not use; two-view methods: gkl_at_two_view"),
    (["method.name=gkl_at_two_view", "data.augment=two_view_autoaugment", "optim.accumulate=2"],
     r"optim.accumulate > 1 with a two-view augmentation"),
])
def test_two_view_refusals(overrides, message):
    with pytest.raises(UserError, match=message):
        from_dict(apply_overrides({"method": {"name": "gkl_at"}}, overrides))


def test_published_recipes_use_the_official_options():
    from pathlib import Path

    from advgkl.config import load_config

    recipes = Path(__file__).resolve().parents[1] / "experiments" / "recipes"
    for name in ("cifar10_gkl_wrn34_awp_ema", "cifar100_gkl_wrn34_awp_ema", "cifar10_trades_gkl_setting",
                 "cifar100_trades_gkl_setting", "cifar10_pgd_at_gkl_setting", "cifar100_pgd_at_gkl_setting"):
        cfg = load_config(recipes / f"{name}.yaml")
        assert (cfg.ema.every, cfg.ema.decay, cfg.ema.start_epoch, cfg.model.ghost_batch) == ("epoch", 0.9, 1, 32), name
        assert cfg.runtime.amp == "none", name
    autoaug = load_config(recipes / "cifar100_gkl_wrn34_autoaug.yaml")
    assert (autoaug.method.name, autoaug.method.view_b_weight, autoaug.data.augment, autoaug.model.ghost_batch) == \
        ("gkl_at_two_view", 0.5, "two_view_autoaugment", 64)
