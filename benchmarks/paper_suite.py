"""The paper-scale settings back to back, within a time budget, with one table of speed and results.

Runs each script at its default (paper) setting into results/gpu/<setting>/ (the ResNets, too
long for one budget, as a measured slice with the full run's time projected from it), then prints
one table: steps/s, wall time, the fraction of it spent measuring, and each setting's headline
numbers next to the paper's (SPEC section 4). A setting that would not fit the budget left is
shortened (fewer steps, said in the table) or skipped (said too); one whose full run finished
earlier in the same folder (results/gpu/cifar_cnn: the CIFAR CNN, 2.6e5 steps) is tabulated
without running it again.

    python benchmarks/paper_suite.py --budget-minutes 9              # one GPU (targets: H100/H200)
    python benchmarks/paper_suite.py --smoke --out /tmp/suite        # the same code, tiny, on CPU

Data (offline defaults; the scripts download the real sets when given a --data-dir that lacks
them): MNIST as the 5,000/5,000 and 7,000/3,000 splits of the real MNIST test set (RESULTS.md
shows how to make them), CIFAR-10 as the full set's class folders (RESULTS.md: data/cifar10_jpeg),
Imagenette as any train/ + val/ class-folder tree (skipped when absent).
"""
import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name, script, flags, target seconds of the full default run on one H100/H200 (None: too long for a
# budget, so a slice of --slice-steps steps is timed and the full run projected), paper's headline
SETTINGS = [
    ("modular_arith", "exp_modular_arith.py", [], 15, "MLP: train 100% by ~200 steps, test 100% at 1.3-2k"),
    ("mnist_mlp", "exp_mnist_mlp.py", ["--data", "mnist5k"], 30,
     "Fig. 2: test ~91%; PGD eps=0.06 ~25% to 1e4, ~61% at 1e5; train LC 4.9 -> 0.14"),
    ("mnist_mlp_init8", "exp_mnist_mlp.py", ["--data", "mnist5k", "--init-scale", "8"], 30,
     "x8: test ~15% to 1e4, ~89% at 1e5; weight norm 92 -> 52"),
    ("deep_mlp_rank", "exp_deep_mlp_rank.py", ["--data", "mnist7k"], 60,
     "12x400, N=7000: second surge of test acc; deep-layer rank tunnel (< 300)"),
    ("cifar_cnn", "exp_cifar_cnn.py", ["--data", "cifar", "--compile"], 480,  # measured: 466 s on one H200
     "Fig. 6a: test ~70%; PGD ~10% to 5.6e4, ~70% at 2.6e5; LC 11.5 -> 8 -> 16 -> 7"),
    ("imagenette_resnet", "exp_imagenette_resnet.py", ["--data", "imagenette"], None,
     "Fig. 6c: LC very high during the ascent; delayed robustness"),
    ("cifar10_resnet", "exp_imagenette_resnet.py", ["--dataset", "cifar10", "--data", "cifar"], None,
     "Fig. 1: PGD (50/255) ~12-18% to 1e5, ~67% at 2e5, ~75% at 3.5e5; clean ~74-75%; LC 53 -> 41 -> 66 -> 36"),
]


def headline(run):
    """Our numbers to set beside the paper's: final test accuracy, each PGD accuracy, LC train at
    init / min / end, the steps of interpolation and of the test and PGD onsets, rank of the last
    hidden layer at its min and end."""
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    parts = [f"test {last.get('test_acc', math.nan):.1%}"]
    parts += [f"{k.replace('pgd_acc_', 'PGD ')} {v:.1%}" for k, v in last.items() if k.startswith("pgd_acc") and v is not None]
    if "lc_train_init" in summary:
        parts.append(f"LC {summary['lc_train_init']:.3g} -> min {summary['lc_train_min']:.3g} -> end "
                     f"{summary['lc_train_end']:.3g}")
    parts.append(f"fit {summary.get('train_acc_99_step')}, test onset {summary.get('test_acc_99pct_of_final_step')}")
    ranks = sorted((k for k in last if k.startswith("rank_")), key=lambda k: int(k.split("_")[1]))
    if ranks:
        deep = [r[ranks[-1]] for r in records if r.get(ranks[-1]) is not None]
        parts.append(f"{ranks[-1]} min {min(deep)} end {deep[-1]}")
    return "; ".join(parts)


def tf32_check(args, out):
    """What TF32 does to LC on the Fig. 1 ResNet at init (pre-activation ResNet18 width 16, the
    run's own seed and directions, --tf32-points real CIFAR-10 training images, or uniform ones
    without data): lc_precision_audit at r = 0.005 (the paper's) and r = 5e-4, with the authors'
    constants and with the true std. On a GPU the real TF32 flags, on a CPU an emulation (said in
    the table). Writes out/tf32_check.md and returns its lines."""
    import torch
    sys.path.insert(0, str(REPO))
    import common
    import exp_imagenette_resnet as script
    import precision
    device = common.pick_device(args.device)
    n = 8 if args.smoke else args.tf32_points
    if Path(args.cifar).exists():
        x = script.to_input(common.load_cifar10(args.cifar, download=False)[0][:n].permute(0, 3, 1, 2))
        what = f"{n} real CIFAR-10 training images"
    else:
        x, what = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), f"{n} uniform random images"
    lines = [f"TF32 and LC on the Fig. 1 ResNet at init ({what}, device {device}; mean LC over the images)", "",
             "| constants | P | r (normalised) | exact | exact at r/10 | TF32 | TF32 at r/10 | TF32 kind |", "|---" * 8 + "|"]
    for name in ("cifar10_authors", "cifar10_true"):
        cfg = common.parse_config(script.Config, ["--dataset", "cifar10", "--normalisation", name] +
                                  (["--lc-directions", "4"] if args.smoke else []))
        torch.manual_seed(cfg.seed)
        model = script.make_model(cfg, 10).to(device)
        directions = common.random_directions(cfg.lc_directions, 3 * 32 * 32, torch.Generator().manual_seed(cfg.seed))
        directions = common.in_input_units(directions, (3, 32, 32), name)
        for r in (cfg.lc_radius, cfg.lc_radius / 10):
            a = precision.lc_precision_audit(model, x.to(device), r, directions, batch_size=16)
            lines.append(f"| {name} | {cfg.lc_directions} | {r:g} | {a['exact']:.2f} | {a['exact_r/10']:.2f} | {a['tf32']:.2f} | "
                         f"{a['tf32_r/10']:.2f} | {a['tf32_kind']} |")
    print("\n".join(lines), flush=True)
    (out / "tf32_check.md").write_text("\n".join(lines) + "\n")
    return lines


