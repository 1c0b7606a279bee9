"""Delayed robustness of ResNet18 without BatchNorm: Imagenette (Fig. 6c) and CIFAR-10 (Fig. 1).

Reproduces the two ResNet experiments of Humayun et al. 2024 ("Deep Networks Always Grok",
arXiv 2402.15555), each as its authors built it (BatchNorm removes grokking, so there is none):
- Imagenette, the default (Fig. 6c): "a standard torchvision ResNet" [paper] without BatchNorm,
  i.e. torchvision.models.resnet18(weights=None, norm_layer=nn.Identity): 7x7 stem, max-pool,
  post-activation blocks, no conv biases, one inplace ReLU module used twice per block (LC counts
  each use as its own layer). Adam lr 1e-3, no weight decay [paper], batch 256, LC radius r=1e-4
  [paper]. Resolution is unpublished: 64 px here (resized and centre-cropped). The paper shows
  LC very high during the ascent.
- CIFAR-10 (Fig. 1, `--dataset cifar10`, from the authors' public code): a pre-activation ResNet18
  of width 16 (kuangliu's layout, conv bias=False, BatchNorm replaced by identity, no ReLU after
  the last block), AdamW lr 1e-3 wd 0, batch 256, no augmentation, ~4.4e5 steps shown; LC P=20,
  r=0.005 on 1024 points; PGD eps 50/255, alpha 4/255, 10 steps, random start. Fig. 1: adversarial
  accuracy ~12-18% until 1e5 steps, ~67% at 2e5, ~75% at 3.5e5; LC 53 -> 41 (~30 steps) -> 66
  (1e3-2e3) -> 36; clean test accuracy ~74-75%. (PGD runs on --pgd-points test images, 1024 by
  default; the paper attacks the whole test set: --pgd-points 10000.)
Units, as the authors' code: inputs are normalised by mean/std inside the model, and the LC radius
and PGD's eps and alpha are in those *normalised* units (r is r * std_c in [0, 1] pixels); the run
prints and stores the pixel equivalents (config.json: pixel_units, normalisation). The constants
(--normalisation, common.NORMALISATIONS): CIFAR-10 uses the authors' (std 0.2023, 0.1994, 0.2010
from grok-adversarial, not the true 0.247, 0.243, 0.262: the paper's radii are 20-23% smaller in
pixels than the true std would make them), Imagenette torchvision's ImageNet constants. The
papers' attack (pgd_ce32_*) clamps, as theirs does, to one global range of the normalised input
(CIFAR-10: [-2.4291, 2.7537]); the default attack to [0, 1] pixels.

    python exp_imagenette_resnet.py                                  # Imagenette, torchvision ResNet18, 64 px
    python exp_imagenette_resnet.py --dataset cifar10                # Fig. 1: pre-act ResNet18 width 16
    python exp_imagenette_resnet.py --quick                          # seconds, the same code path
    python exp_imagenette_resnet.py --dataset cifar10 --quick

Data: Imagenette: --data-dir is a folder with train/ and val/ folders of class folders of images
(Imagenette's own imagenette2-160/ inside it is found too); downloaded through torchvision unless
--no-download. The decoded tensors are cached beside the images, keyed to the folder's contents.
CIFAR-10: torchvision's root, a folder of class folders (train/, test/) or an .npz, as exp_cifar_cnn.py.
Hardware and time: a GPU (not timed yet: no GPU was available; benchmarks/paper_suite.py projects
the full run from a measured slice); a CPU is far too slow beyond --quick and short stand-ins.
The plot should show train accuracy reaching 100%, then PGD accuracy rising much later while the
train LC falls.
"""
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

# the constants of each data set's units (common.NORMALISATIONS has their sources): CIFAR-10 as the
# authors' Fig. 1 code (their std, not the true one), Imagenette with torchvision's ImageNet constants
DEFAULT_NORMALISATION = {"imagenette": "imagenet", "cifar10": "cifar10_authors"}


