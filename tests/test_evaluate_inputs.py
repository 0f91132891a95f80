"""advgkl.evaluate: weights that do not fit, honesty warnings, and the overrides of ``advgkl eval``."""
import json

import pytest
import torch
from torch import nn

from advgkl import evaluate, trainers
from advgkl.checkpoint import FORMAT
from advgkl.config import from_dict
from advgkl.errors import UserError


def make_cfg(**sections):
    """A small valid recipe; ``sections`` replace whole keys inside a section, e.g. eval={...}."""
    raw = {
        "name": "t", "data": {"dataset": "fashion_mnist", "root": "", "batch_size": 32},
        "model": {"name": "tiny_cnn"}, "attack": {"eps": 0.1, "steps": 2},
        "eval": {"n_examples": 16, "version": "none", "batch_size": 16, "honesty_checks": False},
        "logging": {"wandb": "disabled", "progress": False}, "runtime": {"seed": 0},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return raw


class ConstantModel(nn.Module):
    """Predicts class ``c`` for every image, with zero input gradient: the textbook masked gradient."""

    def __init__(self, c: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))
        with torch.no_grad():
            self.bias[c] = 5.0

    def forward(self, x):
        return self.bias + 0.0 * x.flatten(1).sum(1, keepdim=True)


# ---------------------------------------------------------------- model_from_checkpoint

def test_weights_of_another_architecture_are_a_one_line_user_error(tmp_path):
    cfg = from_dict(make_cfg())
    other = trainers.build_model(from_dict(make_cfg(model={"name": "mini_cnn"})))
    path = tmp_path / "final.pt"
    with pytest.raises(UserError) as err:
        evaluate.model_from_checkpoint({"model": other.state_dict()}, cfg, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: weights do not fit model tiny_cnn (") and msg.endswith(")")
    assert "\n" not in msg and err.value.__cause__ is None


def test_ema_weights_are_preferred_when_the_checkpoint_has_them():
    cfg = from_dict(make_cfg())
    torch.manual_seed(0)
    plain, ema = trainers.build_model(cfg).state_dict(), trainers.build_model(cfg).state_dict()
    model, which = evaluate.model_from_checkpoint({"model": plain, "ema": ema}, cfg, "x.pt")
    assert which == "ema" and all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    model, which = evaluate.model_from_checkpoint({"model": plain, "ema": None}, cfg, "x.pt")
    assert which == "model" and all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- evaluate_model: honesty warnings

def test_masked_gradients_are_flagged_and_printed(fmnist_root, fmnist_test_small, tmp_path, capsys):
    n = 16
    y = fmnist_test_small[1][:n]
    c = int(torch.bincount(y, minlength=10).argmax())
    acc = (y == c).double().mean().item()  # the constant model's accuracy at every eps, by hand
    assert acc > 0.05 + 1 / n  # the huge-eps check must fire: a constant model cannot be attacked
    cfg = from_dict(make_cfg(data={"root": str(fmnist_root)},
                             eval={"n_examples": n, "honesty_checks": True, "honesty_pgd_steps": 2}))

    result = evaluate.evaluate_model(ConstantModel(c), cfg, "cpu", tmp_path, tag="t0")

    assert result["clean_acc"] == pytest.approx(acc, abs=1e-7) and result["autoattack_acc"] is None
    warning = (f"PGD accuracy at the huge eps 1 is {acc:.1%}, not ~0: gradients do not lead the attack "
               "(masked or obfuscated gradients)")
    assert result["honesty"]["warnings"] == [warning]
    assert result["honesty"]["suspicious_gradient_masking"] is True
    by_eps = result["honesty"]["pgd_acc_by_eps"]
    assert len(by_eps) == 6 and all(a == pytest.approx(acc, abs=1e-7) for a in by_eps.values())  # flat in eps
    out = capsys.readouterr().out
    assert f"[t0] WARNING suspicious robustness number: {warning}\n" in out


# ---------------------------------------------------------------- evaluate_checkpoint overrides

def test_eval_overrides_replace_the_checkpoints_recipe(make_cifar, tmp_path):
    fake = make_cifar("cifar10", n_train=10, n_test=20)
    raw = make_cfg(data={"dataset": "cifar10", "root": str(tmp_path / "no-data-here")},
                   eval={"n_examples": 1000, "version": "custom", "attacks": ["apgd-ce"], "batch_size": 500},
                   runtime={"seed": 0, "threads": torch.get_num_threads() + 1})
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = trainers.build_model(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": FORMAT, "config": raw, "model": model.state_dict()}, ckpt)

    threads = torch.get_num_threads()
    try:
        results = evaluate.evaluate_checkpoint(ckpt, n_examples=12, version="none", attacks=[], batch_size=5,
                                               device="cpu", wandb="disabled", data_root=str(fake.root))
        assert torch.get_num_threads() == threads + 1  # runtime.threads of the recipe is applied
    finally:
        torch.set_num_threads(threads)

    with torch.no_grad():  # clean accuracy computed here, on the same 12 test images
        expected = (model.eval()(fake.test_images[:12].float() / 255).argmax(1) == fake.test_labels[:12])
    assert results["n_examples"] == 12 and results["autoattack_acc"] is None
    assert results["clean_acc"] == pytest.approx(expected.double().mean().item(), abs=1e-7)
    assert results["autoattack_version"] == "none" and results["evaluated_weights"] == "model"
    assert results["config"]["eval"]["batch_size"] == 5 and results["config"]["eval"]["attacks"] == []
    assert results["config"]["data"]["root"] == str(fake.root)  # read from here, not the recipe's empty folder
    assert results["out"] == str(tmp_path / "run" / "eval_final")
    saved = json.loads((tmp_path / "run" / "eval_final" / "results.json").read_text())
    assert saved["clean_acc"] == results["clean_acc"] and saved["checkpoint"] == str(ckpt)


def test_eval_asks_for_cuda_in_the_flag_the_user_typed(tmp_path, monkeypatch):
    raw = make_cfg()
    ckpt = tmp_path / "final.pt"
    torch.save({"format": FORMAT, "config": raw, "model": trainers.build_model(from_dict(raw)).state_dict()}, ckpt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as err:
        evaluate.evaluate_checkpoint(ckpt, device="cuda", wandb="disabled", out=tmp_path / "out")
    assert str(err.value) == "--device cuda but CUDA is not available here; use --device cpu"
    assert not (tmp_path / "out").exists()
