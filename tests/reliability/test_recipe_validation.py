"""Issue 17: recipe validation that holds. Each mistake a new user made is refused before any compute,
from the command line, with exit code 2, one exact line naming the file, key or override, and no run
folder; checkpoints written before these rules keep loading (``from_saved``).

``advgkl.trainers.train`` is replaced by a stand-in that creates the run folder and returns at once: a
recipe that slips through then fails these tests in milliseconds (exit 0, a run folder) instead of
training (an empty recipe used to start the full default job). ``test_the_harness_sees_an_accepted_recipe``
shows that the stand-in is what an accepted recipe reaches.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from advgkl import cli, trainers
from advgkl.config import Config, apply_overrides, from_dict, from_saved, load_config
from advgkl.errors import UserError

# A small valid recipe: each case below breaks one thing in it (or in its overrides).
TINY = """\
name: t
data: {dataset: fashion_mnist, subset: 64, batch_size: 32}
model: {name: tiny_cnn}
method: {name: gkl_at}
attack: {norm: Linf, eps: 0.1, steps: 1}
optim: {lr: 0.05, epochs: 1}
eval: {version: none, n_examples: 16, batch_size: 16, honesty_checks: false}
logging: {wandb: disabled, progress: false}
runtime: {device: cpu}
"""
DEMO = "experiments/recipes/fmnist_gkl_demo.yaml"
METHODS = "standard, pgd_at, trades, mart, gkl_at, gkl_at_two_view, gkl_kd"
OPTIM_KEYS = ("accumulate, epochs, grad_clip, lr, milestones, momentum, name, nesterov, schedule, step_gamma, "
              "warmup_epochs, weight_decay")
TOP_KEYS = "attack, awp, data, ema, eval, logging, method, model, name, optim, runtime"


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A stand-in for the trainer: what an accepted recipe reaches, and what it leaves (the run folder)."""
    calls = []

    def train(cfg, out, resume=False):
        calls.append(cfg)
        Path(out).mkdir(parents=True)
        return {"clean_acc": 0.0, "autoattack_acc": None}

    monkeypatch.setattr(trainers, "train", train)
    return calls


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def write(tmp_path, content: str | bytes, name: str = "r.yaml") -> Path:
    recipe = tmp_path / name
    if isinstance(content, bytes):
        recipe.write_bytes(content)
    else:
        recipe.write_text(content, encoding="utf-8")
    return recipe


def refused(tmp_path, capsys, no_training, recipe: Path, *overrides: str) -> str:
    """Run ``advgkl train``; check exit 2, one stderr line, no output, no training, no run folder. The line."""
    run = tmp_path / "run"
    code = cli.main(["train", str(recipe), *overrides, "--out", str(run)])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, ""), captured
    assert not run.exists() and no_training == []
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    prefix = "advgkl train: error: "
    assert lines[0].startswith(prefix)
    return lines[0][len(prefix):]


