"""ImageNet-scale training (advgkl.streaming, resnet50) on a tiny generated ImageFolder in ImageNet's layout:
<root>/imagenet/{train,val}/<wnid>/*.JPEG."""
import json

import numpy as np
import pytest
import torch

from advgkl.errors import UserError
from advgkl.streaming import StreamingLoader, evaluation_points, image_folder, training_split
from conftest import tiny_recipe

torch.set_num_threads(1)
WNIDS = ("n01440764", "n01443537", "n01484850")


def write_imagenet(root, n_train=8, n_val=4, seed=0):
    """Random RGB JPEGs of assorted sizes, one folder per class, in both splits; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(WNIDS):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 60, size=2)
                pixels = (rng.random((h, w, 3)) * 80 + 60 * c).astype(np.uint8)  # classes differ in brightness
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("data"))


def loader(root, **kw):
    folder, train_idx, _ = training_split(root, 0, 0, seed=0)
    return StreamingLoader(folder, train_idx, 6, augment="crop_flip", image_size=32, seed=1, **kw)


def test_streaming_batches_are_exact_resumable_and_worker_independent(imagenet):
    first = loader(imagenet)
    assert len(first) == 4  # 24 images, batches of 6
    epoch = list(first)
    assert first.state_dict() == {"epoch": 1, "batch": 0}
    x, y = epoch[0]
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(epoch[0][0], epoch[1][0])
    resumed = loader(imagenet)
    resumed.load_state_dict({"epoch": 0, "batch": 2})
    for (xa, ya), (xb, yb) in zip(epoch[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with_workers = loader(imagenet, workers=2)
    xw, yw = next(iter(with_workers))
    assert torch.equal(xw, x) and torch.equal(yw, y)  # each image's augmentation has its own seed
    ranks = [next(iter(loader(imagenet, rank=r, world_size=2))) for r in range(2)]
    for r, (xr, yr) in enumerate(ranks):
        assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])
    second_epoch = next(iter(first))
    assert not torch.equal(second_epoch[0], x)  # another order and other crops


def test_test_points_are_a_class_balanced_prefix_with_the_evaluation_transform(imagenet):
    x, y = evaluation_points(imagenet, 3, image_size=32)
    assert x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2]
    again, _ = evaluation_points(imagenet, 3, image_size=32)
    assert torch.equal(x, again)  # resize + centre crop: deterministic
    with pytest.raises(UserError, match=r"eval.n_examples=13: imagenet evaluates the first n of its 12 validation"):
        evaluation_points(imagenet, 13, image_size=32)


def test_missing_or_mismatched_imagenet_names_the_layout(tmp_path, imagenet):
    with pytest.raises(UserError, match=r"ImageNet not found: expected .*imagenet/train/<wnid>/\*\.JPEG"):
        image_folder(tmp_path, True)
    odd = write_imagenet(tmp_path / "odd")
    (odd / "imagenet" / "val" / WNIDS[0]).rename(odd / "imagenet" / "val" / "n99999999")
    with pytest.raises(UserError, match=r"hold different class folders"):
        image_folder(odd, False)


def test_resnet50_trains_and_evaluates_on_the_tiny_imagefolder(imagenet, tmp_path):
    from advgkl.trainers import train

    cfg = tiny_recipe(imagenet, data={"dataset": "imagenet", "image_size": 32, "batch_size": 6, "subset": 18,
                                      "val_size": 3, "augment": "crop_flip"},
                      model={"name": "resnet50"}, method={"name": "pgd_at"}, attack={"eps": 4 / 255, "steps": 1},
                      eval={"version": "none", "n_examples": 6, "batch_size": 6, "val_pgd_steps": 1})
    results = train(cfg, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["n_examples"] == 6 and 0 <= stored["clean_acc"] <= 1
    assert results["clean_acc"] == stored["clean_acc"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 3 and "val_pgd_acc" in record  # 18 images in batches of 6; 3 held out


@pytest.mark.parametrize("sections, message", [
    ({"data": {"dataset": "imagenet", "augment": "autoaugment"}}, r"data.augment: 'autoaugment' is not available for imagenet"),
    ({"data": {"dataset": "imagenet", "generated": "x.npz", "generated_ratio": 0.5}}, r"data.generated: mixing in"),
    ({"data": {"dataset": "imagenet"}, "eval": {"n_examples": 0}}, r"eval.n_examples: 0 \(all\) is not available"),
    ({"data": {"dataset": "fashion_mnist"}, "model": {"name": "resnet50"}}, None),
])
def test_imagenet_recipe_refusals(sections, message):
    if message is None:  # resnet50 on a 1-channel dataset: refused when the model is built
        from advgkl.runtime import build_model

        with pytest.raises(UserError, match=r"model resnet50 takes RGB images \(3 channels\); the dataset has 1"):
            build_model(tiny_recipe(**sections))
        return
    with pytest.raises(UserError, match=message):
        tiny_recipe(**sections)


def test_the_imagenet_recipe_loads():
    from pathlib import Path

    from advgkl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "imagenet_resnet50_pgd_at.yaml")
    assert (cfg.data.dataset, cfg.model.name, cfg.attack.eps, cfg.eval.n_examples) == ("imagenet", "resnet50", 4 / 255, 5000)


def test_streaming_loader_refusals(imagenet):
    from advgkl.streaming import transform

    folder, train_idx, _ = training_split(imagenet, 0, 0, seed=0)
    with pytest.raises(UserError, match=r"global batch_size 5 must split evenly over world_size 2"):
        StreamingLoader(folder, train_idx, 5, augment="none", image_size=32, world_size=2)
    with pytest.raises(UserError, match=r"24 training images make no full batch of 32"):
        StreamingLoader(folder, train_idx, 32, augment="none", image_size=32)
    stream = StreamingLoader(folder, train_idx, 6, augment="none", image_size=32)
    with pytest.raises(UserError, match=r"loader position .* is outside 0 <= batch < 4"):
        stream.load_state_dict({"epoch": 0, "batch": 4})
    stream.set_epoch(3)
    assert stream.state_dict() == {"epoch": 3, "batch": 0} and len(stream.dataset) == 24
    with pytest.raises(UserError, match=r"data.subset=30, data.val_size=0: the imagenet training set under .* has 24"):
        training_split(imagenet, 30, 0, seed=0)
    with pytest.raises(UserError, match=r"data.augment: 'autoaugment' is not available for imagenet"):
        transform("autoaugment", 32)
