"""What the tests share: helpers (run a script as a user would, read a run, expect a one-line
refusal; small trained models; the TF32 flags), and tiny data sets in the real on-disk formats."""
import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)  # small models: one thread is fastest on the 2-core CI machine


# ------------------------------------------------------------ helpers
REPO = Path(__file__).resolve().parent.parent


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(name, *args, ok=True):
    """`python <name> --device cpu <args>` (common.py: without --device) as a user types it, run in this process (as `python` would
    run it: __main__, sys.argv, stdout and stderr captured, warnings printed to stderr, the exit code
    from SystemExit, a traceback on a crash), which spares an interpreter and a torch import a call.
    Tests that kill, interrupt or lock need a real process and use subprocess themselves."""
    import contextlib
    import io
    import runpy
    import traceback
    import warnings
    sys.path.insert(0, str(REPO))
    import common
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [str(REPO / name), *(["--device", "cpu"] if name.startswith("exp_") else []), *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: err.write(warnings.formatwarning(m, c, f, n))
            try:
                runpy.run_path(str(REPO / name), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
        for lock in common._LOCKS:  # a process's run-folder locks end with it
            lock.close()
        common._LOCKS.clear()
    proc = subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_run_folder(run):
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "metrics.png", "summary.json", "checkpoint.pt",
                 "partition_init.png", "partition_end.png"):
        assert (run / name).exists(), name
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / ".lock").exists()  # a finished folder is released
    recs = records(run)
    assert recs[0]["step"] == 0 and len(recs) >= 3
    last = recs[-1]
    for key in ("train_acc", "test_acc", "train_loss", "test_loss", "lc_train", "lc_test", "lc_random",
                "rank_1", "erank_1", "weight_norm"):
        assert key in last and np.isfinite(last[key]), key
    assert any(k.startswith("pgd_acc_") for k in last)
    eps_keys = [k.rsplit("_", 1)[1] for k in last if k.startswith("pgd_acc_")]
    for key in [f"pgd_ce32_acc_{e}" for e in eps_keys] + ["margin_p10", "margin_p50", "margin_p90",
                                                          "zero_grad_frac", "batch_loss_max"]:
        assert key in last and np.isfinite(last[key]), key
    assert last["margin_p10"] <= last["margin_p50"] <= last["margin_p90"]
    assert 0 <= last["zero_grad_frac"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time"]["train_s"] > 0 and "measurement_fraction" in summary["time"]
    assert "train_acc_99_step" in summary
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["quick"] is True and config["torch"]


def refused(proc, message, out=None):
    """Exit code 2, no traceback, the message on the last line, nothing created."""
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    if out is not None:
        assert not out.exists()


def trained_mlp(seed=0, centres=(0.35, 0.65), spread=0.08, steps=200):
    """A small MLP fitted to two Gaussian blobs in [0, 1]^10 (accurate and undefended by default;
    closer blobs leave some points misclassified)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(200, 10, generator=g) for c in centres]).clamp(0, 1)
    y = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def band_model():
    """1-D input; class 1 wins only on the band |x - 0.5| < 0.1 (logit1 - logit0 = 1 - 10 |x - 0.5|)."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[0].bias.copy_(torch.tensor([-0.5, 0.5]))
        model[2].weight.copy_(torch.tensor([[10.0, 10.0], [0.0, 0.0]]))
        model[2].bias.copy_(torch.tensor([0.0, 1.0]))
    return model


def tf32_now():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def tf32_set_to(allowed):
    """Both TF32 flags set for the test's duration, then restored (written here, not common's)."""
    old = tf32_now()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def flags_seen_inside(module):
    """A list that receives the TF32 flags each time module's forward runs: on a CPU the flags
    change no number, so a test reads them where the layer runs."""
    seen = []
    module.register_forward_pre_hook(lambda *_: seen.append(tf32_now()))
    return seen


# ------------------------------------------------------------ tiny data sets in the real on-disk formats
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
