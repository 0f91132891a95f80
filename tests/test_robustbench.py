"""RobustBench interop, offline on CPU: metadata, checkpoint checks, `advgkl reproduce`, export round trip.

The reproduce test uses a real leaderboard architecture (Sehwag2021Proxy_R18, robustbench's ResNet-18)
with random weights whose last-layer bias is set so that, on 8 CIFAR-format test images written here,
exactly 2 points are correct: one with a tiny margin (any attack breaks it) and one, an all-white
image, with a margin no 8/255 perturbation undoes. So the expected numbers are known: clean 25 %,
robust 12.5 % after every attack.
"""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch

from advgkl import attacks
from advgkl import robustbench_io as rbio
from advgkl.cli import main
from advgkl.config import Config
from advgkl.errors import UserError

R18 = "Sehwag2021Proxy_R18"  # cifar10 Linf, ResNet-18: the cheapest architecture in the zoo
N_IMAGES = 8
WHITE = 7  # index of the all-white test image: the one point that stays robust

# the five GKL entries and their published numbers (docs/gkl.md#published-recipes-and-numbers)
GKL_ENTRIES = [
    ("cifar10", "Cui2023Decoupled_WRN-34-10", "WideResNet-34-10", 85.31, 57.09),
    ("cifar10", "Cui2023Decoupled_WRN-28-10", "WideResNet-28-10", 92.16, 67.73),
    ("cifar100", "Cui2023Decoupled_WRN-34-10", "WideResNet-34-10", 65.76, 31.91),
    ("cifar100", "Cui2023Decoupled_WRN-34-10_autoaug", "WideResNet-34-10", 65.93, 32.52),
    ("cifar100", "Cui2023Decoupled_WRN-28-10", "WideResNet-28-10", 73.85, 39.18),
]


def write_cifar10_test_batch(root, images: torch.Tensor, labels: torch.Tensor) -> None:
    """``root/cifar-10-batches-py/test_batch`` in the python-pickle format of the real CIFAR-10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    entry = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(images), -1).numpy().astype(np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(entry, f, protocol=4)  # numpy arrays via _reconstruct, as the loader allows


@pytest.fixture(scope="module")
def r18_setup(tmp_path_factory):
    """model_dir with a random-weight Sehwag2021Proxy_R18 in robustbench's layout + a CIFAR-10 test batch."""
    base = tmp_path_factory.mktemp("rb")
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_IMAGES, 3, 32, 32), generator=gen, dtype=torch.uint8)
    images[WHITE] = 255
    torch.manual_seed(0)
    model = rbio._zoo("cifar10", "Linf")[R18]["model"]().eval()
    x = images.float() / 255
    with torch.no_grad():
        z = model(x)
        # class pair (c, d) whose logit gap on the white image is furthest above the gap on any noise image
        gaps = z[:, :, None] - z[:, None, :]
        sep = gaps[WHITE] - gaps[:WHITE].max(0).values
        sep.fill_diagonal_(-1.0)
        c, d = divmod(int(sep.argmax()), 10)
        big = 100 * float(z.abs().max())  # c and d dominate every other class
        model.linear.bias[c] += big
        model.linear.bias[d] += big
        m = model(x)[:, c] - model(x)[:, d]
        weak = int(m.argmin())
        model.linear.bias[c] += float(-m[weak] + 1e-3 * (m[WHITE] - m[weak]))  # all predict c; `weak` barely
        pred = model(x).argmax(1)
    assert (pred == c).all()
    labels = torch.full((N_IMAGES,), (c + 1) % 10, dtype=torch.int64)
    labels[weak] = labels[WHITE] = c
    model_dir, data_dir = base / "models", base / "data"
    path = rbio.checkpoint_path(R18, "cifar10", "Linf", model_dir)
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    write_cifar10_test_batch(data_dir, images, labels)
    return {"model_dir": model_dir, "data_dir": data_dir, "ckpt": path, "model": model, "x": x, "base": base,
            "images": images, "labels": labels, "weak": weak}


