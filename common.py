"""Measurements and run bookkeeping shared by the exp_*.py scripts.

Measurements (each tested against an independent oracle in tests/):
  random_directions, local_complexity   density of linear regions around points (Humayun et al. 2024)
  boundary_points                        points on the decision boundary, for LC "where the regions go"
  feature_rank, effective_rank, layer_ranks   rank of each ReLU layer's input features (Fan et al. 2024)
  weight_norm                            L2 norm of all parameters
  pgd_attack, pgd_accuracy               L-infinity PGD (Madry et al. 2018)
  partition_picture                      the linear regions on a 2D slice of input space

Bookkeeping: device and seed helpers, log-spaced steps, a run folder (config.json, metrics.jsonl,
metrics.csv, metrics.png, summary.json, checkpoint.pt), a timer, the grokking-onset summary.

Every function that looks inside a model finds its neurons the same way: the inputs of every
nn.ReLU module that runs in the forward pass, in the order they run (a conv layer's input: every
channel x position). Use nn.ReLU modules, not F.relu, in models you want to measure.
"""
import contextlib
import copy
import csv
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- device, seed
def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu. On CPU torch uses every core: on a 2-core machine two
    threads trained the MLP 1.2-2.2x and the CNN 1.2-2.4x faster than one (README, performance); when two
    runs share the machine, give each OMP_NUM_THREADS=1."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cuda", "mps", "cpu"):
        raise SystemExit(f"error: unknown --device {name!r}; use auto, cuda, mps or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def seed_everything(seed):
    """Seeds torch's global RNGs (CPU and all GPUs) and numpy's legacy RNG."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def exact_float32():
    """TF32 rounds to ~1e-3 relative: far coarser than an LC radius of 5e-3 or 1e-4. Turn it off."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no BN statistics update, no dropout) for the duration; the old mode is restored."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


@contextlib.contextmanager
def relu_inputs(model, reduce):
    """Calls reduce(layer_index, pre_activation) on the input of every nn.ReLU as it runs.

    The pre-hook runs before the ReLU, so an inplace ReLU is seen before it overwrites its input.
    A module run twice counts as two layers. The hooks are always removed."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module: LC and per-layer rank need "
                         "ReLU networks built with nn.ReLU (not F.relu or another activation)")
    counter = [0]

    def hook(module, inputs):
        reduce(counter[0], inputs[0])
        counter[0] += 1

    def reset(module, inputs):  # layer indices restart at every forward pass of the model
        counter[0] = 0

    handles = [model.register_forward_pre_hook(reset)] + [m.register_forward_pre_hook(hook) for m in relus]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- local complexity
def random_directions(n, dim, generator=None):
    """n orthonormal rows in R^dim (QR of a Gaussian), float32 on CPU. Use a dedicated
    torch.Generator so the directions are fixed for the run and the global RNG is untouched."""
    if n > dim:
        raise ValueError(f"cannot draw {n} orthonormal directions in {dim} dimensions")
    g = torch.randn(dim, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # makes the draw unique given the Gaussian
    return q.T.contiguous().float()


def local_complexity(model, x, radius, directions, batch_size=64):
    """Number of neurons cut by the cross-polytope conv{x +- radius * v_p} around each point.

    x: (N, ...) points with x[i].numel() == directions.shape[1]. directions: (P, D) rows.
    A neuron (the input of an nn.ReLU, per channel x position for conv maps) is cut when its
    pre-activation does not have the same sign at all 2P vertices. Returns a LongTensor (N, L) on
    the CPU: the count per point and per ReLU layer. Sum over L for the LC of a point.

    Each chunk of batch_size points is forwarded as batch_size * 2P vertices in one batch, and
    each layer is reduced to counts as soon as it is computed, so memory is bounded by the chunk.
    Runs in float32 (or the model's dtype) with TF32 off, in eval mode, without gradients; the
    model, its buffers and the global RNG are unchanged."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    n_points = x.shape[0]
    v = directions.to(device=device, dtype=dtype)
    n_vertices = 2 * v.shape[0]
    if x[0].numel() != v.shape[1]:
        raise ValueError(f"directions have dim {v.shape[1]} but a point has {x[0].numel()} entries")
    offsets = radius * torch.cat([v, -v])  # (2P, D)
    chunks = []
    with torch.no_grad(), exact_float32(), eval_mode(model):
        for start in range(0, n_points, batch_size):
            xb = x[start:start + batch_size].to(device=device, dtype=dtype)
            b = xb.shape[0]
            vertices = (xb.reshape(b, 1, -1) + offsets).reshape(b * n_vertices, *x.shape[1:])
            counts = []

            def reduce(layer, pre):  # cut: positive at some vertex and not positive at another
                pre = pre.reshape(b, n_vertices, -1)
                counts.append(((pre.amax(1) > 0) & (pre.amin(1) <= 0)).sum(1))  # amax/amin: 10x a bool sum

            with relu_inputs(model, reduce):
                model(vertices)
            chunks.append(torch.stack(counts, 1).cpu())
    return torch.cat(chunks)


def lc_summary(counts):
    """Mean LC over points and the half-width of its 99% normal confidence interval."""
    total = counts.sum(1).double()
    half = 2.576 * total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
    return total.mean().item(), half


def boundary_points(model, x, steps=20, batch_size=1024):
    """Points on the decision boundary: pair point i with a point of another predicted class and
    bisect the segment between them (steps halvings) until the prediction changes. Returns the
    midpoints of the final brackets, one per point that has a partner (none if all agree)."""
    with torch.no_grad(), eval_mode(model):
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        index = torch.arange(len(x), device=x.device)
        partner = index.clone()
        for shift in range(1, min(len(x), 64)):  # a partner of another class, among 63 neighbours
            same = pred[partner] == pred
            if not same.any():
                break
            partner[same] = torch.roll(index, shift)[same]
        keep = pred[partner] != pred
        if not keep.any():
            return x[:0]
        a, b, cls = x[keep], x[partner[keep]], pred[keep]
        for _ in range(steps):
            mid = (a + b) / 2
            same = torch.cat([model(mid[i:i + batch_size]).argmax(1) for i in range(0, len(mid), batch_size)]) == cls
            shape = (-1,) + (1,) * (x.dim() - 1)
            a = torch.where(same.reshape(shape), mid, a)
            b = torch.where(same.reshape(shape), b, mid)
        return (a + b) / 2


# ----------------------------------------------------------------------------- rank and norm
def feature_rank(h):
    """Numerical rank of the covariance of features h (N, d), in float64 with the default
    tolerance sigma_max * d * eps, as in Deep Grokking (float32 gives a very different answer)."""
    return int(torch.linalg.matrix_rank(torch.cov(h.reshape(h.shape[0], -1).double().T)).item())


def effective_rank(h):
    """Roy & Vetterli's effective rank of the centred features h (N, d): exp of the entropy of the
    singular values normalised to sum 1. Continuous, between 1 and rank; k equal values give k."""
    h = h.reshape(h.shape[0], -1).double()
    return _entropy_rank(torch.linalg.svdvals(h - h.mean(0)))


def _entropy_rank(s):
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def _as_features(pre):
    """A ReLU input as rows of features: (N, d) dense; conv (N, C, H, W): every position is a row of
    C channels, (N*H*W, C); sequence (N, T, d): (N*T, d). Keeps conv covariances small (C x C)."""
    if pre.dim() == 4:
        pre = pre.permute(0, 2, 3, 1)
    return pre.reshape(-1, pre.shape[-1]) if pre.dim() > 2 else pre


def layer_ranks(model, x, batch_size=1024):
    """(feature_rank, effective_rank) of the input of every ReLU layer on the points x.

    The features are those of the network itself, as Deep Grokking computes them: a float64 copy
    of the model (same weights) runs the forward pass, whatever dtype the model trains in. Float32
    rounding would raise the rank of every layer behind a low-rank bottleneck. The float64
    covariance of each layer is accumulated batch by batch (memory d x d, not N x d), with the data
    shifted by its first row so that constant features give exact zeros. The rank uses
    matrix_rank's default tolerance (sigma_max * d * eps64); the effective rank the singular values
    of the centred features, sqrt((N-1) * eig(cov))."""
    stats = {}

    def accumulate(layer, pre):
        h = _as_features(pre)
        if layer not in stats:
            stats[layer] = [h[0].clone(), 0, torch.zeros_like(h[0]), torch.zeros(h.shape[1], h.shape[1], dtype=h.dtype, device=h.device)]
        shift, n, total, outer = stats[layer]
        c = h - shift
        stats[layer] = [shift, n + len(c), total + c.sum(0), outer + c.T @ c]

    device = next(model.parameters()).device
    device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    model64 = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    with torch.no_grad(), eval_mode(model64), relu_inputs(model64, accumulate):
        for i in range(0, len(x), batch_size):
            model64(x[i:i + batch_size].to(device=device, dtype=torch.float64))
    out = []
    for layer in sorted(stats):
        _, n, total, outer = stats[layer]
        cov = (outer - torch.outer(total, total) / n) / (n - 1)
        eig = torch.linalg.eigvalsh(cov).clamp(min=0)
        out.append((int(torch.linalg.matrix_rank(cov).item()), _entropy_rank(eig.sqrt())))
    return out


def weight_norm(model):
    """L2 norm of all parameters, biases included."""
    return math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))


