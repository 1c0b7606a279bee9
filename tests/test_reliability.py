"""What a user can get wrong, through the command line as they type it: every bad flag and bad file
gets one line and exit code 2 before anything is written; resume continues the same experiment
exactly or refuses; a stopped, damaged or busy run folder is handled."""
import dataclasses
import fcntl
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import exp_cifar_cnn
import exp_deep_mlp_rank
import exp_imagenette_resnet
import exp_mnist_mlp
import exp_modular_arith
from conftest import ENV, REPO, records, refused, run_script

SCRIPTS = [exp_modular_arith, exp_mnist_mlp, exp_deep_mlp_rank, exp_cifar_cnn, exp_imagenette_resnet]


# ------------------------------------------------------------------------ flags
@pytest.mark.parametrize("args, message", [
    (["exp_mnist_mlp.py", "--batch-size", "0"], "--batch-size 0: must be a positive whole number"),
    (["exp_mnist_mlp.py", "--lc-radius", "0"], "--lc-radius 0.0: must be a finite number above 0"),
    (["exp_mnist_mlp.py", "--pgd-eps", "0.03", "-0.3"], "--pgd-eps 0.03 -0.3: every value must be a finite number, 0 or more"),
    (["exp_mnist_mlp.py", "--train-size", "-100"], "--train-size -100: must be 0 or more"),
    (["exp_mnist_mlp.py", "--lr", "nan"], "--lr nan: must be a finite number above 0"),
    (["exp_mnist_mlp.py", "--evals", "-3"], "--evals -3: must be a positive whole number"),
    (["exp_mnist_mlp.py", "--lc-directions", "0"], "--lc-directions 0: must be a positive"),
    (["exp_mnist_mlp.py", "--lc-directions", "785"], "at most the input dimension, 784"),
    (["exp_deep_mlp_rank.py", "--rank-every", "0"], "--rank-every 0: must be a positive"),
    (["exp_cifar_cnn.py", "--pgd-points", "0"], "--pgd-points 0: must be a positive"),
    (["exp_cifar_cnn.py", "--device", "mps"], "no usable MPS device"),
    (["exp_modular_arith.py", "--p", "2"], "leaves"),
    (["exp_modular_arith.py", "--train-frac", "1"], "--train-frac 1.0: must be between 0 and 1"),
    (["exp_imagenette_resnet.py", "--resolution", "20"], "multiple of 8"),
    (["exp_imagenette_resnet.py", "--dataset", "cifar10", "--resolution", "64"], "CIFAR-10 images are 32 px"),
    (["exp_mnist_mlp.py", "--pgd-eps", "eight"], "'eight' is not a number"),
    (["exp_cifar_cnn.py", "--pgd-eps", "8"], "--pgd-eps 8: at or above 1, the width of the inputs' range; give radii as fractions, e.g. 8/255"),
    (["exp_mnist_mlp.py", "--pgd-alpha", "2"], "--pgd-alpha 2: at or above 1"),
    (["exp_mnist_mlp.py", "--steps", "inf"], "'inf' is not a whole number"),
    (["exp_mnist_mlp.py", "--pgd-eps", "1/0"], "'1/0' is not a number"),
    (["exp_modular_arith.py", "--model", "lstm"], "invalid choice"),
])
def test_bad_flags_get_one_line_before_anything_is_written(args, message, tmp_path):
    refused(run_script(args[0], *args[1:], "--out", tmp_path / "run", ok=False), message, tmp_path / "run")


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_every_numeric_field_has_a_rule_that_refuses_nonsense(module):
    cfg = common.parse_config(module.Config, [])
    common.check_config(cfg)  # the defaults pass
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (bool, str)):
            continue
        bad = (-0.1,) if isinstance(value, tuple) else -1 if isinstance(value, int) else math.nan
        with pytest.raises(SystemExit) as stop:
            common.check_config(dataclasses.replace(cfg, **{f.name: bad}))
        assert stop.value.code == 2, f.name