@pytest.fixture
def cheap_autoattack(monkeypatch):
    """Standard AutoAttack's attacks and schedule with iteration counts cut so a CPU test takes seconds."""
    original = attacks.AutoAttack.pyautoattack

    def cheap(self, n_classes: int = 10):
        aa = original(self, n_classes)
        for apgd in (aa.apgd, aa.apgd_targeted):
            apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = 5, 2, 1, 1
        aa.fab.n_iter = 3
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 1
        aa.square.n_queries = 10
        return aa

    monkeypatch.setattr(attacks.AutoAttack, "pyautoattack", cheap)


# ----------------------------------------------------------------------------------------------------
# import and metadata

def test_import_robustbench_aliases_pyautoattack():
    rb = rbio.import_robustbench()
    assert rb is sys.modules["robustbench"] and rbio.import_robustbench() is rb
    assert hasattr(rb.utils, "load_model")
    import pyautoattack

    assert sys.modules["autoattack"].AutoAttack is pyautoattack.AutoAttack


BOARDS = [("cifar10", "L2"), ("cifar10", "Linf"), ("cifar10", "corruptions"), ("cifar100", "Linf"),
          ("cifar100", "corruptions"), ("imagenet", "Linf"), ("imagenet", "corruptions")]
ENTRIES = {("cifar10", "L2"): 21, ("cifar10", "Linf"): 99, ("cifar10", "corruptions"): 23, ("cifar100", "Linf"): 38,
           ("cifar100", "corruptions"): 13, ("imagenet", "Linf"): 30, ("imagenet", "corruptions"): 12}
BOARD_EPS = {"Linf": 8 / 255, "L2": 0.5}
# upstream quirks kept as shipped: these entries' "dataset" field names another dataset
WRONG_DATASET_FIELD = {("cifar100", "Linf", "Hendrycks2019Using")} | {
    ("cifar100", "corruptions", n) for n in ("Gowal2020Uncovering_Linf", "Gowal2020Uncovering_extra_Linf",
                                             "Hendrycks2020AugMix_ResNeXt", "Hendrycks2020AugMix_WRN")}


def test_supported_pairs_ship_metadata():
    assert rbio.supported() == BOARDS
    assert sum(ENTRIES.values()) == 236


@pytest.mark.parametrize("dataset,threat_model", BOARDS)
def test_every_zoo_model_has_metadata(dataset, threat_model):
    rows = rbio.leaderboard(dataset, threat_model)
    key = rbio.metric(threat_model)
    assert len(rows) == ENTRIES[(dataset, threat_model)]
    assert set(rbio._zoo(dataset, threat_model)) <= {r["model_name"] for r in rows}
    claimed = [float(r[key]) for r in rows]
    assert claimed == sorted(claimed, reverse=True)
    for r in rows:
        if threat_model != "corruptions":  # 8/255 (or 0.031) Linf and 0.5 L2 on CIFAR; 4/255 on ImageNet
            eps = 4 / 255 if dataset == "imagenet" else BOARD_EPS[threat_model]
            assert abs(rbio.parse_eps(r["eps"]) - eps) < 1e-3
        assert r["dataset"] == dataset or (dataset, threat_model, r["model_name"]) in WRONG_DATASET_FIELD
        assert 0 <= float(r[key]) <= float(r["clean_acc"]) <= 100


