"""What the CLI says when the user gets something wrong (issue 17): argparse messages, files that are not
checkpoints, ``--offline`` runs missing a file, and interruptions. Each case checks the exit code, the exact
first line(s) printed and that nothing was created; nothing here downloads or trains (the commands' work
is replaced where a case needs it to return or to be interrupted)."""
from __future__ import annotations

import importlib
import os
import zipfile

import numpy as np
import pytest
import torch

import advgkl.config
import advgkl.data
import advgkl.evaluate
import advgkl.trainers
from advgkl import robustbench_io as rbio
from advgkl.checkpoint import FORMAT
from advgkl.cli import main
from test_robustbench import R18, r18_setup  # noqa: F401  (tests/ is on sys.path; r18_setup is a fixture)

rbcli = importlib.import_module("advgkl.robustbench_io.cli")
RECIPE = "experiments/recipes/fmnist_gkl_demo.yaml"
XCIT = "Debenedetti2022Light_XCiT-S12"  # cifar10 Linf; timm downloads its weights (no Google-Drive id)
XCIT_URL = "https://github.com/RobustBench/robustbench/releases/download/v1.1/debenedetti2022light-xcit-s-cifar10-linf.pth.tar"


@pytest.fixture(autouse=True)
def _not_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):  # the CLI names the rank under torchrun; these tests run alone
        monkeypatch.delenv(var, raising=False)


