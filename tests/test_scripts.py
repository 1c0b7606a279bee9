"""Every script end to end in --quick mode on CPU, through its command line, as a user runs it."""
import json
import subprocess
import sys

import pytest

from conftest import ENV, REPO, check_run_folder, records, run_script


@pytest.fixture(scope="session")
def suite(tmp_path_factory, mnist_dir, cifar_npz, image_folder):
    """benchmarks/paper_suite.py --smoke: every script's --quick run through the suite's own code."""
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--smoke", "--device", "cpu",
                           "--out", str(out), "--mnist5k", str(mnist_dir), "--mnist7k", str(mnist_dir),
                           "--cifar", str(cifar_npz), "--imagenette", str(image_folder)],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "smoke", proc.stdout


def test_paper_suite_smoke_runs_every_setting_and_tabulates_them(suite):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from paper_suite import SETTINGS
    out, stdout = suite
    table = (out / "suite.md").read_text().splitlines()
    assert table[0].startswith("| setting | run | steps | steps/s | wall s | measuring | projected full run | paper |")
    names = ["modular_arith", "mnist_mlp", "mnist_mlp_init8", "deep_mlp_rank", "cifar_cnn", "imagenette_resnet",
             "cifar10_resnet"]
    assert [line.split(" | ")[0][2:] for line in table[2:]] == names
    for line, (_, _, _, _, paper) in zip(table[2:], SETTINGS):
        assert "| smoke |" in line and f"| {paper} | test " in line  # the paper's numbers beside ours
    assert stdout.rstrip().endswith(table[-1])  # the table is printed too


def test_suite_smoke_has_its_own_folder_and_a_rerun_reports_the_stored_runs(suite):
    out, _ = suite
    assert out.name == "smoke" and (out / "tf32_check.md").read_text().count("| cifar10_") == 4
    before = {p: p.read_bytes() for p in out.rglob("summary.json")}
    table = (out / "suite.md").read_text()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--smoke", "--device", "cpu",
                           "--out", str(out.parent), "--mnist5k", "/nonexistent", "--only", "modular_arith"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("summary.json")} == before  # speeds not zeroed
    row = next(line for line in table.splitlines() if line.startswith("| modular_arith |"))
    assert row in (out / "suite.md").read_text()  # the stored figures, not a no-op's


@pytest.mark.parametrize("args, message", [(["--budget-minutes", "nan"], "finite"), (["--budget-minutes", "0"], "above 0"),
                                           (["--only", "mnist_mpl"], "no such setting"),
                                           (["--tf32-points", "1e9"], "invalid int value"),
                                           (["--tf32-points", "100000"], "at most 1e4")])
def test_suite_flags_are_checked(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--out", str(tmp_path / "s"),
                           *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "s").exists()


def test_suite_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "s").write_text("not a folder")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "is a file" in proc.stderr.strip().splitlines()[-1]


def test_suite_never_reports_a_smoke_run_as_a_full_one(suite, tmp_path):
    import shutil
    shutil.copytree(suite[0] / "modular_arith", tmp_path / "modular_arith")  # smoke runs, in a folder of full runs
    before = {p: p.read_bytes() for p in (tmp_path / "modular_arith").rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--device", "cpu", "--out",
                           str(tmp_path), "--only", "modular_arith"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in (tmp_path / "suite.md").read_text().splitlines() if line.startswith("| modular_arith"))
    assert "holds a smoke (--quick) run, not a full one" in row
    assert {p: p.read_bytes() for p in (tmp_path / "modular_arith").rglob("*") if p.is_file()} == before