# ----------------------------------------------------------------------------- PGD
def pgd_attack(model, x, y, eps, alpha, steps, random_start=True, restarts=1, lo=0.0, hi=1.0,
               generator=None):
    """L-infinity PGD on the cross-entropy (untargeted). Returns adversarial inputs with
    |x_adv - x| <= eps and lo <= x_adv <= hi: for each example, the first iterate (of any step of
    any restart) that fools the model, else the last iterate. So robust accuracy can only fall with more steps or
    restarts. The model runs in eval mode and is left unchanged (no parameter, buffer or .grad).

    The attack ascends log(1 - p_y), computed in float64 as logsumexp over the wrong classes minus
    logsumexp over all: per example its input gradient is a positive multiple (p_y / (1 - p_y)) of
    the cross-entropy's, so the sign steps are the same, but it does not vanish on very confident
    logits, where the cross-entropy's gradient underflows to exactly zero (gradient masking)."""
    if eps == 0:
        return x.clone()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with eval_mode(model), exact_float32():
        for _ in range(restarts):
            if random_start:
                noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
                x_adv = (x + eps * (2 * noise.to(x) - 1)).clamp(lo, hi)
            else:
                x_adv = x.clone()
            for step in range(steps + 1):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                with torch.no_grad():  # keep the first iterate that fools the model (free: logits are here)
                    newly = ~fooled & (logits.argmax(1) != y)
                    best[newly] = x_adv[newly]
                    fooled |= newly
                if step == steps:  # not fooled yet: return the last iterate, the strongest try
                    best[~fooled] = x_adv.detach()[~fooled]
                    break
                z = logits.double()
                log_wrong = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).logsumexp(1) - z.logsumexp(1)
                loss = log_wrong.sum()  # log(1 - p_y): see the docstring
                grad, = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    x_adv = x_adv + alpha * grad.sign()
                    x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(lo, hi)
    return best.detach()


