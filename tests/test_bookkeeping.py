"""The run folder: metrics.jsonl (strict JSON, a half-written line, a damaged one), metrics.csv and
metrics.png, log-spaced steps, the onsets of summary.json, the partition pictures' three steps."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import records, run_script


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



def test_legends_stay_short_enough_to_fit_under_their_panel():
    # a ResNet has 16-17 ReLU layers: a legend naming each would run into the panel below, so a rank
    # panel names six layers, first and last among them (the colours order the rest); other panels keep all
    from matplotlib.figure import Figure
    axes = Figure().subplots(1, 2)
    for i in range(16):
        axes[0].plot([1, 2], [i, i], label=f"rank_{i + 1}")
    for i in range(7):
        axes[1].plot([1, 2], [i, i], label=f"pgd_acc_{i}")
    common.finish_panel(axes[0], "feature rank per layer", "rank")
    common.finish_panel(axes[1], "PGD accuracy", "accuracy")
    named = [text.get_text() for text in axes[0].get_legend().get_texts()]
    assert len(named) == 6 and named[0] == "rank_1" and named[-1] == "rank_16"
    assert len(axes[1].get_legend().get_texts()) == 7

def test_half_written_last_line_is_skipped_with_a_warning(tmp_path, capsys):
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
    # a damaged line before the last is not a killed write: the file is refused, not silently shortened
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_a\n{"step": 12, "train_acc": 0.3}\n')
    with pytest.raises(SystemExit) as refused:
        common.read_metrics(tmp_path)
    assert refused.value.code == 2 and "not JSON; the file is damaged" in capsys.readouterr().err


def test_onset_summary_finds_the_steps():
    records = [{"step": s, "train_acc": tr, "test_acc": te, "pgd_acc_0.1": pg, "lc_train": lc}
               for s, tr, te, pg, lc in [(0, 0.1, 0.1, 0.7, 5.0), (10, 0.995, 0.2, 0.0, 2.0), (100, 1.0, 0.5, 0.1, 6.0),
                                         (1000, 1.0, 0.9, 0.3, 1.0), (5000, 1.0, 0.9, 0.6, 0.5),
                                         (7000, 1.0, 0.9, 0.6, 0.5), (9000, 1.0, 0.9, 0.6, 0.5)]]
    s = common.onset_summary(records)
    assert s["train_acc_99_step"] == 10
    assert s["test_acc_99pct_of_final_step"] == 1000 and s["test_acc_delay_steps"] == 990
    # PGD accuracy 0.7 at step 0 (a weak model's transient) is not the onset: the rise after fitting is
    assert s["pgd_acc_0.1_99pct_of_final_step"] == 5000 and s["pgd_acc_0.1_delay_steps"] == 4990
    assert (s["lc_train_init"], s["lc_train_min"], s["lc_train_max"], s["lc_train_end"]) == (5.0, 0.5, 6.0, 0.5)


def test_onset_thresholds_are_inclusive_and_searched_from_the_fit_step():
    final = 0.5
    records = [{"step": 0, "train_acc": 0.5, "test_acc": 0.1},
               {"step": 10, "train_acc": 0.99, "test_acc": 0.99 * final},  # exactly at both thresholds
               {"step": 20, "train_acc": 1.0, "test_acc": final}, {"step": 30, "train_acc": 1.0, "test_acc": final},
               {"step": 40, "train_acc": 1.0, "test_acc": final}]
    s = common.onset_summary(records)
    assert s["train_acc_99_step"] == 10
    assert s["test_acc_99pct_of_final_step"] == 10 and s["test_acc_delay_steps"] == 0


@pytest.mark.parametrize("curve, onset, why", [
    ([0.1, 0.1, 0.2, 0.9, 0.95, 0.96, 0.95], 400, None),  # grokked: a plateau at 0.95
    ([0.1, 0.11, 0.1, 0.12, 0.11, 0.1, 0.12], None, "no_rise"),  # never left its fit-time level
    ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], None, "no_rise"),  # stays at 0
    ([0.1, 0.1, 0.12, 0.15, 0.18, 0.21, 0.235], None, "still_rising"),  # modular arithmetic at wd 0.1
    ([0.1, 0.1, 0.3, 0.8, 0.82, 0.79, 0.81], 400, None),  # a noisy plateau (0.8 < 99% of 0.81)
    ([0.1, 0.1, 0.3, 0.9, 0.9, 0.6, 0.5], None, "not_settled"),  # fell at the end
])
def test_onsets_need_a_plateau_above_the_curves_lowest_level(curve, onset, why):
    steps = [0, 100, 200, 300, 400, 500, 600]
    records = [{"step": s, "train_acc": 1.0 if s >= 100 else 0.5, "test_acc": v} for s, v in zip(steps, curve)]
    s = common.onset_summary(records)
    assert s["test_acc_99pct_of_final_step"] == onset and s.get("test_acc_no_onset") == why
    assert s.get("test_acc_delay_steps") == (None if onset is None else onset - 100)


def test_metrics_are_strict_json_and_nan_is_null(tmp_path):
    common.log_metrics(tmp_path, {"step": 0, "train_loss": float("nan"), "test_loss": float("inf"), "train_acc": 0.1})
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record == {"step": 0, "train_loss": None, "test_loss": None, "train_acc": 0.1}
    common.plot_run(tmp_path)  # nulls are skipped, not drawn


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


def test_an_early_peak_that_collapses_is_not_the_onset():
    # the full CIFAR-10 CNN under the papers' attack: above its final value while it learns, at 0 for
    # 1e5 steps, back to its final 8% at the end; the net never fits, so the search starts at step 0
    curve = {0: 0.0, 1: 0.10, 5: 0.17, 300: 0.05, 4000: 0.0, 60000: 0.0, 100000: 0.004, 160000: 0.035,
             220000: 0.057, 240000: 0.0795, 250000: 0.081, 260000: 0.080}
    records = [{"step": s, "train_acc": 0.97, "pgd_ce32_acc_0.196": v} for s, v in curve.items()]
    s = common.onset_summary(records)
    assert s["train_acc_99_step"] is None
    assert s["pgd_ce32_acc_0.196_99pct_of_final_step"] == 240000  # 0.0795 >= 0.99 * 0.080, and it stays there
    # a rise that dips back within tol of the level still has its onset at the first crossing
    levels = [0.1, 0.5, 0.9, 0.88, 0.9, 0.91, 0.9]
    wobbly = [{"step": s, "train_acc": 1.0, "test_acc": v} for s, v in zip(range(0, 700, 100), levels)]
    assert common.onset_summary(wobbly)["test_acc_99pct_of_final_step"] == 200


def test_partition_pictures_at_init_at_the_first_fit_and_at_the_end(tmp_path, mnist_dir, monkeypatch):
    drawn, draw = [], common.partition_picture

    def recorded(model, anchors, path, *args, **kwargs):
        drawn.append((Path(path).name, kwargs["title"]))
        return draw(model, anchors, path, *args, **kwargs)

    monkeypatch.setattr(common, "partition_picture", recorded)
    run_script("exp_mnist_mlp.py", "--quick", "--no-download", "--data-dir", mnist_dir, "--out", tmp_path / "run")
    logged = records(tmp_path / "run")
    fit = next(r["step"] for r in logged if r["train_acc"] >= 0.99)
    assert fit < logged[-2]["step"]  # evaluations after the fit, which draw no picture
    assert drawn == [("partition_init.png", "step 0: "), ("partition_fit.png", f"step {fit}: "),
                     ("partition_end.png", f"step {logged[-1]['step']}: ")]
