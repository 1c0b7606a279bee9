"""Which test points survive the papers' attack, and why: a per-point look at a CIFAR CNN checkpoint.

The logged pgd_ce32_acc and zero_grad_frac are fractions; this recomputes them point by point on
the run's own PGD points (the first --pgd-points of its shuffled test set) and cross-tabulates, at
each eps: survives the papers' attack (float32 cross-entropy from x) / has an exactly zero input
gradient at the clean point / survives the toolkit's attack (float64 log(1 - p_y), random start),
with the margins of each group. If the survivors of the papers' attack are the zero-gradient points
and the toolkit's attack fools them, their "robustness" is gradient masking.

    python benchmarks/masked_points.py results/gpu/cifar_cnn --data-dir data/cifar10_jpeg

Runs on the CPU in about two minutes (1024 points; --device cuda: seconds). The logged counts
stand beside the recomputed ones: on the device the run used they agree exactly; from a GPU run's
checkpoint the CPU's float32 rounding moves the zero-gradient threshold, and its random starts differ.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import exp_cifar_cnn as script  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder of exp_cifar_cnn.py with a checkpoint")
    parser.add_argument("--data-dir", help="the run's data (default: its config's data_dir)")
    parser.add_argument("--ce32-random-start", action="store_true",
                        help="the papers' attack from a random start (their code has the flag but starts at x, as logged)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: on the run's own device the counts are the logged ones")
    args = parser.parse_args()
    run = Path(args.run)
    stored = json.loads((run / "config.json").read_text())["config"]
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    cfg = script.Config(**{**stored, "data_dir": args.data_dir or stored["data_dir"]})
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = script.make_model(cfg)
    model.load_state_dict(state["model"])

    # the run's test points, in its order (main: the subset's draw, then the test permutation)
    x_train, _, x_test, y_test = common.load_cifar10(cfg.data_dir, download=False)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    common.take_train_subset(cfg, len(x_train), data_gen)
    order = torch.randperm(len(x_test), generator=data_gen)[:cfg.pgd_points]
    device = common.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact float32, as measure()
    model = model.to(device)
    x, y = x_test[order].permute(0, 3, 1, 2).float().div(255).to(device), y_test[order].to(device)

    scale = common.channel_std(script.NORMALISATION).to(device)
    margins = common.logit_margins(model, x, y)
    # zero_grad_fraction's test, kept per point: the batch-mean float32 cross-entropy's input gradient
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xg).float(), y), xg)
    zero_grad = (grad.flatten(1) == 0).all(1).cpu()
    assert zero_grad.float().mean().item() == common.zero_grad_fraction(model, x, y)
    step = state["step"]

    def span(t):
        return f"{t.min():.1f}..{t.max():.1f}" if len(t) else "none"
    print(f"{run}: step {step}, {len(x)} test points; zero gradient at {int(zero_grad.sum())} (margins "
          f"{span(margins[zero_grad])}); nonzero gradient: margins {span(margins[~zero_grad])}; margin above 87.3, "
          f"where exp(-margin) is below float32's smallest normal number: {int((margins > 87.3).sum())}")
    logged = next(r for r in common.read_metrics(run) if r["step"] == step)  # the run's own numbers, as counts
    print(f"logged at this step: zero gradient at {round(logged['zero_grad_frac'] * len(x))}")
    random_start = args.ce32_random_start or cfg.ce32_random_start
    if random_start != cfg.ce32_random_start:
        print("the papers' attack from a random start here, from x in the run: its logged counts are not comparable")
    print("| eps | papers' attack survives (logged) | of them zero gradient | of them survive the toolkit's | "
          "toolkit's attack survives (logged) |\n|---|---|---|---|---|")
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)  # as measure() draws them
    for eps in cfg.pgd_eps:
        start = generator.get_state()  # both attacks from the same random starts, as measure()
        toolkit = common.pgd_attack(model, x, y, eps * scale, cfg.pgd_alpha * scale, cfg.pgd_steps, generator=generator)
        ce32_gen = torch.Generator(device).set_state(start)
        papers = torch.cat([common.pgd_attack(model, x[i:i + 2048], y[i:i + 2048], eps * scale, cfg.pgd_alpha * scale,
                                              cfg.pgd_steps, random_start=random_start, loss="ce32", generator=ce32_gen)
                            for i in range(0, len(x), 2048)])
        with torch.no_grad():
            toolkit_ok, papers_ok = (model(toolkit).argmax(1) == y).cpu(), (model(papers).argmax(1) == y).cpu()
        was = {k: round(logged[f"{k}_{eps:.3g}"] * len(x)) for k in ("pgd_acc", "pgd_ce32_acc")}
        print(f"| {eps * 255:.0f}/255 | {int(papers_ok.sum())} ({was['pgd_ce32_acc']}) | {int((papers_ok & zero_grad).sum())} | "
              f"{int((papers_ok & toolkit_ok).sum())} | {int(toolkit_ok.sum())} ({was['pgd_acc']}) |")


if __name__ == "__main__":
    main()
