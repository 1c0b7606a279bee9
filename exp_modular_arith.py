"""Grokking of (a + b) mod p, with delayed robustness and the local complexity that explains it.

Reproduces, on an algorithmic task that needs no download, the two phenomena of Humayun et al.
2024 ("Deep Networks Always Grok", arXiv 2402.15555): the network fits its training pairs within a
few hundred steps, generalises to the held-out pairs only much later (grokking, Power et al. 2022),
and becomes robust to small L-infinity perturbations of its (relaxed one-hot) input later still.
The model is piecewise linear, so local complexity (LC) applies: one-hot(a) ++ one-hot(b) (2p
inputs) -> ReLU MLP -> p logits; `--model transformer` swaps in a 1-layer transformer whose MLP is
ReLU (Nanda et al. 2023), where LC counts that MLP's neurons.

    python exp_modular_arith.py                   # p=97, 40% split, 10k full-batch steps
    python exp_modular_arith.py --quick           # seconds, the same code path
    python exp_modular_arith.py --model transformer --p 113 --steps 20000 --lr 1e-3

Hardware and time: about 3 minutes on one CPU core (well under one on a GPU).
The plot (runs/modular_arith/metrics.png) should show: train accuracy 100% within ~150 steps,
test accuracy rising to ~100% around 1-2k steps, PGD accuracy at eps=0.01 rising after it, and
(unlike the image settings of the paper) the train LC growing while the network generalises;
RESULTS.md discusses this.
"""
import dataclasses
import itertools

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
    p: int = 97  # the modulus: the task is (a + b) mod p over all p*p pairs
    train_frac: float = 0.4  # fraction of the p*p pairs used for training; the rest is the test set
    model: str = "mlp"  # mlp: one-hot -> ReLU MLP; transformer: 1 attention layer + ReLU MLP
    width: int = 128  # hidden width of the MLP (d_model of the transformer)
    depth: int = 2  # hidden ReLU layers of the MLP (ignored by the transformer)
    steps: int = 10_000  # full-batch optimisation steps
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1.0  # AdamW weight decay: large, as grokking needs
    compile: bool = False  # torch.compile the training step's model (CUDA graphs on a GPU)
    evals: int = 40  # number of log-spaced evaluation steps
    lc_radius: float = 0.005  # radius r of the cross-polytope around each point
    lc_directions: int = 25  # P: the cross-polytope has 2P vertices
    lc_points: int = 1024  # points for LC (train, test and random each)
    lc_batch: int = 128  # points per LC forward (times 2P vertices)
    pgd_eps: tuple = (0.01, 0.03, 0.05)  # L-inf radii on the relaxed one-hot input in [0, 1] (keep well below 0.5)
    pgd_alpha: float = 0.0156  # PGD step size
    pgd_steps: int = 10  # PGD steps
    pgd_restarts: int = 1  # PGD random restarts (an example is robust if it survives all)
    ce32_random_start: bool = False  # the papers' attack from a random start (their code starts at x)
    pgd_points: int = 1024  # test points attacked
    rank_points: int = 10_000  # test points whose features give the per-layer rank
    partition_resolution: int = 300  # grid points per side of the partition pictures
    seed: int = 0  # seeds the model, the split and every measurement
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = "runs/modular_arith"  # run folder
    resume: bool = False  # continue the run in --out from its last checkpoint (its stored config)
    continue_anyway: bool = False  # --resume although the code changed or the data cannot be checked (recorded)
    quick: bool = False  # a seconds-long run of the same code path (p=23, 300 steps, few points)
    ZERO_OK = ("seed", "weight_decay")  # may be 0; every other number must be above 0
    CHOICES = {"model": ["mlp", "transformer"], "device": ["auto", "cuda", "mps", "cpu"]}
    PRESETS = {("quick", True): dict(  # --quick: the same code path in seconds
        p=23, train_frac=0.5, steps=300, evals=8, lc_points=64, pgd_points=64, lc_directions=8, pgd_steps=3,
        rank_points=256, partition_resolution=64)}


