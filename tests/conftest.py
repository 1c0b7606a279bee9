import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)  # small models: one thread is fastest on the 2-core CI machine


# ------------------------------------------------------------ tiny data sets in the real on-disk formats
import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_idx(path, array):
    """IDX as in the MNIST distribution: magic (0, 0, dtype 0x08, ndim), big-endian sizes, bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """torchvision's layout, <root>/MNIST/raw/*-ubyte: digits drawn as class-dependent bars + noise."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def cifar_npz(tmp_path_factory):
    """The .npz layout the CIFAR script documents (x uint8 N x 32 x 32 x 3, y labels)."""
    path = tmp_path_factory.mktemp("cifar") / "cifar_tiny.npz"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 300), ("test", 100)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        x[np.arange(n), :, :, y % 3] //= 3  # a weak colour cue per class
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """train/ and val/ folders of class folders of JPEGs of various sizes, as Imagenette ships."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenette")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for c, wnid in enumerate(("n01440764", "n02102040", "n02979186")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (40 + i, 50, 3)).astype(np.uint8)
                img[..., c] = 255
                Image.fromarray(img).save(folder / f"img{i}.JPEG")
    return root