def stored_config(run):
    """The config.json record of a run folder (None when there is none or it cannot be read)."""
    try:
        return json.loads((run / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_step(run):
    """The step of a run folder's last logged record (None when there is none)."""
    try:
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return None


def run_child(cmd, timeout, name):
    """Runs one script; returns its exit code, or None when it ran past timeout (then stopped with
    SIGINT, as Ctrl-C would: it keeps what it logged). Ctrl-C or SIGTERM to the suite reach the
    script too (SIGTERM is forwarded), and the suite ends in one line once the script has ended."""
    child = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda *_: (child.send_signal(signal.SIGTERM), child.wait(),
                                                         sys.exit(f"paper suite: terminated during {name}; its run "
                                                                  f"folder keeps what it logged")))
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)
        child.wait()
        return None
    except KeyboardInterrupt:  # the script got the same Ctrl-C from the terminal; let it end in its own line
        child.wait()
        print(f"paper suite: interrupted during {name}; rerun the same command to continue (runs resume)",
              file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--budget-minutes", type=float, default=9.0, help="wall-clock budget for the whole suite")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu"), help="parent folder of the run folders")
    parser.add_argument("--device", default="auto", help="passed to every script")
    parser.add_argument("--slice-steps", type=int, default=3000, help="steps of the timed ResNet slices")
    parser.add_argument("--mnist5k", default=str(REPO / "data" / "mnist_real_5k5k"), help="MNIST root, 1000-image runs")
    parser.add_argument("--mnist7k", default=str(REPO / "data" / "mnist_real_7k3k"), help="MNIST root, N=7000")
    parser.add_argument("--cifar", default=str(REPO / "data" / "cifar10_jpeg"), help="CIFAR-10 root, class folders or .npz")
    parser.add_argument("--imagenette", default=str(REPO / "data" / "imagenette"), help="Imagenette folder")
    parser.add_argument("--only", nargs="+", help="run only these settings")
    parser.add_argument("--smoke", action="store_true", help="every setting with --quick: the same code, tiny, on CPU")
    parser.add_argument("--tf32-check", action="store_true",
                        help="only the TF32 check of LC (run first anyway by a whole suite, without --only, on a "
                             "GPU or with --smoke)")
    parser.add_argument("--tf32-points", type=int, default=128, help="images of the TF32 check")
    args = parser.parse_args()
    names = [name for name, *_ in SETTINGS]
    if not (math.isfinite(args.budget_minutes) and args.budget_minutes > 0):
        parser.error(f"--budget-minutes {args.budget_minutes}: must be a finite number of minutes above 0")
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such setting; choose from {', '.join(names)}")
    if not (1 <= args.slice_steps <= 10**7 and 1 <= args.tf32_points <= 10**4):
        parser.error("--slice-steps (at most 1e7) and --tf32-points (at most 1e4) must be positive whole numbers")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; name a folder for the run folders")
    # smoke runs get their own subfolder: a later real suite never resumes (or reports) a smoke run
    out = Path(args.out) / "smoke" if args.smoke else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.budget_minutes
    import torch
    if args.tf32_check or (not args.only and (args.smoke or torch.cuda.is_available())):
        tf32_check(args, out)
        if args.tf32_check:
            return
    rows = []
    for name, script, flags, target, paper in SETTINGS:
        if args.only and name not in args.only:
            continue
        flags = [f for f in flags if not (args.smoke and f == "--compile")]  # compiling would dwarf a smoke run
        if "--data" in flags:  # the suite's data option for this setting, as the script's --data-dir
            data = flags.index("--data")
            path = getattr(args, flags[data + 1])
            flags[data:data + 2] = ["--data-dir", path] + (["--no-download"] if not path.endswith(".npz") else [])
            if not Path(path).exists():
                rows.append((name, f"skipped: no data at {path}", "", "", "", "", "", paper))
                continue
        run = out / name
        stored = stored_config(run)
        finished = stored is not None and not args.smoke and last_step(run) == stored.get("steps")
        left = deadline - time.time()
        steps_flag, mode = [], "full"
        if args.smoke:
            steps_flag, mode = ["--quick"], "smoke"
        elif finished:  # a full run made earlier: tabulated, not run again
            mode = "finished earlier (not rerun)"
        elif target is None:
            steps_flag, mode = ["--steps", str(args.slice_steps), "--evals", "3"], "slice"
        elif left < 0.2 * target:
            rows.append((name, f"skipped: {left:.0f} s left of the budget, ~{target} s needed", "", "", "", "", "", paper))
            continue
        elif left < 1.2 * target:
            default_steps = {"modular_arith": 10_000, "cifar_cnn": 260_000}.get(name, 100_000)
            steps = int(default_steps * left / (1.3 * target))
            steps_flag, mode = ["--steps", str(steps)], f"shortened to {steps} steps (budget)"
        if stored is not None and bool(stored.get("quick")) != args.smoke:  # the run's own record, not its folder's name
            rows.append((name, f"skipped: {run} holds a {'smoke (--quick)' if stored.get('quick') else 'full'} run, not "
                               f"a {'smoke' if args.smoke else 'full'} one; choose another --out", "", "", "", "", "", paper))
            continue
        cmd = [sys.executable, str(REPO / script), "--device", args.device, "--out", str(run), *flags, *steps_flag]
        if (run / "checkpoint.pt").exists():
            cmd.append("--resume")
        started = time.time()
        if finished:
            returncode = 0
        else:
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            returncode = run_child(cmd, timeout=max(left, 60) if not args.smoke else 600, name=name)
        status = ("stopped at the budget (metrics so far kept)" if returncode is None else
                  mode if returncode == 0 else f"failed (exit {returncode})")
        wall = time.time() - started
        summary_path = run / "summary.json"
        if not summary_path.exists():
            rows.append((name, status, "", "", f"{wall:.0f}", "", "", paper))
            continue
        summary = json.loads(summary_path.read_text())
        t = summary.get("time", {})
        config = stored_config(run) or {}
        if bool(config.get("quick")) != args.smoke:
            status = f"refused: {run} holds a {'smoke' if config.get('quick') else 'full'} run"
        rate = t.get("train_steps_per_s") or math.nan
        projected = ""
        if mode == "slice":  # the full default schedule: training at the slice's rate, 40 evaluations at their cost
            full_steps = 440_000 if "--dataset" in flags else 350_000
            per_eval = sum(v for k, v in t.items() if k in ("eval_s", "rank_s", "lc_s", "pgd_s", "partition_s")) / 4
            projected = f"{(full_steps / rate + 40 * per_eval) / 60:.0f} min"
        rows.append((name, status, str(config.get("steps", "")), f"{rate:.0f}", f"{t.get('wall_s', wall):.0f}",
                     f"{t.get('measurement_fraction', math.nan):.0%}", projected, paper, headline(run)))
    header = "| setting | run | steps | steps/s | wall s | measuring | projected full run | paper | ours |"
    print("\n" + header + "\n" + "|---" * 9 + "|")
    for row in rows:
        print("| " + " | ".join((list(row) + [""] * 9)[:9]) + " |")
    (out / "suite.md").write_text(header + "\n" + "|---" * 9 + "|\n" +
                                  "".join("| " + " | ".join((list(r) + [""] * 9)[:9]) + " |\n" for r in rows))


if __name__ == "__main__":
    main()