def test_the_harness_sees_an_accepted_recipe(tmp_path, capsys, no_training):
    recipe = write(tmp_path, TINY)
    assert cli.main(["train", str(recipe), "optim.lr=0.2", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run").is_dir() and no_training[0].optim.lr == 0.2
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 1. an empty recipe file


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n# and another\n", "---\n", "{}\n", "~\n"])
def test_an_empty_recipe_file_is_refused(tmp_path, capsys, no_training, content):
    recipe = write(tmp_path, content)
    message = f"recipe {recipe} is empty; start from {DEMO}"
    assert refused(tmp_path, capsys, no_training, recipe) == message
    assert refused(tmp_path, capsys, no_training, recipe, "optim.epochs=1") == message  # overrides are no recipe


def test_an_empty_dict_from_python_is_still_the_defaults():
    assert from_dict({}) == Config()
    assert from_dict(apply_overrides({}, ["optim.epochs=3"])).optim.epochs == 3


# ---------------------------------------------------------------- 2. values that trained meaninglessly


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
    (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
    (["attack.eps=.inf"], "attack.eps: must be a finite number, got inf"),
    (["attack.eps=5"], "attack.eps: must be <= 1 with attack.norm Linf (images are in [0, 1]), got 5.0"),
    (["attack.eps=1.001"], "attack.eps: must be <= 1 with attack.norm Linf (images are in [0, 1]), got 1.001"),
    (["eval.eps=5"], "eval.eps: must be <= 1 with attack.norm Linf (images are in [0, 1]), got 5.0"),
    (["eval.eps=.inf"], "eval.eps: must be a finite number, got inf"),
    (["attack.norm=L2", "attack.eps=.inf"], "attack.eps: must be a finite number, got inf"),
    (["optim.epochs=1e20"], "optim.epochs: expected int, got str '1e20'"),
    (["optim.epochs=100000000000"], "optim.epochs: must be <= 100000, got 100000000000"),
    (["optim.epochs=100001"], "optim.epochs: must be <= 100000, got 100001"),
])
def test_meaningless_values_are_refused(tmp_path, capsys, no_training, overrides, message):
    assert refused(tmp_path, capsys, no_training, write(tmp_path, TINY), *overrides) == message


@pytest.mark.parametrize("overrides,check", [
    (["optim.lr=1e-9"], lambda c: c.optim.lr == 1e-9),
    (["attack.eps=1"], lambda c: c.attack.eps == 1.0),  # the largest L-inf radius on [0, 1] images
    (["eval.eps=1"], lambda c: c.eval.eps == 1.0),
    (["eval.eps=0"], lambda c: c.eval.eps == 0.0),  # 0 = the training eps
    (["attack.norm=L2", "attack.eps=5", "eval.eps=3"], lambda c: (c.attack.eps, c.eval.eps) == (5.0, 3.0)),
    (["optim.epochs=100000"], lambda c: c.optim.epochs == 100000),
])
def test_values_at_the_new_limits_are_accepted(tmp_path, overrides, check):
    assert check(load_config(write(tmp_path, TINY), overrides))


def test_configs_saved_before_the_new_limits_still_load():
    """A checkpoint of a run this code accepted before issue 17 must stay evaluable (advgkl eval, teachers)."""
    saved = Config().to_dict()
    saved["optim"].update(lr=0.0, epochs=10 ** 11)
    saved["attack"]["eps"] = 5.0
    saved["eval"]["eps"] = 5.0
    cfg = from_saved(saved)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.attack.eps, cfg.eval.eps) == (0.0, 10 ** 11, 5.0, 5.0)
    assert error_of(from_dict, saved) == "optim.lr: must be > 0, got 0.0"  # a new job may not


# ---------------------------------------------------------------- 3. duplicate keys


@pytest.mark.parametrize("content,message", [
    ("name: a\nname: b\n", "line 2: duplicate key 'name' (first on line 1)"),
    ("name: d\noptim:\n  lr: 0.1\n  epochs: 1\n  lr: 0.5\n", "line 5: duplicate key 'optim.lr' (first on line 3)"),
    ("optim: {lr: 0.1, lr: 0.5}\n", "line 1: duplicate key 'optim.lr' (first on line 1)"),
    ("optim: {lr: 0.1}\nname: x\noptim: {epochs: 2}\n", "line 3: duplicate key 'optim' (first on line 1)"),
    ("model:\n  name: tiny_cnn\n  kwargs: {width: 8, width: 16}\n",
     "line 3: duplicate key 'model.kwargs.width' (first on line 3)"),
    ("logging:\n  tags:\n    - {a: 1, a: 2}\n", "line 3: duplicate key 'logging.tags[0].a' (first on line 3)"),
    ("1: a\n0x1: b\n", "line 2: duplicate key '1' (first on line 1)"),  # equal once read, as in the dict
])
def test_duplicate_keys_in_a_recipe_are_refused_with_their_lines(tmp_path, capsys, no_training, content, message):
    recipe = write(tmp_path, content)
    assert refused(tmp_path, capsys, no_training, recipe) == f"recipe {recipe} {message}"


def test_duplicate_keys_in_a_whole_recipe_file_after_valid_sections(tmp_path, capsys, no_training):
    recipe = write(tmp_path, TINY + "optim: {lr: 0.1}\n")
    assert refused(tmp_path, capsys, no_training, recipe) == (
        f"recipe {recipe} line 10: duplicate key 'optim' (first on line 6)")


def test_duplicate_keys_in_an_override_value_are_refused(tmp_path, capsys, no_training):
    recipe = write(tmp_path, TINY)
    assert refused(tmp_path, capsys, no_training, recipe, "model.kwargs={width: 8, width: 16}") == (
        "override model.kwargs: duplicate key 'model.kwargs.width'")
    assert refused(tmp_path, capsys, no_training, recipe, "optim={lr: 0.1, epochs: 1, lr: 2}") == (
        "override optim: duplicate key 'optim.lr'")


