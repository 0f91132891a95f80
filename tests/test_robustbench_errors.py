"""RobustBench interop, the paths a user hits when something is missing or wrong (offline, CPU only).

Import problems (no AutoAttack, no pkg_resources, no robustbench), bad or missing checkpoint files,
the downloader failing or succeeding (robustbench's Google-Drive downloader is replaced, as in
test_robustbench.py), ensemble and timm-hosted zoo entries, `reproduce` argument errors and notes,
`export-robustbench` input errors and warnings, and the leaderboard command's --json / empty --grep.
"""
from __future__ import annotations

import importlib
import json
import sys
import urllib.error
from pathlib import Path

import pytest
import requests
import torch
from torch import nn

import advgkl.data
from advgkl import robustbench_io as rbio
from advgkl.cli import main
from advgkl.errors import UserError
from test_robustbench import (  # noqa: F401  (r18_setup / cheap_autoattack are fixtures used below)
    GKL_ENTRIES, N_IMAGES, R18, WHITE, _fake_run, cheap_autoattack, r18_setup, write_cifar10_test_batch)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _cli_error(capsys, argv) -> str:
    """Runs the CLI, checks it exits 2 with one error line on stderr; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _robustbench_imported():
    """The import tests below break sys.modules on purpose and restore the modules imported here."""
    rbio.import_robustbench()


@pytest.fixture(autouse=True)
def _not_distributed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):  # the CLI names the rank under torchrun; these tests run alone
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------------------------------
# import_robustbench in broken environments (sys.modules entries set to None block an import)

def test_import_without_autoattack(monkeypatch):
    rbio.import_robustbench()
    monkeypatch.delitem(sys.modules, "robustbench.utils")  # as in a fresh interpreter
    monkeypatch.setitem(sys.modules, "autoattack", None)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(UserError) as e:
        rbio.import_robustbench()
    assert _one_line(e) == "robustbench needs AutoAttack: pip install pyautoattack==0.2.0"
    assert isinstance(e.value.__cause__, ImportError)


def test_import_without_pkg_resources_installs_a_working_stub(monkeypatch, tmp_path):
    rb = rbio.import_robustbench()
    import pkg_resources as real_pkg_resources

    rel = "helper_files/imagenet_test_image_ids.txt"  # the file robustbench.loaders reads through it
    expected = real_pkg_resources.resource_filename("robustbench.loaders", rel)
    old_utils, old_loaders = sys.modules["robustbench.utils"], sys.modules["robustbench.loaders"]
    monkeypatch.setattr(rb, "utils", old_utils)  # re-imports rebind these attributes: restored afterwards
    monkeypatch.setattr(rb, "loaders", old_loaders)
    monkeypatch.delitem(sys.modules, "robustbench.utils")
    monkeypatch.delitem(sys.modules, "robustbench.loaders")
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # setuptools >= 81

    assert rbio.import_robustbench() is rb
    assert sys.modules["robustbench.utils"] is not old_utils  # really imported again, with the stub present
    assert hasattr(sys.modules["robustbench.utils"], "load_model")
    stub = sys.modules["pkg_resources"]
    assert stub is not real_pkg_resources and stub is not None
    assert stub.resource_filename("robustbench.loaders", rel) == expected and Path(expected).is_file()

    loaders = importlib.import_module("robustbench.loaders")  # robustbench.data's import, now on the stub
    assert loaders is not old_loaders and loaders.pkg_resources is stub
    ids = Path(expected).read_text().splitlines()
    class_to_idx = {c: i for i, c in enumerate(sorted({ln.split("/")[0] for ln in ids}))}
    samples = loaders.make_custom_dataset(str(tmp_path), rel, class_to_idx)
    assert len(samples) == len(ids) == 5000
    assert samples[0] == (str(tmp_path / ids[0]), class_to_idx[ids[0].split("/")[0]])


def test_import_without_robustbench(monkeypatch, capsys):
    rbio.import_robustbench()
    monkeypatch.delitem(sys.modules, "robustbench.utils")
    monkeypatch.setitem(sys.modules, "robustbench", None)
    expected = ("cannot import robustbench (import of robustbench halted; None in sys.modules); "
                "install robustbench==1.1.1 and setuptools<81")
    with pytest.raises(UserError) as e:
        rbio.import_robustbench()
    assert _one_line(e) == expected
    # the command that needs the model zoo says the same and exits 2
    assert _cli_error(capsys, ["leaderboard"]) == f"advgkl leaderboard: error: {expected}"


# ----------------------------------------------------------------------------------------------------
# checkpoint files

@pytest.mark.parametrize("obj,kind", [([torch.zeros(3)], "list"), ({}, "dict"), (torch.zeros(3), "Tensor")])
def test_checkpoint_that_is_not_a_state_dict(tmp_path, obj, kind):
    path = tmp_path / "weights.pt"
    torch.save(obj, path)
    with pytest.raises(UserError) as e:
        rbio.check_checkpoint_file(path)
    assert _one_line(e) == f"checkpoint {path} holds a {kind}, not a state dict."

    ckpt = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path / "models")  # via the loader: with the hint
    ckpt.parent.mkdir(parents=True)
    torch.save(obj, ckpt)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path / "models", download=False)
    msg = _one_line(e)
    assert msg.startswith(f"checkpoint {ckpt} holds a {kind}, not a state dict. Put the file for {R18} at "
                          f"{ckpt.resolve()} ")


def _gdrive_id(name, dataset="cifar10", threat_model="Linf"):
    return rbio._zoo(dataset, threat_model)[name]["gdrive_id"]


def test_downloader_that_writes_nothing(tmp_path, monkeypatch):
    rb = rbio.import_robustbench()
    calls = []
    monkeypatch.setattr(rb.utils, "download_gdrive_new", lambda gid, fname: calls.append((gid, Path(fname))))
    path = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path)
    msg = _one_line(e)
    assert msg.startswith(f"could not download {R18}.pt (OSError: the downloader wrote no file). "
                          f"Put the file for {R18} at {path.resolve()} ")
    assert msg.endswith(f"it is published at https://drive.google.com/uc?id={_gdrive_id(R18)}")
    assert calls == [(_gdrive_id(R18), path.with_name(f"{R18}.pt.part"))]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_download_that_dies_midway_leaves_no_file(r18_setup, tmp_path, monkeypatch):
    rb = rbio.import_robustbench()
    half = r18_setup["ckpt"].read_bytes()[:100_000]

    def dies(gid, fname):
        Path(fname).write_bytes(half)
        raise requests.exceptions.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", dies)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path)
    assert _one_line(e).startswith(f"could not download {R18}.pt (ConnectionError: Connection reset by peer). "
                                   f"Put the file for {R18} at ")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_successful_download_is_checked_and_moved_into_place(r18_setup, tmp_path, monkeypatch):
    rb = rbio.import_robustbench()
    good = r18_setup["ckpt"].read_bytes()
    seen = []

    def download(gid, fname):
        seen.append(Path(fname).name)
        Path(fname).write_bytes(good)

    monkeypatch.setattr(rb.utils, "download_gdrive_new", download)
    model = rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path)
    path = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path)
    assert seen == [f"{R18}.pt.part"]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [path] and path.read_bytes() == good
    with torch.no_grad():
        assert torch.equal(model(r18_setup["x"]), r18_setup["model"](r18_setup["x"]))
    # a second call finds the file: no download
    rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path)
    assert seen == [f"{R18}.pt.part"]


def test_ensemble_entry_needs_one_file_per_member(tmp_path):
    name = "Chen2020Adversarial"  # cifar10 Linf: an ensemble of three networks, one checkpoint each
    ids = _gdrive_id(name)
    assert isinstance(ids, list) and len(ids) == 3
    base = rbio.checkpoint_path(name, "cifar10", "Linf", tmp_path)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(name, "cifar10", "Linf", tmp_path, download=False)
    msg = _one_line(e)
    m0 = base.parent / f"{name}.pt_m0.pt"  # robustbench's naming: '{model_path}_m{i}.pt'
    assert msg.startswith(f"checkpoint for {name} not found in --model-dir {tmp_path} and downloads are off "
                          f"(--offline). Put the file for {name} at {m0.resolve()} ")
    assert msg.endswith(f"https://drive.google.com/uc?id={ids[0]}")

    base.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, m0)  # member 0 present: member 1 is the one reported
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(name, "cifar10", "Linf", tmp_path, download=False)
    msg = _one_line(e)
    assert f"at {(base.parent / f'{name}.pt_m1.pt').resolve()} " in msg
    assert msg.endswith(f"https://drive.google.com/uc?id={ids[1]}")


def test_timm_hosted_entry_offline(tmp_path, monkeypatch):
    """XCiT entries have no gdrive id: timm fetches their weights; offline that is a UserError naming the model."""
    name = "Debenedetti2022Light_XCiT-S12"
    assert _gdrive_id(name) is None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights from elsewhere

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(name, "cifar10", "Linf", tmp_path / "models")
    msg = _one_line(e)
    assert msg.startswith(f"robustbench could not load {name} from ")
    assert "URLError: <urlopen error [Errno -2] Name or service not known>" in msg
    assert "XCiT-S12 for cifar10 Linf" in msg
    assert not (tmp_path / "models").exists()  # no checkpoint file is involved for this entry


# ----------------------------------------------------------------------------------------------------
# reproduce

def _reproduce_argv(setup, out, *extra):
    return ["reproduce", R18, "--model-dir", str(setup["model_dir"]), "--data-dir", str(setup["data_dir"]),
            "--out", str(out), "--wandb", "disabled", "--offline", "--no-progress", *extra]


def test_reproduce_cuda_requested_without_cuda(r18_setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _cli_error(capsys, _reproduce_argv(r18_setup, tmp_path / "out", "--device", "cuda"))
    assert line == ("advgkl reproduce: error: --device cuda but CUDA is not available here; "
                    "use --device cpu")
    assert not (tmp_path / "out").exists()


def test_reproduce_bad_batch_size(r18_setup, tmp_path, capsys):
    line = _cli_error(capsys, _reproduce_argv(r18_setup, tmp_path / "out", "--device", "cpu", "--batch-size", "0"))
    assert line == "advgkl reproduce: error: --batch-size must be >= 1, got 0"
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_finished_out_without_resume(r18_setup, tmp_path, capsys):
    """Checked before the model is loaded: here there is no checkpoint, and the folder is what is reported."""
    out = tmp_path / "out"
    out.mkdir()
    (out / rbio.REPORT_NAME).write_text("{}")
    no_checkpoint = {**r18_setup, "model_dir": tmp_path / "no_models"}
    line = _cli_error(capsys, _reproduce_argv(no_checkpoint, out, "--device", "cpu"))
    assert line == (f"advgkl reproduce: error: {out} already holds a reproduce report; pass --resume to reuse "
                    f"its finished evaluation, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [rbio.REPORT_NAME]


def test_reproduce_reads_the_default_data_root(r18_setup, tmp_path, monkeypatch):
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    write_cifar10_test_batch(tmp_path / "default_data", images, torch.tensor([0, 1, 2]))
    monkeypatch.setattr(advgkl.data, "DEFAULT_ROOT", tmp_path / "default_data")  # $ADVGKL_DATA at import
    with pytest.raises(UserError) as e:  # the 3-image test set written above is the one read
        rbio.reproduce(R18, n_examples=4, model_dir=r18_setup["model_dir"], out_dir=tmp_path / "out",
                       device="cpu", wandb="disabled", download=False)  # the checkpoint is checked first
    assert _one_line(e) == "--n-examples must be between 1 and 3 (the cifar10 test set), got 4"


def test_reproduce_custom_attacks_on_a_subset(r18_setup, tmp_path, cheap_autoattack, capsys, monkeypatch):
    """No --device: the CPU when CUDA is absent; a non-standard version and a subset each add a note."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    n = N_IMAGES - 1  # leaves out the all-white image: 1 correct point (the tiny-margin one), 0 robust
    assert r18_setup["weak"] < n and WHITE == n
    argv = _reproduce_argv(r18_setup, out, "--n-examples", str(n), "--batch-size", "4", "--version", "custom",
                           "--attacks", "apgd-ce")
    assert main(argv) == 0
    report = json.loads((out / "reproduce_report.json").read_text())
    assert report["device"] == "cpu" and report["autoattack_version"] == "custom"
    assert report["attacks"] == ["apgd-ce"] and report["n_examples"] == 7 and report["n_test_set"] == 8
    assert report["notes"] == [
        "AutoAttack 'custom' is not the leaderboard's 'standard': the robust accuracy is not comparable with "
        "the claim",
        "measured on the first 7 of 8 test points; the claim is for all 8",
    ]
    m = report["measured"]
    assert (m["clean_correct"], m["robust_correct"]) == (1, 0)
    assert (m["clean_acc"], m["autoattack_acc"]) == (pytest.approx(100 / 7, abs=1e-4), 0.0)
    assert report["per_attack_robust_acc"] == {"clean": pytest.approx(100 / 7, abs=1e-4), "apgd-ce": 0.0}
    printed = capsys.readouterr().out
    assert "device cpu" in printed
    assert "note:        measured on the first 7 of 8 test points; the claim is for all 8" in printed.splitlines()


