"""Deep Grokking: per-layer feature rank of a deep MLP tracks its (multi-stage) generalisation.

Reproduces Fan, Pascanu & Jaggi 2024 ("Deep Grokking", arXiv 2405.19454): ReLU MLPs of depth
4, 8 or 12 and width 400, every parameter scaled x8 after the default init, trained with MSE on
one-hot targets (AdamW, batch 200) on the first N MNIST training images. Deeper networks grok
later and more; at N=7000 the 8- and 12-layer networks show a second surge of test accuracy,
aligned with a double descent of the feature rank of the deep layers, which form a low-rank
"tunnel". The weight norm, by contrast, falls smoothly. Rank = numerical rank (float64, default
tolerance) of the covariance of each layer's pre-activations on 10k test images, logged at
log-spaced steps (with LC and PGD) and every --rank-every steps (accuracy, rank, weight norm).

    python exp_deep_mlp_rank.py                                   # depth 12, N=7000, 1e5 steps
    python exp_deep_mlp_rank.py --depth 8 --train-size 5000
    python exp_deep_mlp_rank.py --quick                           # seconds, the same code path
    # CPU-scale setting (documented in RESULTS.md), Fashion-MNIST from Debian's package:
    python exp_deep_mlp_rank.py --dataset fashion-mnist --depth 8 --width 200 --train-size 1000 \
        --weight-decay 0.1 --steps 30000 --rank-every 1000

Data: --data-dir holds torchvision's layout (MNIST/raw/train-images-idx3-ubyte, plain or .gz as
distributed; downloaded there unless --no-download), or is an .npz with x_train, y_train,
x_test, y_test (uint8, N x 28 x 28). Units: images in [0, 1], radii in pixel units. The rank is
that of the network's own features: a float64 forward of the model's weights, as the paper's
float64 model computes them (float32 features raise the rank behind a low-rank bottleneck).
Hardware and time: depth 12, 1e5 steps: about an hour on one CPU core, a fifth of it measuring
(benchmarks/README.md); on a GPU not timed yet (target: a minute). The plot should
show test accuracy rising in one or two stages long after train accuracy hits 100%, and the rank
of the deep layers falling (then rising and falling again in the two-stage case) as it does.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------- yours to change: the setting
# The experiment is Config, make_model, the loss and the training step in main's loop: change them
# freely (a new Config field becomes a --flag). Keep the rest of main (the run folder, the fixed
# measurement points, the evaluation steps): it is what makes the numbers comparable.
@dataclasses.dataclass
class Config:
    dataset: str = "mnist"  # mnist or fashion-mnist (same format, same code)
    data_dir: str = "data"  # torchvision root (<data-dir>/MNIST/raw/ or FashionMNIST/raw/), or an .npz file
    download: bool = True  # download through torchvision when the files are missing
    train_size: int = 7000  # N: the first N training images, as in Deep Grokking (0: all)
    width: int = 400  # hidden width
    depth: int = 12  # number of Linear layers (depth - 1 ReLU layers)
    init_scale: float = 8.0  # every parameter is multiplied by this after the default init
    steps: int = 100_000  # optimisation steps
    batch_size: int = 200  # training batch
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    compile: bool = False  # torch.compile the training step's model (CUDA graphs on a GPU)
    evals: int = 30  # number of log-spaced evaluation steps (every measure)
    rank_every: int = 3000  # also every this many steps: accuracy, rank and weight norm (the paper's rank curve)
    lc_radius: float = 0.05  # radius r of the cross-polytope, pixel units (0.05 matches Fig. 2 at init)
    lc_directions: int = 25  # P: the cross-polytope has 2P vertices
    lc_points: int = 1024  # points for LC (train, test and random each)
    lc_batch: int = 128  # points per LC forward (times 2P vertices)
    pgd_eps: tuple = (0.03, 0.06, 0.1)  # L-inf radii in pixel units ([0, 1] images); fractions like 8/255 work
    pgd_alpha: float = 0.0156  # PGD step size, pixel units
    pgd_steps: int = 20  # PGD steps
    pgd_restarts: int = 1  # PGD random restarts (an example is robust if it survives all)
    ce32_random_start: bool = False  # the papers' attack from a random start (their code starts at x)
    pgd_points: int = 1024  # test images attacked
    rank_points: int = 10_000  # test points whose features give the per-layer rank
    partition_resolution: int = 300  # grid points per side of the partition pictures
    seed: int = 0  # seeds the model, the batches and every measurement
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = "runs/deep_mlp_rank"  # run folder
    resume: bool = False  # continue the run in --out from its last checkpoint (its stored config)
    continue_anyway: bool = False  # --resume although the code changed or the data cannot be checked (recorded)
    quick: bool = False  # a seconds-long run of the same code path
    ZERO_OK = ("seed", "train_size", "weight_decay")  # may be 0; every other number must be above 0
    CHOICES = {"dataset": ["mnist", "fashion-mnist"], "device": ["auto", "cuda", "mps", "cpu"]}
    PRESETS = {("quick", True): dict(  # --quick: the same code path in seconds
        train_size=200, steps=200, evals=6, lc_points=64, pgd_points=64, lc_directions=8, pgd_steps=5,
        batch_size=50, depth=6, width=64, rank_every=100, rank_points=256, partition_resolution=64)}


def make_model(cfg):
    layers, width_in = [nn.Flatten()], 28 * 28
    for _ in range(cfg.depth - 1):
        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
        width_in = cfg.width
    model = nn.Sequential(*layers, nn.Linear(width_in, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(cfg.init_scale)
    return model


def mse_one_hot(out, y):
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))


def main(cfg):
    common.check_config(cfg, input_dim=28 * 28)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timer = common.Timer(device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    with timer("setup"):
        x_train, y_train, x_test, y_test = common.load_mnist(cfg.data_dir, cfg.dataset, cfg.download)
    subset = common.take_train_subset(cfg, len(x_train))  # the first N, as in the paper
    run, checkpoint = common.start_run(cfg.out, cfg, device, {"data": common.data_fingerprint(
        x_train, y_train, x_test, y_test)})
    # the data lives on the device as float tensors in [0, 1]; batches are drawn by indexing
    x_train, y_train = x_train[subset].unsqueeze(1).float().div(255).to(device), y_train[subset].to(device)
    x_test, y_test = x_test.unsqueeze(1).float().div(255).to(device), y_test.to(device)

    model = make_model(cfg).to(device)
    train_model = common.compiled(model, cfg.compile, device)
    optimizer = common.make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed + 2)  # draws the training batches
    generators = {"sample": sample_gen}  # saved in checkpoints, so a resumed run is exact
    start = common.restore(run, checkpoint, model, optimizer, generators, timer)

    # what every evaluation measures, fixed for the whole run (random points: uniform in [0, 1]^784)
    probes = common.Probes(
        train=(x_train, y_train), test=(x_test, y_test), loss_fn=mse_one_hot,
        lc_points={"train": x_train[:cfg.lc_points], "test": x_test[:cfg.lc_points],
                   "random": torch.rand(cfg.lc_points, 1, 28, 28, generator=data_gen).to(device)},
        directions=common.random_directions(cfg.lc_directions, 28 * 28, data_gen),
        anchors=common.anchor_points(x_train, y_train))
    full_steps = set(common.log_steps(cfg.steps, cfg.evals))  # everything, LC and PGD included
    eval_steps = sorted(full_steps | set(range(0, cfg.steps, cfg.rank_every)))  # the rest: accuracy, rank, norm
    print(f"{run}: {sum(p.numel() for p in model.parameters())} parameters, {len(x_train)} {cfg.dataset} "
          f"train images, {len(x_test)} test images, device {device}")

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
                                    full=step in full_steps, batch_loss_max=batch_loss_max)
        if step == cfg.steps:
            break
        idx = torch.randint(len(x_train), (cfg.batch_size,), device=device, generator=sample_gen)
        loss = mse_one_hot(train_model(x_train[idx]), y_train[idx])
        batch_loss_max = torch.maximum(batch_loss_max, loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.heartbeat(step + 1, start, cfg.steps, eval_steps)
    return common.finish_run(run, timer, cfg.steps)


if __name__ == "__main__":
    common.cli(main, Config)