def pgd_accuracy(model, x, y, eps, alpha, steps, batch_size=1024, **kwargs):
    """Fraction of examples still classified correctly after pgd_attack (every restart)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_adv = pgd_attack(model, xb, yb, eps, alpha, steps, **kwargs)
        with torch.no_grad(), eval_mode(model):
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


# ----------------------------------------------------------------------------- one evaluation
def evaluate(model, x, y, loss_fn, batch_size=2048):
    """(accuracy, mean loss) of model on (x, y), in eval mode, without gradients."""
    correct, loss = 0, 0.0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size])
            correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
            loss += loss_fn(out, y[i:i + batch_size]).item() * len(out)
    return correct / len(x), loss / len(x)


def measure(model, cfg, probes, timer, full=True):
    """Every measure of the papers at one step but the losses, as a dict. probes holds what stays fixed for the
    run: train and test (x, y) tensors and loss_fn; lc_points, a dict of named point sets (train,
    test, random) and directions; rank_x; pgd_x, pgd_y, pgd_gen, and the input box lo, hi.
    LC (mean and 99% CI) is also taken at points on the decision boundary between test points.
    cfg names the settings: lc_radius, lc_batch, pgd_eps, pgd_alpha, pgd_steps, pgd_restarts.
    full=False measures only rank and weight norm (frequent, cheap evaluations)."""
    rec = {}
    with timer("rank"):  # first: cheap, and in every evaluation (full=False: only rank and norm)
        for i, (rank, erank) in enumerate(layer_ranks(model, probes["rank_x"])):
            rec[f"rank_{i + 1}"], rec[f"erank_{i + 1}"] = rank, round(erank, 2)
    rec["weight_norm"] = weight_norm(model)
    if not full:
        return rec
    with timer("lc"):
        sets = dict(probes["lc_points"])
        sets["boundary"] = boundary_points(model, sets["test"])
        for name, pts in sets.items():
            if len(pts) == 0:  # no boundary points while every test point gets the same class
                continue
            counts = local_complexity(model, pts, cfg.lc_radius, probes["directions"], cfg.lc_batch)
            rec[f"lc_{name}"], rec[f"lc_{name}_ci"] = lc_summary(counts)
    with timer("pgd"):
        for eps in cfg.pgd_eps:
            rec[f"pgd_acc_{eps:.3g}"] = pgd_accuracy(model, probes["pgd_x"], probes["pgd_y"], eps, cfg.pgd_alpha,
                                                   cfg.pgd_steps, restarts=cfg.pgd_restarts, lo=probes["lo"],
                                                   hi=probes["hi"], generator=probes["pgd_gen"])
    return rec


def evaluate_and_log(model, cfg, step, probes, run, timer, checkpoint, full=True):
    """One evaluation step of a script: train and test accuracy and loss, measure(), the partition picture at init, at the first
    evaluation with train accuracy >= 99% ("fit") and at the end, one logged record, a progress
    line, a checkpoint (checkpoint() saves it). Stops the run with a clear message when the
    training loss is not finite; what was logged stays, and the plot is written. full=False: see
    measure (no LC, PGD or partition picture)."""
    rec = {"step": step}
    with timer("eval"):
        for split in ("train", "test"):
            rec[f"{split}_acc"], rec[f"{split}_loss"] = evaluate(model, *probes[split], probes["loss_fn"])
    if not math.isfinite(rec["train_loss"]):
        log_metrics(run, rec)
        write_csv(run)
        plot_run(run)
        raise SystemExit(f"error: training loss is {rec['train_loss']} at step {step}; lower --lr (or --init-scale); "
                         f"the metrics so far are in {run}")
    rec.update(measure(model, cfg, probes, timer, full))
    name = "init" if step == 0 else "end" if step == cfg.steps else None
    if name is None and full and rec["train_acc"] >= 0.99 and not (Path(run) / "partition_fit.png").exists():
        name = "fit"
    if name:
        with timer("partition"):
            partition_picture(model, probes["anchors"], Path(run) / f"partition_{name}.png", cfg.partition_resolution,
                              title=f"step {step}: ")
    log_metrics(run, rec)
    done = timer.seconds.get("train", 0.0)
    rate = f"{step / done:.0f} it/s" if done > 0 and step else ""
    shown = " ".join(f"{k} {v:.3g}" for k, v in rec.items()
                     if k in ("train_acc", "test_acc", "lc_train", "lc_boundary") or k.startswith("pgd_acc"))
    print(f"step {step:>7}/{cfg.steps} ({100 * step / max(cfg.steps, 1):5.1f}%) {rate:>9} | {shown}", flush=True)
    with timer("checkpoint"):
        checkpoint()


# ----------------------------------------------------------------------------- partition picture
def partition_picture(model, anchors, path, resolution=300, margin=0.5, batch_size=1024, title=""):
    """Draws the linear regions of model on the plane through three inputs (anchors: (3, ...)).

    The plane is x(a, b) = x0 + a (x1 - x0) + b (x2 - x0) for a, b in [-margin, 1 + margin]. Every
    grid point gets its activation pattern (the signs at every ReLU input, see region_ids);
    neighbouring grid points with different patterns mark a region edge. The decision
    boundary (where the predicted class changes) is drawn in red, the anchors as dots.
    Returns the number of distinct regions seen on the grid (a lower bound of the true count)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    x0, x1, x2 = anchors.to(device).float().flatten(1)
    ticks = torch.linspace(-margin, 1 + margin, resolution, device=device)
    a, b = torch.meshgrid(ticks, ticks, indexing="xy")
    pattern_ids, classes = region_ids(model, x0 + a.reshape(-1, 1) * (x1 - x0) + b.reshape(-1, 1) * (x2 - x0),
                                      anchors.shape[1:], batch_size)
    ids = pattern_ids.reshape(resolution, resolution).cpu()
    cls = classes.reshape(resolution, resolution).cpu()
    n_regions = len(torch.unique(ids))

    def edges(t):
        e = torch.zeros_like(t, dtype=torch.bool)
        e[:, 1:] |= t[:, 1:] != t[:, :-1]
        e[1:, :] |= t[1:, :] != t[:-1, :]
        return e

    rng = np.random.default_rng(0)
    _, inverse = torch.unique(ids, return_inverse=True)
    colors = 0.75 + 0.25 * rng.random((n_regions, 3))
    img = colors[inverse.numpy()]
    img[edges(ids).numpy()] = 0.15
    img[edges(cls).numpy()] = (0.85, 0.0, 0.0)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    extent = (-margin, 1 + margin, -margin, 1 + margin)
    ax.imshow(img, origin="lower", extent=extent, interpolation="nearest")
    ax.scatter([0, 1, 0], [0, 0, 1], c="k", s=30, zorder=3)
    ax.set_title(f"{title}{n_regions} regions on the grid (red: decision boundary)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n_regions


def region_ids(model, points, point_shape, batch_size=1024):
    """Region index of each point's activation pattern (the signs at every ReLU input) and its
    predicted class. Each layer's sign vector is projected on 4 random integer vectors (entries
    below 2^20): the float64 sums are integers below 2^53, so exact and independent of batching,
    and two different patterns agree on all 4 with probability below 2^-80."""
    gen = torch.Generator().manual_seed(12345)
    weights = {}
    keys, classes = [], []
    with torch.no_grad(), eval_mode(model), exact_float32():
        for i in range(0, len(points), batch_size):
            xb = points[i:i + batch_size].reshape(-1, *point_shape)
            parts = []

            def project(layer, pre):
                bits = (pre.reshape(len(xb), -1) > 0).double()
                if layer not in weights:
                    weights[layer] = torch.randint(0, 2**20, (bits.shape[1], 4), generator=gen).double().to(xb.device)
                parts.append(bits @ weights[layer])

            with relu_inputs(model, project):
                classes.append(model(xb).argmax(1))
            keys.append(torch.cat(parts, 1))
    _, ids = torch.unique(torch.cat(keys), dim=0, return_inverse=True)
    return ids, torch.cat(classes)


# ----------------------------------------------------------------------------- schedules, timing
def log_steps(total, n=40, first=0):
    """About n integer steps from `first` to `total`, evenly spaced on a log axis (0 included)."""
    steps = np.unique(np.round(np.geomspace(1, max(total, 1), n)).astype(int))
    return sorted({s for s in [0, *steps.tolist(), total] if first <= s <= total})


class Timer:
    """Wall time per category (with a GPU sync at each boundary, so times are real)."""

    def __init__(self, device):
        self.device, self.seconds, self.start = device, {}, time.perf_counter()
        self.last_beat = self.start

    @contextlib.contextmanager
    def __call__(self, name):
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def heartbeat(self, step, first_step, total, every=30.0):
        """Between evaluations (log-spaced, so far apart late in a run): a progress line every
        `every` seconds, with steps/s and the training time left. One clock read a step, no sync."""
        now = time.perf_counter()
        if now - self.last_beat < every:
            return
        self.last_beat = now
        trained = self.seconds.get("train", 0.0)
        rate = (step - first_step) / trained if trained else 0.0
        left = f"about {(total - step) / rate / 60:.0f} min of training left" if rate else ""
        print(f"step {step:>7}/{total} ({100 * step / max(total, 1):5.1f}%) {rate:7.0f} it/s, {left}", flush=True)

    def report(self, train_steps):
        wall = time.perf_counter() - self.start
        measured = sum(v for k, v in self.seconds.items() if k not in ("train", "setup"))
        return {"wall_s": round(wall, 2), **{f"{k}_s": round(v, 2) for k, v in self.seconds.items()},
                "measurement_fraction": round(measured / wall, 3) if wall else 0.0,
                "train_steps_per_s": round(train_steps / self.seconds["train"], 1) if self.seconds.get("train") else None}


# ----------------------------------------------------------------------------- run folder
def parse_config(cls, argv=None):
    """A dataclass of hyper-parameters -> argparse (every field a --flag, its comment the help)."""
    import argparse
    import dataclasses
    import inspect
    import re
    source = inspect.getsource(cls)
    helps = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", source, re.M))
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name, ""))
        elif f.type in (tuple, "tuple"):
            parser.add_argument(flag, type=float, nargs="+", default=list(f.default), help=helps.get(f.name, ""))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            choices = getattr(cls, "CHOICES", {}).get(f.name)
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=helps.get(f.name, ""))
    args = parser.parse_args(argv)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