# ----------------------------------------------------------------------------------------------------
# export-robustbench

REQUIRED = ["dataset", "threat_model", "eps", "model", "method", "clean_acc", "autoattack_acc"]


def _results(run):
    return json.loads((run / "results.json").read_text())


def _write_results(run, results):
    (run / "results.json").write_text(json.dumps(results))


def test_export_invalid_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"dataset": "cifar10", ')  # a run killed while writing
    try:
        json.loads('{"dataset": "cifar10", ')
    except json.JSONDecodeError as err:
        reason = str(err)
    with pytest.raises(UserError) as e:
        rbio.export_robustbench(run)
    assert _one_line(e) == f"{run / 'results.json'} is not valid JSON ({reason})"
    assert _cli_error(capsys, ["export-robustbench", str(run)]) == \
        f"advgkl export-robustbench: error: {run / 'results.json'} is not valid JSON ({reason})"


def test_export_missing_fields(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    res = _results(run)
    del res["eps"], res["method"]
    _write_results(run, res)
    with pytest.raises(UserError) as e:
        rbio.export_robustbench(run)
    assert _one_line(e) == f"{run / 'results.json'} lacks ['eps', 'method']; it needs {REQUIRED}"


def test_export_without_the_evaluated_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, evaluated="best")  # best weights were evaluated, but only final.pt exists
    best = run / "checkpoints" / "best.pt"
    assert _cli_error(capsys, ["export-robustbench", str(run)]) == \
        f"advgkl export-robustbench: error: {best} not found: the run has no final weights to export"
    assert not (run / "robustbench").exists()


