"""`advgkl train`: bad data settings refused before the run folder exists, a finished run resumed
without being touched, and a screen that summarises the recipe instead of printing all of it."""
import json

import pytest
import yaml

from advgkl import cli

TINY = ["data.subset=64", "data.batch_size=32", "model.name=tiny_cnn", "attack.steps=1", "optim.epochs=1",
        "eval.version=none", "eval.n_examples=16", "eval.honesty_checks=false", "logging.progress=false"]


@pytest.fixture
def recipe(fmnist_root, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "fashion_mnist", "root": str(fmnist_root)},
                                    "logging": {"wandb": "disabled"}}))
    return path


def train(recipe, out, *overrides, resume=False):
    return cli.main(["train", str(recipe), *TINY, *overrides, "--out", str(out)] + (["--resume"] if resume else []))


@pytest.mark.parametrize("override,message", [
    ("data.subset=100000", "data.subset=100000: the fashion_mnist training set has 60000 images (0 = all)"),
    ("data.val_size=60000 data.subset=0", "data.val_size=60000: the fashion_mnist training set has 60000 images"),
    ("eval.n_examples=20000", "eval.n_examples=20000: the fashion_mnist test set has 10000 points (0 = all)"),
])
def test_data_sizes_are_refused_before_the_run_folder_exists(recipe, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert train(recipe, out, *override.split()) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"advgkl train: error: {message}"
    assert not out.exists()


def test_subset_is_checked_after_the_held_out_images(recipe, tmp_path, capsys):
    assert train(recipe, tmp_path / "run", "data.val_size=1000", "data.subset=59500") == 2
    assert capsys.readouterr().err.splitlines()[0] == ("advgkl train: error: data.subset=59500: the fashion_mnist "
                                                       "training set has 59000 images after data.val_size=1000 (0 = all)")


def test_resuming_a_finished_run_leaves_it_untouched(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(recipe, out) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train(recipe, out, resume=True) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{out} has finished; its results.json is unchanged"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # other eval settings would replace the run's own results: refused, pointing at advgkl eval
    assert train(recipe, out, "eval.n_examples=32", resume=True) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"advgkl train: error: {out} has finished and was evaluated with other settings (eval.n_examples: 16 -> 32); "
        f"to evaluate its weights again, run advgkl eval {out / 'checkpoints' / 'final.pt'}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_run_saved_before_new_recipe_keys_still_resumes(recipe, tmp_path, capsys):
    """A results.json or last.pt written before optim.accumulate existed is read as this version reads it."""
    import torch

    from advgkl.checkpoint import atomic_torch_save, load_checkpoint

    out = tmp_path / "run"
    assert train(recipe, out, "optim.epochs=2", "runtime.checkpoint_every=1") == 0
    results = json.loads((out / "results.json").read_text())
    del results["config"]["optim"]["accumulate"], results["config"]["model"]["activation_checkpointing"]
    (out / "results.json").write_text(json.dumps(results))
    assert train(recipe, out, "optim.epochs=2", "runtime.checkpoint_every=1", resume=True) == 0
    (out / "results.json").unlink()  # an interrupted final evaluation: resume reads last.pt
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    del last["config"]["optim"]["accumulate"]
    atomic_torch_save(last, out / "checkpoints" / "last.pt")
    assert train(recipe, out, "optim.epochs=2", "runtime.checkpoint_every=1", resume=True) == 0
    assert torch.equal(load_checkpoint(out / "checkpoints" / "final.pt")["model"]["net.0.weight"],
                       last["model"]["net.0.weight"])


def test_records_of_a_run_killed_before_its_first_checkpoint_need_resume(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "step": 2}\n')
    assert train(recipe, out) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"advgkl train: error: {out} already holds a run; pass --resume to continue it, or choose another --out")


def test_the_screen_summarises_the_recipe_and_config_yaml_says_it_resumed(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(recipe, out, resume=True) == 0  # --resume on an empty folder starts the run
    header = capsys.readouterr().out.split("\n  full recipe:")[0].splitlines()
    assert header == [
        f"advgkl train -> {out}",
        "  data    fashion_mnist, 64 training images, 0 held out, batch 32, augment none",
        "  model   tiny_cnn",
        "  method  gkl_at (alpha 1.0, beta 5.0, gamma 1.0, weights prior, prior_temperature 4.0, symmetric True, "
        "sample_temperature 4.0, attack_beta 0.0, attack_gamma 1.0)",
        "  attack  pgd Linf eps 0.1, 1 steps, constant eps",
        "  optim   sgd, lr 0.1 cosine, 1 epochs; seed 0",
        "  eval    none",
    ]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["runtime"]["resume"] == "auto" and saved["runtime"]["dist_timeout_s"] == 1800


def test_a_nan_loss_before_any_checkpoint_names_none(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(recipe, out, "optim.lr=1e30", "data.subset=256") == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("advgkl train: error: the loss became nan at epoch 1, step ") and error.endswith(")")
    assert not (out / "checkpoints" / "last.pt").exists()
