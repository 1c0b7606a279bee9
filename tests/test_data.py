"""The CIFAR-10 class-folder layout (train/<class>/*, test/ or val/), read by exp_cifar_cnn.py and
exp_imagenette_resnet.py --dataset cifar10 through one loader: exact pixels from PNGs, shapes and
labels from JPEGs, a cache that follows the folder, and one line naming the file for a bad folder;
the training subset, seeded and random."""
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import refused
from conftest import run_script

CLASSES = ("truck", "airplane", "cat")  # written unsorted: labels follow the sorted names


def class_folders(root, suffix=".png", test_split="test", n=(4, 2), solid=False):
    """root/{train,test}/<class>/NN<suffix> of known random pixels; returns {split: (x NHWC, y)} in
    the order the loader must give (classes sorted, files sorted within a class). solid: one random
    colour per image (JPEG keeps it; it does not keep random noise)."""
    rng = np.random.default_rng(1)
    expected = {}
    for split, count in (("train", n[0]), (test_split, n[1])):
        xs, ys = [], []
        for label, name in enumerate(sorted(CLASSES)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 256, (1, 1, 3) if solid else (32, 32, 3), dtype=np.uint8)
                img = np.broadcast_to(img, (32, 32, 3)).copy()
                Image.fromarray(img).save(root / split / name / f"{i:04d}{suffix}")
                xs.append(img)
                ys.append(label)
        expected[split] = (np.stack(xs), np.array(ys))
    return expected


def test_png_class_folders_load_exactly_and_are_cached(tmp_path):
    expected = class_folders(tmp_path / "cifar")
    for attempt in ("decoded", "cached"):
        x_train, y_train, x_test, y_test = common.load_cifar10(tmp_path / "cifar", download=False)
        assert x_train.dtype == torch.uint8 and x_train.shape == (12, 32, 32, 3)
        assert np.array_equal(x_train.numpy(), expected["train"][0]), attempt
        assert np.array_equal(x_test.numpy(), expected["test"][0]), attempt
        assert y_train.tolist() == expected["train"][1].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert y_test.tolist() == expected["test"][1].tolist() and y_test.dtype == torch.int64
        assert len(list((tmp_path / "cifar").glob("tensors_32px_*.pt"))) == 1
    # a changed folder is decoded again (a new cache), not served from the old one
    img = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "cifar" / "train" / "cat" / "9999.png")
    x_train, y_train, _, _ = common.load_cifar10(tmp_path / "cifar", download=False)
    assert len(x_train) == 13 and x_train[8].sum() == 0 and y_train[8] == 1  # the last of cat's 5


def test_jpeg_class_folders_with_val_give_shapes_and_labels(tmp_path):
    expected = class_folders(tmp_path / "cifar", ".jpg", "val", solid=True)
    x_train, y_train, x_test, y_test = common.load_cifar10(tmp_path / "cifar", download=False)
    assert x_train.shape == (12, 32, 32, 3) and x_test.shape == (6, 32, 32, 3)
    assert y_train.tolist() == expected["train"][1].tolist() and y_test.tolist() == expected["val"][1].tolist()
    # JPEG is lossy, but the pixels are the images' own (not another image's)
    assert (x_train.float() - torch.from_numpy(expected["train"][0]).float()).abs().amax() < 8


@pytest.mark.parametrize("script, units", [(["exp_cifar_cnn.py", "--train-size", "0"], "cifar10_true"),
                                           (["exp_imagenette_resnet.py", "--dataset", "cifar10"], "cifar10_authors")])
def test_both_cifar_scripts_run_on_class_folders(tmp_path, script, units):
    class_folders(tmp_path / "cifar", n=(20, 4))
    run_script(*script, "--quick", "--data-dir", tmp_path / "cifar", "--out", tmp_path / "run")
    info = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert info["data"]["shapes"][0][0] == 60 and info["data"]["shapes"][2][0] == 12
    mean, std, _ = common.NORMALISATIONS[units]  # config.json names the script's normalisation
    assert info["normalisation"]["name"] == units and info["normalisation"]["std"] == list(std)


def _break(root, how):
    if how == "no test split":
        shutil.rmtree(root / "test")
        return "test/ or val/ is missing"
    if how == "class missing from test":
        shutil.rmtree(root / "test" / "cat")
        return "no class folder cat (it is in train/)"
    if how == "not an image":
        (root / "train" / "cat" / "notes.txt").write_text("hello")
        return "notes.txt: not an image file"
    if how == "damaged image":
        (root / "train" / "cat" / "0001.png").write_bytes(b"\x89PNG damaged")
        return "0001.png: not a readable image"
    if how == "wrong size":
        Image.fromarray(np.zeros((28, 32, 3), np.uint8)).save(root / "test" / "truck" / "0000.png")
        return "0000.png: 32x28 px, but every image must be 32x32"
    if how == "stray file":
        (root / "train" / "README").write_text("hello")
        return "README: a file outside the class folders"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no test split", "class missing from test", "not an image", "damaged image",
                                 "wrong size", "stray file"])
def test_a_bad_class_folder_is_named_in_one_line(tmp_path, how):
    class_folders(tmp_path / "cifar")
    message = _break(tmp_path / "cifar", how)
    refused(run_script("exp_cifar_cnn.py", "--data-dir", tmp_path / "cifar", "--out", tmp_path / "run", ok=False),
            message, tmp_path / "run")


def test_the_training_subset_is_a_seeded_random_one_or_the_first_examples():
    cfg = types.SimpleNamespace(train_size=5)
    drawn = common.take_train_subset(cfg, 100, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randperm(100, generator=torch.Generator().manual_seed(3))[:5])
    assert not torch.equal(drawn, torch.arange(5))  # random, not the first five (data files are often sorted)
    assert torch.equal(common.take_train_subset(cfg, 100), torch.arange(5))
    assert len(common.take_train_subset(types.SimpleNamespace(train_size=0), 100, torch.Generator())) == 100
