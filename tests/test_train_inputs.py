"""Trainer pieces that the end-to-end runs do not reach: device resolution, the constant schedule,
GKL-AT with per-sample weights, KL distillation, a RobustBench teacher, and set-up errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advgkl import losses, trainers
from advgkl.methods import METHODS, Context
from advgkl.config import from_dict
from advgkl.errors import UserError
from conftest import tiny_recipe
from test_robustbench import R18, r18_setup  # noqa: F401  (fixture)


def test_device_resolution_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainers.resolve_device("auto") == torch.device("cpu")
    assert trainers.resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError) as err:
            trainers.resolve_device(name)
        assert str(err.value) == (f"runtime.device={name} but CUDA is not available here; use runtime.device=cpu")


def test_constant_schedule_with_warmup():
    cfg = from_dict({"optim": {"lr": 0.2, "schedule": "constant", "epochs": 4, "warmup_epochs": 1}})
    steps_per_epoch = 10
    assert [trainers.lr_at(s, steps_per_epoch, cfg) for s in (0, 4, 9)] == pytest.approx([0.02, 0.1, 0.2])
    assert {trainers.lr_at(s, steps_per_epoch, cfg) for s in range(10, 40)} == {0.2}


def test_gkl_attack_objective_with_per_sample_weights():
    """method.weights=sample: the attack weights each pair by softmax(nat / T_prior) ** gamma, in float64
    against the pairwise reference implementation."""
    cfg = from_dict({"method": {"name": "gkl_at", "weights": "sample", "gamma": 0.5, "sample_temperature": 2.0,
                                "attack_beta": 1.0, "attack_gamma": 0.5}})
    objective = METHODS["gkl_at"].objective(Context(opts=cfg.method))
    assert objective.needs_nat
    g = torch.Generator().manual_seed(0)
    adv, nat = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    w = torch.softmax(nat / 2.0, dim=1) ** 0.5
    expected = losses.gkl_pairwise(adv, nat, w, alpha=1.0, beta=1.0)
    assert objective(adv, torch.zeros(6, dtype=torch.int64), nat).item() == pytest.approx(expected.item(), rel=1e-10)


def test_kd_with_the_kl_loss_is_ce_plus_ramped_kl():
    cfg = from_dict({"method": {"name": "gkl_kd", "teacher": "t.pt", "kd_loss": "kl", "ce_weight": 0.5,
                                "kd_warmup_epochs": 2.0}})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    teacher = torch.randn(8, 3)
    ctx = Context(opts=cfg.method, progress=0.5, teacher_logits=teacher)
    loss, nat, adv = METHODS["gkl_kd"].loss(model, x, None, y, ctx)
    logits = model(x)
    kl = (F.softmax(teacher, 1) * (F.log_softmax(teacher, 1) - F.log_softmax(logits, 1))).sum(1).mean()
    expected = 0.5 * F.cross_entropy(logits, y) + 0.25 * kl  # ramp = progress / warm-up = 0.25
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and adv is None and torch.equal(nat, logits)


def test_a_robustbench_teacher_is_loaded_frozen(r18_setup, monkeypatch):  # noqa: F811
    monkeypatch.chdir(r18_setup["base"])  # the teacher is read from ./models, robustbench's layout
    cfg = from_dict({"data": {"dataset": "cifar10"}, "method": {"name": "gkl_kd", "teacher": f"robustbench:{R18}"}})
    teacher = trainers.load_teacher(cfg.method.teacher, cfg, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(teacher(r18_setup["x"][:4]), r18_setup["model"](r18_setup["x"][:4]))


def _tiny(root, *overrides):
    return tiny_recipe(root, *overrides, name="run", data={"subset": 40, "batch_size": 64}, attack={"eps": 0.1, "steps": 5},
                       eval={"n_examples": 8, "batch_size": 500}, runtime={"device": "cpu", "threads": 2})


def test_a_batch_larger_than_the_training_set_is_refused(fmnist_root, tmp_path):
    try:
        with pytest.raises(UserError) as err:
            trainers.train(_tiny(fmnist_root), tmp_path / "run")
        assert str(err.value) == ("data.batch_size=64 needs 64 training images per batch, but the training set "
                                  "has 40")
        assert torch.get_num_threads() == 2  # runtime.threads was applied before the data was read
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest.py)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_output_folder_that_cannot_be_created_is_refused(fmnist_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"output folder .*file/run is not writable \(Not a directory\)"):
        trainers.train(_tiny(fmnist_root, "data.batch_size=8"), blocker / "run")


def test_the_progress_bar_names_the_epoch(fmnist_root, tmp_path, capsys):
    trainers.train(_tiny(fmnist_root, "data.batch_size=8", "logging.progress=true", "runtime.threads=1"),
                   tmp_path / "run")
    assert "epoch 1/1" in capsys.readouterr().err  # tqdm, on stderr
