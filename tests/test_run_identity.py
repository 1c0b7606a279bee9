"""A run knows what it is: --resume refuses another script's folder, other data, an edited config.json,
a run made before a field existed and a changed --compile, before anything is written; a kill during
the metrics rewrite loses nothing; the data and sizes that cannot work are refused up front; a real
torch.save failure is survived."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import common
from conftest import ENV, REPO, records, refused, run_script

QUICK = ["--quick", "--no-download", "--steps", "20"]


@pytest.fixture(scope="module")
def finished_mnist_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("identity") / "run"
    run_script("exp_mnist_mlp.py", *QUICK, "--data-dir", mnist_dir, "--out", out)
    return out


@pytest.fixture
def mnist_run(tmp_path, finished_mnist_run):
    """A copy of one finished quick run for each test, which may change it."""
    return shutil.copytree(finished_mnist_run, tmp_path / "run")


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}


def test_resume_refuses_another_scripts_folder(mnist_run):
    before = snapshot(mnist_run)
    refused(run_script("exp_deep_mlp_rank.py", "--out", mnist_run, "--resume", ok=False),
            "holds a run of exp_mnist_mlp.py, not of exp_deep_mlp_rank.py")
    assert snapshot(mnist_run) == before


def test_resume_refuses_other_data_but_takes_a_moved_copy(tmp_path, mnist_dir, mnist_run):
    other = tmp_path / "other"
    shutil.copytree(mnist_dir, other)
    moved = tmp_path / "moved"
    shutil.copytree(mnist_dir, moved)
    image = other / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # one pixel of one test image
    image.write_bytes(bytes(data))
    before = snapshot(mnist_run)
    refused(run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "40", "--data-dir", other,
                       ok=False), "was trained on other data")
    assert snapshot(mnist_run) == before
    run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "40", "--data-dir", moved)


def test_resume_refuses_an_edited_config_and_a_changed_compile(mnist_run):
    path = mnist_run / "config.json"
    info = json.loads(path.read_text())
    info["config"]["lr"] = 0.05  # edited by hand: the checkpoint's optimiser still runs at 1e-3
    path.write_text(json.dumps(info))
    before = snapshot(mnist_run)
    refused(run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "40", ok=False),
            "config.json no longer matches its checkpoint (lr differ)")
    assert snapshot(mnist_run) == before
    info["config"]["lr"] = 0.001
    path.write_text(json.dumps(info))
    refused(run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--compile", ok=False),
            "holds a run with --compile False")



def test_resume_refuses_a_run_made_before_a_field_existed(mnist_run):
    # a run from an older version of the script has no pgd_restarts in config.json: today's default
    # could differ from what it ran with, so the resume is refused, naming the field
    path = mnist_run / "config.json"
    info = json.loads(path.read_text())
    del info["config"]["pgd_restarts"]
    path.write_text(json.dumps(info))
    before = snapshot(mnist_run)
    refused(run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "40", ok=False),
            "made by an older version of this script, without --pgd-restarts")
    assert snapshot(mnist_run) == before


def test_resume_refuses_fewer_steps_than_its_checkpoint_and_redoes_what_came_after_it(mnist_run):
    before = snapshot(mnist_run)
    refused(run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "10", ok=False),
            "is at step 20, past --steps 10; give --steps 20 or more")
    assert snapshot(mnist_run) == before
    # a record after the checkpoint (a process killed between an evaluation and its checkpoint) is redone
    common.log_metrics(mnist_run, {"step": 21, "train_acc": 0.123})
    run_script("exp_mnist_mlp.py", "--out", mnist_run, "--resume", "--steps", "40")
    steps = [r["step"] for r in records(mnist_run)]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    assert all(r.get("train_acc") != 0.123 for r in records(mnist_run))

def test_a_kill_during_the_metrics_rewrite_loses_no_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": i, "train_acc": 0.5, "pad": "x" * 1000}) for i in range(40_000)]
    original = "\n".join(lines) + "\n"
    kept = "".join(line + "\n" for line in lines[:20_001])
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import common; print('go', flush=True); "
            f"common.truncate_metrics({str(run)!r}, 20000)")
    path = run / "metrics.jsonl"
    path.write_text(original)
    size = path.stat().st_size
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    # kill the moment the rewrite touches the folder: a file appears or metrics.jsonl changes size
    while proc.poll() is None and path.stat().st_size == size and len(list(run.iterdir())) == 1:
        pass
    proc.kill()
    proc.wait()
    assert path.read_text() in (original, kept)  # the old file or the new one, whole: never a half-written file
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, stdout=subprocess.DEVNULL)
    assert path.read_text() == kept and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--train-size", "2"], "--train-size 2: at least 3"),
    (["--rank-points", "1"], "--rank-points 1: at least 2"),
    (["--seed", str(2**40)], "must be below 2^32"),
])
def test_sizes_that_cannot_work_are_refused_up_front(tmp_path, mnist_dir, args, message):
    out = tmp_path / "run"
    refused(run_script("exp_mnist_mlp.py", *QUICK, "--data-dir", mnist_dir, *args, "--out", out, ok=False), message,
            out)


def test_a_one_class_data_set_is_refused(tmp_path):
    path = tmp_path / "one_class.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (50, 32, 32, 3)).astype(np.uint8), y_train=np.zeros(50, np.uint8),
             x_test=rng.integers(0, 256, (10, 32, 32, 3)).astype(np.uint8), y_test=np.zeros(10, np.uint8))
    out = tmp_path / "run"
    refused(run_script("exp_cifar_cnn.py", "--quick", "--data-dir", path, "--out", out, ok=False),
            "needs at least two classes", out)


def test_a_real_write_failure_on_the_image_cache_is_survived(tmp_path, image_folder):
    import exp_imagenette_resnet
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    for old in folder.glob("tensors_*"):
        old.unlink()
    cfg = common.parse_config(exp_imagenette_resnet.Config, ["--quick", "--data-dir", str(folder), "--no-download"])
    key_files = sorted(p for split in ("train", "val") for p in (folder / split).rglob("*") if p.is_file())
    assert key_files
    exp_imagenette_resnet.load_data(cfg)  # writes the cache: learn its name, then block it
    cache = next(folder.glob("tensors_*.pt"))
    cache.unlink()
    blocked = cache.with_name(cache.name + ".tmp")
    blocked.mkdir()  # the real writer cannot open its temporary file
    with pytest.raises(OSError):
        common.write_atomic(cache, b"x")
    with pytest.warns(UserWarning, match="cannot cache the decoded images"):
        x_train = exp_imagenette_resnet.load_data(cfg)[0]
    assert len(x_train) > 0 and not cache.exists()


def _overcommits_always():
    try:
        return open("/proc/sys/vm/overcommit_memory").read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(_overcommits_always(), reason="this kernel would grant 160 GB and then kill the process")
def test_out_of_memory_ends_in_one_line(tmp_path):
    # a real allocation failure: a 200k-wide hidden layer needs a 160 GB weight matrix
    out = tmp_path / "run"
    proc = run_script("exp_modular_arith.py", "--quick", "--width", "200000", "--out", out, ok=False)
    refused(proc, "out of memory")
    assert "lower --batch-size" in proc.stderr


def test_a_full_disk_ends_in_one_line_and_keeps_the_metrics(tmp_path):
    # a real ENOSPC: the checkpoint's temporary file is /dev/full, where every write fails
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt.tmp").symlink_to("/dev/full")
    proc = run_script("exp_modular_arith.py", "--quick", "--out", out, ok=False)
    refused(proc, "the disk is full")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]


def test_config_records_the_model_and_a_resume_refuses_an_edited_one(tmp_path):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "30", "--out", out)
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["layers"][:2] == ["Sequential", "Linear"] and "ReLU" in model["layers"]
    import exp_modular_arith
    cfg = common.parse_config(exp_modular_arith.Config, ["--quick"])
    assert model["parameters"] == sum(p.numel() for p in exp_modular_arith.make_model(cfg).parameters())
    info = json.loads((out / "config.json").read_text())
    info["model"]["layers"].append("Dropout")  # as if the script's model had been edited since
    (out / "config.json").write_text(json.dumps(info))
    refused(run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "60", ok=False),
            "differs from the one")


def test_time_adds_up_across_the_processes_of_a_run(tmp_path):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "300", "--out", out)
    first = json.loads((out / "summary.json").read_text())["time"]
    run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "600")
    second = json.loads((out / "summary.json").read_text())["time"]
    assert second["train_s"] > first["train_s"]  # both processes
    assert second["train_steps_per_s"] == pytest.approx(600 / second["train_s"], rel=0.02)  # the whole run
    (out / "summary.json").unlink()  # a crash between the last checkpoint and the summary: the resume recovers
    run_script("exp_modular_arith.py", "--out", out, "--resume")
    recovered = json.loads((out / "summary.json").read_text())["time"]
    assert recovered["train_s"] >= second["train_s"] * 0.99 and recovered["train_steps_per_s"] > 0


def _folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_on_changed_code_is_refused_unless_continued_knowingly(tmp_path):
    for name in ("common.py", "exp_modular_arith.py"):
        shutil.copy(REPO / name, tmp_path / name)

    def run(*args):
        return subprocess.run([sys.executable, "exp_modular_arith.py", "--device", "cpu", *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)

    assert run("--quick", "--steps", "40", "--out", "run", "--evals", "3").returncode == 0
    with open(tmp_path / "common.py", "a") as f:
        f.write("\n# an edit between the interruption and the resume\n")
    before = _folder_bytes(tmp_path / "run")
    proc = run("--out", "run", "--resume", "--steps", "60")
    assert proc.returncode == 2 and "changed code: common.py" in proc.stderr and "--continue-anyway" in proc.stderr
    assert _folder_bytes(tmp_path / "run") == before  # nothing written, not even a lock
    assert run("--out", "run", "--resume", "--steps", "60", "--continue-anyway").returncode == 0
    resumed = json.loads((tmp_path / "run" / "config.json").read_text())["resumed"][-1]
    assert resumed["continued_anyway"] == ["changed code: common.py"]


def test_a_folder_without_a_data_fingerprint_is_not_resumed_on_unchecked_data(tmp_path, mnist_dir):
    out = tmp_path / "run"
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", out)
    info = json.loads((out / "config.json").read_text())
    del info["data"]  # as config.json was before fingerprints
    (out / "config.json").write_text(json.dumps(info))
    before = _folder_bytes(out)
    refused(run_script("exp_mnist_mlp.py", "--out", out, "--resume", "--steps", "400", ok=False),
            "data made before fingerprints")
    assert _folder_bytes(out) == before
    run_script("exp_mnist_mlp.py", "--out", out, "--resume", "--steps", "400", "--continue-anyway")


@pytest.mark.parametrize("damage, message", [
    (lambda s: {**s, "step": -5}, "is not a whole number >= 0"),
    (lambda s: {**s, "step": 10.5}, "is not a whole number >= 0"),
    (lambda s: {k: v for k, v in s.items() if k != "generators"}, "lacks generators"),
    (lambda s: {**s, "step": 7}, "logged no evaluation there"),
    (lambda s: {**s, "model": {"weight": s["optimizer"]["state"][0]["exp_avg"]}}, "does not fit this script's model"),
    (lambda s: {**s, "rng_cpu": s["rng_cpu"][:10]}, "does not fit this script's model"),
])
def test_a_damaged_checkpoint_is_refused_and_the_folder_left_as_it_was(tmp_path, damage, message):
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "40", "--out", out)
    import torch
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(damage(state), out / "checkpoint.pt")
    before = _folder_bytes(out)
    refused(run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "80", ok=False), message)
    assert _folder_bytes(out) == before


def test_two_real_processes_on_one_folder_the_second_is_refused_by_the_lock(tmp_path):
    import time
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "exp_modular_arith.py"), "--device", "cpu", "--quick", "--steps",
                              "1000000", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = subprocess.run([sys.executable, str(REPO / "exp_modular_arith.py"), "--device", "cpu", "--out", str(out),
                                 "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
        refused(second, f"is in use by another process (pid {first.pid})")
        assert first.poll() is None  # the first goes on
    finally:
        first.kill()
        first.wait()


def test_a_resume_killed_before_its_first_checkpoint_resumes_again(tmp_path):
    import time
    out = tmp_path / "run"
    run_script("exp_modular_arith.py", "--quick", "--steps", "300", "--out", out)
    before = records(out)
    extended = subprocess.Popen([sys.executable, str(REPO / "exp_modular_arith.py"), "--device", "cpu", "--out", str(out),
                                 "--resume", "--steps", "20000", "--evals", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=ENV)
    for line in extended.stdout:  # killed once it has resumed, long before its next evaluation (step 20000)
        if "resumed from the checkpoint at step 300" in line:
            break
    time.sleep(0.5)
    extended.kill()
    extended.wait()
    assert records(out) == before
    run_script("exp_modular_arith.py", "--out", out, "--resume", "--steps", "400", "--evals", "2")
    after = records(out)
    assert after[:len(before)] == before and after[-1]["step"] == 400