def test_merge_keys_may_still_be_overridden_and_python_tags_stay_refused(tmp_path):
    # `<<` copies keys in; writing one of them again beside it is YAML's override, not a duplicate
    base = TINY.replace("optim: {lr: 0.05, epochs: 1}\n", "")
    recipe = write(tmp_path, base + "optim:\n  <<: {lr: 0.05, epochs: 1}\n  lr: 0.2\n")
    assert (load_config(recipe).optim.lr, load_config(recipe).optim.epochs) == (0.2, 1)
    evil = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n", "evil.yaml")
    assert error_of(load_config, evil).startswith(f"{evil}: not a valid recipe YAML (")
    message = error_of(apply_overrides, {}, ["name=!!python/object/apply:os.system ['echo pwned']"])
    assert message.startswith("override name: not a valid recipe YAML (")


# ---------------------------------------------------------------- 4. files that are not YAML text


def test_a_binary_recipe_is_one_line(tmp_path, capsys, no_training):
    recipe = write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert refused(tmp_path, capsys, no_training, recipe) == (
        f"recipe {recipe} is not a YAML text file (byte 0 is not UTF-8)")
    latin1 = write(tmp_path, "name: caf\xe9\n".encode("latin-1"), "latin1.yaml")
    assert error_of(load_config, latin1) == f"recipe {latin1} is not a YAML text file (byte 9 is not UTF-8)"


