"""Recipes: safe YAML, dotted overrides, every user mistake is one clear message before any compute."""
from pathlib import Path

import pytest
import yaml

from advgkl import cli
from advgkl.config import Config, apply_overrides, from_dict, load_config, to_yaml
from advgkl.errors import UserError

RECIPES = sorted(Path(__file__).parent.parent.joinpath("experiments", "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_shipped_recipes_cover_the_published_settings():
    names = {p.stem for p in RECIPES}
    assert {"fmnist_gkl_demo", "cifar10_gkl_wrn34_awp_ema", "cifar100_gkl_wrn34_awp_ema",
            "cifar100_gkl_wrn34_autoaug", "cifar10_gkl_wrn28_swish_generated",
            "cifar10_trades_wrn34", "cifar10_pgd_at_wrn34"} <= names
    c10 = load_config(RECIPES[[p.stem for p in RECIPES].index("cifar10_gkl_wrn34_awp_ema")])
    assert (c10.method.alpha, c10.method.beta, c10.attack.steps) == (4.0, 20.0, 5)
    assert c10.attack.eps == pytest.approx(8 / 255) and c10.attack.eps_schedule == "linear"
    assert c10.awp.enabled and c10.ema.enabled and (c10.ema.every, c10.ema.start_epoch) == ("epoch", 1)


def test_overrides_parse_yaml_scalars_and_fractions():
    raw = apply_overrides({}, ["optim.weight_decay=5e-4", "optim.lr=0.2", "method.beta=6", "data.subset=2000", "attack.eps=8/255",
                               "logging.tags=[a, b]", "ema.enabled=true", "model.name=tiny_cnn"])
    cfg = from_dict(raw)
    assert cfg.optim.weight_decay == 5e-4  # PyYAML reads 5e-4 as a string; the config accepts it
    assert cfg.optim.lr == 0.2 and cfg.method.beta == 6.0 and isinstance(cfg.method.beta, float)
    assert cfg.data.subset == 2000 and cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.logging.tags == ["a", "b"] and cfg.ema.enabled is True
    # YAML 1.1 reads on/off as booleans: the on/off settings take them back as written
    on_off = from_dict(apply_overrides({}, ["runtime.channels_last=on"])).runtime.channels_last
    assert on_off == "on" and from_dict({"runtime": {"channels_last": False}}).runtime.channels_last == "off"
    with pytest.raises(UserError, match="runtime.amp: expected str, got bool True"):
        from_dict(apply_overrides({}, ["runtime.amp=on"]))


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown key optim.lrr"),
    ("bogus.x=1", "unknown key bogus"),
    ("optim.epochs=two", "optim.epochs: expected int"),
    ("optim.epochs=1.5", "optim.epochs: expected int"),
    ("ema.enabled=3", "ema.enabled: expected bool"),
    ("attack.eps=-0.1", "attack.eps: must be >= 0"),
    ("method.beta=-1", "method.beta: must be >= 0"),
    ("method.name=fgsm_magic", "method.name: 'fgsm_magic' is not one of standard, pgd_at"),
    ("model.name=resnet9000", "model.name: 'resnet9000' is not one of"),
    ("data.dataset=imagenet21k", "data.dataset: 'imagenet21k' is not one of"),
    ("attack.norm=Linfinity", "attack.norm"),
    ("ema.decay=1.5", "ema.decay"),
    ("optim.epochs=0", "optim.epochs: must be > 0"),
    ("attack.eps=1/0", "division by zero"),
    ("logging.wandb=sometimes", "logging.wandb"),
    ("runtime.device=tpu", "runtime.device"),
    ("data.generated_ratio=0.5", "needs data.generated"),
    ("awp.enabled=true", None),  # fine for gkl_at, the default method
])
def test_bad_values_name_the_key_and_the_allowed_values(override, message):
    if message is None:
        from_dict(apply_overrides({}, [override]))
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        from_dict(apply_overrides({}, [override]))


def test_method_specific_checks():
    with pytest.raises(UserError, match="needs a teacher"):
        from_dict({"method": {"name": "gkl_kd"}})
    with pytest.raises(UserError, match="awp.enabled needs an adversarial method"):
        from_dict({"method": {"name": "standard"}, "awp": {"enabled": True}})
    with pytest.raises(UserError, match="label_smoothing"):
        from_dict({"method": {"name": "trades", "label_smoothing": 0.1}})
    with pytest.raises(UserError, match="eval.version custom needs eval.attacks"):
        from_dict({"eval": {"version": "custom"}})


def test_python_object_tags_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError, match="not a valid recipe YAML"):
        load_config(evil)
    assert not Path("pwned").exists()


def test_defaults_are_valid():
    assert from_dict({}) == Config()


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("content,overrides,message", [
    ("data: {datset: cifar10}\n", [], "unknown key data.datset"),
    ("optim: {epochs: ten}\n", [], "optim.epochs: expected int"),
    ("attack: {eps: -1}\n", [], "attack.eps: must be >= 0"),
    ("name: !!python/object/apply:os.system ['echo hacked']\n", [], "not a valid recipe YAML"),
    ("data: [1, 2\n", [], "not a valid recipe YAML"),
    ("- just\n- a list\n", [], "must be a YAML mapping"),
    ("name: ok\n", ["method.beta"], "expected dotted.key=value"),
])
def test_cli_config_errors_exit_2_with_one_message_and_no_traceback(tmp_path, capsys, content, overrides, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    code, err = _cli(capsys, "train", str(recipe), *overrides, "--out", str(tmp_path / "run"))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # failed before any output or compute


def test_cli_missing_recipe(tmp_path, capsys):
    code, err = _cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err
