"""The command line as a student meets it: help, numbers, abbreviations, resume and Ctrl-C, local MNIST
folders, provenance without git."""
import gzip
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO, records, run_script

MODULAR_QUICK = ["--quick", "--steps", "200"]


def test_runs_tool_help_exits_0_and_no_arguments_exit_2():
    proc = run_script("tools/runs.py", "--help")
    assert proc.returncode == 0 and "compare" in proc.stdout and "split-mnist" in proc.stdout
    proc = run_script("tools/runs.py", ok=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_whole_numbers_take_scientific_notation_and_flags_are_never_abbreviated(tmp_path):
    sys.path.insert(0, str(REPO))
    import common
    import exp_modular_arith
    assert common.parse_config(exp_modular_arith.Config, ["--steps", "5e3"]).steps == 5000
    for argv, message in ((["--steps", "5.5"], "not a whole number"), (["--step", "5"], "unrecognized arguments")):
        proc = run_script("exp_modular_arith.py", *argv, "--out", tmp_path / "run", ok=False)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "run").exists()


def test_resume_without_a_run_is_refused_and_writes_nothing(tmp_path):
    proc = run_script("exp_modular_arith.py", "--out", tmp_path / "typo", "--resume", ok=False)
    assert proc.returncode == 2 and "no run in" in proc.stderr and not (tmp_path / "typo").exists()
    assert "Traceback" not in proc.stderr


def test_resume_says_its_step_and_a_finished_run_is_left_as_it_is(tmp_path):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", *MODULAR_QUICK, "--out", out)
    proc = run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "300")
    assert "resumed from the checkpoint at step 200" in proc.stdout
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    proc = run_script("exp_modular_arith.py", "--out", out, "--resume")
    assert "nothing to do" in proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    info = json.loads((out / "config.json").read_text())
    assert info["script"] == "exp_modular_arith.py"
    assert set(info["code_sha256"]) == {"exp_modular_arith.py", "common.py"}


def test_ctrl_c_ends_with_one_line_and_the_command_to_continue(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "exp_modular_arith.py"), "--device", "cpu", "--quick",
                             "--steps", "1000000", "--evals", "60", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            # a shell's background job (CI's, say) starts with SIGINT ignored, and a Python
                            # started so installs no KeyboardInterrupt handler: give the child what a terminal gives
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "checkpoint.pt").exists() and len(records(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert f"continue with: python exp_modular_arith.py --out {out} --resume" in err
    step = records(out)[-1]["step"]
    assert f"at step {step}" in err
    assert (out / "metrics.csv").exists() and (out / "metrics.png").exists()  # what was logged, drawn
    import torch  # the interrupt may land between an evaluation's record and its checkpoint
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    assert saved in (step, records(out)[-2]["step"])
    resumed = run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", str(step + 10))
    assert f"resumed from the checkpoint at step {saved}" in resumed.stdout


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_a_plain_folder_of_the_four_files(tmp_path, mnist_dir, compress):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in (mnist_dir / "MNIST" / "raw").iterdir():
        data = f.read_bytes()
        (plain / (f.name + (".gz" if compress else ""))).write_bytes(gzip.compress(data) if compress else data)
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", plain, "--steps", "20", "--evals", "2",
               "--out", tmp_path / "run")
    assert records(tmp_path / "run")[-1]["step"] == 20


def test_a_test_set_only_copy_gets_the_split_command_which_works(tmp_path, mnist_dir):
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    for f in (mnist_dir / "MNIST" / "raw").glob("t10k-*"):
        shutil.copy(f, only_test / f.name)
    proc = run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", only_test, "--out",
                      tmp_path / "run", ok=False)
    assert proc.returncode == 2 and "only the test files" in proc.stderr and "split-mnist" in proc.stderr
    run_script("tools/runs.py", "split-mnist", only_test, tmp_path / "split", "--train", "60")
    sys.path.insert(0, str(REPO))
    import common
    x_train, y_train, x_test, y_test = common.load_mnist(tmp_path / "split", download=False)
    x_all = common.read_idx(only_test / "t10k-images-idx3-ubyte")
    assert len(x_train) == 60 and len(x_test) == len(x_all) - 60
    assert (x_train == x_all[:60]).all() and (x_test == x_all[60:]).all()
    y_all = common.read_idx(only_test / "t10k-labels-idx1-ubyte")
    assert (y_train == y_all[:60]).all() and (y_test == y_all[60:]).all()  # the labels follow their images


def test_quick_runs_get_their_own_default_folder():
    sys.path.insert(0, str(REPO))
    import common
    import exp_imagenette_resnet
    import exp_modular_arith
    assert common.parse_config(exp_modular_arith.Config, []).out == "runs/modular_arith"
    assert common.parse_config(exp_modular_arith.Config, ["--quick"]).out == "runs/modular_arith_quick"
    assert common.parse_config(exp_modular_arith.Config, ["--quick", "--out", "mine"]).out == "mine"
    cifar = common.parse_config(exp_imagenette_resnet.Config, ["--dataset", "cifar10", "--quick"])
    assert cifar.out == "runs/cifar10_resnet_quick" and cifar.resolution == 16  # both presets, then the suffix
