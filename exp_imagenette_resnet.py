"""Delayed robustness of a pre-activation ResNet18 without BatchNorm on Imagenette.

Reproduces the Imagenette experiment of Humayun et al. 2024 ("Deep Networks Always Grok", arXiv
2402.15555; Fig. 1 shows its CIFAR-10 analogue): a pre-activation ResNet18 with no BatchNorm
(BatchNorm removes grokking), base width 16, Adam lr 1e-3, batch 256, no augmentation. Adversarial
accuracy stays at ~12-18% until ~1e5 steps, then rises (~67% at 2e5, ~75% at 3.5e5) while the
local complexity (r=1e-4) descends, ascends and descends again.
Choices where the paper is silent: images resized (shorter side) and centre-cropped to
--resolution 64 px (a GPU trains 3.5e5 steps at 64 px in hours, at 128 px in about four times
that), stem 3x3 conv, stages of strides 1,2,2,2, a final ReLU, global average pooling, PGD eps
in pixel units.

    python exp_imagenette_resnet.py                     # 3.5e5 steps at 64 px (GPU)
    python exp_imagenette_resnet.py --resolution 128
    python exp_imagenette_resnet.py --quick             # seconds, the same code path

Data: --data-dir is a folder with train/ and val/ folders of class folders of images (any names;
Imagenette's own layout imagenette2-160/{train,val}/n01440764/*.JPEG is found too); it is
downloaded through torchvision unless --no-download. The decoded tensors are cached beside the
images (tensors_<res>px.pt). Hardware and time: one GPU for hours (see the README's performance
table); a CPU is far too slow beyond --quick. The plot should show train accuracy reaching 100%,
then PGD accuracy rising much later while the train LC falls.
"""
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

import common


@dataclasses.dataclass
class Config:
    data_dir: str = "data/imagenette"  # folder with train/ and val/ class folders (or imagenette2-160/ in it)
    download: bool = True  # download Imagenette (160 px) through torchvision when missing
    resolution: int = 64  # images are resized and centre-cropped to this many pixels a side
    width: int = 16  # channels of the first stage (doubled at each of the 4 stages)
    steps: int = 350_000  # optimisation steps
    batch_size: int = 256  # training batch
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam (L2) weight decay
    compile: bool = False  # torch.compile the training step's model (pays on a GPU)
    evals: int = 40  # number of log-spaced evaluation steps
    lc_radius: float = 1e-4  # radius r of the cross-polytope, in pixel units (the paper's Imagenette value)
    lc_directions: int = 25  # P: the cross-polytope has 2P vertices
    lc_points: int = 1024  # points for LC (train, test and random each)
    lc_batch: int = 8  # points per LC forward (times 2P vertices)
    pgd_eps: tuple = (1 / 255, 4 / 255, 8 / 255)  # L-inf radii in pixel units ([0, 1] images)
    pgd_alpha: float = 1 / 255  # PGD step size
    pgd_steps: int = 10  # PGD steps
    pgd_restarts: int = 1  # PGD random restarts (an example is robust if it survives all)
    pgd_points: int = 1024  # validation images attacked
    rank_points: int = 512  # validation images whose features give the per-layer (channel) rank
    partition_resolution: int = 150  # grid points per side of the partition pictures
    seed: int = 0  # seeds the model, the batches and every measurement
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = "runs/imagenette_resnet"  # run folder
    resume: bool = False  # continue the run in --out from its last checkpoint
    quick: bool = False  # a seconds-long run of the same code path
    CHOICES = {"device": ["auto", "cuda", "mps", "cpu"]}


def load_imagenette(cfg):
    """(x_train, y_train, x_val, y_val): uint8 NCHW images at cfg.resolution and int64 labels."""
    root = Path(cfg.data_dir)
    folders = [root, root / "imagenette2-160", root / "imagenette2-320", root / "imagenette2"]
    found = next((f for f in folders if (f / "train").is_dir() and (f / "val").is_dir()), None)
    if found is None and cfg.download:
        try:
            for split in ("train", "val"):
                torchvision.datasets.Imagenette(root, split=split, size="160px", download=True)
        except (RuntimeError, OSError) as e:
            print(f"download failed: {str(e).splitlines()[0]}")
        found = next((f for f in folders if (f / "train").is_dir() and (f / "val").is_dir()), None)
    if found is None:
        raise SystemExit(f"error: no train/ and val/ image folders in {root} (nor in {root}/imagenette2-160/), and "
                         f"Imagenette could not be downloaded; pass --data-dir <folder with train/<class>/*.jpg "
                         f"and val/<class>/*.jpg>")
    cache = found / f"tensors_{cfg.resolution}px.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    to_tensor = T.Compose([T.Resize(cfg.resolution), T.CenterCrop(cfg.resolution), T.PILToTensor()])
    splits = [torchvision.datasets.ImageFolder(found / s, transform=to_tensor) for s in ("train", "val")]
    if splits[0].classes != splits[1].classes:
        raise SystemExit(f"error: train/ and val/ in {found} have different class folders")
    tensors = []
    for ds in splits:
        print(f"decoding {len(ds)} images of {ds.root} at {cfg.resolution} px (cached afterwards)")
        tensors += [torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)]
    torch.save(tensors, cache)
    return tensors