# ----------------------------------------------------------------------- yours to change: the setting
# The experiment is Config, make_model, the loss and the training step in main's loop: change them
# freely (a new Config field becomes a --flag). Keep the rest of main (the run folder, the fixed
# measurement points, the evaluation steps): it is what makes the numbers comparable.
@dataclasses.dataclass
class Config:
    dataset: str = "imagenette"  # imagenette (Fig. 6c) or cifar10 (Fig. 1; its defaults are in PRESETS)
    arch: str = "torchvision"  # torchvision: resnet18 without BN; preact: kuangliu's pre-activation ResNet18
    data_dir: str = "data"  # Imagenette: folder with train/ and val/ (or imagenette2-160/); CIFAR: root or .npz
    download: bool = True  # download through torchvision when missing
    normalisation: str = "auto"  # input constants (mean/std), the radii's units: auto = the data set's (see above)
    resolution: int = 64  # Imagenette images are resized and centre-cropped to this many pixels (CIFAR: 32)
    width: int = 16  # channels of the first stage of the preact net (the torchvision net has 64)
    steps: int = 350_000  # optimisation steps
    batch_size: int = 256  # training batch
    lr: float = 1e-3  # Adam(W) learning rate
    weight_decay: float = 0.0  # AdamW weight decay (0: plain Adam)
    compile: bool = False  # torch.compile the training step's model (CUDA graphs on a GPU)
    evals: int = 40  # number of log-spaced evaluation steps
    lc_radius: float = 1e-4  # radius r of the cross-polytope, normalised units (the paper's Imagenette value)
    lc_directions: int = 25  # P: the cross-polytope has 2P vertices
    lc_points: int = 1024  # points for LC (train, test and random each)
    lc_batch: int = 8  # points per LC forward (times 2P vertices)
    pgd_eps: tuple = (8 / 255, 25 / 255, 50 / 255)  # L-inf radii in normalised units; fractions like 8/255 work
    pgd_alpha: float = 4 / 255  # PGD step size, normalised units
    pgd_steps: int = 10  # PGD steps
    pgd_restarts: int = 1  # PGD random restarts (an example is robust if it survives all)
    ce32_random_start: bool = False  # the papers' attack from a random start (their code starts at x)
    pgd_points: int = 1024  # test images attacked
    rank_points: int = 512  # test images whose features give the per-layer (channel) rank
    partition_resolution: int = 100  # grid points per side of the partition pictures
    seed: int = 0  # seeds the model, the batches and every measurement
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = "runs/imagenette_resnet"  # run folder
    resume: bool = False  # continue the run in --out from its last checkpoint (its stored config)
    continue_anyway: bool = False  # --resume although the code changed or the data cannot be checked (recorded)
    quick: bool = False  # a seconds-long run of the same code path
    ZERO_OK = ("seed", "weight_decay")  # may be 0; every other number must be above 0
    CHOICES = {"dataset": ["imagenette", "cifar10"], "arch": ["torchvision", "preact"],
               "normalisation": ["auto", *common.NORMALISATIONS],
               "device": ["auto", "cuda", "mps", "cpu"]}
    PRESETS = {("dataset", "cifar10"): dict(  # Fig. 1, from the authors' code
        arch="preact", resolution=32, steps=440_000, lc_radius=0.005, lc_directions=20, lc_batch=32,
        out="runs/cifar10_resnet"),
        ("quick", True): dict(  # --quick: the same code path in seconds
        resolution=16, steps=30, evals=4, lc_points=8, pgd_points=16, lc_directions=4, pgd_steps=2, batch_size=16,
        width=4, rank_points=16, partition_resolution=24)}


def image_folders(cfg):
    """The folder holding train/ and val/ (downloading Imagenette into data_dir when allowed)."""
    root = Path(cfg.data_dir)
    candidates = [root, root / "imagenette2-160", root / "imagenette2-320", root / "imagenette2"]
    found, failed = next((f for f in candidates if (f / "train").is_dir() and (f / "val").is_dir()), None), ""
    if found is None and cfg.download:
        try:
            for split in ("train", "val"):
                torchvision.datasets.Imagenette(root, split=split, size="160px", download=True)
        except Exception as e:  # no network, a server error, a full disk: its reason goes into the one line
            failed = f" ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        found = next((f for f in candidates if (f / "train").is_dir() and (f / "val").is_dir()), None)
    if found is None:
        common.die(f"no train/ and val/ image folders in {root} (nor in {root}/imagenette2-160/), and Imagenette "
                   f"could not be downloaded{failed}; pass --data-dir <folder with train/<class>/*.jpg and "
                   f"val/<class>/*.jpg>")
    return found


def load_data(cfg):
    """(x_train, y_train, x_test, y_test): uint8 NCHW images and int64 labels, checked."""
    if cfg.dataset == "cifar10":
        x_train, y_train, x_test, y_test = common.load_cifar10(cfg.data_dir, cfg.download)
        return x_train.permute(0, 3, 1, 2).contiguous(), y_train, x_test.permute(0, 3, 1, 2).contiguous(), y_test
    x_train, y_train, x_test, y_test = common.load_image_folders(image_folders(cfg), cfg.resolution, resize=True)
    n_classes = int(y_train.max()) + 1
    common.check_data(Path(cfg.data_dir), x_train, y_train, x_test, y_test, (3, cfg.resolution, cfg.resolution),
                      n_classes)
    return x_train, y_train, x_test, y_test


class PreActBlock(nn.Module):
    """ReLU -> conv -> ReLU -> conv, plus a shortcut (a 1x1 conv of the activated input when the
    shape changes). No normalisation, no conv bias. Each ReLU is its own module."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = self.relu1(x)
        skip = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(self.relu2(self.conv1(out))) + skip


def normalisation(cfg):
    """The name of the input constants (common.NORMALISATIONS): the model normalises with them, and
    the LC radius and PGD's eps and alpha are in units of the input they normalise."""
    return DEFAULT_NORMALISATION[cfg.dataset] if cfg.normalisation == "auto" else cfg.normalisation


def to_input(images):
    """uint8 images (N, 3, H, W) as the model takes them: float in [0, 1] pixels (it normalises)."""
    return images.float().div(255)


