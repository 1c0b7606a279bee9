"""How much the authors' sign rule changes LC on a bias-free ResNet, at init and at a run's end.

The toolkit counts a neuron as cut when its pre-activation is > 0 at some vertex of the
cross-polytope and <= 0 at another (the ReLU's output is not linear there). The authors' code
counts any change of sign(pre) in {-1, 0, +1}, so also a neuron that is exactly 0 at some vertices
and negative at the others: in bias-free networks every unit behind a dead ReLU input is exactly
0, and those are counted although no ReLU bends there. This prints both counts at the same points
and directions, for the weights at init (rebuilt from the run's seed) and at its last checkpoint.

    python benchmarks/lc_rules.py RUN_FOLDER [--points 128]     # a run of exp_imagenette_resnet.py
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import exp_imagenette_resnet as script  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder of exp_imagenette_resnet.py (config.json, checkpoint.pt)")
    parser.add_argument("--points", type=int, default=128, help="training images measured")
    args = parser.parse_args()
    run = Path(args.run)
    stored = json.loads((run / "config.json").read_text())["config"]
    fields = {f.name for f in dataclasses.fields(script.Config)}
    cfg = script.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields})
    if "normalisation" not in stored:  # runs made before the field existed used the true CIFAR-10 std
        cfg = dataclasses.replace(cfg, normalisation="cifar10_true" if cfg.dataset == "cifar10" else "imagenet")
    x_train, y_train, _, _ = script.load_data(cfg)
    n_classes = int(y_train.max()) + 1
    points = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:args.points]]
    points = script.to_input(points)
    directions = common.random_directions(cfg.lc_directions, points[0].numel(), torch.Generator().manual_seed(1))
    directions = common.in_input_units(directions, points.shape[1:], script.normalisation(cfg))
    torch.manual_seed(cfg.seed)  # the run seeded the global RNG, then built the model: the same init
    at_init = script.make_model(cfg, n_classes)
    at_end = script.make_model(cfg, n_classes)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    at_end.load_state_dict(state["model"])
    print(f"{run}: {cfg.arch} ResNet18 on {cfg.dataset}, r={cfg.lc_radius} (normalised units), P={cfg.lc_directions}, "
          f"{len(points)} training images")
    print("| weights | step | LC, toolkit rule (ReLU bends) | LC, authors' rule (sign incl. 0) | difference |")
    print("|---|---|---|---|---|")
    for name, model, step in (("init", at_init, 0), ("end", at_end, state["step"])):
        ours = common.lc_summary(common.local_complexity(model, points, cfg.lc_radius, directions, cfg.lc_batch))
        theirs = common.lc_summary(common.local_complexity(model, points, cfg.lc_radius, directions, cfg.lc_batch,
                                                           zero_is_a_sign=True))
        print(f"| {name} | {step} | {ours[0]:.2f} ± {ours[1]:.2f} | {theirs[0]:.2f} ± {theirs[1]:.2f} | "
              f"{theirs[0] - ours[0]:+.2f} ({(theirs[0] - ours[0]) / max(ours[0], 1e-9):+.1%}) |")


if __name__ == "__main__":
    main()
