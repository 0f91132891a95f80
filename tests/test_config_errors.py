"""Every way a recipe or an override can be wrong: one exact UserError line naming the key (or the file),
and from the CLI exit code 2 with that line on stderr. Boundaries are checked on both sides."""
import dataclasses
import runpy
import sys

import pytest

from advgkl import cli
from advgkl.config import Config, OptimConfig, apply_overrides, from_dict, load_config
from advgkl.data import DATASETS
from advgkl.errors import UserError
from advgkl.models import list_models


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message  # one line, whatever the mistake
    return message


def overridden(*overrides: str) -> Config:
    return from_dict(apply_overrides({}, list(overrides)))


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("overrides,message", [
    (["optim.epochs=two"], "optim.epochs: expected int, got str 'two'"),
    (["ema.enabled=3"], "ema.enabled: expected bool, got int 3"),
    (["optim.lr="], "optim.lr: expected float, got str ''"),  # an empty value is '', never a silent default
    (["name=[a, b]"], "name: expected str, got list ['a', 'b']"),
    (["optim.epochs=8/2"], "optim.epochs: expected int, got str '8/2'"),  # fractions are for floats only
    # list fields: a scalar is refused as a whole, a bad item by its index
    (["logging.tags=a"], "logging.tags: expected a list of str, got 'a'"),
    (["optim.milestones=0.5"], "optim.milestones: expected a list of float, got 0.5"),
    (["optim.milestones=[0.5, late]"], "optim.milestones[1]: expected float, got str 'late'"),
    # a section given a scalar
    (["optim=fast"], "optim: expected a mapping of keys, got 'fast'"),
    (["data=5"], "data: expected a mapping of keys, got 5"),
    (["attack.eps=1/0"], "attack.eps: division by zero in '1/0'"),
    (["attack.eps=0/0"], "attack.eps: division by zero in '0/0'"),
])
def test_wrong_types_name_the_key_and_the_value(overrides, message):
    assert error_of(overridden, *overrides) == message


def test_a_recipe_that_is_not_a_mapping_is_named_as_the_recipe():
    assert error_of(from_dict, ["a"]) == "recipe: expected a mapping of keys, got ['a']"


def test_fractions_are_floats_also_inside_lists():
    cfg = overridden("attack.eps=8/255", "optim.milestones=[1/2, 3/4]", "method.beta=3 / 2")
    assert cfg.attack.eps == 8 / 255
    assert cfg.optim.milestones == [0.5, 0.75]
    assert cfg.method.beta == 1.5


def test_unknown_keys_list_what_is_allowed_where():
    assert error_of(overridden, "bogus=1") == (
        "unknown key bogus in top level; allowed keys: "
        "attack, awp, data, ema, eval, logging, method, model, name, optim, runtime")
    message = error_of(overridden, "optim.lrr=0.1")
    head, allowed = message.split("; allowed keys: ")
    assert head == "unknown key optim.lrr in optim"
    allowed, hint = allowed.split("; ")  # a close allowed key is suggested last
    assert allowed.split(", ") == sorted(f.name for f in dataclasses.fields(OptimConfig))
    assert hint == "did you mean 'lr'?"


# ---------------------------------------------------------------- values, each rule at its boundary