def apply_quick(cfg, **quick):
    """--quick: these values replace the fields still at their defaults (a flag given on the command
    line wins, so `--quick --steps 100` runs 100 steps of the quick setting)."""
    import dataclasses
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in quick.items() if getattr(cfg, k) == defaults[k]})


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(out, config, device, resume=False):
    """Creates the run folder and writes config.json (hyper-parameters plus provenance). A new run
    refuses a folder that already holds metrics, so nothing logged is overwritten by accident."""
    import dataclasses
    run = Path(out)
    if (run / "metrics.jsonl").exists() and not resume:
        raise SystemExit(f"error: {run} already holds a run; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    info = {"config": dataclasses.asdict(config), "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    name = "config.json" if not (run / "config.json").exists() else "config.resumed.json"
    (run / name).write_text(json.dumps(info, indent=2))
    return run


def log_metrics(run, record):
    """Appends one JSON line and flushes it to disk, so a crash loses nothing already logged."""
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run, up_to_step=None):
    """The logged records; a half-written last line (a killed run) is skipped with a warning."""
    path = Path(run) / "metrics.jsonl"
    records = []
    if not path.exists():
        return records
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i + 1}: skipped a half-written line (the run was killed while writing)")
    if up_to_step is not None:
        records = [r for r in records if r["step"] <= up_to_step]
    return records