def test_suite_tabulates_a_finished_full_run_without_running_it_again(suite, tmp_path):
    import shutil
    run = tmp_path / "modular_arith"
    shutil.copytree(suite[0] / "modular_arith", run)
    info = json.loads((run / "config.json").read_text())
    info["config"]["quick"] = False  # as a full run's record: finished at its own --steps
    (run / "config.json").write_text(json.dumps(info))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--device", "cpu", "--out",
                           str(tmp_path), "--only", "modular_arith"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in (tmp_path / "suite.md").read_text().splitlines() if line.startswith("| modular_arith"))
    assert "finished earlier (not rerun)" in row and "== modular_arith" not in proc.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_stopping_the_suite_stops_its_script_and_ends_in_one_line(tmp_path, how):
    import os
    import signal
    import time
    out = tmp_path / "suite"
    suite = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "paper_suite.py"), "--smoke", "--device", "cpu",
                              "--out", str(out), "--only", "modular_arith"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV, start_new_session=True)  # its own process group, as a terminal's job
    run = out / "smoke" / "modular_arith"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    if how == "SIGTERM":
        suite.send_signal(signal.SIGTERM)
    else:
        os.killpg(suite.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    _, err = suite.communicate(timeout=120)
    assert suite.returncode in ((1,) if how == "SIGTERM" else (130,)) and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("paper suite: " + ("terminated" if how == "SIGTERM" else "interrupted"))
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.strip()
    assert not alive  # no orphaned script


def test_modular_arith_quick(suite):
    run = suite[0] / "modular_arith"
    check_run_folder(run)
    assert records(run)[-1]["train_acc"] > 0.9  # it learns


def test_modular_arith_transformer_quick(tmp_path):
    run_script("exp_modular_arith.py", "--quick", "--model", "transformer", "--steps", "50", "--out", tmp_path / "run")
    check_run_folder(tmp_path / "run")


def test_mnist_mlp_quick(suite):
    check_run_folder(suite[0] / "mnist_mlp")
    config = json.loads((suite[0] / "mnist_mlp_init8" / "config.json").read_text())["config"]
    assert config["init_scale"] == 8


def test_deep_mlp_rank_quick(suite):
    check_run_folder(suite[0] / "deep_mlp_rank")
    assert "rank_5" in records(suite[0] / "deep_mlp_rank")[-1]  # a rank per hidden layer (depth 6 in quick mode)


def test_cifar_cnn_quick(suite):
    check_run_folder(suite[0] / "cifar_cnn")
    config = json.loads((suite[0] / "cifar_cnn" / "config.json").read_text())
    assert config["pixel_units"]["lc_radius"] == [0.001235, 0.001218, 0.001308]  # 0.005 * CIFAR-10's std


def test_masked_points_recomputes_the_logged_attacks_and_finds_masking(suite, cifar_npz, tmp_path):
    """benchmarks/masked_points.py on the quick CIFAR run: on the run's own device its counts are the
    logged ones; with the head scaled by 1e4 every correct point saturates float32, so the papers'
    attack survivors are exactly the zero-gradient points, and they are every correct point."""
    import shutil
    import torch

    def table(run):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "masked_points.py"), str(run), "--data-dir",
                               str(cifar_npz)], capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        zero = int(proc.stdout.split("zero gradient at ")[1].split()[0])
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
                if line.startswith("| ") and "/255" in line]
        return zero, proc.stdout, rows

    zero, out, rows = table(suite[0] / "cifar_cnn")
    assert len(rows) == 3 and f"logged at this step: zero gradient at {zero}" in out
    for eps, papers, _, _, toolkit in rows:
        for cell in (papers, toolkit):  # "n (logged n)"
            now, logged = cell.split(" (")
            assert now == logged.rstrip(")"), (eps, cell)
    run = tmp_path / "saturated"
    shutil.copytree(suite[0] / "cifar_cnn", run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    head = [k for k in state["model"] if k.endswith("weight")][-1]
    state["model"][head] *= 1e4
    torch.save(state, run / "checkpoint.pt")
    zero, out, rows = table(run)
    assert zero > 0
    for eps, papers, of_them_zero, _, _ in rows:
        assert int(papers.split()[0]) == int(of_them_zero) == zero, (eps, out)


def test_imagenette_resnet_quick(suite, image_folder):
    run = suite[0] / "imagenette_resnet"
    check_run_folder(run)
    # torchvision's ResNet18: the stem's ReLU and one inplace ReLU module used twice in each of 8 blocks
    assert len([k for k in records(run)[-1] if k.startswith("rank_")]) == 17
    assert len(list(image_folder.glob("tensors_16px_*.pt"))) == 1  # decoded once, then cached
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["arch"] == "torchvision" and len(config["pixel_units"]["lc_radius"]) == 3


def test_cifar10_preact_resnet_quick(suite):
    run = suite[0] / "cifar10_resnet"
    check_run_folder(run)
    assert len([k for k in records(run)[-1] if k.startswith("rank_")]) == 16  # 2 ReLUs x 8 blocks
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["arch"], config["resolution"], config["lc_radius"], config["lc_batch"]) == ("preact", 32, 0.005, 32)


