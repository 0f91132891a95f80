"""The seven RobustBench boards end to end on CPU: `advgkl leaderboard` and `advgkl reproduce` for one entry of each
board new to advgkl (CIFAR-10 L2, CIFAR-100 Linf, CIFAR-10/100 corruptions, ImageNet Linf and corruptions; CIFAR-10
Linf is test_robustbench.py's), on data generated here in the layouts robustbench's loaders read, with zoo
architectures holding random weights saved in RobustBench's checkpoint layout.

Every model's last layer is set so the expected numbers are known: a huge bias on one class makes a point of that
class correct under any perturbation (Linf / L2), and two dominant classes whose logit gap is a linear function
of the penultimate features split the corrupted images into correct and wrong ones, which the test recomputes
from the arrays and images it wrote.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from PIL import Image
from torch import nn

from advgkl import robustbench_io as rbio
from advgkl.cli import main
from advgkl.errors import UserError
from test_robustbench import cheap_autoattack, write_cifar10_test_batch  # noqa: F401  (a fixture used below)

C_SHAPE = (50_000, 32, 32, 3)  # one CIFAR-C file: severities 1..5 of the 10,000 test images, stacked
N_C = 2  # test points of the CIFAR corruption tests: 75 x N_C forward passes


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _random_zoo_model(name, dataset, threat_model) -> nn.Module:
    torch.manual_seed(0)
    return rbio._zoo(dataset, threat_model)[name]["model"]().eval()


def _save_random_zoo_model(name, dataset, threat_model, model_dir, edit, model=None) -> nn.Module:
    """A zoo architecture with seeded random weights, its last layer changed by ``edit``, saved as RobustBench does."""
    model = model if model is not None else _random_zoo_model(name, dataset, threat_model)
    with torch.no_grad():
        edit(model)
    state = model.state_dict()
    if dataset == "imagenet":  # RobustBench's ImageNet files hold the bare network: no 'model.', no normaliser
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    path = rbio.checkpoint_path(name, dataset, threat_model, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return model


def _always(cls: int):
    """An edit after which the model predicts ``cls`` on every input, by a margin no perturbation undoes."""
    def edit(model):
        _last_linear(model).bias[cls] += 1e4
    return edit


def _reproduce(name, dataset, threat_model, model_dir, data_dir, out, *extra) -> dict:
    argv = ["reproduce", name, "--dataset", dataset, "--threat-model", threat_model, "--model-dir", str(model_dir),
            "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", "--wandb", "disabled", "--offline",
            "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((out / rbio.REPORT_NAME).read_text())


# ----------------------------------------------------------------------------------------------------
# leaderboard

def test_leaderboard_lists_the_seven_boards(capsys):
    assert main(["leaderboard"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["dataset", "threat", "model", "metric", "eps", "entries"]
    rows = [ln.split()[:6] for ln in lines[2:9]]
    assert rows == [["cifar10", "L2", "autoattack_acc", "0.5", "21", "21"],
                    ["cifar10", "Linf", "autoattack_acc", "8/255", "99", "76"],
                    ["cifar10", "corruptions", "corruptions_acc", "-", "23", "17"],
                    ["cifar100", "Linf", "autoattack_acc", "8/255", "38", "38"],
                    ["cifar100", "corruptions", "corruptions_acc", "-", "13", "12"],
                    ["imagenet", "Linf", "autoattack_acc", "4/255", "30", "30"],
                    ["imagenet", "corruptions", "corruptions_acc", "-", "12", "12"]]
    assert "CIFAR-10-C/labels.npy" in lines[4] and "ImageNet-C/{corruption}/{1..5}/{wnid}/*.JPEG" in lines[8]
    assert lines[9].startswith("one board: advgkl leaderboard --dataset")
    assert main(["leaderboard", "--json"]) == 0
    assert [(b["dataset"], b["threat_model"]) for b in json.loads(capsys.readouterr().out)] == rbio.supported()


def test_leaderboard_corruptions_board_and_grep_over_every_board(capsys):
    assert main(["leaderboard", "--dataset", "imagenet", "--threat-model", "corruptions", "--grep", "noisymix"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "name", "architecture", "clean", "corr", "extra", "data"]
    assert [ln.split()[1:] for ln in lines[2:]] == [["Erichson2022NoisyMix_new", "ResNet-50", "76.90", "53.28", "no"],
                                                     ["Erichson2022NoisyMix", "ResNet-50", "76.98", "52.47", "no"]]
    assert main(["leaderboard", "--grep", "Salman2020Do_50_2"]) == 0  # no board named: every board, by board
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "imagenet Linf" and "\n\nimagenet corruptions\n" in out
    assert "Salman2020Do_50_2_Linf  WideResNet-50-2  68.64" in out
    assert main(["leaderboard", "--grep", "Salman2020Do_50_2", "--json"]) == 0
    assert [(r["threat_model"], r["model_name"]) for r in json.loads(capsys.readouterr().out)] == [
        ("Linf", "Salman2020Do_50_2"), ("corruptions", "Salman2020Do_50_2_Linf")]
    assert main(["leaderboard", "--grep", "no-such-paper"]) == 0
    assert capsys.readouterr().out == "no entries on any board match 'no-such-paper'\n"


# ----------------------------------------------------------------------------------------------------
# CIFAR L2 and CIFAR-100 Linf

def _write_cifar100_test(root, images, labels) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    import pickle

    entry = {b"fine_labels": [int(v) for v in labels], b"coarse_labels": [0] * len(labels),
             b"data": images.reshape(len(images), -1).numpy()}
    with open(folder / "test", "wb") as f:
        pickle.dump(entry, f, protocol=4)


@pytest.mark.parametrize("name,dataset,threat_model,eps,claim", [
    ("Sehwag2021Proxy_R18", "cifar10", "L2", 0.5, (89.76, 74.41)),
    ("Addepalli2022Efficient_RN18", "cifar100", "Linf", 8 / 255, (65.45, 27.67)),
])
def test_reproduce_cifar_adversarial_boards(tmp_path, cheap_autoattack, name, dataset, threat_model, eps, claim):
    """4 points, all predicted as class 3 whatever the perturbation: the one labelled 3 is the only correct one."""
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.tensor([1, 3, 0, 2])
    (write_cifar10_test_batch if dataset == "cifar10" else _write_cifar100_test)(tmp_path / "data", images, labels)
    _save_random_zoo_model(name, dataset, threat_model, tmp_path / "models", _always(3))
    report = _reproduce(name, dataset, threat_model, tmp_path / "models", tmp_path / "data", tmp_path / "out",
                        "--batch-size", "4", "--version", "custom", "--attacks", "apgd-ce")
    assert (report["metric"], report["eps"]) == ("autoattack_acc", pytest.approx(eps))
    assert (report["claimed"]["clean_acc"], report["claimed"]["autoattack_acc"]) == claim
    m = report["measured"]
    assert (m["clean_correct"], m["robust_correct"], m["clean_acc"], m["autoattack_acc"]) == (1, 1, 25.0, 25.0)
    assert report["per_attack_robust_acc"] == {"clean": 25.0, "apgd-ce": 25.0}


# ----------------------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C

def _two_class_edit(a: int, b: int, direction: torch.Tensor, feats_mid: torch.Tensor):
    """Classes a and b dominate; a wins where (features - feats_mid) . direction > 0."""
    def edit(model):
        fc = _last_linear(model)
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[a] = direction
        fc.bias[a] = 1e3 - float(direction @ feats_mid)
        fc.bias[b] = 1e3
    return edit


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last linear layer's input for images ``x`` in [0, 1]."""
    seen = {}
    hook = _last_linear(model).register_forward_hook(lambda m, i, o: seen.update(f=i[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["f"].flatten(1)


@pytest.fixture
def lazy_npy(monkeypatch):
    """robustbench reads each 150 MB CIFAR-C file whole, 75 times; memory-mapped, only the rows it keeps are read."""
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: real_load(*a, **{"mmap_mode": "r", **k}))


@pytest.fixture
def no_loader_workers(monkeypatch):
    """robustbench's ImageNet loaders start 2-4 worker processes per call; in-process is faster for a few images."""
    import torch.utils.data

    real = torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: real(*a, **{**k, "num_workers": 0}))


@pytest.fixture(scope="module")
def cifar_c(tmp_path_factory):
    """CIFAR-10-C and CIFAR-100-C folders (hard links to one set of files): 15 corruption files of the real shape,
    sparse, whose first N_C rows of each severity are drawn from a pool of 4 random images, and labels.npy."""
    base = tmp_path_factory.mktemp("cifar_c")
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    picks = {}
    src = base / "files"
    src.mkdir()
    labels = np.array([5, 7] * (N_C // 2) + [0] * (10_000 - N_C), dtype=np.uint8)
    np.save(src / "labels.npy", np.tile(labels, 5))
    for c in rbio.corruptions():
        with open(src / f"{c}.npy", "wb") as f:
            npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": C_SHAPE})
            start = f.tell()
            for s in range(1, 6):
                picks[(c, s)] = rng.integers(0, len(pool), N_C)
                f.seek(start + (s - 1) * 10_000 * 32 * 32 * 3)
                f.write(pool[picks[(c, s)]].tobytes())
            f.truncate(start + int(np.prod(C_SHAPE)))  # the rest stays a hole: 150 MB on paper, kilobytes on disk
    for folder in ("CIFAR-10-C", "CIFAR-100-C"):
        (base / folder).mkdir()
        for p in src.iterdir():
            (base / folder / p.name).hardlink_to(p)
    return {"base": base, "pool": torch.from_numpy(pool).permute(0, 3, 1, 2).float() / 255, "picks": picks,
            "labels": torch.from_numpy(labels[:N_C].astype(np.int64)),
            "clean": torch.from_numpy(pool[:N_C]).permute(0, 3, 1, 2).contiguous()}


@pytest.mark.parametrize("dataset,claim,per_corruption", [("cifar10", (95.08, 88.82), False),
                                                          ("cifar100", (76.28, 64.11), True)])
def test_reproduce_cifar_corruptions(cifar_c, tmp_path, dataset, claim, per_corruption, capsys, lazy_npy):
    name, base, labels, pool = "Hendrycks2020AugMix_WRN", cifar_c["base"], cifar_c["labels"], cifar_c["pool"]
    (write_cifar10_test_batch if dataset == "cifar10" else _write_cifar100_test)(base / dataset, cifar_c["clean"],
                                                                                 labels)
    for folder in ("CIFAR-10-C", "CIFAR-100-C"):
        (base / dataset / folder).symlink_to(base / folder)
    probe = _random_zoo_model(name, dataset, "corruptions")
    f_a, f_b = _features(probe, pool[:1]), _features(probe, pool[1:2])
    model = _save_random_zoo_model(name, dataset, "corruptions", tmp_path / "models",
                                   _two_class_edit(5, 7, (f_a - f_b)[0], ((f_a + f_b) / 2)[0]), probe)
    with torch.no_grad():  # what robustbench's evaluation must find, from the files written above
        pred = model(pool).argmax(1)
    expected = {k: int((pred[idx] == labels).sum()) for k, idx in cifar_c["picks"].items()}
    assert 0 < sum(expected.values()) < 75 * N_C and (pred[:N_C] == labels).all()
    report = _reproduce(name, dataset, "corruptions", tmp_path / "models", base / dataset, tmp_path / "out")
    m = report["measured"]
    assert report["metric"] == "corruptions_acc" and report["eps"] is None
    assert (report["claimed"]["clean_acc"], report["claimed"]["corruptions_acc"]) == claim
    assert (m["clean_correct"], m["clean_acc"]) == (2, 100.0)
    assert m["corrupted_correct"] == pytest.approx(sum(expected.values()) / 75)
    assert m["corruptions_acc"] == pytest.approx(100 * sum(expected.values()) / (75 * N_C), abs=1e-4)
    for (c, s), k in expected.items():
        assert report["per_corruption_acc"][c][str(s)] == pytest.approx(100 * k / N_C)
    # RobustBench publishes per-corruption numbers for this entry on CIFAR-100 only
    assert (report["claimed_per_corruption_acc"] is not None) == per_corruption
    printed = capsys.readouterr().out
    assert f"{name}  {dataset} corruptions  15 corruptions x 5 severities  n={N_C}/{N_C}" in printed
    fog = report["per_corruption_acc"]["fog"]["mean"]
    assert any(ln.split()[:2] == ["fog", f"{fog:.2f}"] and (len(ln.split()) == 3) == per_corruption
               for ln in printed.splitlines())


# ----------------------------------------------------------------------------------------------------
# ImageNet

def _wnids() -> list[str]:
    return list(rbio.testsets._imagenet_wnids())


def _image_folder(root, ids, images) -> None:
    """``root/{wnid}/`` for all 1000 classes, and ``images[i]`` saved as RobustBench's i-th listed file."""
    for w in _wnids():
        (root / w).mkdir(parents=True)
    for rel, img in zip(ids, images):
        img.save(root / rel, format="JPEG", quality=95)


def _random_image(seed: int, size=(80, 60)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _as_robustbench_reads(img: Image.Image, preprocessing) -> torch.Tensor:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)  # the same bytes as on disk, decoded the same way
    return preprocessing(Image.open(buf).convert("RGB"))[None]


@pytest.mark.slow
def test_reproduce_imagenet_linf(tmp_path, cheap_autoattack, no_loader_workers):
    """Two listed images; every input is predicted as the first one's class: clean 50 %, robust 50 %."""
    ids = rbio.testsets._imagenet_ids()[:2]
    labels = [_wnids().index(i.split("/")[0]) for i in ids]
    assert labels[0] != labels[1]
    _image_folder(tmp_path / "data" / "val", ids, [_random_image(0), _random_image(1)])
    _save_random_zoo_model("Salman2020Do_R18", "imagenet", "Linf", tmp_path / "models", _always(labels[0]))
    report = _reproduce("Salman2020Do_R18", "imagenet", "Linf", tmp_path / "models", tmp_path / "data",
                        tmp_path / "out", "--n-examples", "2", "--version", "custom", "--attacks", "apgd-ce")
    assert report["eps"] == pytest.approx(4 / 255) and report["n_test_set"] == 5000
    assert (report["claimed"]["clean_acc"], report["claimed"]["autoattack_acc"]) == (52.92, 25.32)
    m = report["measured"]
    assert (m["clean_correct"], m["robust_correct"], m["clean_acc"], m["autoattack_acc"]) == (1, 1, 50.0, 50.0)
    assert "measured on the first 2 of 5000 test points; the claim is for all 5000" in report["notes"]


@pytest.mark.slow
def test_reproduce_imagenet_corruptions(tmp_path, no_loader_workers):
    """One listed image: clean as image A; ImageNet-C's severities 1-2 hold A (correct), 3-5 image B (wrong)."""
    name = "Hendrycks2020AugMix"
    first = rbio.testsets._imagenet_ids()[0]
    label = _wnids().index(first.split("/")[0])
    img_a, img_b = _random_image(2), _random_image(3, size=(50, 70))
    prepr = rbio.testsets.preprocessing(name, "imagenet", "corruptions")
    probe = _random_zoo_model(name, "imagenet", "corruptions")
    f_a = _features(probe, _as_robustbench_reads(img_a, prepr))[0]
    f_b = _features(probe, _as_robustbench_reads(img_b, prepr))[0]
    other = (label + 1) % 1000
    _save_random_zoo_model(name, "imagenet", "corruptions", tmp_path / "models",
                           _two_class_edit(label, other, f_a - f_b, (f_a + f_b) / 2), probe)
    data = tmp_path / "data"
    _image_folder(data / "val", [first], [img_a])
    _image_folder(tmp_path / "tree_a", [first], [img_a])
    _image_folder(tmp_path / "tree_b", [first], [img_b])
    for c in rbio.corruptions():  # 75 links to two trees: 75 copies of 1000 class folders would cost seconds
        (data / "ImageNet-C" / c).mkdir(parents=True)
        for s in range(1, 6):
            (data / "ImageNet-C" / c / str(s)).symlink_to(tmp_path / ("tree_a" if s <= 2 else "tree_b"))
    report = _reproduce(name, "imagenet", "corruptions", tmp_path / "models", data, tmp_path / "out",
                        "--n-examples", "1")
    assert (report["claimed"]["clean_acc"], report["claimed"]["corruptions_acc"]) == (77.34, 49.33)
    m = report["measured"]
    assert (m["clean_acc"], m["corruptions_acc"], m["corrupted_correct"]) == (100.0, 40.0, pytest.approx(0.4))
    assert report["per_corruption_acc"]["fog"] == {"1": 100.0, "2": 100.0, "3": 0.0, "4": 0.0, "5": 0.0,
                                                    "mean": 40.0}
    assert m["corruptions_acc_ci95"] == pytest.approx([100 * v for v in rbio.wilson_interval(0.4, 1)], abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# what each board needs on disk: one-line errors naming the folder and the files

def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_cifar_c_missing_offline_names_folder_and_files(tmp_path):
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("cifar100", tmp_path, 4, download=False)
    msg = _one_line(e)
    assert msg.startswith(f"cifar100 corruptions not found and downloads are off (--offline): {tmp_path}/CIFAR-100-C/ "
                          f"does not exist; it must hold labels.npy and the 15 files {{corruption}}.npy (shot_noise, ")
    assert "each 50000 x 32 x 32 x 3 uint8" in msg and msg.endswith("the folder that holds CIFAR-100-C/")
    assert not (tmp_path / "CIFAR-100-C").exists()


def test_cifar_c_incomplete_or_wrong_files(tmp_path, monkeypatch):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "labels.npy", np.zeros(50_000, dtype=np.uint8))
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("cifar10", tmp_path, 4, download=False)
    assert _one_line(e).startswith(f"{folder}/ lacks shot_noise.npy, motion_blur.npy, ")
    for c in rbio.corruptions():
        np.save(folder / f"{c}.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))  # too few rows
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("cifar10", tmp_path, 4, download=True)
    assert _one_line(e).startswith(f"{folder / 'shot_noise.npy'} holds uint8 [10, 32, 32, 3]; {folder}/ must hold")
    np.save(folder / "labels.npy", np.full(50_000, 10, dtype=np.uint8))  # CIFAR-10 has classes 0..9
    with pytest.raises(UserError, match=r"not at least 4 labels in \[0, 9\]"):
        rbio.require_corruptions("cifar10", tmp_path, 4, download=False)
    (folder / "labels.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="labels.npy is not a readable .npy file"):
        rbio.require_corruptions("cifar10", tmp_path, 4, download=False)


def test_cifar_c_download_failure(tmp_path, monkeypatch):
    import robustbench.data

    def offline(record, files, save_dir):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(robustbench.data, "zenodo_download", offline)
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("cifar10", tmp_path / "d", 4, download=True)
    assert _one_line(e) == ("could not download CIFAR-10-C from Zenodo record 2535967 (ConnectionError: Name or "
                            f"service not known); download CIFAR-10-C.tar by hand and unpack it in {tmp_path / 'd'}/")


def test_imagenet_val_layout_errors(tmp_path):
    first = rbio.testsets._imagenet_ids()[0]
    with pytest.raises(UserError) as e:
        rbio.load_clean("imagenet", "Salman2020Do_R50", "Linf", tmp_path, 2, download=True)
    msg = _one_line(e)
    assert msg.startswith(f"ImageNet validation images not found: {tmp_path}/val/ does not exist. RobustBench reads "
                          f"{tmp_path}/val/{{wnid}}/{{file}} for the images listed in "
                          f"robustbench/helper_files/imagenet_test_image_ids.txt (the first is {tmp_path / 'val' / first})")
    assert msg.endswith("point --data-dir at the folder that holds val/")
    for w in _wnids()[:997]:
        (tmp_path / "val" / w).mkdir(parents=True)
    (tmp_path / "val" / "extra").mkdir()
    with pytest.raises(UserError) as e:
        rbio.load_clean("imagenet", "Salman2020Do_R50", "Linf", tmp_path, 2, download=True)
    assert _one_line(e).startswith(f"ImageNet validation images: {tmp_path}/val/ holds 998 class folders, not the 1000 "
                                   f"ImageNet wnids (missing 3: {_wnids()[997:]}, unexpected 1: ['extra'])")
    (tmp_path / "val" / "extra").rmdir()
    for w in _wnids()[997:]:
        (tmp_path / "val" / w).mkdir()
    with pytest.raises(UserError) as e:
        rbio.load_clean("imagenet", "Salman2020Do_R50", "Linf", tmp_path, 2, download=True)
    assert _one_line(e).startswith(f"ImageNet validation images: 2 of the first 2 images RobustBench evaluates are "
                                   f"missing, e.g. {tmp_path / 'val' / first}. ")
    (tmp_path / "val" / first).write_bytes(b"not a JPEG")
    second = rbio.testsets._imagenet_ids()[1]
    _random_image(0).save(tmp_path / "val" / second, format="JPEG")
    with pytest.raises(UserError, match=f"robustbench could not read the images under {tmp_path / 'val'} "
                                        f"\\(UnidentifiedImageError: "):
        rbio.load_clean("imagenet", "Salman2020Do_R50", "Linf", tmp_path, 2, download=True)
    with pytest.raises(UserError, match=r"--n-examples must be between 1 and 5000 \(RobustBench's ImageNet test subset"):
        rbio.load_clean("imagenet", "Salman2020Do_R50", "Linf", tmp_path, 5001, download=True)


def test_imagenet_c_missing(tmp_path):
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("imagenet", tmp_path, 1, download=True)  # never downloaded
    assert _one_line(e).startswith(f"ImageNet-C not found: {tmp_path}/ImageNet-C/ does not exist. RobustBench reads "
                                   f"{tmp_path}/ImageNet-C/{{corruption}}/{{severity}}/{{wnid}}/{{file}} for the 15 "
                                   f"corruptions (shot_noise, ")
    (tmp_path / "ImageNet-C").mkdir()
    with pytest.raises(UserError) as e:
        rbio.require_corruptions("imagenet", tmp_path, 1, download=True)
    assert _one_line(e).startswith(f"ImageNet-C shot_noise severity 1 not found: {tmp_path}/ImageNet-C/shot_noise/1/ "
                                   f"does not exist.")


def test_reproduce_corruptions_refuses_attacks(tmp_path, capsys):
    capsys.readouterr()
    assert main(["reproduce", "Standard", "--threat-model", "corruptions", "--version", "custom", "--attacks",
                 "apgd-ce", "--out", str(tmp_path / "out"), "--offline"]) == 2
    assert capsys.readouterr().err == ("advgkl reproduce: error: --attacks applies to the Linf and L2 boards; cifar10 "
                                       "corruptions measures clean accuracy on corrupted images, with no attack\n")
    assert not (tmp_path / "out").exists()


def test_imagenet_standard_entry_weights_come_from_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url, cached = rbio.zoo.hub_weights("Standard_R50", "imagenet", "Linf")
    assert url.startswith("https://download.pytorch.org/models/resnet50-") and cached.name == url.rsplit("/", 1)[1]
    with pytest.raises(UserError) as e:
        rbio.load_leaderboard_model("Standard_R50", "imagenet", "corruptions", tmp_path / "models", download=False)
    assert _one_line(e) == (f"the weights of Standard_R50 are not in torch.hub's cache and downloads are off "
                            f"(--offline): torchvision (not --model-dir) provides them, from {url}; put that file at "
                            f"{cached} (the cache follows $TORCH_HOME), or run once without --offline")


# ----------------------------------------------------------------------------------------------------
# export-robustbench for every board

@pytest.mark.parametrize("dataset,threat_model,eps,eps_str", [("cifar10", "L2", 0.5, "0.5"),
                                                              ("cifar100", "Linf", 8 / 255, "8/255"),
                                                              ("imagenet", "Linf", 4 / 255, "4/255")])
def test_export_adversarial_boards(tmp_path, dataset, threat_model, eps, eps_str):
    from test_robustbench import _fake_run

    run = tmp_path / "run"
    _fake_run(run)
    res = json.loads((run / "results.json").read_text())
    res.update(dataset=dataset, threat_model=threat_model, eps=eps, n_examples=1000)
    (run / "results.json").write_text(json.dumps(res))
    printed = []
    json_path, weights = rbio.export_robustbench(run, name="Me2025", echo=printed.append)
    assert json_path == run / "robustbench" / "model_info" / dataset / threat_model / "Me2025.json"
    assert weights == run / "robustbench" / dataset / threat_model / "Me2025.pt"
    info = json.loads(json_path.read_text())
    assert (info["eps"], info["clean_acc"], info["autoattack_acc"]) == (eps_str, "85.31", "57.09")
    size = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}[dataset]
    assert printed[0] == (f"warning: evaluated on 1000 test points; RobustBench entries use the full test set "
                          f"({size})")


def test_export_corruptions_entry(tmp_path, capsys):
    from test_robustbench import _fake_run

    run = tmp_path / "run"
    _fake_run(run)
    res = json.loads((run / "results.json").read_text())
    assert main(["export-robustbench", str(run), "--name", "Me2025", "--threat-model", "corruptions"]) == 2
    assert capsys.readouterr().err == (
        f"advgkl export-robustbench: error: {run / 'results.json'} lacks ['corruptions_acc']; a corruptions entry "
        f"needs ['dataset', 'model', 'method', 'clean_acc', 'corruptions_acc'] (corruptions_acc: "
        f"advgkl.robustbench_io.corruption_accuracy on CIFAR-C / ImageNet-C)\n")
    res["corruptions_acc"] = 0.7512
    (run / "results.json").write_text(json.dumps(res))
    assert main(["export-robustbench", str(run), "--name", "Me2025", "--threat-model", "corruptions"]) == 0
    info = json.loads((run / "robustbench" / "model_info" / "cifar10" / "corruptions" / "Me2025.json").read_text())
    shipped = rbio._model_info("cifar10", "corruptions")["Addepalli2022Efficient_WRN_34_10"]
    assert list(info) == [k for k in shipped if k != "footnote"]  # RobustBench's own fields and order
    assert (info["eps"], info["clean_acc"], info["corruptions_acc"], info["reported"]) == ("8/255", "85.31", "75.12",
                                                                                            "75.12")
    assert (run / "robustbench" / "cifar10" / "corruptions" / "Me2025.pt").is_file()
    assert main(["export-robustbench", str(run), "--threat-model", "L2", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.endswith("holds a Linf evaluation; it cannot be exported to the L2 board\n")
    res["threat_model"] = "corruptions"  # an evaluation of corruptions alone: the board by default, eps null
    del res["eps"]
    (run / "results.json").write_text(json.dumps(res))
    json_path, _ = rbio.export_robustbench(run, name="Me2025c", echo=lambda *a: None)
    assert json_path.parent.name == "corruptions" and json.loads(json_path.read_text())["eps"] is None