@pytest.mark.parametrize("overrides,message", [
    (["attack.norm=Linfinity"], "attack.norm: 'Linfinity' is not one of Linf, L2"),
    (["logging.wandb=sometimes"], "logging.wandb: 'sometimes' is not one of offline, online, disabled"),
    (["attack.eps=-0.1"], "attack.eps: must be >= 0, got -0.1"),
    (["data.subset=-1"], "data.subset: must be >= 0, got -1"),
    (["optim.epochs=0"], "optim.epochs: must be > 0, got 0"),
    (["data.batch_size=-8"], "data.batch_size: must be > 0, got -8"),
    (["data.generated=g.npz", "data.generated_ratio=1"], "data.generated_ratio: must be in [0, 1), got 1.0"),
    (["data.generated_ratio=0.5"], "data.generated_ratio > 0 needs data.generated (path to an .npz file)"),
    (["method.name=standard", "method.label_smoothing=1"], "method.label_smoothing: must be in [0, 1), got 1.0"),
    # each method has its own option group: another method's option is an unknown key
    (["method.name=trades", "method.label_smoothing=0.1"],
     "unknown key method.label_smoothing in method trades; allowed keys: beta, name"),
    (["method.name=pgd_at", "method.beta=3"], "unknown key method.beta in method pgd_at; allowed keys: label_smoothing, name"),
    (["method.name=gkl_at", "method.weights=uniform"], "method.weights: 'uniform' is not one of prior, sample"),
    (["method.name=gkl_at", "method.prior_temperature=0"], "method.prior_temperature: must be > 0, got 0.0"),
    (["method.name=trades", "method.beta=-1"], "method.beta: must be >= 0, got -1.0"),
    (["method.name=at"], "method.name: 'at' is not one of standard, pgd_at, trades, mart, gkl_at, gkl_at_two_view, gkl_kd"),
    (["attack.name=cw"], "attack.name: 'cw' is not one of pgd, fgsm"),
    (["model.kwargs=[1]"], "model.kwargs: expected a mapping of option names to values, got [1]"),
    (["method.name=gkl_kd"], "method.teacher: gkl_kd needs a teacher (checkpoint path or robustbench:NAME)"),
    (["attack.eps=0"], "method gkl_at needs attack.eps > 0 and attack.steps > 0"),
    (["method.name=trades", "attack.steps=0"], "method trades needs attack.eps > 0 and attack.steps > 0"),
    # robust distillation attacks too, although gkl_kd itself is not an adversarial method
    (["method.name=gkl_kd", "method.teacher=t.pt", "method.kd_adversarial=true", "attack.eps=0"],
     "method gkl_kd needs attack.eps > 0 and attack.steps > 0"),
    (["method.name=standard", "awp.enabled=true"], "awp.enabled needs an adversarial method; standard trains on clean inputs"),
    (["ema.decay=1"], "ema.decay: must be in (0, 1), got 1.0"),
    (["ema.decay=0"], "ema.decay: must be in (0, 1), got 0.0"),
    (["optim.epochs=4", "optim.warmup_epochs=4"], "optim.warmup_epochs must be smaller than optim.epochs"),
    (["eval.version=custom"], "eval.version custom needs eval.attacks (e.g. [apgd-ce, apgd-t])"),
    (["data.subset=100", "data.val_size=100"], "data.val_size must be smaller than data.subset"),
    (["runtime.device=tpu"], "runtime.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    (["runtime.device=cuda:x"], "runtime.device: 'cuda:x' is not one of auto, cpu, cuda, cuda:N"),
    # NaN passes every range check (comparisons with it are false): floats must be finite
    (["optim.lr=.nan"], "optim.lr: must be a finite number, got nan"),
    (["attack.eps=.inf"], "attack.eps: must be a finite number, got inf"),
    (["method.beta=-.inf"], "method.beta: must be a finite number, got -inf"),
    (["optim.weight_decay=1e400"], "optim.weight_decay: must be a finite number, got '1e400'"),  # a YAML string
    (["data.generated_ratio=.NaN"], "data.generated_ratio: must be a finite number, got nan"),
])
def test_impossible_values_are_refused_with_the_rule(overrides, message):
    assert error_of(overridden, *overrides) == message


@pytest.mark.parametrize("overrides,check", [
    (["data.generated=g.npz", "data.generated_ratio=0.99"], lambda c: c.data.generated_ratio == 0.99),
    (["method.name=pgd_at", "method.label_smoothing=0.1"], lambda c: c.method.label_smoothing == 0.1),
    (["method.name=standard", "attack.eps=0", "attack.steps=0"], lambda c: c.attack.steps == 0),  # no attack needed
    (["ema.decay=0.5"], lambda c: c.ema.decay == 0.5),
    (["optim.epochs=4", "optim.warmup_epochs=3.5"], lambda c: c.optim.warmup_epochs == 3.5),
    (["data.subset=100", "data.val_size=99"], lambda c: c.data.val_size == 99),
    (["data.val_size=100"], lambda c: c.data.val_size == 100),  # subset 0 = all: checked against the data later
    (["runtime.device=cuda:1"], lambda c: c.runtime.device == "cuda:1"),
])
def test_values_just_inside_each_rule_are_accepted(overrides, check):
    assert check(overridden(*overrides))


@pytest.mark.parametrize("key,value,registry", [
    ("data.dataset", "places365", sorted(DATASETS)),
    ("model.name", "vgg9000", list_models()),
])
def test_registry_names_are_listed_in_full(key, value, registry):
    message = error_of(overridden, f"{key}={value}")
    head, allowed = message.split(" is not one of ")
    assert head == f"{key}: {value!r}"
    assert allowed.split(", ") == list(registry)


# ---------------------------------------------------------------- overrides and recipe files


def test_override_syntax_errors_name_the_override():
    assert error_of(apply_overrides, {}, ["method.beta"]) == (
        "override 'method.beta': expected dotted.key=value, e.g. optim.lr=0.1")
    message = error_of(apply_overrides, {}, ["optim.milestones=[1, 2"])
    assert message.startswith("override optim.milestones: not a valid recipe YAML (") and message.endswith(")")
    assert error_of(apply_overrides, {"name": "demo"}, ["name.x=1"]) == "override name.x: name is 'demo', not a section"


def test_an_override_into_a_scalar_of_a_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: demo\n")
    assert error_of(load_config, recipe, ["name.x=1"]) == "override name.x: name is 'demo', not a section"


@pytest.mark.parametrize("content", ["", "# only a comment\n", "---\n"])
def test_an_empty_recipe_is_refused_even_with_overrides(tmp_path, content):  # issue 17: it was a default run
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(content)
    message = f"recipe {recipe} is empty; start from experiments/recipes/fmnist_gkl_demo.yaml"
    assert error_of(load_config, recipe) == message
    assert error_of(load_config, recipe, ["optim.epochs=3"]) == message
    assert from_dict({}) == Config()  # from Python, a partial (or empty) dict is still the defaults


@pytest.mark.parametrize("content,kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_a_recipe_that_is_not_a_mapping_names_the_file_and_what_it_is(tmp_path, content, kind):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    assert error_of(load_config, recipe) == f"{recipe}: a recipe must be a YAML mapping of sections, got {kind}"


def test_missing_or_unreadable_recipe_names_the_file(tmp_path):
    assert error_of(load_config, tmp_path / "nope.yaml") == f"recipe {tmp_path / 'nope.yaml'} does not exist"
    assert error_of(load_config, tmp_path) == f"recipe {tmp_path} is a folder, not a YAML file"
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [1, 2\n")
    message = error_of(load_config, broken)
    assert message.startswith(f"{broken}: not a valid recipe YAML (") and message.endswith(")")


# ---------------------------------------------------------------- the CLI


def test_cli_prints_exactly_one_line_and_exits_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {epochs: 0}\n")
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "advgkl train: error: optim.epochs: must be > 0, got 0\n"
    assert captured.out == ""
    assert not (tmp_path / "run").exists()


def test_cli_under_torchrun_names_the_failing_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = tmp_path / "nope.yaml"
    assert cli.main(["train", str(missing)]) == 2
    assert capsys.readouterr().err == f"advgkl train (rank 1 of 2): error: recipe {missing} does not exist\n"


def test_python_dash_m_advgkl_cli_exits_with_mains_code(tmp_path, capsys, monkeypatch):
    # What `python -m advgkl.cli ...` runs, in this process: a fresh interpreter would spend ~2 s importing torch.
    missing = tmp_path / "nope.yaml"
    monkeypatch.setattr(sys, "argv", ["advgkl", "train", str(missing)])
    monkeypatch.delitem(sys.modules, "advgkl.cli")  # as in a fresh `python -m` (and no runpy warning)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("advgkl.cli", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"advgkl train: error: recipe {missing} does not exist\n"


def test_cli_works_without_the_robustbench_commands(tmp_path, capsys, monkeypatch):
    assert cli.build_parser().parse_args(["leaderboard"]).command == "leaderboard"  # present when importable
    monkeypatch.setitem(sys.modules, "advgkl.robustbench_io", None)  # makes its import raise ImportError
    parser = cli.build_parser()
    assert parser.parse_args(["eval", "x.pt"]).checkpoint == "x.pt"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["leaderboard"])
    assert exit_.value.code == 2
    assert "invalid choice: 'leaderboard'" in capsys.readouterr().err
    missing = tmp_path / "nope.yaml"
    assert cli.main(["train", str(missing)]) == 2  # train and eval keep working
    assert capsys.readouterr().err == f"advgkl train: error: recipe {missing} does not exist\n"
