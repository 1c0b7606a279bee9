"""Run folder, metrics, plot, onset summary, log-spaced steps; the partition picture."""
import itertools
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from test_scripts import REPO, run_script

sys.path.insert(0, str(REPO / "tools"))
import runs as runs_tool  # noqa: E402


def test_log_steps_are_log_spaced_and_include_both_ends():
    steps = common.log_steps(100_000, 40)
    assert steps[0] == 0 and steps[-1] == 100_000 and steps == sorted(set(steps))
    ratios = np.diff(np.log(steps[5:]))
    assert ratios.max() < 2 * ratios.mean()  # evenly spaced on a log axis
    assert set(common.log_steps(100, 200)) <= set(range(101))  # never more steps than exist


def test_run_folder_metrics_csv_and_plot(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1
        steps: int = 100
        resume: bool = False

    run, checkpoint = common.start_run(tmp_path / "run", Cfg(), torch.device("cpu"))
    info = json.loads((run / "config.json").read_text())
    assert checkpoint is None
    assert info["config"] == {"lr": 0.1, "steps": 100, "resume": False} and info["torch"] == torch.__version__
    assert "command" in info and "git_commit" in info
    for step in (0, 1, 10, 100):
        common.log_metrics(run, {"step": step, "train_acc": 0.5, "test_acc": 0.4, "train_loss": 1.0, "test_loss": 2.0,
                                 "lc_train": 3.0, "lc_train_ci": 0.1, "pgd_acc_0.1": 0.2, "rank_1": 5, "erank_1": 4.5,
                                 "weight_norm": 9.0})
    titles = common.plot_run(run)
    assert titles == ["accuracy", "loss", "local complexity", "PGD accuracy", "feature rank per layer",
                      "effective rank per layer", "weight norm"]
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    common.write_csv(run)
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("step,train_acc")
    (run / "checkpoint.pt").write_bytes(b"")  # a run with a checkpoint is never overwritten
    with pytest.raises(SystemExit):
        common.start_run(run, Cfg(), torch.device("cpu"))


def test_half_written_last_line_is_skipped_with_a_warning(tmp_path):
    common.log_metrics(tmp_path, {"step": 0, "train_acc": 0.1})
    common.log_metrics(tmp_path, {"step": 5, "train_acc": 0.2})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_a')  # the run was killed mid-write
    with pytest.warns(UserWarning, match="half-written"):
        records = common.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 5]
    with pytest.warns(UserWarning):
        common.truncate_metrics(tmp_path, 3)
    assert [r["step"] for r in common.read_metrics(tmp_path)] == [0]


def test_onset_summary_finds_the_steps():
    records = [{"step": s, "train_acc": tr, "test_acc": te, "pgd_acc_0.1": pg, "lc_train": lc}
               for s, tr, te, pg, lc in [(0, 0.1, 0.1, 0.7, 5.0), (10, 0.995, 0.2, 0.0, 2.0), (100, 1.0, 0.5, 0.1, 6.0),
                                         (1000, 1.0, 0.9, 0.3, 1.0), (5000, 1.0, 0.9, 0.6, 0.5)]]
    s = common.onset_summary(records)
    assert s["train_acc_99_step"] == 10
    assert s["test_acc_99pct_of_final_step"] == 1000 and s["test_acc_delay_steps"] == 990
    # PGD accuracy 0.7 at step 0 (a weak model's transient) is not the onset: the rise after fitting is
    assert s["pgd_acc_0.1_99pct_of_final_step"] == 5000 and s["pgd_acc_0.1_delay_steps"] == 4990
    assert (s["lc_train_init"], s["lc_train_min"], s["lc_train_max"], s["lc_train_end"]) == (5.0, 0.5, 6.0, 0.5)


def arrangement_regions(w, b, lo, hi):
    """Closed form for lines in general position: regions of the arrangement inside the square
    [lo, hi]^2 = 1 + (lines crossing it) + (pairwise intersections inside it)  (Euler's formula)."""
    corners = np.array(list(itertools.product([lo, hi], repeat=2)))
    vals = corners @ w.T + b
    crossing = [(vals[:, i].min() < 0 < vals[:, i].max()) for i in range(len(b))]
    inside = 0
    for i, j in itertools.combinations(range(len(b)), 2):
        p = np.linalg.solve(w[[i, j]], -b[[i, j]])
        inside += bool(((p > lo) & (p < hi)).all())
    return 1 + sum(crossing) + inside