@pytest.mark.parametrize("dataset,threat_model", BOARDS)
def test_every_shipped_entry_matches_its_metadata(dataset, threat_model):
    """The listing's numbers are the JSON files' own; a corruptions entry's number is the mean of its 75 published
    per-set accuracies (RobustBench's unaggregated_results.csv) wherever the CSV has the entry."""
    files = sorted((rbio.MODEL_INFO_DIR / dataset / threat_model).glob("*.json"))
    by_name = {r["model_name"]: r for r in rbio.leaderboard(dataset, threat_model)}
    assert sorted(by_name) == [f.stem for f in files]
    key = rbio.metric(threat_model)
    with_csv = 0
    for f in files:
        raw, row = json.loads(f.read_text()), by_name[f.stem]
        assert {k: row[k] for k in raw} == raw
        assert (float(row["clean_acc"]), float(row[key])) == (float(raw["clean_acc"]), float(raw[key]))
        per = rbio.claimed_per_corruption(f.stem, dataset) if threat_model == "corruptions" else None
        if per is not None:
            with_csv += 1
            assert sorted(per) == sorted(rbio.corruptions()) and all(len(v) == 6 for v in per.values())
            mean = sum(v[str(s)] for v in per.values() for s in range(1, 6)) / 75
            assert mean == pytest.approx(float(raw[key]), abs=0.01)  # published with 2 decimals, some truncated
    if threat_model == "corruptions":  # only CIFAR-10's two AugMix entries lack a row
        assert with_csv == ENTRIES[(dataset, threat_model)] - (2 if dataset == "cifar10" else 0)


@pytest.mark.parametrize("dataset,name,arch,clean,aa", GKL_ENTRIES)
def test_gkl_entries_match_published_numbers(dataset, name, arch, clean, aa):
    entry = rbio.leaderboard_entry(name, dataset, "Linf")
    assert (entry["architecture"], float(entry["clean_acc"]), float(entry["autoattack_acc"])) == (arch, clean, aa)
    assert rbio.parse_eps(entry["eps"]) == pytest.approx(8 / 255) and entry["in_model_zoo"]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="Did you mean: Cui2023Decoupled_WRN-34-10"):
        rbio.leaderboard_entry("Cui2023Decoupled_WRN-34-1", "cifar10", "Linf")
    with pytest.raises(UserError, match="exists for: cifar100 Linf"):
        rbio.leaderboard_entry("Cui2023Decoupled_WRN-34-10_autoaug", "cifar10", "Linf")
    with pytest.raises(UserError, match="advgkl ships: cifar10 L2"):
        rbio.leaderboard("cifar100", "L2")
    with pytest.raises(UserError) as e:  # a name from another board is pointed there
        rbio.leaderboard_entry("Salman2020Do_R50", "cifar10", "Linf")
    assert "'Salman2020Do_R50' exists for: imagenet Linf (use --dataset / --threat-model)" in str(e.value)
    with pytest.raises(UserError, match="Did you mean: Hendrycks2020AugMix, Hendrycks2020Many"):
        rbio.leaderboard_entry("Hendrycks2020Augmix", "imagenet", "corruptions")


def test_eps_parsing_and_formatting():
    assert rbio.parse_eps("8/255") == 8 / 255 and rbio.parse_eps("0.5") == 0.5
    assert rbio.format_eps(8 / 255, "Linf") == "8/255" and rbio.format_eps(0.5, "L2") == "0.5"
    with pytest.raises(UserError):
        rbio.parse_eps("eight")