def test_export_uses_the_checkpoint_an_eval_named(tmp_path):
    run = tmp_path / "run"
    _, ema = _fake_run(run)
    other = tmp_path / "elsewhere" / "eval_me.pt"
    other.parent.mkdir()
    (run / "checkpoints" / "final.pt").rename(other)
    res = _results(run)
    res["checkpoint"] = str(other)
    _write_results(run, res)
    _, weights = rbio.export_robustbench(run, echo=lambda *a: None)
    exported = torch.load(weights, weights_only=True)
    assert exported.keys() == ema.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in ema.state_dict().items())


@pytest.mark.parametrize("with_ema", [True, False])
def test_export_without_evaluated_weights_picks_ema_then_model(tmp_path, with_ema):
    run = tmp_path / "run"
    model, ema = _fake_run(run)
    res = _results(run)
    del res["evaluated_weights"]  # an older results.json
    _write_results(run, res)
    final = run / "checkpoints" / "final.pt"
    if not with_ema:
        ckpt = torch.load(final, weights_only=True)
        ckpt["ema"] = None  # a run trained without EMA
        torch.save(ckpt, final)
    printed = []
    _, weights = rbio.export_robustbench(run, echo=printed.append)
    expected = (ema if with_ema else model).state_dict()
    exported = torch.load(weights, weights_only=True)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], v) for k, v in expected.items())
    assert printed[-1].startswith(f"exported {'ema' if with_ema else 'model'!r} weights of {run} as ")