def test_partition_region_count_matches_the_line_arrangement(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3))
    anchors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the plane's coordinates are the inputs
    w, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    expected = arrangement_regions(w, b, -2.0, 3.0)
    found = common.partition_picture(model, anchors, tmp_path / "p.png", resolution=1000, margin=2.0)
    assert expected > 8 and found == expected
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_region_ids_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    points = torch.randn(999, 5)
    ids_a, cls_a, _ = common.region_ids(model, points, (5,), batch_size=4096)
    ids_b, cls_b, _ = common.region_ids(model, points, (5,), batch_size=37)
    assert torch.equal(ids_a, ids_b) and torch.equal(cls_a, cls_b)
    # and two points share an id exactly when their sign patterns agree
    pre1 = points @ model[0].weight.T + model[0].bias
    pre2 = pre1.clamp(min=0) @ model[2].weight.T + model[2].bias
    patterns = torch.cat([pre1 > 0, pre2 > 0], 1)
    _, expected = torch.unique(patterns, dim=0, return_inverse=True)
    assert torch.equal(ids_a[:, None] == ids_a[None], expected[:, None] == expected[None])


def test_boundary_points_lie_between_two_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(200, 4)
    bp = common.boundary_points(model, x, steps=30)
    assert 150 < len(bp) <= 200
    # a tiny step in some direction changes the prediction: check along the bisection segment
    with torch.no_grad():
        logits = model(bp)
        top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).max() < 1e-4  # the two best classes tie: the point is on the boundary


def test_onset_thresholds_are_inclusive_and_searched_from_the_fit_step():
    final = 0.5
    records = [{"step": 0, "train_acc": 0.5, "test_acc": 0.1},
               {"step": 10, "train_acc": 0.99, "test_acc": 0.99 * final},  # exactly at both thresholds
               {"step": 20, "train_acc": 1.0, "test_acc": final}]
    s = common.onset_summary(records)
    assert s["train_acc_99_step"] == 10
    assert s["test_acc_99pct_of_final_step"] == 10 and s["test_acc_delay_steps"] == 0


def test_metrics_are_strict_json_and_nan_is_null(tmp_path):
    common.log_metrics(tmp_path, {"step": 0, "train_loss": float("nan"), "test_loss": float("inf"), "train_acc": 0.1})
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record == {"step": 0, "train_loss": None, "test_loss": None, "train_acc": 0.1}
    common.plot_run(tmp_path)  # nulls are skipped, not drawn


def test_boundary_density_counts_the_lines_between_neighbouring_grid_points():
    # one hidden layer in 2D: between two grid points, exactly the neurons whose line separates them flip
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 3))
    n = 60
    ticks = np.linspace(-1.0, 2.0, n)
    b, a = np.meshgrid(ticks, ticks, indexing="ij")
    points = torch.tensor(np.stack([a.ravel(), b.ravel()], 1), dtype=torch.float32)
    w, bias = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    signs = (points.double().numpy() @ w.T + bias > 0).reshape(n, n, -1)
    expected = np.zeros((n, n), int)
    expected[:, :-1] += (signs[:, 1:] != signs[:, :-1]).sum(2)
    expected[1:] += (signs[1:] != signs[:-1]).sum(2)
    for batch in (37, 10_000):  # whole rows per batch, whatever is asked
        _, _, flips = common.region_ids(model, points, (2,), batch_size=batch, row=n)
        np.testing.assert_array_equal(flips.reshape(n, n).numpy(), expected)
    assert expected.sum() > 2 * n  # several lines cross the grid


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


def test_anchor_points_take_three_classes_or_the_first_three_inputs():
    x = torch.arange(6.0).reshape(6, 1)
    assert common.anchor_points(x, torch.tensor([2, 2, 0, 1, 1, 0])).flatten().tolist() == [2.0, 3.0, 0.0]
    assert common.anchor_points(x, torch.tensor([1, 1, 0, 0, 1, 0])).flatten().tolist() == [0.0, 1.0, 2.0]


def test_plots_leave_a_notebooks_backend_and_figures_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    old = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend: anything but Agg
    try:
        mine = plt.figure()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        common.partition_picture(model, torch.rand(3, 4), tmp_path / "p.png", resolution=20)
        common.log_metrics(tmp_path, {"step": 0, "train_acc": 0.5, "pgd_acc_0.1": 0.2, "pgd_ce32_acc_0.1": 0.3,
                                      "margin_p50": 3.0, "zero_grad_frac": 0.0})
        titles = common.plot_run(tmp_path)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
        assert titles == ["accuracy", "PGD accuracy", "logit margin"]
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "metrics.png").exists()
    finally:
        plt.close("all")
        matplotlib.use(old)


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
