"""Every script end to end in --quick mode on CPU, through its command line, as a user runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(name, *args, ok=True):
    proc = subprocess.run([sys.executable, str(REPO / name), "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)
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
    recs = records(run)
    assert recs[0]["step"] == 0 and len(recs) >= 3
    last = recs[-1]
    for key in ("train_acc", "test_acc", "train_loss", "test_loss", "lc_train", "lc_test", "lc_random",
                "rank_1", "erank_1", "weight_norm"):
        assert key in last and np.isfinite(last[key]), key
    assert any(k.startswith("pgd_acc_") for k in last)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time"]["train_s"] > 0 and "measurement_fraction" in summary["time"]
    assert "train_acc_99_step" in summary
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["quick"] is True and config["torch"]


def test_modular_arith_quick(tmp_path):
    run_script("exp_modular_arith.py", "--quick", "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")
    assert records(tmp_path / "run")[-1]["train_acc"] > 0.9  # it learns


def test_modular_arith_transformer_quick(tmp_path):
    run_script("exp_modular_arith.py", "--quick", "--model", "transformer", "--steps", "50", "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")


def test_mnist_mlp_quick(tmp_path, mnist_dir):
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")


def test_deep_mlp_rank_quick(tmp_path, mnist_dir):
    run_script("exp_deep_mlp_rank.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")
    assert "rank_5" in records(tmp_path / "run")[-1]  # a rank per hidden layer (depth 6 in quick mode)


def test_cifar_cnn_quick(tmp_path, cifar_npz):
    run_script("exp_cifar_cnn.py", "--quick", "--data-dir", cifar_npz, "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")


def test_imagenette_resnet_quick(tmp_path, image_folder):
    run_script("exp_imagenette_resnet.py", "--quick", "--no-download", "--data-dir", image_folder, "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")
    assert len([k for k in records(tmp_path / "run")[-1] if k.startswith("rank_")]) == 17  # every ReLU of ResNet18
    assert (image_folder / "tensors_16px.pt").exists()  # decoded once, then cached


def test_resume_continues_exactly(tmp_path, mnist_dir):
    flags = ["--quick", "--no-download", "--data-dir", mnist_dir]
    run_script("exp_mnist_mlp.py", *flags, "--steps", 150, "--out", tmp_path / "straight")
    run_script("exp_mnist_mlp.py", *flags, "--steps", 60, "--out", tmp_path / "resumed")
    refused = run_script("exp_mnist_mlp.py", *flags, "--steps", 60, "--out", tmp_path / "resumed", ok=False)
    assert refused.returncode != 0 and "already holds a run" in refused.stderr  # no silent overwrite
    run_script("exp_mnist_mlp.py", *flags, "--steps", 150, "--out", tmp_path / "resumed", "--resume")
    a, b = records(tmp_path / "straight")[-1], records(tmp_path / "resumed")[-1]
    assert a["step"] == b["step"] == 150
    for key in a:  # same batches, same PGD starts, same weights: the same numbers
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_help_lists_every_field():
    out = run_script("exp_cifar_cnn.py", "--help").stdout
    for flag in ("--lc-radius", "--pgd-eps", "--train-size", "--quick", "--resume", "--data-dir"):
        assert flag in out
    assert "radius r of the cross-polytope" in out


@pytest.mark.parametrize("args, message", [
    (["exp_modular_arith.py", "--no-such-flag"], "unrecognized arguments"),
    (["exp_modular_arith.py", "--model", "lstm"], "invalid choice"),
    (["exp_mnist_mlp.py", "--no-download", "--data-dir", "/nonexistent/folder"], "not found in /nonexistent/folder"),
    (["exp_cifar_cnn.py", "--data-dir", "/nonexistent/cifar.npz"], "does not exist"),
    (["exp_imagenette_resnet.py", "--no-download", "--data-dir", "/nonexistent"], "no train/ and val/ image folders"),
    (["exp_imagenette_resnet.py", "--resolution", "20"], "multiple of 8"),
])
def test_bad_input_gives_a_one_line_error(args, message, tmp_path):
    proc = run_script(args[0], *args[1:], "--out", tmp_path / "run", ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()[-1]) > 20


def test_wrong_image_size_is_refused(tmp_path):
    path = tmp_path / "small.npz"
    x = np.zeros((10, 28, 28, 3), np.uint8)
    np.savez(path, x_train=x, y_train=np.zeros(10, np.uint8), x_test=x, y_test=np.zeros(10, np.uint8))
    proc = run_script("exp_cifar_cnn.py", "--data-dir", path, "--out", tmp_path / "run", ok=False)
    assert proc.returncode != 0 and "must be 32x32x3" in proc.stderr and "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_metrics(tmp_path, mnist_dir):
    proc = run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--init-scale", "1e30",
                      "--out", tmp_path / "run", ok=False)
    assert proc.returncode != 0 and "training loss is" in proc.stderr and "Traceback" not in proc.stderr
    assert records(tmp_path / "run")[0]["step"] == 0
    assert (tmp_path / "run" / "metrics.png").exists()
