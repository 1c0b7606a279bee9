"""Are every script's --quick metrics byte-identical to a saved set? The check a refactor must pass.

    python tools/quick_identity.py save DIR [--repo CHECKOUT]    # run the seven --quick runs, keep their metrics.jsonl
    python tools/quick_identity.py check DIR [--repo CHECKOUT]   # run them again and compare byte for byte

The seven runs: the five scripts, the modular transformer and the CIFAR-10 ResNet, each on CPU with one
thread, on tiny data made here in the real on-disk formats (IDX, .npz, a folder of PNGs), so nothing
outside the repository is needed. --repo runs another checkout's scripts (e.g. a git worktree of
the commit before a change) on the same data.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUNS = {  # name: (script, flags after --quick)
    "modular_arith": ("exp_modular_arith.py", []),
    "modular_transformer": ("exp_modular_arith.py", ["--model", "transformer"]),
    "mnist_mlp": ("exp_mnist_mlp.py", ["--data-dir", "{mnist}", "--no-download"]),
    "deep_mlp_rank": ("exp_deep_mlp_rank.py", ["--data-dir", "{mnist}", "--no-download"]),
    "cifar_cnn": ("exp_cifar_cnn.py", ["--data-dir", "{cifar}"]),
    "imagenette_resnet": ("exp_imagenette_resnet.py", ["--data-dir", "{images}", "--no-download"]),
    "cifar10_resnet": ("exp_imagenette_resnet.py", ["--dataset", "cifar10", "--data-dir", "{cifar}"]),
}


def make_data(root):
    """Tiny MNIST (IDX), CIFAR-10 (.npz) and Imagenette (class folders of PNGs) under root."""
    from PIL import Image
    rng = np.random.default_rng(0)
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    arrays = {}
    for split, n in (("train", 300), ("test", 100)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        x[np.arange(n), :, :, y % 3] //= 3
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    np.savez(root / "cifar.npz", **arrays)
    for split, n in (("train", 10), ("val", 4)):
        for c in range(3):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (40 + i, 50, 3)).astype(np.uint8)
                img[..., c] = 255
                Image.fromarray(img).save(folder / f"img{i}.png")
    return {"mnist": root / "mnist", "cifar": root / "cifar.npz", "images": root / "images"}


def run_all(repo, out):
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_data(Path(tmp))
        for name, (script, flags) in RUNS.items():
            folder = Path(tmp) / "runs" / name
            cmd = [sys.executable, script, "--quick", "--device", "cpu", "--out", str(folder),
                   *[f.format(**paths) for f in flags]]
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
            if proc.returncode:
                sys.exit(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            (out / f"{name}.jsonl").write_bytes((folder / "metrics.jsonl").read_bytes())
            print(f"{name}: {len((folder / 'metrics.jsonl').read_text().splitlines())} records", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["save", "check"])
    parser.add_argument("dir", type=Path, help="where the saved metrics are (or go)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    if args.mode == "save":
        run_all(args.repo, args.dir)
    else:
        with tempfile.TemporaryDirectory() as fresh:
            run_all(args.repo, Path(fresh))
            differ = [n for n in RUNS if (Path(fresh) / f"{n}.jsonl").read_bytes() != (args.dir / f"{n}.jsonl").read_bytes()]
        print("byte-identical: all seven" if not differ else f"DIFFERENT: {', '.join(differ)}")
        sys.exit(1 if differ else 0)