def test_leaderboard_command(capsys):
    assert main(["leaderboard", "--dataset", "cifar100", "--threat-model", "Linf", "--grep", "cui2023"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "name", "architecture", "clean", "AA", "extra", "data"]
    assert [ln.split()[1] for ln in lines[2:]] == ["Cui2023Decoupled_WRN-28-10", "Cui2023Decoupled_WRN-34-10_autoaug",
                                                    "Cui2023Decoupled_WRN-34-10"]
    assert lines[2].split()[2:] == ["WideResNet-28-10", "73.85", "39.18", "no"]


# ----------------------------------------------------------------------------------------------------
# statistics

def test_wilson_interval_known_values():
    # reference values: Brown, Cai & DasGupta (2001) / statsmodels proportion_confint(method="wilson")
    assert rbio.wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert rbio.wilson_interval(50, 100) == pytest.approx((0.4038315, 0.5961685), abs=1e-6)
    assert rbio.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert rbio.wilson_interval(10, 10) == pytest.approx((0.7224672, 1.0), abs=1e-6)
    lo, hi = rbio.wilson_interval(571, 1000)  # a 1,000-point check of a ~57 % claim: +-3 pp
    assert (lo, hi) == pytest.approx((0.5402, 0.6013), abs=1e-4)
    with pytest.raises(ValueError):
        rbio.wilson_interval(3, 2)


def test_verdict():
    assert rbio.verdict(85.31, (83.0, 87.5), 57.09, (54.0, 60.1))[0] == "consistent"
    assert rbio.verdict(85.31, (83.0, 85.305), 57.09, (54.0, 57.09))[0] == "consistent"  # 2-decimal rounding
    word, detail = rbio.verdict(85.31, (83.0, 87.5), 57.09, (50.0, 55.0))
    assert word == "not consistent" and "AutoAttack accuracy 57.09 is above" in detail and "clean" not in detail
    word, detail = rbio.verdict(85.31, (86.0, 90.0), 57.09, (58.0, 60.0))
    assert word == "not consistent" and "clean accuracy 85.31 is below" in detail and "AutoAttack" in detail


# ----------------------------------------------------------------------------------------------------
# loading checkpoints

def test_load_leaderboard_model(r18_setup):
    model = rbio.load_leaderboard_model(R18, "cifar10", "Linf", r18_setup["model_dir"], download=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(r18_setup["x"]), r18_setup["model"](r18_setup["x"]))


def test_missing_checkpoint_says_where(tmp_path):
    name = "Cui2023Decoupled_WRN-34-10"
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(name, "cifar100", "Linf", tmp_path, download=False)
    assert str(tmp_path / "cifar100" / "Linf" / f"{name}.pt") in str(e.value)
    assert "drive.google.com" in str(e.value)


def test_external_entry_without_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        rbio.load_leaderboard_model("Madry2018Towards", "cifar10", "Linf", tmp_path, download=False)


def _bad_files(real: bytes) -> dict[str, bytes]:
    html = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>"
    return {"random bytes": np.random.default_rng(0).bytes(4096), "truncated": real[: len(real) // 2],
            "html page": html, "empty": b""}


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "html page", "empty"])
def test_bad_checkpoint_refused_before_robustbench(r18_setup, tmp_path, monkeypatch, kind):
    rb = rbio.import_robustbench()

    def never(*a, **k):
        raise AssertionError("robustbench must not see a bad file")

    monkeypatch.setattr(rb.utils, "load_model", never)
    path = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_bad_files(r18_setup["ckpt"].read_bytes())[kind])
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path, download=False)
    assert str(path) in str(e.value) and "download it again" in str(e.value)
    if kind == "html page":
        assert "HTML page" in str(e.value)


def test_wrong_architecture_refused(tmp_path):
    path = rbio.checkpoint_path(R18, "cifar10", "Linf", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "linear.weight": torch.zeros(10, 7)}, path)
    with pytest.raises(UserError, match="does not hold the weights of ResNet-18"):
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path, download=False)