@pytest.mark.parametrize("evaluated", ["ema", "swa"])
def test_export_checkpoint_without_those_weights(tmp_path, evaluated):
    run = tmp_path / "run"
    _fake_run(run, evaluated=evaluated)
    final = run / "checkpoints" / "final.pt"
    ckpt = torch.load(final, weights_only=True)
    ckpt["ema"] = None
    torch.save(ckpt, final)
    with pytest.raises(UserError) as e:
        rbio.export_robustbench(run)
    assert _one_line(e) == (f"{final} has no weights for evaluated_weights={evaluated!r} (the checkpoint holds "
                            f"['config', 'model'])")


class _Wrapped(nn.Module):
    """A network whose submodule is called `model`: its keys contain 'model.'."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 3)


def test_export_refuses_keys_robustbench_would_rename(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    final = run / "checkpoints" / "final.pt"
    ckpt = torch.load(final, weights_only=True)
    wrapped = nn.DataParallel(_Wrapped()).state_dict()  # 'module.' is stripped; 'model.' cannot be
    assert list(wrapped) == ["module.model.weight", "module.model.bias"]
    ckpt["ema"] = wrapped
    torch.save(ckpt, final)
    with pytest.raises(UserError) as e:
        rbio.export_robustbench(run)
    assert _one_line(e) == ("robustbench's loader strips 'module.'/'model.' wherever it occurs in a key, so "
                            "these keys would not load back: ['model.weight', 'model.bias']; rename the "
                            "submodules before exporting")
    assert not (run / "robustbench").exists()


def test_keys_lost_in_robustbench_format():
    from advgkl.robustbench_io.export import _keys_lost_in_robustbench_format

    rb = rbio.import_robustbench()
    state = {k: torch.zeros(1) for k in ("conv.weight", "model.weight", "block.submodel.bias", "head.module.x",
                                         "modules.0.w")}
    lost = _keys_lost_in_robustbench_format(state)
    assert lost == ["model.weight", "block.submodel.bias", "head.module.x"]
    loaded = rb.utils.rm_substr_from_state_dict(rb.utils.rm_substr_from_state_dict(state, "module."), "model.")
    assert [k for k in state if k not in loaded] == lost  # exactly the keys robustbench's loader renames


@pytest.mark.parametrize("data,extra,footnote", [
    ({"generated": "cifar10_1m.npz", "generated_ratio": 0.3}, {}, True),
    ({"generated": "cifar10_1m.npz", "generated_ratio": 0.0}, {}, False),  # named, never mixed into a batch
    ({}, {"generated_by": "sweep.py"}, False),  # a key that merely contains "generated"
])
def test_export_footnote_reads_the_generated_data_settings(tmp_path, data, extra, footnote):
    from advgkl.config import Config

    run = tmp_path / "run"
    _fake_run(run)
    res = _results(run)
    config = Config().to_dict()
    config["data"].update(data)
    res["config"] = {**config, **extra}
    _write_results(run, res)
    json_path, _ = rbio.export_robustbench(run, echo=lambda *a: None)
    info = json.loads(json_path.read_text())
    assert info.get("footnote") == ("It uses additional generated images in training." if footnote else None)


@pytest.mark.parametrize("bad", ["my model", "-leading-dash", "a/b"])
def test_export_bad_name(tmp_path, capsys, bad):
    run = tmp_path / "run"
    _fake_run(run)
    assert _cli_error(capsys, ["export-robustbench", str(run), f"--name={bad}"]) == (
        f"advgkl export-robustbench: error: --name {bad!r}: use letters, digits, '_', '-', '.' (RobustBench "
        f"model ids)")
    assert not (run / "robustbench").exists()


def test_export_architecture_footnote_and_warnings(tmp_path):
    from advgkl.models import create_model

    run = tmp_path / "run"
    torch.manual_seed(0)
    model = create_model("preact_resnet18")
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "ema": None}, run / "checkpoints" / "final.pt")
    _write_results(run, {
        "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "model": "preact_resnet18",
        "method": "trades", "clean_acc": 0.8, "autoattack_acc": 0.45, "n_examples": 1000,
        "autoattack_version": "fast",
        "config": {"data": {"root": "data", "generated": "cifar10_1m.npz", "generated_ratio": 0.3}}})
    printed = []
    json_path, weights = rbio.export_robustbench(run, echo=printed.append)
    assert json_path == run / "robustbench" / "model_info" / "cifar10" / "Linf" / "advgkl_trades_PreActResNet-18.json"
    info = json.loads(json_path.read_text())
    assert info["architecture"] == "PreActResNet-18"
    assert info["footnote"] == "It uses additional generated images in training."
    assert info["additional_data"] is False  # generated data is not extra data for RobustBench
    assert (info["clean_acc"], info["autoattack_acc"]) == ("80.00", "45.00")
    assert printed[:2] == [
        "warning: evaluated on 1000 test points; RobustBench entries use the full test set (10000)",
        "warning: AutoAttack 'fast'; RobustBench entries use 'standard'",
    ]
    reloaded = create_model("preact_resnet18").eval()
    reloaded.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))


# ----------------------------------------------------------------------------------------------------
# leaderboard command

def test_leaderboard_json(capsys):
    assert main(["leaderboard", "--dataset", "cifar100", "--grep", "CUI2023", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = {name: (arch, clean, aa) for ds, name, arch, clean, aa in GKL_ENTRIES if ds == "cifar100"}
    assert [r["model_name"] for r in rows] == sorted(expected, key=lambda k: -expected[k][2])
    for r in rows:
        arch, clean, aa = expected[r["model_name"]]
        assert (r["architecture"], float(r["clean_acc"]), float(r["autoattack_acc"])) == (arch, clean, aa)
        assert r["threat_model"] == "Linf" and r["in_model_zoo"] is True and r["eps"] == "8/255"


def test_leaderboard_grep_without_match(capsys):
    assert main(["leaderboard", "--threat-model", "L2", "--grep", "no-such-paper"]) == 0
    assert capsys.readouterr().out == "no cifar10 L2 entries match 'no-such-paper'\n"