def make_model(cfg, n_classes):
    mean, std, _ = common.NORMALISATIONS[normalisation(cfg)]
    if cfg.arch == "torchvision":
        return nn.Sequential(common.Normalize(mean, std),
                             torchvision.models.resnet18(weights=None, num_classes=n_classes, norm_layer=nn.Identity))
    w = cfg.width
    blocks, c_in = [], w
    for c_out, stride in [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]:
        blocks += [PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(common.Normalize(mean, std), nn.Conv2d(3, w, 3, 1, 1, bias=False), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, n_classes))


def main(cfg):
    if cfg.dataset == "cifar10" and cfg.resolution != 32:
        if not cfg.quick:  # --quick's small images are for Imagenette; CIFAR-10 stays at its 32 px
            common.die(f"--resolution {cfg.resolution}: CIFAR-10 images are 32 px; drop --resolution (Imagenette only)")
        cfg = dataclasses.replace(cfg, resolution=32)
    if cfg.resolution < 16 or cfg.resolution % 8:
        common.die(f"--resolution {cfg.resolution} must be a multiple of 8 and at least 16")
    common.check_config(cfg, input_dim=3 * cfg.resolution ** 2)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timer = common.Timer(device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    with timer("setup"):
        x_train, y_train, x_test, y_test = load_data(cfg)
    n_classes = int(y_train.max()) + 1
    units = normalisation(cfg)  # the model's input constants, and so the units of every radius
    notes = {**common.units_notes(cfg, units), "data": common.data_fingerprint(x_train, y_train, x_test, y_test)}
    run, checkpoint = common.start_run(cfg.out, cfg, device, notes)
    # the training data lives on the device as uint8 (4x smaller); each batch becomes the model's input there
    x_train, y_train = x_train.to(device), y_train.to(device)
    test_order = torch.randperm(len(x_test), generator=data_gen)  # folders are sorted by class
    x_test, y_test = to_input(x_test[test_order]).to(device), y_test[test_order].to(device)
    lc_train = to_input(x_train[torch.randperm(len(x_train), generator=data_gen)[:cfg.lc_points].to(device)])

    model = make_model(cfg, n_classes).to(device)
    if device.type == "cuda":  # NHWC convolutions: faster on tensor cores
        model = model.to(memory_format=torch.channels_last)
    train_model = common.compiled(model, cfg.compile, device)
    optimizer = common.make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # draws the training batches
    generators = {"sample": sample_gen}  # saved in checkpoints, so a resumed run is exact
    start = common.restore(run, checkpoint, model, optimizer, generators, timer)

    # what every evaluation measures, fixed for the whole run (random points: uniform in [0, 1]^D);
    # the radii are in normalised units (measure scales eps, alpha and the LC directions by std), and
    # the papers' attack clamps as theirs does, to the normalised input's global range
    shape = (3, cfg.resolution, cfg.resolution)
    directions = common.random_directions(cfg.lc_directions, 3 * cfg.resolution ** 2, data_gen)
    eval_idx = torch.randperm(len(x_train), generator=data_gen)[:2048].to(device)  # train accuracy on a fixed 2048
    anchor_x, anchor_y = common.anchor_points(x_train, y_train)
    probes = common.Probes(
        train=(to_input(x_train[eval_idx]), y_train[eval_idx]), test=(x_test, y_test), loss_fn=F.cross_entropy,
        lc_points={"train": lc_train, "test": x_test[:cfg.lc_points],
                   "random": torch.rand(cfg.lc_points, *shape, generator=data_gen).to(device)},
        directions=directions, anchors=(to_input(anchor_x), anchor_y), units=units,
        papers_clamp="normalised")
    eval_steps = common.log_steps(cfg.steps, cfg.evals)
    print(f"{run}: {cfg.arch} ResNet18, {sum(p.numel() for p in model.parameters())} parameters, {len(x_train)} "
          f"train images of {n_classes} classes at {cfg.resolution} px, device {device}")

    # Each evaluation step logs train/test accuracy and loss, and through common.measure:
    #   LC at train, test, random and decision-boundary points   common.local_complexity
    #   feature rank and effective rank of every ReLU layer       common.layer_ranks
    #   weight norm                                               common.weight_norm
    #   PGD accuracy: the toolkit's attack and the papers'        common.pgd_accuracy (loss "log1m", "ce32")
    #   logit margins and the zero-gradient fraction              common.logit_margins, zero_grad_fraction
    batch_loss_max = torch.zeros((), device=device)  # the worst batch between evaluations: loss spikes
    timer.start_training()  # no host-device sync inside this loop: the evaluations sync once each
    for step in range(start, cfg.steps + 1):
        if step in eval_steps:
            common.evaluate_and_log(model, optimizer, generators, cfg, step, probes, run, timer,
                                    batch_loss_max=batch_loss_max)
        if step == cfg.steps:
            break
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=sample_gen)
        loss = F.cross_entropy(train_model(to_input(x_train[idx])), y_train[idx])
        batch_loss_max = torch.maximum(batch_loss_max, loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.heartbeat(step + 1, start, cfg.steps, eval_steps)
    return common.finish_run(run, timer, cfg.steps)


if __name__ == "__main__":
    common.cli(main, Config)
