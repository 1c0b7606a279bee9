"""tools/runs.py compare: seeds in a band with their spread in the table, sweeps grouped by the
fields that differ, mixed experiments and a folder given twice refused (split-mnist: test_cli.py);
tools/mutants.py's pieces of common.py each still there once."""
import json
import sys

import common
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "tools"))
import runs as runs_tool  # noqa: E402


def test_compare_draws_seeds_and_tabulates_their_spread(tmp_path):
    for seed, (fit, final) in enumerate([(10, 0.8), (20, 0.9), (30, 1.0)]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        for step, tr, te in [(0, 0.1, 0.1), (fit, 1.0, final / 2), (100, 1.0, final)]:
            common.log_metrics(run, {"step": step, "train_acc": tr, "test_acc": te, "lc_train": 3.0 + seed})
    table = runs_tool.compare_runs([tmp_path / f"seed{i}" for i in range(3)], tmp_path / "fig.png", at=[90], keys=["lc_train"])
    assert "| lc_train at ~90 (step 100) | 3 | 4 | 5 | 4 | 3 - 5 |" in table  # the logged step nearest 90
    assert "| train_acc_99_step | 10 | 20 | 30 | 20 | 10 - 30 |" in table
    assert "| test_acc_final | 0.8 | 0.9 | 1 | 0.9 | 0.8 - 1 |" in table
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run(folder, script, config, test_accs):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": config, "script": script, "command": f"python {script}"}))
    for step, acc in zip((0, 10, 100), test_accs):
        common.log_metrics(folder, {"step": step, "train_acc": 1.0, "test_acc": acc})


def test_compare_groups_a_sweep_by_the_fields_that_differ_and_refuses_mixed_experiments(tmp_path):
    runs = []
    for wd, base in ((0.1, 0.5), (1.0, 0.8)):
        for seed in (0, 1):
            folder = tmp_path / f"wd{wd}_s{seed}"
            _fake_run(folder, "exp_mnist_mlp.py", {"weight_decay": wd, "seed": seed, "out": str(folder), "lr": 1e-3},
                      (0.1, base, base + 0.1 * seed))
            runs.append(folder)
    groups = runs_tool.run_groups(runs)
    assert groups == {"weight_decay=0.1": runs[:2], "weight_decay=1.0": runs[2:]}
    table = runs_tool.compare_runs(runs, tmp_path / "fig.png")
    assert "| setting | weight_decay=0.1 | weight_decay=0.1 | weight_decay=1.0 | weight_decay=1.0 | - | - | - | - |" in table
    assert "| test_acc_final | 0.5 | 0.6 | 0.8 | 0.9 | 0.55 | 0.5 - 0.6 | 0.85 | 0.8 - 0.9 |" in table
    other = tmp_path / "modular"
    _fake_run(other, "exp_modular_arith.py", {"weight_decay": 1.0, "seed": 0}, (0.1, 0.5, 1.0))
    for bad, message in (([runs[0], other], "different scripts"), ([runs[0], runs[0]], "given twice")):
        proc = run_script("tools/runs.py", "compare", *bad, "--out", tmp_path / "x.png", ok=False)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "x.png").exists()


def test_compare_refuses_one_folder_under_two_spellings_and_mixed_data_sets(tmp_path):
    _fake_run(tmp_path / "a", "exp_mnist_mlp.py", {"seed": 0}, (0.1, 0.5, 0.9))
    proc = run_script("tools/runs.py", "compare", tmp_path / "a", f"{tmp_path}/a/../a", "--out", tmp_path / "x.png", ok=False)
    assert proc.returncode == 2 and "given twice" in proc.stderr
    _fake_run(tmp_path / "c", "exp_imagenette_resnet.py", {"dataset": "cifar10"}, (0.1, 0.5, 0.9))
    _fake_run(tmp_path / "i", "exp_imagenette_resnet.py", {"dataset": "imagenette"}, (0.1, 0.5, 0.9))
    proc = run_script("tools/runs.py", "compare", tmp_path / "c", tmp_path / "i", "--out", tmp_path / "x.png", ok=False)
    assert proc.returncode == 2 and "different data sets" in proc.stderr and not (tmp_path / "x.png").exists()


def test_compare_at_picks_the_nearest_logged_step_on_the_log_axis(tmp_path):
    _fake_run(tmp_path / "a", "exp_mnist_mlp.py", {"seed": 0}, (0.1, 0.5, 0.9))  # steps 0, 10, 100
    table = runs_tool.compare_runs([tmp_path / "a"], tmp_path / "x.png", at=[40], keys=["test_acc"])
    assert "| test_acc at ~40 (step 100) |" in table  # log(100/40) < log(40/10): 100 is nearer on a log axis


def test_one_band_per_group_of_seeds_and_none_for_single_runs(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    bands = []
    original = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between", lambda self, *a, **k: (bands.append(k.get("color")), original(self, *a, **k))[1])
    for wd in (0.1, 1.0):
        for seed in (0, 1):
            _fake_run(tmp_path / f"wd{wd}_s{seed}", "exp_mnist_mlp.py", {"weight_decay": wd, "seed": seed},
                      (0.1, 0.5, 0.6 + 0.1 * seed))
    runs_tool.compare_runs([tmp_path / "wd0.1_s0", tmp_path / "wd1.0_s0"], tmp_path / "singles.png")
    assert bands == []  # one run per setting: no band
    runs_tool.compare_runs(sorted(tmp_path.glob("wd*")), tmp_path / "seeds.png")
    assert len(bands) == 2 * 2  # per setting, one band for each of train_acc and test_acc
    assert sorted(set(bands)) == ["C0", "C1"]  # in its setting's colour


def test_every_mutant_of_tools_mutants_is_one_piece_of_common():
    # tools/mutants.py replaces exact pieces of common.py: after a refactor each must still occur once
    import mutants
    source = (REPO / "common.py").read_text()
    assert len(mutants.MUTANTS) > 40
    for name, piece, replacement in mutants.MUTANTS:
        assert source.count(piece) == 1 and replacement != piece, name