def test_failed_download_leaves_no_file(tmp_path, monkeypatch):
    rb = rbio.import_robustbench()

    def html_download(gdrive_id, fname):  # what gdown saves when Google Drive answers with a page
        open(fname, "wb").write(b"<html><body>Too many users have viewed or downloaded this file</body></html>")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", html_download)
    with pytest.raises(UserError, match="HTML page"):
        rbio.load_leaderboard_model(R18, "cifar10", "Linf", tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------------------------------
# reproduce

def test_reproduce_command(r18_setup, tmp_path, cheap_autoattack, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["reproduce", R18, "--dataset", "cifar10", "--threat-model", "Linf", "--n-examples", str(N_IMAGES),
            "--model-dir", str(r18_setup["model_dir"]), "--data-dir", str(r18_setup["data_dir"]), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--wandb", "disabled", "--offline", "--no-progress"]
    real_attack, calls = attacks._run_attack, []

    def killed_at_apgd_t(aa, name, x, y):  # the job dies when the second attack starts
        calls.append(name)
        if name == "apgd-t":
            raise KeyboardInterrupt
        return real_attack(aa, name, x, y)

    monkeypatch.setattr(attacks, "_run_attack", killed_at_apgd_t)
    assert main(argv) == 130 and not (out / "reproduce_report.json").exists()
    calls.clear()
    monkeypatch.setattr(attacks, "_run_attack", lambda aa, name, x, y: calls.append(name) or real_attack(aa, name, x, y))
    capsys.readouterr()
    assert main(argv) == 2 and calls == []  # without --resume the half-done folder is refused, nothing runs
    assert capsys.readouterr().err == (f"advgkl reproduce: error: {out} already holds an interrupted reproduce run; "
                                       f"pass --resume to continue it, or choose another --out\n")
    assert main(argv + ["--resume"]) == 0  # continues: APGD-CE is not run again
    assert calls == ["apgd-t", "fab-t", "square"]
    printed = capsys.readouterr().out
    report = json.loads((out / "reproduce_report.json").read_text())
    assert report["claimed"]["clean_acc"] == 84.59 and report["claimed"]["autoattack_acc"] == 55.54  # metadata
    assert report["eps"] == pytest.approx(8 / 255) and report["autoattack_version"] == "standard"
    assert report["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    m = report["measured"]
    assert (m["clean_acc"], m["autoattack_acc"], m["clean_correct"], m["robust_correct"]) == (25.0, 12.5, 2, 1)
    assert m["clean_acc_ci95"] == pytest.approx([100 * v for v in rbio.wilson_interval(2, 8)], abs=1e-3)
    assert m["autoattack_acc_ci95"] == pytest.approx([100 * v for v in rbio.wilson_interval(1, 8)], abs=1e-3)
    assert report["difference"] == {"clean_acc": pytest.approx(25 - 84.59), "autoattack_acc": pytest.approx(12.5 - 55.54)}
    assert report["per_attack_robust_acc"] == {"clean": 25.0, "apgd-ce": 12.5, "apgd-t": 12.5, "fab-t": 12.5,
                                               "square": 12.5}
    assert report["verdict"] == "not consistent" and "clean accuracy 84.59 is above" in report["verdict_detail"]
    assert report["resumed"] and report["wall_time_s"] >= report["this_call_wall_time_s"] > 0
    assert report["environment"]["torch"] == torch.__version__
    assert report["checkpoint"]["sha256"] and report["n_examples"] == 8 and report["ci_method"].startswith("Wilson")
    assert "84.59" in printed and "55.54" in printed and "verdict:     not consistent" in printed
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["autoattack_acc"] == 12.5

    # once finished: without --resume the folder is refused; with it the finished AutoAttack state gives
    # the same numbers at once, no attack reruns
    calls.clear()
    assert main(argv) == 2 and calls == []
    assert capsys.readouterr().err.startswith(f"advgkl reproduce: error: {out} already holds a reproduce report; "
                                              f"pass --resume")
    assert main(argv + ["--resume"]) == 0 and calls == []
    again = json.loads((out / "reproduce_report.json").read_text())
    assert again["resumed"] and again["measured"] == report["measured"]

    # a different evaluation in the same folder is refused before any compute, --resume or not
    assert main(argv[:6] + ["--n-examples", "4"] + argv[8:] + ["--resume"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_reproduce_model_broken_by_first_attack(r18_setup, tmp_path, cheap_autoattack):
    labels = r18_setup["labels"].clone()
    labels[WHITE] = (labels[WHITE] + 1) % 10  # only the tiny-margin point is correct: AA ends at 0 %
    write_cifar10_test_batch(tmp_path / "data", r18_setup["images"], labels)
    report = rbio.reproduce(R18, model_dir=r18_setup["model_dir"], data_dir=tmp_path / "data", out_dir=tmp_path / "out",
                            batch_size=4, device="cpu", wandb="disabled", download=False, progress=False,
                            resume=True, echo=lambda *a: None)  # resume=True in a fresh folder simply starts
    assert not report["resumed"]
    assert report["per_attack_robust_acc"] == {"clean": 12.5, "apgd-ce": 0.0, "apgd-t": 0.0, "fab-t": 0.0,
                                               "square": 0.0}


def test_reproduce_rejects_bad_n(r18_setup, tmp_path):
    with pytest.raises(UserError, match="between 1 and 8"):
        rbio.reproduce(R18, n_examples=9, model_dir=r18_setup["model_dir"], data_dir=r18_setup["data_dir"],
                       out_dir=tmp_path, wandb="disabled", device="cpu", download=False)


# ----------------------------------------------------------------------------------------------------
# export

def _fake_run(run_dir, model_name="tiny_cnn", evaluated="ema"):
    from advgkl.models import create_model

    torch.manual_seed(0)
    model, ema = create_model(model_name), create_model(model_name)
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"format": "advgkl-checkpoint-v1", "config": {"model": {"name": model_name}},
                "model": model.state_dict(), "ema": ema.state_dict(), "epoch": 1}, run_dir / "checkpoints" / "final.pt")
    results = {"name": "demo", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "model": model_name,
               "method": "gkl_at", "evaluated_weights": evaluated, "clean_acc": 0.8531, "autoattack_acc": 0.5709,
               "per_attack_robust_acc": {"clean": 0.8531, "apgd-ce": 0.58}, "n_examples": 10000,
               "autoattack_version": "standard", "config": Config().to_dict()}
    (run_dir / "results.json").write_text(json.dumps(results))
    return model, ema


def test_export_round_trip(tmp_path, monkeypatch, capsys):
    from advgkl.models import create_model

    run = tmp_path / "run"
    _, ema = _fake_run(run)
    assert main(["export-robustbench", str(run), "--name", "Mine2025GKL_tiny", "--out", str(tmp_path / "rb"),
                 "--link", "https://example.org", "--venue", "arXiv"]) == 0
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "Mine2025GKL_tiny.json").read_text())
    shipped = rbio._model_info("cifar10", "Linf")["Cui2023Decoupled_WRN-34-10"]
    assert list(info) == list(shipped)  # same fields, same order as RobustBench's own files
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"], info["eps"]) == ("85.31", "57.09", "57.09", "8/255")
    assert info["dataset"] == "cifar10" and info["additional_data"] is False and info["link"] == "https://example.org"

    weights = tmp_path / "rb" / "cifar10" / "Linf" / "Mine2025GKL_tiny.pt"
    x = torch.rand(4, 3, 32, 32)
    reloaded = create_model("tiny_cnn").eval()
    reloaded.load_state_dict(torch.load(weights, weights_only=True))
    ema.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), ema(x))

    # robustbench's own loader reads the file once the architecture is in its zoo
    rb = rbio.import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]
    monkeypatch.setitem(zoo, "Mine2025GKL_tiny", {"model": lambda: create_model("tiny_cnn"), "gdrive_id": "unused"})
    via_rb = rb.utils.load_model("Mine2025GKL_tiny", model_dir=str(tmp_path / "rb"), dataset="cifar10",
                                 threat_model="Linf")
    with torch.no_grad():
        assert torch.equal(via_rb(x), ema(x))


def test_export_defaults_and_errors(tmp_path):
    run = tmp_path / "run"
    model, _ = _fake_run(run, evaluated="final")
    json_path, weights = rbio.export_robustbench(run, echo=lambda *a: None)
    assert json_path.name == "advgkl_gkl_at_tiny_cnn.json" and json_path.is_relative_to(run / "robustbench")
    exported = torch.load(weights, weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())  # "final" = the raw weights

    results = json.loads((run / "results.json").read_text())
    results["autoattack_acc"] = None
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="no AutoAttack accuracy"):
        rbio.export_robustbench(run)
    with pytest.raises(UserError, match="results.json not found"):
        rbio.export_robustbench(tmp_path / "nowhere")