def test_control_characters_and_deep_nesting_are_one_line(tmp_path):
    nul = write(tmp_path, "name: a\x00b\n", "nul.yaml")
    assert error_of(load_config, nul).startswith(f"{nul}: not a valid recipe YAML (unacceptable character")
    deep = write(tmp_path, "name: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    assert error_of(load_config, deep) == f"{deep}: not a valid recipe YAML (nested too deeply)"


def test_a_utf8_recipe_with_a_byte_order_mark_loads(tmp_path):
    recipe = write(tmp_path, b"\xef\xbb\xbf" + TINY.replace("name: t\n", "name: caf\xe9\n").encode("utf-8"))
    assert load_config(recipe).name == "caf\xe9"


def test_a_folder_is_named_as_a_folder(tmp_path, capsys, no_training):
    folder = tmp_path / "recipes.yaml"
    folder.mkdir()
    assert refused(tmp_path, capsys, no_training, folder) == f"recipe {folder} is a folder, not a YAML file"
    assert refused(tmp_path, capsys, no_training, tmp_path / "nope.yaml") == (
        f"recipe {tmp_path / 'nope.yaml'} does not exist")


# ---------------------------------------------------------------- 5. misspellings: the close name


@pytest.mark.parametrize("overrides,message", [
    (["method.name=gklat"], f"method.name: 'gklat' is not one of {METHODS}; did you mean 'gkl_at'?"),
    (["method.name=GKL_AT"], f"method.name: 'GKL_AT' is not one of {METHODS}; did you mean 'gkl_at'?"),
    (["method.name=at"], f"method.name: 'at' is not one of {METHODS}"),  # nothing close: no guess (not 'mart')
    (["optim.lrr=0.1"], f"unknown key optim.lrr in optim; allowed keys: {OPTIM_KEYS}; did you mean 'lr'?"),
    (["optim.learning_rate=0.1"], f"unknown key optim.learning_rate in optim; allowed keys: {OPTIM_KEYS}"),
    (["optimizer.lr=0.1"], f"unknown key optimizer in top level; allowed keys: {TOP_KEYS}; did you mean 'optim'?"),
    (["method.betta=3"], "unknown key method.betta in method gkl_at; allowed keys: alpha, attack_beta, attack_gamma, "
                         "beta, gamma, name, prior_temperature, sample_temperature, symmetric, weights; "
                         "did you mean 'beta'?"),
    (["attack.name=pgdd"], "attack.name: 'pgdd' is not one of pgd, fgsm; did you mean 'pgd'?"),
    (["attack.norm=linf"], "attack.norm: 'linf' is not one of Linf, L2; did you mean 'Linf'?"),
    (["data.dataset=fashion-mnist"], "data.dataset: 'fashion-mnist' is not one of cifar10, cifar100, "
                                     "fashion_mnist, imagefolder, imagenet, mnist, svhn; did you mean 'fashion_mnist'?"),
    (["optim.name=adam"], "optim.name: 'adam' is not one of sgd, adamw; did you mean 'adamw'?"),
])
def test_a_misspelt_key_or_choice_suggests_the_close_one(tmp_path, capsys, no_training, overrides, message):
    assert refused(tmp_path, capsys, no_training, write(tmp_path, TINY), *overrides) == message


def test_a_misspelt_model_suggests_the_registered_one(tmp_path, capsys, no_training):
    message = refused(tmp_path, capsys, no_training, write(tmp_path, TINY), "model.name=smallcnn")
    assert message.startswith("model.name: 'smallcnn' is not one of ")
    assert message.endswith("; did you mean 'small_cnn'?")


def test_a_misspelt_key_in_the_recipe_file_itself(tmp_path, capsys, no_training):
    recipe = write(tmp_path, TINY.replace("data: {dataset:", "data: {datset:"))
    message = refused(tmp_path, capsys, no_training, recipe)
    assert message.startswith("unknown key data.datset in data; allowed keys: ")
    assert message.endswith("; did you mean 'dataset'?")


# ---------------------------------------------------------------- 6. overrides into sections; odd keys


@pytest.mark.parametrize("section", ["", "optim:\n", "optim: null\n"])  # absent, or written empty
def test_an_override_into_an_absent_or_empty_section_creates_it(tmp_path, capsys, no_training, section):
    recipe = write(tmp_path, TINY.replace("optim: {lr: 0.05, epochs: 1}\n", section))
    assert cli.main(["train", str(recipe), "optim.lr=0.2", "--out", str(tmp_path / "run")]) == 0
    assert no_training[0].optim.lr == 0.2 and no_training[0].optim.epochs == Config().optim.epochs


def test_an_override_into_an_absent_method_section_uses_the_default_method():
    assert from_dict(apply_overrides({"name": "x"}, ["method.beta=3"])).method.beta == 3.0
    assert from_dict(apply_overrides({"method": None}, ["method.beta=3"])).method.name == "gkl_at"


@pytest.mark.parametrize("overrides,message", [
    (["optim=3", "optim.lr=1"], "override optim.lr: optim is 3, not a section"),
    (["name.x=1"], "override name.x: name is 't', not a section"),
    (["model.kwargs.width=8", "model.kwargs.width.x=1"], "override model.kwargs.width.x: model.kwargs.width is 8, "
                                                           "not a section"),
    (["optim.=1"], "override 'optim.=1': expected dotted.key=value, e.g. optim.lr=0.1"),
    ([".lr=1"], "override '.lr=1': expected dotted.key=value, e.g. optim.lr=0.1"),
    (["=1"], "override '=1': expected dotted.key=value, e.g. optim.lr=0.1"),
    (["optim=3"], "optim: expected a mapping of keys, got 3"),
])
def test_overrides_that_cannot_apply_name_the_culprit(tmp_path, capsys, no_training, overrides, message):
    assert refused(tmp_path, capsys, no_training, write(tmp_path, TINY), *overrides) == message


@pytest.mark.parametrize("extra,message", [
    ("1: x\n", f"unknown key 1 in top level; allowed keys: {TOP_KEYS}"),
    ("zzz: y\n1: x\nnull: z\n", f"unknown key 1 in top level; allowed keys: {TOP_KEYS}"),  # int, str, None
    ("true: x\nzzz: y\n", f"unknown key True in top level; allowed keys: {TOP_KEYS}"),
])
def test_unknown_keys_of_mixed_types_are_one_line(tmp_path, capsys, no_training, extra, message):
    assert refused(tmp_path, capsys, no_training, write(tmp_path, TINY + extra)) == message


def test_unknown_non_string_keys_inside_sections(tmp_path):
    assert error_of(from_dict, {"optim": {1: "a", "lrr": 2}}) == (
        f"unknown key optim.1 in optim; allowed keys: {OPTIM_KEYS}")
    assert error_of(from_dict, {"model": {"kwargs": {1: 2}}}) == (
        "model.kwargs: expected a mapping of option names to values, got {1: 2}")
