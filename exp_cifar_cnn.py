"""Delayed robustness of a 5-layer CNN without BatchNorm on CIFAR-10.

Reproduces Fig. 6a of Humayun et al. 2024 ("Deep Networks Always Grok", arXiv 2402.15555): a CNN
of 5 conv layers (width 32, no BatchNorm, which removes grokking) and a linear head, Adam lr 1e-3
without weight decay, no augmentation. It fits the training set by ~6e3 steps at ~70% test
accuracy; PGD accuracy stays near 10% until ~5.6e4 steps, then rises (~51% at 1.2e5, ~70% at
2.6e5) while the local complexity descends, ascends and descends again.
Choices where the paper is silent: 3x3 convs with strides 1,2,1,2,1 (32->16->8 px), batch 128,
inputs in [0, 1] with the CIFAR-10 normalisation inside the model (so PGD's clamp is right),
LC with P=20 directions and r=0.005 in pixel units, PGD eps 1/255, 4/255 and 8/255 in pixel units.

    python exp_cifar_cnn.py                                    # 2.6e5 steps on the full CIFAR-10
    python exp_cifar_cnn.py --quick                            # seconds, the same code path
    # CPU-scale setting (RESULTS.md), on the 10k-image subset of real CIFAR-10 images in a .npz:
    python exp_cifar_cnn.py --data-dir ../shared/data/cifar10_subset.npz --train-size 2000 --steps 20000

Data: --data-dir is torchvision's root (<data-dir>/cifar-10-batches-py/, downloaded there unless
--no-download) or an .npz file with x_train, y_train, x_test, y_test (uint8, N x 32 x 32 x 3).
Hardware and time: the full 2.6e5 steps need a GPU (an estimated 40 minutes; not timed yet); a
CPU runs 10-20 steps/s (RESULTS.md: 5000 images, 20k steps, 33 minutes on one core).
The plot should show train accuracy at 100% by a few thousand steps, and PGD accuracy rising
long after it while the train LC falls.
"""
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


@dataclasses.dataclass
class Config:
    data_dir: str = "data"  # torchvision root holding cifar-10-batches-py/, or an .npz file
    download: bool = True  # download through torchvision when the files are missing
    train_size: int = 50_000  # training images, a seeded random subset (all 50k by default)
    width: int = 32  # channels of every conv layer
    steps: int = 260_000  # optimisation steps
    batch_size: int = 128  # training batch
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam (L2) weight decay: none in the paper
    compile: bool = False  # torch.compile the training step's model (pays on a GPU)
    evals: int = 40  # number of log-spaced evaluation steps
    lc_radius: float = 0.005  # radius r of the cross-polytope, in pixel units
    lc_directions: int = 20  # P: the cross-polytope has 2P vertices
    lc_points: int = 1024  # points for LC (train, test and random each)
    lc_batch: int = 32  # points per LC forward (times 2P vertices)
    pgd_eps: tuple = (1 / 255, 4 / 255, 8 / 255)  # L-inf radii in pixel units ([0, 1] images)
    pgd_alpha: float = 1 / 255  # PGD step size
    pgd_steps: int = 10  # PGD steps
    pgd_restarts: int = 1  # PGD random restarts (an example is robust if it survives all)
    pgd_points: int = 1024  # test images attacked
    rank_points: int = 1024  # test images whose features give the per-layer (channel) rank
    partition_resolution: int = 200  # grid points per side of the partition pictures
    seed: int = 0  # seeds the model, the subset, the batches and every measurement
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = "runs/cifar_cnn"  # run folder
    resume: bool = False  # continue the run in --out from its last checkpoint
    quick: bool = False  # a seconds-long run of the same code path
    CHOICES = {"device": ["auto", "cuda", "mps", "cpu"]}