def test_mnist_reads_the_distributions_gz_files_and_takes_fractions(tmp_path, mnist_dir):
    import gzip
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_dir / "MNIST" / "raw").iterdir():
        (raw / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", tmp_path / "data", "--pgd-eps", "8/255",
               "--steps", "20", "--evals", "2", "--out", tmp_path / "run")
    assert "pgd_acc_0.0314" in records(tmp_path / "run")[-1]


@pytest.mark.parametrize("script", ["exp_modular_arith.py", "exp_mnist_mlp.py", "exp_deep_mlp_rank.py",
                                    "exp_cifar_cnn.py", "exp_imagenette_resnet.py"])
def test_help_works_and_lists_every_field(script):
    out = run_script(script, "--help").stdout
    for flag in ("--lc-radius", "--pgd-eps", "--steps", "--quick", "--resume", "--out", "--seed"):
        assert flag in out
    assert "radius r of the cross-polytope" in out


def test_transformer_computes_the_full_forward_at_the_equals_position():
    """Oracle: the textbook forward (attention and MLP at all three positions, then read '='), in
    float64. The script runs only the '=' position; the logits must be the same."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(REPO))
    import exp_modular_arith as script
    torch.manual_seed(0)
    model = script.make_model(script.Config(model="transformer", p=11, width=16)).double()
    x = F.one_hot(torch.randint(0, 11, (50, 2)), 11).double().reshape(50, -1)
    h = torch.cat([model.embed(x.reshape(-1, 2, 11)), model.equals.expand(50, -1, -1)], 1) + model.pos
    h = h + model.attn(h, h, h, need_weights=False)[0]
    h = h + model.mlp(h)
    torch.testing.assert_close(model(x), model.unembed(h[:, -1]), rtol=1e-12, atol=1e-12)


def test_a_copied_script_with_new_fields_runs_outside_the_repository(tmp_path, mnist_dir):
    """Coursework: exp_mnist_mlp.py and common.py copied into a folder of their own, with new fields
    of each type added to the Config (and a dropout layer using one), run --quick there."""
    import shutil
    shutil.copy(REPO / "common.py", tmp_path / "common.py")
    script = (REPO / "exp_mnist_mlp.py").read_text()
    anchor = "    width: int = 200  # hidden width\n"
    assert anchor in script
    script = script.replace(anchor, anchor + "    dropout: float = 0.1  # dropout after each hidden ReLU\n"
                            "    heads: int = 2  # an int field\n    note_bool: bool = False  # a flag\n"
                            "    extra: tuple = (1.0, 2.0)  # a tuple field\n")
    layer = "        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]\n"
    assert layer in script
    script = script.replace(layer, "        layers += [nn.Linear(width_in, cfg.width), nn.ReLU(), nn.Dropout(cfg.dropout)]\n")
    (tmp_path / "exp_mnist_mlp.py").write_text(script)
    proc = subprocess.run([sys.executable, "exp_mnist_mlp.py", "--quick", "--device", "cpu", "--no-download",
                           "--data-dir", str(mnist_dir), "--dropout", "0.2", "--steps", "20", "--out", "run"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["dropout"] == 0.2 and config["heads"] == 2 and config["extra"] == [1.0, 2.0]
    proc = subprocess.run([sys.executable, "exp_mnist_mlp.py", "--quick", "--dropout", "nan", "--out", "bad"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dropout nan: must be a finite number above 0" in proc.stderr