class Normalize(nn.Module):
    """Per-channel normalisation inside the model, so attacks work in pixel space [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """ReLU -> conv -> ReLU -> conv, plus a shortcut (1x1 conv of the activated input when the
    shape changes). No normalisation. Each ReLU is its own module, so LC counts each use."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = self.relu1(x)
        skip = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(self.relu2(self.conv1(out))) + skip


def make_model(cfg, n_classes):
    w = cfg.width
    blocks, c_in = [], w
    for c_out, stride in [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]:
        blocks += [PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), nn.Conv2d(3, w, 3, 1, 1),
                         *blocks, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, n_classes))


def main(cfg):
    if cfg.quick:
        cfg = common.apply_quick(cfg, resolution=16, steps=30, evals=4, lc_points=8, pgd_points=16,
                                  lc_directions=4, pgd_steps=2, batch_size=16, width=4, rank_points=16,
                                  partition_resolution=24)
    if cfg.resolution < 16 or cfg.resolution % 8:
        raise SystemExit(f"error: --resolution {cfg.resolution} must be a multiple of 8 and at least 16")
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    timer = common.Timer(device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    with timer("setup"):
        x_train, y_train, x_test, y_test = load_imagenette(cfg)
    run = common.start_run(cfg.out, cfg, device, cfg.resume)
    n_classes = int(y_train.max()) + 1
    # the data lives on the device as uint8 (4x smaller); each batch becomes float in [0, 1] there
    x_train, y_train = x_train.to(device), y_train.to(device)
    test_order = torch.randperm(len(x_test), generator=data_gen)  # folders are sorted by class
    x_test, y_test = x_test[test_order].float().div(255).to(device), y_test[test_order].to(device)
    lc_train = x_train[torch.randperm(len(x_train), generator=data_gen)[:cfg.lc_points].to(device)].float().div(255)

    model = make_model(cfg, n_classes).to(device)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # draws the training batches
    pgd_gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # PGD random starts
    generators = {"sample": sample_gen, "pgd": pgd_gen}  # saved in checkpoints, so a resumed run is exact
    start = 0
    if cfg.resume:
        start = common.load_checkpoint(run, model, optimizer, generators)
        common.truncate_metrics(run, start)

    # what every evaluation measures, fixed for the whole run (random points: uniform in [0, 1]^D)
    shape = (3, cfg.resolution, cfg.resolution)
    eval_idx = torch.randperm(len(x_train), generator=data_gen)[:2048].to(device)
    train_eval = (x_train[eval_idx].float().div(255), y_train[eval_idx])  # train accuracy on a fixed 2048
    probes = {"train": train_eval, "test": (x_test, y_test), "loss_fn": F.cross_entropy,
              "lc_points": {"train": lc_train, "test": x_test[:cfg.lc_points],
                            "random": torch.rand(cfg.lc_points, *shape, generator=data_gen).to(device)},
              "directions": common.random_directions(cfg.lc_directions, 3 * cfg.resolution ** 2, data_gen),
              "rank_x": x_test[:cfg.rank_points], "pgd_x": x_test[:cfg.pgd_points], "pgd_y": y_test[:cfg.pgd_points],
              "pgd_gen": pgd_gen, "lo": 0.0, "hi": 1.0,
              "anchors": x_train[torch.stack([(y_train == c).nonzero()[0, 0] for c in range(3)])].float().div(255)}
    eval_steps = common.log_steps(cfg.steps, cfg.evals)
    print(f"{run}: {sum(p.numel() for p in model.parameters())} parameters, {len(x_train)} train images of "
          f"{n_classes} classes at {cfg.resolution} px, device {device}")

    for step in range(start, cfg.steps + 1):
        if step in eval_steps and not (cfg.resume and step == start):
            common.evaluate_and_log(model, cfg, step, probes, run, timer,
                                    lambda: common.save_checkpoint(run, model, optimizer, step, generators))
        if step == cfg.steps:
            break
        with timer("train"):
            idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=sample_gen)
            loss = F.cross_entropy(train_model(x_train[idx].float().div(255)), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        timer.heartbeat(step + 1, start, cfg.steps)
    return common.finish_run(run, timer, cfg.steps - start)


if __name__ == "__main__":
    main(common.parse_config(Config))