def load_cifar10(cfg):
    """(x_train, y_train, x_test, y_test): uint8 NHWC images and int64 labels."""
    path = Path(cfg.data_dir)
    if path.suffix == ".npz":
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; pass --data-dir <cifar .npz or torchvision root>")
        d = np.load(path)
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
        if missing:
            raise SystemExit(f"error: {path} lacks {sorted(missing)}; it needs x_train, y_train, x_test, y_test")
        arrays = [d["x_train"], d["y_train"], d["x_test"], d["y_test"]]
    else:
        try:
            train = torchvision.datasets.CIFAR10(path, train=True, download=cfg.download)
            test = torchvision.datasets.CIFAR10(path, train=False, download=cfg.download)
        except (RuntimeError, OSError) as e:
            raise SystemExit(f"error: CIFAR-10 not found in {path}/cifar-10-batches-py/ (data_batch_1..5, test_batch) "
                             f"and could not be downloaded ({str(e).splitlines()[0]}); put it there, or pass "
                             f"--data-dir <file.npz> with x_train, y_train, x_test, y_test") from None
        arrays = [train.data, train.targets, test.data, test.targets]
    x_train, y_train, x_test, y_test = (torch.as_tensor(np.asarray(a)) for a in arrays)
    if x_train.shape[1:] != (32, 32, 3) or x_test.shape[1:] != (32, 32, 3):
        raise SystemExit(f"error: CIFAR-10 images must be 32x32x3 (N, H, W, C), got {tuple(x_train.shape[1:])}")
    return x_train, y_train.long(), x_test, y_test.long()


class Normalize(nn.Module):
    """Per-channel normalisation inside the model, so attacks work in pixel space [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def make_model(cfg):
    w = cfg.width
    layers = [Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    for c_in, stride in [(3, 1), (w, 2), (w, 1), (w, 2), (w, 1)]:
        layers += [nn.Conv2d(c_in, w, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(w * 8 * 8, 10))


def main(cfg):
    if cfg.quick:
        cfg = common.apply_quick(cfg, train_size=min(cfg.train_size, 256), steps=60, evals=5, lc_points=16,
                                  pgd_points=32, lc_directions=4, pgd_steps=2, batch_size=32, width=8,
                                  rank_points=64, partition_resolution=40)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    timer = common.Timer(device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    with timer("setup"):
        x_train, y_train, x_test, y_test = load_cifar10(cfg)
    if cfg.train_size > len(x_train):
        raise SystemExit(f"error: --train-size {cfg.train_size} but the data set has {len(x_train)} images")
    run = common.start_run(cfg.out, cfg, device, cfg.resume)
    # the data lives on the device as float tensors in [0, 1], NCHW; batches are drawn by indexing
    subset = torch.randperm(len(x_train), generator=data_gen)[:cfg.train_size]
    x_train = x_train[subset].permute(0, 3, 1, 2).float().div(255).to(device)
    y_train = y_train[subset].to(device)
    test_order = torch.randperm(len(x_test), generator=data_gen)  # test files may be sorted by class
    x_test = x_test[test_order].permute(0, 3, 1, 2).float().div(255).to(device)
    y_test = y_test[test_order].to(device)

    model = make_model(cfg).to(device)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # draws the training batches
    pgd_gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # PGD random starts
    generators = {"sample": sample_gen, "pgd": pgd_gen}  # saved in checkpoints, so a resumed run is exact
    start = 0
    if cfg.resume:
        start = common.load_checkpoint(run, model, optimizer, generators)
        common.truncate_metrics(run, start)

    # what every evaluation measures, fixed for the whole run (random points: uniform in [0, 1]^3072)
    probes = {"train": (x_train, y_train), "test": (x_test, y_test), "loss_fn": F.cross_entropy,
              "lc_points": {"train": x_train[:cfg.lc_points], "test": x_test[:cfg.lc_points],
                            "random": torch.rand(cfg.lc_points, 3, 32, 32, generator=data_gen).to(device)},
              "directions": common.random_directions(cfg.lc_directions, 3 * 32 * 32, data_gen),
              "rank_x": x_test[:cfg.rank_points], "pgd_x": x_test[:cfg.pgd_points], "pgd_y": y_test[:cfg.pgd_points],
              "pgd_gen": pgd_gen, "lo": 0.0, "hi": 1.0,
              "anchors": x_train[torch.stack([(y_train == c).nonzero()[0, 0] for c in range(3)])]}
    eval_steps = common.log_steps(cfg.steps, cfg.evals)
    print(f"{run}: {sum(p.numel() for p in model.parameters())} parameters, {len(x_train)} train images, "
          f"device {device}")

    for step in range(start, cfg.steps + 1):
        if step in eval_steps and not (cfg.resume and step == start):
            common.evaluate_and_log(model, cfg, step, probes, run, timer,
                                    lambda: common.save_checkpoint(run, model, optimizer, step, generators))
        if step == cfg.steps:
            break
        with timer("train"):
            idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=sample_gen)
            loss = F.cross_entropy(train_model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        timer.heartbeat(step + 1, start, cfg.steps)
    return common.finish_run(run, timer, cfg.steps - start)


if __name__ == "__main__":
    main(common.parse_config(Config))