def run(capsys, argv) -> tuple[int, list[str], list[str]]:
    """main(argv) -> (exit code, stdout lines, stderr lines); argparse's SystemExit becomes its code."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def error_line(capsys, argv) -> str:
    """The one stderr line of a command that fails with a UserError (exit 2, nothing on stdout)."""
    code, out, err = run(capsys, argv)
    assert (code, out, len(err)) == (2, [], 1), (code, out, err)
    return err[0]


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------
# A. argparse: help, a missing recipe, unknown flags, --resume on eval

def test_top_level_help_is_plain_text(capsys):
    code, out, err = run(capsys, ["--help"])
    assert code == 0 and err == []
    text = " ".join(" ".join(out).split())  # argparse wraps the usage line to the terminal's width
    assert text.startswith("usage: advgkl [-h] {train,eval,sweep,summarize,leaderboard,reproduce,export-robustbench} ...")
    assert "``" not in text
    assert "Adversarial training and robustness evaluation: train | eval | leaderboard | reproduce | " \
           "export-robustbench | sweep | summarize." in text


def test_eval_help_describes_the_checkpoint_and_resume(capsys):
    code, out, _ = run(capsys, ["eval", "--help"])
    assert code == 0
    text = " ".join(" ".join(out).split())
    assert "checkpoint an advgkl checkpoint, e.g. runs/<name>/checkpoints/final.pt" in text
    assert "--resume continue an interrupted evaluation in --out" in text


def test_train_without_a_recipe_says_the_recipe_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["train"])
    assert (code, out) == (2, [])
    assert err == ["usage: advgkl train [-h] [--out OUT] [--resume] recipe [overrides ...]",
                   "advgkl train: error: the recipe is missing: give a YAML recipe, e.g. "
                   "advgkl train experiments/recipes/fmnist_gkl_demo.yaml"]
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("argv,usage,error", [
    (["train", RECIPE, "--epochs", "3"], "usage: advgkl train [-h] [--out OUT] [--resume] recipe [overrides ...]",
     "advgkl train: error: unrecognized arguments: --epochs 3; recipe settings are dotted overrides after the "
     "recipe, e.g. optim.epochs=2"),
    (["eval", "final.pt", "--epsilon", "0.1"], "usage: advgkl eval [-h] [--out OUT] [--n-examples N_EXAMPLES]",
     "advgkl eval: error: unrecognized arguments: --epsilon 0.1"),
    (["leaderboard", "--bogus"], "usage: advgkl leaderboard [-h] [--dataset {cifar10,cifar100,imagenet}]",
     "advgkl leaderboard: error: unrecognized arguments: --bogus"),
])
def test_an_unknown_flag_prints_the_subcommands_usage_and_names_the_flag(capsys, tmp_path, monkeypatch, argv,
                                                                         usage, error):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, argv)
    assert (code, out) == (2, [])
    assert err[0] == usage and err[-1] == error
    assert not any(line.startswith("usage: advgkl [-h]") for line in err)  # not the top-level usage
    assert files_under(tmp_path) == []


def _fake_results(out, per_attack):
    return {"out": str(out), "clean_acc": 0.845, "autoattack_acc": 0.63 if per_attack else None,
            "per_attack_robust_acc": per_attack}


PER_ATTACK = {"clean": 0.845, "apgd-ce": 0.645, "apgd-t": 0.63}


@pytest.mark.parametrize("extra,resume", [([], False), (["--resume"], True)])
def test_eval_passes_resume_and_prints_the_per_attack_accuracies(capsys, tmp_path, monkeypatch, extra, resume):
    seen = {}

    def fake_evaluate(path, **kw):
        seen.update(kw, path=path)
        return _fake_results(tmp_path / "ev", PER_ATTACK)

    monkeypatch.setattr(advgkl.evaluate, "evaluate_checkpoint", fake_evaluate)
    code, out, err = run(capsys, ["eval", "final.pt", "--out", str(tmp_path / "ev"), *extra])
    assert (code, err) == (0, [])
    assert seen["path"] == "final.pt" and seen["resume"] is resume and seen["out"] == str(tmp_path / "ev")
    assert out == [f"results: {tmp_path / 'ev' / 'results.json'}  clean_acc=0.8450  autoattack_acc=0.63  "
                   f"(clean 0.845 -> apgd-ce 0.645 -> apgd-t 0.63)"]


def test_eval_without_autoattack_prints_no_per_attack_part(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(advgkl.evaluate, "evaluate_checkpoint", lambda path, **kw: _fake_results(tmp_path, {}))
    code, out, _ = run(capsys, ["eval", "final.pt", "--version", "none"])
    assert code == 0
    assert out == [f"results: {tmp_path / 'results.json'}  clean_acc=0.8450  autoattack_acc=None"]


def test_train_prints_the_per_attack_accuracies(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(advgkl.config, "load_config", lambda recipe, overrides: advgkl.config.Config())
    monkeypatch.setattr(advgkl.trainers, "train",
                        lambda cfg, out, resume=False: _fake_results(out, PER_ATTACK))
    code, out, err = run(capsys, ["train", RECIPE, "--out", str(tmp_path / "run")])
    assert (code, err) == (0, [])
    assert out == [f"results: {tmp_path / 'run' / 'results.json'}  clean_acc=0.8450  autoattack_acc=0.63  "
                   f"(clean 0.845 -> apgd-ce 0.645 -> apgd-t 0.63)"]


# ----------------------------------------------------------------------------------------------------
# A6. Ctrl-C: only the commands that have --resume advise it

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv,patch,expected", [
    (["train", RECIPE], [(advgkl.trainers, "train")],
     "advgkl train: interrupted; rerun with --resume to continue"),
    (["eval", "final.pt"], [(advgkl.evaluate, "evaluate_checkpoint")],
     "advgkl eval: interrupted; rerun with --resume to continue"),
    (["reproduce", R18], [(rbcli, "reproduce")],
     "advgkl reproduce: interrupted; rerun with --resume to continue"),
    (["leaderboard", "--dataset", "cifar10"], [(rbcli, "leaderboard")], "advgkl leaderboard: interrupted"),
    (["export-robustbench", "run"], [(rbcli, "export_robustbench")], "advgkl export-robustbench: interrupted"),
])
def test_interrupted_commands_advise_resume_only_where_it_exists(capsys, monkeypatch, argv, patch, expected):
    monkeypatch.setattr(advgkl.config, "load_config", lambda recipe, overrides: advgkl.config.Config())
    for module, name in patch:
        monkeypatch.setattr(module, name, _interrupt)
    code, out, err = run(capsys, argv)
    assert (code, out, err) == (130, [], [expected])


# ----------------------------------------------------------------------------------------------------
# B. files given as a checkpoint to `advgkl eval`

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def _write(path, kind):
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "html page":
        path.write_bytes(b"<!DOCTYPE html>\n<html><head><title>Google Drive - Quota exceeded</title></head></html>")
    elif kind == "malicious pickle":
        torch.save({"format": FORMAT, "model": _Evil()}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip of something else":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")
    elif kind == "truncated":
        torch.save({"format": FORMAT, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "cut in half":  # torch's zip reader says OSError EINVAL for this one: still "truncated"
        torch.save({"format": FORMAT, "model": {f"w{i}": torch.zeros(300) for i in range(8)}}, path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("kind,says", [
    ("random bytes", "is not a torch checkpoint"),
    ("html page", "is an HTML page, not a checkpoint (a failed download?)"),
    ("malicious pickle", "holds objects that are not plain tensors/containers (posix.system); advgkl only loads "
                         "weights_only checkpoints"),
    ("empty", "is empty (0 bytes), not a checkpoint (an interrupted copy or download?)"),
    ("zip of something else", "is not a torch checkpoint"),
    ("truncated", "is not a loadable checkpoint: it is truncated or corrupt (2000 bytes; PytorchStreamReader "
                  "failed reading zip archive: failed finding central directory)"),
    ("cut in half", "is not a loadable checkpoint: it is truncated or corrupt ({size} bytes; [Errno 22] Invalid "
                    "argument)"),
])
def test_eval_names_what_a_bad_checkpoint_file_is(capsys, tmp_path, monkeypatch, kind, says):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "final.pt"
    _write(path, kind)
    line = error_line(capsys, ["eval", str(path), "--wandb", "disabled"])
    assert line == f"advgkl eval: error: {path} {says.format(size=path.stat().st_size)}"
    assert "weights_only=False" not in line and "weights_only` set to `False`" not in line
    assert files_under(tmp_path) == ["final.pt"]  # nothing created, and the malicious pickle ran nothing


def test_eval_of_a_folder_says_it_is_a_folder(capsys, tmp_path):
    folder = tmp_path / "final.pt"
    folder.mkdir()
    assert error_line(capsys, ["eval", str(folder)]) == \
        f"advgkl eval: error: checkpoint {folder} is a folder, not a checkpoint file"
    run_dir = tmp_path / "run"  # a run folder: the checkpoint inside it is suggested
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "final.pt").write_bytes(b"x")
    assert error_line(capsys, ["eval", str(run_dir)]) == (
        f"advgkl eval: error: checkpoint {run_dir} is a folder, not a checkpoint file; did you mean "
        f"{run_dir / 'checkpoints' / 'final.pt'}?")
    assert files_under(tmp_path) == ["final.pt", "run", "run/checkpoints", "run/checkpoints/final.pt"]


def test_eval_of_a_missing_file_still_says_it_does_not_exist(capsys, tmp_path):
    assert error_line(capsys, ["eval", str(tmp_path / "nope.pt")]) == \
        f"advgkl eval: error: checkpoint {tmp_path / 'nope.pt'} does not exist"


# ----------------------------------------------------------------------------------------------------
# C. `advgkl reproduce --offline`: no download of anything; the checkpoint is checked before the data

@pytest.fixture
def no_downloads(monkeypatch):
    """Every downloader advgkl or robustbench could reach fails the test."""
    rb = rbio.import_robustbench()

    def download(*args, **kwargs):
        raise AssertionError(f"--offline downloaded {args}")

    monkeypatch.setattr(advgkl.data, "_download", download)
    monkeypatch.setattr(rb.utils, "download_gdrive_new", download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)


def _offline(name, model_dir, data_dir, out):
    return ["reproduce", name, "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--device", "cpu", "--wandb", "disabled", "--no-progress", "--offline"]


def test_offline_without_checkpoint_or_data_reports_the_checkpoint(capsys, tmp_path, no_downloads):
    line = error_line(capsys, _offline(R18, tmp_path / "models", tmp_path / "data", tmp_path / "out"))
    ckpt = (tmp_path / "models" / "cifar10" / "Linf" / f"{R18}.pt").resolve()
    assert line.startswith(f"advgkl reproduce: error: checkpoint for {R18} not found in --model-dir "
                           f"{tmp_path / 'models'} and downloads are off (--offline). Put the file for {R18} at "
                           f"{ckpt} ")
    assert files_under(tmp_path) == []


def test_offline_without_data_names_the_folder_and_data_dir(capsys, tmp_path, r18_setup, no_downloads):
    line = error_line(capsys, _offline(R18, r18_setup["model_dir"], tmp_path / "data", tmp_path / "out"))
    assert line == (f"advgkl reproduce: error: cifar10 test set not found and downloads are off (--offline): "
                    f"{tmp_path / 'data' / 'cifar-10-batches-py'}/ does not exist; point --data-dir at the folder "
                    f"that holds cifar-10-batches-py/test_batch (the python version of cifar10)")
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # the folder, without the test batch
    line = error_line(capsys, _offline(R18, r18_setup["model_dir"], tmp_path / "data", tmp_path / "out"))
    assert line == (f"advgkl reproduce: error: cifar10 test set not found and downloads are off (--offline): "
                    f"{tmp_path / 'data' / 'cifar-10-batches-py'}/ has no test_batch; point --data-dir at the "
                    f"folder that holds cifar-10-batches-py/test_batch (the python version of cifar10)")
    assert files_under(tmp_path) == ["data", "data/cifar-10-batches-py"]  # only what the test made


def test_offline_with_a_folder_as_checkpoint(capsys, tmp_path, no_downloads):
    ckpt = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path / "models")
    ckpt.mkdir(parents=True)
    line = error_line(capsys, _offline(R18, tmp_path / "models", tmp_path / "data", tmp_path / "out"))
    assert line.startswith(f"advgkl reproduce: error: checkpoint {ckpt} is a folder, not a checkpoint file. "
                           f"Put the file for {R18} at {ckpt.resolve()} ")


@pytest.mark.parametrize("kind,says", [
    ("random bytes", "(4096 bytes) is not a torch checkpoint; delete it and download it again."),
    ("malicious pickle", "holds objects that are not plain tensors/containers (posix.system); advgkl only loads "
                         "weights_only checkpoints."),
])
def test_offline_with_a_bad_checkpoint_file(capsys, tmp_path, monkeypatch, no_downloads, kind, says):
    monkeypatch.chdir(tmp_path)
    ckpt = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path / "models")
    ckpt.parent.mkdir(parents=True)
    _write(ckpt, kind)
    line = error_line(capsys, _offline(R18, tmp_path / "models", tmp_path / "data", tmp_path / "out"))
    assert line.startswith(f"advgkl reproduce: error: checkpoint {ckpt} {says} Put the file for {R18} at ")
    assert "weights_only` set to `False`" not in line
    assert files_under(tmp_path) == ["models", "models/cifar10", "models/cifar10/Linf", f"models/cifar10/Linf/{R18}.pt"]


def test_offline_timm_hosted_entry_names_torch_hub_cache(capsys, tmp_path, monkeypatch, no_downloads):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "debenedetti2022light-xcit-s-cifar10-linf.pth.tar"
    line = error_line(capsys, _offline(XCIT, tmp_path / "models", tmp_path / "data", tmp_path / "out"))
    assert line == (f"advgkl reproduce: error: the weights of {XCIT} are not in torch.hub's cache and downloads "
                    f"are off (--offline): timm (not --model-dir) provides them, from {XCIT_URL}; put that file at "
                    f"{cached} (the cache follows $TORCH_HOME), or run once without --offline")
    assert "Hugging Face" not in line
    assert files_under(tmp_path) == []  # not even torch.hub's cache folder


def test_timm_hosted_entry_with_a_bad_cached_file(capsys, tmp_path, monkeypatch, no_downloads):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "debenedetti2022light-xcit-s-cifar10-linf.pth.tar"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html><body>rate limited</body></html>")
    line = error_line(capsys, _offline(XCIT, tmp_path / "models", tmp_path / "data", tmp_path / "out"))
    assert line == (f"advgkl reproduce: error: the cached weights of {XCIT}, {cached}, is an HTML page (a failed "
                    f"download?); delete the file so that timm downloads it again from {XCIT_URL}")


def test_timm_hosted_download_failure_names_the_url_not_the_hf_hub(tmp_path, monkeypatch):
    import urllib.error

    from advgkl.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(XCIT, "cifar10", "Linf", tmp_path / "models")  # downloads allowed
    msg = str(e.value)
    assert msg.startswith(f"robustbench could not load {XCIT} from {XCIT_URL} (timm's download, cached in "
                          f"{tmp_path / 'torch_home' / 'hub' / 'checkpoints'}): URLError: ")
    assert "Hugging Face" not in msg and "\n" not in msg


def test_train_overrides_may_follow_the_options(monkeypatch, tmp_path):
    seen = {}
    cli = importlib.import_module("advgkl.cli")
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(overrides=args.overrides, out=args.out))
    assert main(["train", "r.yaml", "optim.epochs=2", "--out", str(tmp_path), "optim.lr=0.1", "--resume"]) == 0
    assert seen == {"overrides": ["optim.epochs=2", "optim.lr=0.1"], "out": str(tmp_path)}