# ------------------------------------------------------------------------ data
def npz(path, **change):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 32, 32, 3)).astype(np.uint8), "y_train": rng.integers(0, 10, 40),
              "x_test": rng.integers(0, 256, (20, 32, 32, 3)).astype(np.uint8), "y_test": rng.integers(0, 10, 20)}
    np.savez(path, **{**arrays, **change})
    return path


@pytest.mark.parametrize("change, message", [
    ({"y_train": np.full(40, 10)}, "train labels must lie in 0..9, found 10..10"),
    ({"y_train": np.zeros((40, 1), np.int64)}, "train labels must be a 1-D array of integers"),
    ({"y_test": np.zeros(19, np.int64)}, "20 test images but 19 labels"),
    ({"x_train": np.random.default_rng(0).random((40, 32, 32, 3)).astype(np.float32)}, "expected uint8"),
    ({"x_test": np.zeros((20, 28, 28, 3), np.uint8)}, "must be 32x32x3"),
])
def test_bad_cifar_npz_is_named_with_what_is_wrong(change, message, tmp_path):
    path = npz(tmp_path / "bad.npz", **change)
    refused(run_script("exp_cifar_cnn.py", "--data-dir", path, "--out", tmp_path / "run", ok=False), message,
            tmp_path / "run")
    assert str(path) in run_script("exp_cifar_cnn.py", "--data-dir", path, ok=False).stderr


def test_garbage_npz_and_truncated_idx_are_named(tmp_path, mnist_dir):
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    refused(run_script("exp_cifar_cnn.py", "--data-dir", tmp_path / "garbage.npz", "--out", tmp_path / "a", ok=False),
            "garbage.npz: not a readable .npz file", tmp_path / "a")
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_dir / "MNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes()[:-100] if f.name.startswith("t10k-images") else f.read_bytes())
    refused(run_script("exp_mnist_mlp.py", "--no-download", "--data-dir", tmp_path / "mnist", "--out", tmp_path / "b",
                       ok=False), "t10k-images-idx3-ubyte: 78316 bytes, but its header announces", tmp_path / "b")


def test_missing_mnist_files_are_listed(tmp_path, mnist_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes((mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes())
    proc = run_script("exp_mnist_mlp.py", "--no-download", "--data-dir", tmp_path, "--out", tmp_path / "run", ok=False)
    refused(proc, "found train-images-idx3-ubyte; missing train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                  "t10k-labels-idx1-ubyte (plain or .gz)", tmp_path / "run")
    refused(run_script("exp_mnist_mlp.py", "--no-download", "--data-dir", mnist_dir, "--train-size", "400",
                       "--out", tmp_path / "run", ok=False), "the data hold 300 training examples", tmp_path / "run")


def test_bad_image_folders_are_named(tmp_path, image_folder):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken, ignore=shutil.ignore_patterns("*.pt"))
    (broken / "train" / "n01440764" / "img0.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg")
    refused(run_script("exp_imagenette_resnet.py", "--no-download", "--data-dir", broken, "--out", tmp_path / "a",
                       ok=False), "img0.JPEG: not a readable image", tmp_path / "a")
    empty = tmp_path / "empty"
    shutil.copytree(image_folder, empty, ignore=shutil.ignore_patterns("*.pt"))
    for f in (empty / "val" / "n02979186").iterdir():
        f.unlink()
    refused(run_script("exp_imagenette_resnet.py", "--no-download", "--data-dir", empty, "--out", tmp_path / "b",
                       ok=False), "n02979186", tmp_path / "b")


def test_imagenette_cache_follows_the_folder_survives_damage_and_read_only(tmp_path, image_folder, monkeypatch):
    import shutil
    from PIL import Image
    root = tmp_path / "images"
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns("*.pt"))
    cfg = exp_imagenette_resnet.Config(data_dir=str(root), download=False, resolution=16)
    _, y_train, _, _ = exp_imagenette_resnet.load_data(cfg)
    first = list(root.glob("tensors_16px_*.pt"))
    assert len(first) == 1 and int(y_train.max()) == 2
    for split in ("train", "val"):  # a new class folder: a new cache, four classes
        (root / split / "n03000684").mkdir()
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / split / "n03000684" / "a.JPEG")
    _, y_train, _, _ = exp_imagenette_resnet.load_data(cfg)
    assert int(y_train.max()) == 3 and len(list(root.glob("tensors_16px_*.pt"))) == 2
    newest = max(root.glob("tensors_16px_*.pt"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])  # a damaged cache is decoded again
    assert int(exp_imagenette_resnet.load_data(cfg)[1].max()) == 3

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    newest.unlink()
    monkeypatch.setattr(torch, "save", read_only)
    with pytest.warns(UserWarning, match="cannot cache the decoded images"):
        assert int(exp_imagenette_resnet.load_data(cfg)[1].max()) == 3