def truncate_metrics(run, step):
    """On resume: keep only the records up to the checkpoint's step (later ones will be redone)."""
    records = read_metrics(run, up_to_step=step)
    (Path(run) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_csv(run):
    records = read_metrics(run)
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(Path(run) / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)


def save_checkpoint(run, model, optimizer, step, generators):
    """Model, optimiser, step and every RNG state (the global ones and the named generators:
    batches, PGD starts), written atomically (tmp file, then rename)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng_cpu": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()},
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    tmp = Path(run) / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, Path(run) / "checkpoint.pt")


def load_checkpoint(run, model, optimizer, generators):
    """Restores what save_checkpoint wrote (weights_only=True: no code runs) and returns the step."""
    path = Path(run) / "checkpoint.pt"
    if not path.exists():
        raise SystemExit(f"error: --resume given but {path} does not exist; start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


def onset_summary(records):
    """Grokking onsets from the logged records: the first step where train accuracy reaches 99%
    (interpolation), then, searching from that step on, the first step where test accuracy and
    each PGD accuracy reach 99% of their final value, and the delays between them. (Searching
    after interpolation skips the transient early in training when a weak model is briefly
    "robust".) Without interpolation the search starts at step 0. Plus LC at init, min, max, end."""
    if not records:
        return {}
    fit = next((r["step"] for r in records if r.get("train_acc", 0) >= 0.99), None)
    after = [r for r in records if r["step"] >= (fit or 0)]
    last = records[-1]
    out = {"train_acc_99_step": fit}
    for key in [k for k in last if k == "test_acc" or k.startswith("pgd_acc")]:
        out[f"{key}_final"] = last[key]
        onset = next((r["step"] for r in after if r.get(key) is not None and r[key] >= 0.99 * last[key]), None)
        onset = onset if last[key] > 0 else None  # nothing rose
        out[f"{key}_99pct_of_final_step"] = onset
        if onset is not None and fit is not None:
            out[f"{key}_delay_steps"] = onset - fit
    lc = [r["lc_train"] for r in records if "lc_train" in r]
    if lc:
        out.update(lc_train_init=lc[0], lc_train_min=min(lc), lc_train_max=max(lc), lc_train_end=lc[-1])
    return out


def write_summary(run, time_report=None):
    """summary.json: the onsets of the logged records, plus a time breakdown when given."""
    summary = {**onset_summary(read_metrics(run)), **({"time": time_report} if time_report else {})}
    (Path(run) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finish_run(run, timer, train_steps):
    """Writes metrics.csv, metrics.png and summary.json (onsets and time breakdown); prints it."""
    with timer("plot"):
        write_csv(run)
        plot_run(run)
    summary = write_summary(run, timer.report(train_steps))
    print(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- plot
PANELS = [  # (title, which keys, y-axis label)
    ("accuracy", lambda k: k in ("train_acc", "test_acc"), "accuracy"),
    ("loss", lambda k: k in ("train_loss", "test_loss"), "loss (log)"),
    ("local complexity", lambda k: k.startswith("lc_") and not k.endswith("_ci"), "cut neurons per point"),
    ("PGD accuracy", lambda k: k.startswith("pgd_acc"), "robust accuracy"),
    ("feature rank per layer", lambda k: k.startswith("rank_"), "rank of cov"),
    ("effective rank per layer", lambda k: k.startswith("erank_"), "effective rank"),
    ("weight norm", lambda k: k == "weight_norm", "L2 norm"),
]


def plot_run(run, path=None):
    """Every logged metric against training step on a log axis (step 0 drawn at 1/2 of the first
    logged step), one panel per group, into run/metrics.png. Works on any run folder, also while
    the run goes on: `python common.py runs/x`. Returns the panel titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    if not records:
        raise SystemExit(f"error: no metrics in {run}/metrics.jsonl to plot")
    keys = list(dict.fromkeys(k for r in records for k in r if k != "step" and isinstance(r[k], (int, float))))
    panels = [(t, [k for k in keys if pick(k)], y) for t, pick, y in PANELS]
    panels = [p for p in panels if p[1]]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    positive = [r["step"] for r in records if r["step"] > 0]
    zero_at = min(positive) / 2 if positive else 1
    for ax, (title, ks, ylabel) in zip(axes.flat, panels):
        for k in ks:
            pts = [(r["step"] or zero_at, r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=".", ms=3, lw=1.2, label=k)
            ci = [(r["step"] or zero_at, r[k], r[k + "_ci"]) for r in records if r.get(k + "_ci") is not None]
            if ci:
                cx, cy, ch = map(np.array, zip(*ci))
                ax.fill_between(cx, cy - ch, cy + ch, alpha=0.2)
        ax.set_xscale("log")
        if title == "loss" and any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2 if len(ks) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(Path(run).name), fontsize=11)
    fig.tight_layout()
    out = Path(path or Path(run) / "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _, _ in panels]


if __name__ == "__main__":
    # python common.py RUN [RUN ...]: redraw metrics.png and metrics.csv of run folders (also while
    # a run goes on) and refresh the onsets in summary.json (its time breakdown is kept).
    if len(sys.argv) < 2:
        raise SystemExit("usage: python common.py RUN_FOLDER [RUN_FOLDER ...]")
    for folder in sys.argv[1:]:
        plot_run(folder)
        write_csv(folder)
        path = Path(folder) / "summary.json"
        write_summary(folder, json.loads(path.read_text()).get("time") if path.exists() else None)
        print(f"{folder}: metrics.png, metrics.csv and summary.json written")