class OneLayerTransformer(nn.Module):
    """Tokens a, b, '=' -> embed -> one attention layer -> ReLU MLP -> logits at '='.
    The input is the relaxed one-hot of (a, b), so PGD and LC act on the same 2p inputs as the MLP."""

    def __init__(self, p, d_model, heads=4):
        super().__init__()
        self.p = p
        self.embed = nn.Linear(p, d_model, bias=False)  # a linear map of the one-hot = an embedding
        self.equals = nn.Parameter(torch.randn(1, 1, d_model) / d_model ** 0.5)
        self.pos = nn.Parameter(torch.randn(1, 3, d_model) / d_model ** 0.5)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, d_model))
        self.unembed = nn.Linear(d_model, p)

    def forward(self, x):
        tokens = self.embed(x.reshape(-1, 2, self.p))
        h = torch.cat([tokens, self.equals.expand(len(x), -1, -1)], 1) + self.pos
        # the logits read the '=' position only, and with one layer nothing else reads the a and b
        # positions: attend from '=' alone and run the MLP there. The same function at half the
        # work, and LC and rank count only the MLP neurons that can reach the logits.
        last = h[:, -1] + self.attn(h[:, -1:], h, h, need_weights=False)[0][:, 0]
        return self.unembed(last + self.mlp(last))


def make_model(cfg):
    if cfg.model == "transformer":
        return OneLayerTransformer(cfg.p, cfg.width)
    layers, width_in = [], 2 * cfg.p
    for _ in range(cfg.depth):
        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
        width_in = cfg.width
    return nn.Sequential(*layers, nn.Linear(width_in, cfg.p))


def main(cfg):
    if not 0 < cfg.train_frac < 1:
        common.die(f"--train-frac {cfg.train_frac}: must be between 0 and 1 (the fraction of pairs used for training)")
    n_train = int(cfg.train_frac * cfg.p ** 2)
    if cfg.p < 3 or not 1 <= n_train < cfg.p ** 2:
        common.die(f"--p {cfg.p} --train-frac {cfg.train_frac} leaves {n_train} training and {cfg.p ** 2 - n_train} "
                   f"test pairs; use p >= 3 and a fraction that leaves both non-empty")
    common.check_config(cfg, input_dim=2 * cfg.p)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timer = common.Timer(device)
    run, checkpoint = common.start_run(cfg.out, cfg, device)

    # data: every pair (a, b) as one-hot(a) ++ one-hot(b), split once with a seeded generator
    data_gen = torch.Generator().manual_seed(cfg.seed)
    pairs = torch.tensor(list(itertools.product(range(cfg.p), repeat=2)))
    x_all = torch.cat([F.one_hot(pairs[:, 0], cfg.p), F.one_hot(pairs[:, 1], cfg.p)], 1).float()
    y_all = (pairs[:, 0] + pairs[:, 1]) % cfg.p
    order = torch.randperm(len(pairs), generator=data_gen)
    x_train, y_train = x_all[order[:n_train]].to(device), y_all[order[:n_train]].to(device)
    x_test, y_test = x_all[order[n_train:]].to(device), y_all[order[n_train:]].to(device)

    model = make_model(cfg).to(device)
    train_model = common.compiled(model, cfg.compile, device)
    optimizer = common.make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generators = {}  # full batch: no sampling; PGD's starts are seeded by (seed, step)
    start = common.restore(run, checkpoint, model, optimizer, generators, timer)

    # what every evaluation measures, fixed for the whole run (random points: uniform in the input box)
    probes = common.Probes(
        train=(x_train, y_train), test=(x_test, y_test), loss_fn=F.cross_entropy,
        lc_points={"train": x_train[:cfg.lc_points], "test": x_test[:cfg.lc_points],
                   "random": torch.rand(cfg.lc_points, 2 * cfg.p, generator=data_gen).to(device)},
        directions=common.random_directions(cfg.lc_directions, 2 * cfg.p, data_gen),
        anchors=common.anchor_points(x_train, y_train))
    eval_steps = common.log_steps(cfg.steps, cfg.evals)
    print(f"{run}: {sum(p.numel() for p in model.parameters())} parameters, {n_train} train pairs, device {device}")

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
        loss = F.cross_entropy(train_model(x_train), y_train)
        batch_loss_max = torch.maximum(batch_loss_max, loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer.heartbeat(step + 1, start, cfg.steps, eval_steps)
    return common.finish_run(run, timer, cfg.steps)


if __name__ == "__main__":
    common.cli(main, Config)