# ------------------------------------------------------------------------ resume, stopped and busy folders
QUICK_MNIST = ["--quick", "--no-download", "--steps", "1000"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mnist_dir):
    """An uninterrupted quick run of 1000 steps (evaluations at 0, 1, 4, 16, 63, 251, 1000)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_script("exp_mnist_mlp.py", *QUICK_MNIST, "--data-dir", mnist_dir, "--out", out)
    return out


def test_kill_and_resume_gives_every_record_of_an_uninterrupted_run(tmp_path, mnist_dir, straight_run):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "exp_mnist_mlp.py"), "--device", "cpu", *QUICK_MNIST, "--data-dir",
           str(mnist_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "checkpoint.pt").exists() or len(_lines(out)) < 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert len(_lines(out)) < len(records(straight_run))
    run_script("exp_mnist_mlp.py", "--out", out, "--resume")  # the stored config: nothing retyped
    a, b = records(straight_run), records(out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a == b  # every record, exactly: same batches, same PGD starts, same weights
    pgd = [v for r in a for k, v in r.items() if k.startswith("pgd_acc")]
    assert any(0 < v < 1 for v in pgd)  # PGD is not saturated, so a wrong PGD stream would show
    resumed = json.loads((out / "config.json").read_text())["resumed"]
    assert len(resumed) == 1 and resumed[0]["changed"] == {"resume": True}


def _lines(out):
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_a_longer_schedule_on_resume_gives_the_records_of_the_longer_run(tmp_path, mnist_dir, straight_run):
    out = tmp_path / "run"
    run_script("exp_mnist_mlp.py", *QUICK_MNIST, "--data-dir", mnist_dir, "--steps", "200", "--out", out)
    run_script("exp_mnist_mlp.py", "--out", out, "--resume", "--steps", "1000")
    straight = {r["step"]: r for r in records(straight_run)}
    later = [r for r in records(out) if r["step"] > 200]
    assert [r["step"] for r in later] == [251, 1000]
    # batch_loss_max is the worst batch since the previous evaluation, so it depends on the schedule
    assert all({k: v for k, v in r.items() if k != "batch_loss_max"} ==
               {k: v for k, v in straight[r["step"]].items() if k != "batch_loss_max"} for r in later)


def test_resume_refuses_another_experiment_and_leaves_the_metrics(tmp_path, mnist_dir):
    out = tmp_path / "run"
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--steps", "20", "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_script("exp_mnist_mlp.py", "--out", out, "--resume", "--seed", "1", "--lr", "0.01", ok=False)
    refused(proc, "holds a run with --seed 0, --lr 0.001 (given: 1, 0.01)")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    refused(run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", out, ok=False),
            "already holds a run; pass --resume")


def test_a_run_that_stopped_before_its_checkpoint_starts_again_in_its_folder(tmp_path, mnist_dir):
    out = tmp_path / "run"
    flags = ["--quick", "--no-download", "--data-dir", mnist_dir, "--out", out]
    proc = run_script("exp_mnist_mlp.py", *flags, "--init-scale", "1e30", ok=False)
    refused(proc, "training loss is nan at step 0; lower --lr")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))["train_loss"] is None
    assert (out / "metrics.png").exists() and not (out / "checkpoint.pt").exists()
    run_script("exp_mnist_mlp.py", *flags, "--steps", "20")  # same folder, nothing deleted by hand
    assert json.loads((out / "config.json").read_text())["config"]["init_scale"] == 1.0
    assert (out / "metrics.failed.jsonl").read_text().splitlines() == lines
    fresh = tmp_path / "fresh"  # the same run in a folder of its own: every record, not only the last, is its
    run_script("exp_mnist_mlp.py", *flags[:-1], fresh, "--steps", "20")
    assert records(out) == records(fresh) and records(out)[-1]["step"] == 20


def test_a_busy_folder_and_a_damaged_checkpoint_are_refused(tmp_path, mnist_dir):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        refused(run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", out,
                           ok=False), "is in use by another process (pid 4242)")
    assert not (out / "metrics.jsonl").exists()
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--steps", "5", "--out", out)
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 damaged")
    refused(run_script("exp_mnist_mlp.py", "--out", out, "--resume", "--steps", "10", ok=False),
            "checkpoint.pt is damaged or not a checkpoint")


# ------------------------------------------------------------------------ what up-front checks cannot see
def test_data_too_small_to_measure_is_refused(tmp_path):
    for n_train, n_test, message in ((2, 10, "2 train images; at least 3"), (10, 1, "1 test images; at least 2")):
        path = npz(tmp_path / f"small{n_train}_{n_test}.npz", x_train=np.zeros((n_train, 32, 32, 3), np.uint8),
                   y_train=np.arange(n_train) % 2, x_test=np.zeros((n_test, 32, 32, 3), np.uint8),
                   y_test=np.zeros(n_test, np.int64))
        refused(run_script("exp_cifar_cnn.py", "--quick", "--train-size", "0", "--data-dir", path, "--out",
                           tmp_path / "run", ok=False), message, tmp_path / "run")


@pytest.mark.parametrize("args, message", [(["--steps", "1e30"], "'1e30' is too large a count (at most 1e9)"),
                                           (["--steps", "5e10"], "--steps 50000000000: at most 1e9"),
                                           (["--width", "1e18"], "at most 1e9"),
                                           (["--evals", "1e9"], "--evals 1000000000: at most 1e4 evaluations")])
def test_huge_counts_are_refused_up_front(tmp_path, args, message):
    refused(run_script("exp_modular_arith.py", "--quick", *args, "--out", tmp_path / "run", ok=False), message,
            tmp_path / "run")


def test_a_mistyped_matplotlib_backend_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "exp_modular_arith.py"), "--quick", "--device", "cpu", "--out",
                           str(tmp_path / "run")], env={**ENV, "MPLBACKEND": "Aggg"}, capture_output=True, text=True,
                          timeout=300)
    refused(proc, "MPLBACKEND='Aggg' is not a matplotlib back-end", tmp_path / "run")


def test_damaged_run_files_end_in_one_line_and_change_nothing(tmp_path):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "40", "--out", out)
    info = json.loads((out / "config.json").read_text())
    info["config"]["lr"] = "fast"
    (out / "config.json").write_text(json.dumps(info))
    before = (out / "config.json").read_bytes()
    refused(run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "80", ok=False),
            "lr is 'fast', not a float")
    assert (out / "config.json").read_bytes() == before
    info["config"]["lr"] = 1e-3
    (out / "config.json").write_text(json.dumps(info))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2, 3]", *lines[1:]]) + "\n")
    refused(run_script("tools/runs.py", "redraw", out, ok=False), "metrics.jsonl:2: not a record of this toolkit")
    refused(run_script("tools/runs.py", "compare", out, "--out", tmp_path / "cmp.png", ok=False), "metrics.jsonl:2")


def test_compare_checks_its_output_before_drawing(tmp_path):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "40", "--out", out)
    refused(run_script("tools/runs.py", "compare", out, "--out", tmp_path / "no" / "cmp.png", ok=False),
            "does not exist; make it first")
    refused(run_script("tools/runs.py", "compare", out, "--out", tmp_path / "cmp", ok=False), "ending in .png")


def test_a_failed_download_gives_its_reason_in_the_one_line(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(SystemExit):
        common.load_mnist(tmp_path, download=True)
    err = capsys.readouterr()
    assert "the download failed (Error downloading train-images-idx3-ubyte.gz: no route to host)" in err.err
    assert err.out == "" and len(err.err.strip().splitlines()) == 1
