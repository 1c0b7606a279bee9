"""What the exp_*.py scripts share, in three parts.

1. MEASUREMENTS, each tested against an independent oracle in tests/: local_complexity (LC),
   layer_ranks, weight_norm, pgd_accuracy (two attacks), logit_margins, zero_grad_fraction;
   measure() takes them all at one step; partition_picture draws the linear regions on a plane.
2. BOOKKEEPING: the evaluation step, the command line, the run folder, metrics.png; the checks
   that make a resumed run the same run, in one sub-section a reader may skip.
3. DATA: the MNIST, CIFAR-10 and image-folder loaders.

The neurons are the inputs of every nn.ReLU module that runs in the forward pass, in the order
they run (a conv layer's: every channel x position): build models with nn.ReLU, not F.relu.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import gzip
import hashlib
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import einops
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ==================== PART 1 of 3, MEASUREMENTS: each tested against an independent oracle in tests/
# ----------------------------------------------------------------------------- the neurons: ReLU inputs
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


UNCOUNTED_KINKS = ("max_pool", "leaky_relu", "hardtanh", "relu6", "prelu", "rrelu", "threshold")


class _WatchFunctions(torch.overrides.TorchFunctionMode):
    """Sees relu called outside an nn.ReLU module, and other kinks that no ReLU neuron stands for."""

    def __init__(self):
        super().__init__()
        self.inside_relu, self.stray_relus, self.kinks = 0, 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("relu", "relu_") and not self.inside_relu:
            self.stray_relus += 1
        elif any(k in name for k in UNCOUNTED_KINKS):
            self.kinks.add(name.strip("_"))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def relu_inputs(model, reduce):
    """Calls reduce(layer_index, pre_activation) on the input of every nn.ReLU as it runs (a pre-hook:
    an inplace ReLU is seen before it overwrites it; a module run twice is two layers). Refuses
    (ValueError) a model without nn.ReLU, one where none ran, one that calls F.relu (neurons left out);
    warns when some nn.ReLU never ran or other kinks (max-pooling, leaky ReLU...) cut the input too."""
    name = type(model).__name__
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{name} has no nn.ReLU module: LC and per-layer rank need ReLU networks built "
                         "with nn.ReLU modules (not F.relu or another activation)")
    counter, ran, watch = [0], set(), _WatchFunctions()

    def hook(module, inputs):
        reduce(counter[0], inputs[0])
        counter[0] += 1
        ran.add(id(module))
        watch.inside_relu += 1

    def leave(module, inputs, output):
        watch.inside_relu -= 1

    def reset(module, inputs):  # layer indices restart at every forward pass of the model
        counter[0] = 0

    handles = [model.register_forward_pre_hook(reset)] + [m.register_forward_pre_hook(hook) for m in relus]
    handles += [m.register_forward_hook(leave) for m in relus]
    try:
        with watch:
            yield counter
    finally:
        for h in handles:
            h.remove()
    if watch.stray_relus:
        raise ValueError(f"{name} calls relu as a function (F.relu, torch.relu or Tensor.relu) "
                         f"{watch.stray_relus} time(s): those neurons would be left out of LC and rank; "
                         "use nn.ReLU modules")
    if not ran:
        raise ValueError(f"no nn.ReLU module of {name} ran in the forward pass: nothing to measure")
    if len(ran) < len(relus):
        warnings.warn(f"{len(relus) - len(ran)} of the {len(relus)} nn.ReLU modules of {name} never ran; "
                      "only the ones that ran are measured", stacklevel=3)
    if watch.kinks:
        warnings.warn(f"{name} also uses {', '.join(sorted(watch.kinks))}: its kinks cut the input space too but "
                      "LC and the partition pictures count only nn.ReLU neurons", stacklevel=3)


def _check_points(x, where):  # uint8 images (0..255) would be measured as if in [0, 1]: nonsense, no error
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{where}: inputs must be a floating-point tensor (e.g. images as x.float() / 255), got "
                         f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: inputs contain NaN or infinite values")


def _as_labels(y, n=None):  # integer labels, one per example, as int64 (one_hot and gather need it)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if y.dim() != 1 or (n is not None and len(y) != n):
        raise ValueError(f"labels must have shape ({n if n is not None else 'N'},), one per input, got {tuple(y.shape)}"
                         + (" (flatten them: y.view(-1))" if y.numel() == (n or y.numel()) else ""))
    return y.long()


# ----------------------------------------------------------------------------- local complexity
def random_directions(n, dim, generator=None):
    """n orthonormal rows in R^dim (QR of a Gaussian), float32 on CPU, from their own generator."""
    if n > dim:
        raise ValueError(f"cannot draw {n} orthonormal directions in {dim} dimensions")
    g = torch.randn(dim, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # makes the draw unique given the Gaussian
    return q.T.contiguous().float()


def local_complexity(model, x, radius, directions, batch_size=64, zero_is_a_sign=False, tf32=False):
    """Number of neurons cut by the cross-polytope conv{x +- radius * v_p} around each point: a LongTensor
    (N, L) on the CPU, per point and ReLU layer. x: (N, ...); directions: (P, D) rows, D = x[i].numel()
    (for normalised units: in_input_units), or an int P (P orthonormal ones, seed 0). A neuron is cut
    when it is > 0 at some vertex and <= 0 at another (zero_is_a_sign=True: also 0 at some and < 0 at
    the others, as the authors' code). batch_size points run as batch_size * 2P vertices a forward
    pass. float32, TF32 off (tf32=True: on, as the authors' GPU code), eval mode; the model and the
    global RNG unchanged. Refuses (ValueError) non-floating or non-finite inputs and a bad radius."""
    _check_points(x, "local_complexity")
    if x.abs().max() > 10:
        warnings.warn(f"local_complexity: inputs reach {x.abs().max().item():g}; the radius is in the inputs' units: "
                      "images in 0..255 need x / 255 (or a radius 255x larger)", stacklevel=2)
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"local_complexity: radius must be a finite number > 0, got {radius}")
    if isinstance(directions, int):
        directions = random_directions(directions, x[0].numel(), torch.Generator().manual_seed(0))
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    n_points = x.shape[0]
    v = directions.to(device=device, dtype=dtype)
    if x[0].numel() != v.shape[1]:
        raise ValueError(f"directions have dim {v.shape[1]} but a point has {x[0].numel()} entries")
    offsets = radius * torch.cat([v, -v])  # (2P, D): the cross-polytope's vertices around 0
    chunks = []
    with torch.no_grad(), tf32_flags(tf32), eval_mode(model):
        for start in range(0, n_points, batch_size):
            xb = x[start:start + batch_size].to(device=device, dtype=dtype)
            b = xb.shape[0]
            vertices = einops.rearrange(xb.reshape(b, 1, -1) + offsets, "b v d -> (b v) d").reshape(-1, *x.shape[1:])
            counts = []

            def reduce(layer, pre):  # per point: max and min over its 2P vertices of every neuron
                pre = einops.rearrange(pre, "(b v) ... -> b v (...)", b=b)
                high, low = pre.amax(1), pre.amin(1)  # amax/amin: 10x faster than counting signs
                cut = (high > 0) & (low <= 0)
                if zero_is_a_sign:
                    cut |= (high == 0) & (low < 0)
                counts.append(cut.sum(1))

            with relu_inputs(model, reduce):
                model(vertices)
            chunks.append(torch.stack(counts, 1).cpu())
    return torch.cat(chunks)


def lc_summary(counts):  # mean LC over points, and the half-width of its 99% normal confidence interval
    total = counts.sum(1).double()
    half = 2.576 * total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
    return total.mean().item(), half


@contextlib.contextmanager
def tf32_flags(allowed):
    """Both TF32 flags (matmul, cuDNN) set for the duration: TF32 rounds to ~1e-3, too coarse to measure."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def boundary_points(model, x, steps=20, batch_size=1024):
    """Points on the decision boundary: each point paired with one of another predicted class
    (among 63 neighbours), the segment bisected `steps` times; the final brackets' midpoints."""
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
def _entropy_rank(s):  # effective rank (Roy & Vetterli): exp of the entropy of the singular values / their sum
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def layer_ranks(model, x, batch_size=1024):
    """(rank, effective rank) of the covariance of every ReLU layer's input over the points x: dense
    (N, d): d x d over the N points; conv (N, C, H, W): C x C over the N*H*W positions; sequence
    (N, T, d): d x d over the N*T tokens. In float64 as Deep Grokking (a float64 copy of the model:
    float32 rounding raises the rank behind a low-rank bottleneck), matrix_rank's default tolerance;
    accumulated batch by batch, shifted by the first row (constant features: 0)."""
    stats = {}

    def accumulate(layer, pre):
        h = einops.rearrange(pre, "n c h w -> (n h w) c" if pre.dim() == 4 else "n ... d -> (n ...) d")
        if layer not in stats:
            stats[layer] = [h[0].clone(), 0, torch.zeros_like(h[0]), h.new_zeros(h.shape[1], h.shape[1])]
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


# ----------------------------------------------------------------------------- PGD and its diagnostics
PGD_LOSSES = ("log1m", "ce32")


def _check_radius(name, value, lo, hi):
    t = torch.as_tensor(value, dtype=torch.float64)
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError(f"{name} must be a number >= 0 (not NaN), got {value}")
    width = (torch.as_tensor(hi, dtype=torch.float64) - torch.as_tensor(lo, dtype=torch.float64)).cpu()
    if (t.cpu() >= width).any():
        raise ValueError(f"{name} {value} is at or above the width of the input box [lo, hi] ({width.min().item():g}): "
                         f"the attack could reach any input; for 8 of 255 grey levels give 8/255")


def pgd_attack(model, x, y, eps, alpha, steps, random_start=True, restarts=1, lo=0.0, hi=1.0,
               generator=None, loss="log1m"):
    """L-infinity PGD (untargeted): sign steps of size alpha, projected on |x_adv - x| <= eps and clamped
    to [lo, hi]; eps, alpha, lo, hi broadcast against one input (per channel: (C, 1, 1)).
    "log1m" (the toolkit's) measures robustness: it ascends log(1 - p_y) in float64, whose gradient has
    the cross-entropy's signs but never vanishes on confident logits, and keeps each example's first
    fooling iterate of any step or restart (more steps or restarts never raise robust accuracy).
    "ce32" is the papers' (grok-adversarial attacks.py): float32 cross-entropy averaged over the batch,
    the last iterate scored. Past a margin of ~90 float32 rounds 1 - p_y to 0: the gradient is exactly
    zero, the point never moves and counts as robust (gradient masking). Their code starts at x
    (random_start=False). Eval mode; refuses (ValueError) a NaN or negative eps or alpha, bad inputs."""
    if loss not in PGD_LOSSES:
        raise ValueError(f"loss must be one of {PGD_LOSSES}, got {loss!r}")
    _check_points(x, "pgd_attack")
    _check_radius("eps", eps, lo, hi)
    _check_radius("alpha", alpha, lo, hi)
    y = _as_labels(y, len(x))
    eps, alpha, lo, hi = (torch.as_tensor(t, dtype=x.dtype, device=x.device) for t in (eps, alpha, lo, hi))
    if (x < lo - 1e-5).any() or (x > hi + 1e-5).any():  # (a box computed from mean/std rounds)
        raise ValueError(f"pgd_attack: inputs lie outside the box the attack clamps to ({x.min().item():g}.."
                         f"{x.max().item():g} against lo..hi); scale images to [0, 1] (x / 255) or pass lo and hi")
    if not eps.any():
        return x.clone()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with eval_mode(model), tf32_flags(False):
        for _ in range(restarts):
            if random_start:
                noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
                x_adv = torch.clamp(x + eps * (2 * noise.to(x) - 1), lo, hi)
            else:
                x_adv = x.clone()
            for step in range(steps + 1):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                if loss == "log1m" or step == steps:  # log1m: every iterate counts; ce32: only the last
                    with torch.no_grad():  # (free: the logits are here)
                        newly = ~fooled & (logits.argmax(1) != y)
                        best[newly] = x_adv[newly]
                        fooled |= newly
                if step == steps:
                    break
                if loss == "ce32":
                    objective = F.cross_entropy(logits.float(), y)  # float32, mean over the batch: the authors'
                else:
                    z = logits.double()
                    log_wrong = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).logsumexp(1) - z.logsumexp(1)
                    objective = log_wrong.sum()  # log(1 - p_y): see the docstring
                grad, = torch.autograd.grad(objective, x_adv)
                with torch.no_grad():
                    x_adv = x_adv + alpha * grad.sign()
                    x_adv = torch.clamp(x + (x_adv - x).clamp(-eps, eps), lo, hi)
            best[~fooled] = x_adv.detach()[~fooled]  # not fooled by any restart: its last iterate
    return best.detach()


def pgd_accuracy(model, x, y, eps, alpha, steps, batch_size=None, loss="log1m", **kwargs):
    """Fraction still classified correctly after pgd_attack; "ce32" in the authors' batches of 2048."""
    batch_size = batch_size or (2048 if loss == "ce32" else 1024)
    y, correct = _as_labels(y, len(x)), 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], _as_labels(y[i:i + batch_size])
        x_adv = pgd_attack(model, xb, yb, eps, alpha, steps, loss=loss, **kwargs)
        with torch.no_grad(), eval_mode(model), tf32_flags(False):
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


def logit_margins(model, x, y, batch_size=1024):
    """z_y - max_{j != y} z_j per example (float64, on the CPU): > 0 where the model is right."""
    y = _as_labels(y, len(x))
    out = []
    with torch.no_grad(), eval_mode(model), tf32_flags(False):
        for i in range(0, len(x), batch_size):
            z, yb = model(x[i:i + batch_size]).double(), y[i:i + batch_size]
            other = z.masked_fill(F.one_hot(yb, z.shape[1]).bool(), -math.inf).amax(1)
            out.append((z.gather(1, yb[:, None])[:, 0] - other).cpu())
    return torch.cat(out)


def zero_grad_fraction(model, x, y, batch_size=2048):
    """Fraction of examples where the papers' attack cannot move: the input gradient of the float32
    cross-entropy (batch mean) is exactly zero at the clean point."""
    y = _as_labels(y, len(x))
    zero = 0
    with eval_mode(model), tf32_flags(False):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(xb).float(), y[i:i + batch_size]), xb)
            zero += (grad.flatten(1) == 0).all(1).sum().item()
    return zero / len(x)


# ----------------------------------------------------------------------------- units of the inputs
# Input normalisations (mean, std per channel), each named once with its source. The radii of the
# CIFAR and ResNet scripts are in the units of the normalised input, so the constants set the radii.
NORMALISATIONS = {
    "cifar10_true": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                     "CIFAR-10's own per-channel mean and std over the 50k training images"),
    "cifar10_authors": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                        "grok-adversarial dataloaders.py (Humayun et al.'s Fig. 1 code; kuangliu's widely copied "
                        "constants): the true mean, but not the true std"),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torchvision's ImageNet constants"),
}


def papers_box(name):
    """The papers' attack's clamp in [0, 1] pixels per channel, (lo, hi) as (C, 1, 1): their PGD
    clamps the normalised input to one global range [min_c -m_c/s_c, max_c (1-m_c)/s_c] (for
    cifar10_authors [-2.4291, 2.7537], grok-adversarial configs.py), not each channel's [0, 1]."""
    m, s = torch.tensor(NORMALISATIONS[name][0]).reshape(-1, 1, 1), channel_std(name)
    low, high = (-m / s).min(), ((1 - m) / s).max()
    return m + low * s, m + high * s


class Normalize(nn.Module):
    """Per-channel normalisation as the model's first layer, so inputs stay in pixel space [0, 1]
    (PGD's clamp is right there) while the network sees what the authors' networks saw."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def channel_std(name):  # (C, 1, 1): a radius r in units normalised by NORMALISATIONS[name] is r * std_c in pixels
    return torch.tensor(NORMALISATIONS[name][1]).reshape(-1, 1, 1)


def in_input_units(directions, shape, name):  # (P, D) rows drawn in normalised units, in pixels (shape: (C, H, W))
    return (directions.reshape(-1, *shape) * channel_std(name).to(directions.device)).flatten(1)


def units_notes(cfg, name):
    """config.json's record of radii in normalised units: the normalisation, and the radii per
    channel in [0, 1] pixels (r * std_c), also printed."""
    mean, std, source = NORMALISATIONS[name]

    def to_pixels(r):
        return [float(f"{r * s:.4g}") for s in std]

    units = {"lc_radius": to_pixels(cfg.lc_radius), "pgd_eps": [to_pixels(e) for e in cfg.pgd_eps],
             "pgd_alpha": to_pixels(cfg.pgd_alpha)}
    print(f"radii in normalised units; per channel in [0, 1] pixels: LC r {units['lc_radius']}, PGD eps "
          f"{units['pgd_eps']}, alpha {units['pgd_alpha']}")
    return {"pixel_units": units, "normalisation": dict(name=name, mean=list(mean), std=list(std), source=source)}


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


@dataclasses.dataclass(frozen=True)
class Probes:
    """What every evaluation of a run measures, fixed for the whole run (measure, evaluate_and_log).
    Points are model inputs in [0, 1] (pixels; one-hot entries). PGD attacks, and rank is taken on,
    the first cfg.pgd_points and cfg.rank_points test points. A missing or misspelt field is a TypeError."""
    train: tuple  # (x, y): train accuracy and loss
    test: tuple  # (x, y): test accuracy and loss; PGD and rank on its first points; LC's boundary points between them
    loss_fn: object  # loss_fn(logits, y): the training loss
    lc_points: dict  # {name: points} where LC is taken: train, test, random (boundary is added)
    directions: torch.Tensor  # (P, D) orthonormal LC directions, in the radii's units (random_directions)
    anchors: tuple  # (x, y): three points that span the partition pictures' plane (anchor_points)
    units: str = "none"  # the radii's units: none = the inputs'; a NORMALISATIONS name = the normalised input's
    papers_clamp: str = "box"  # the papers' attack clamps to box = [0, 1] or normalised = theirs (papers_box)

    def __post_init__(self):
        if self.units != "none" and self.units not in NORMALISATIONS:
            raise ValueError(f"Probes: units {self.units!r}: use 'none' or one of {', '.join(NORMALISATIONS)}")
        if self.papers_clamp not in ("box", "normalised") or (self.papers_clamp, self.units) == ("normalised", "none"):
            raise ValueError(f"Probes: papers_clamp {self.papers_clamp!r}: use 'box', or 'normalised' with units set")


def measure(model, cfg, probes, timer, step, full=True):
    """Every measure of the papers at one step but the losses, as a dict. probes: what stays fixed
    for the run; cfg: the settings (radii in probes.units). Rank and norm; LC (mean, 99% CI) at each
    set of probes.lc_points and at decision-boundary points between test points; at every eps both
    attacks (pgd_acc_<eps>: the toolkit's, masking-free; pgd_ce32_acc_<eps>: the papers', from x
    unless cfg.ce32_random_start) from the same random starts, seeded by (seed, step) so a step's
    numbers do not depend on the steps evaluated before it; the margins' quantiles
    (margin_p10/p50/p90) and zero_grad_frac on the same points. full=False: rank and norm only."""
    x, y = (t[:cfg.pgd_points] for t in probes.test)
    normalised = probes.units != "none"
    rec = {}
    with timer("rank"):  # first: cheap, and in every evaluation (full=False: only rank and norm)
        for i, (rank, erank) in enumerate(layer_ranks(model, probes.test[0][:cfg.rank_points])):
            rec[f"rank_{i + 1}"], rec[f"erank_{i + 1}"] = rank, round(erank, 2)
    rec["weight_norm"] = weight_norm(model)
    if not full:
        return rec
    with timer("lc"):
        sets = dict(probes.lc_points)
        sets["boundary"] = boundary_points(model, sets["test"])
        directions = in_input_units(probes.directions, x.shape[1:], probes.units) if normalised else probes.directions
        for name, pts in sets.items():
            if len(pts) == 0:  # no boundary points while every test point gets the same class
                continue
            counts = local_complexity(model, pts, cfg.lc_radius, directions, cfg.lc_batch)
            rec[f"lc_{name}"], rec[f"lc_{name}_ci"] = lc_summary(counts)
    scale = channel_std(probes.units).to(x.device) if normalised else 1.0  # eps and alpha in the input's units
    ce32_lo, ce32_hi = ((0.0, 1.0) if probes.papers_clamp == "box" else
                        tuple(t.to(x.device) for t in papers_box(probes.units)))
    generator = torch.Generator(x.device).manual_seed(cfg.seed * 1_000_003 + step)
    for eps in cfg.pgd_eps:
        attack = (model, x, y, eps * scale, cfg.pgd_alpha * scale, cfg.pgd_steps)
        ce32_gen = torch.Generator(x.device).set_state(generator.get_state())  # both from the same random starts
        with timer("pgd"):
            rec[f"pgd_acc_{eps:.3g}"] = pgd_accuracy(*attack, restarts=cfg.pgd_restarts, generator=generator)
        with timer("pgd_ce32"):
            rec[f"pgd_ce32_acc_{eps:.3g}"] = pgd_accuracy(*attack, restarts=cfg.pgd_restarts, lo=ce32_lo, hi=ce32_hi,
                                                          loss="ce32", generator=ce32_gen,
                                                          random_start=cfg.ce32_random_start)
    with timer("pgd_ce32"):
        margins = logit_margins(model, x, y)
        for q in (10, 50, 90):
            rec[f"margin_p{q}"] = torch.quantile(margins, q / 100).item()
        rec["zero_grad_frac"] = zero_grad_fraction(model, x, y)
    return rec


# ----------------------------------------------------------------------------- partition picture
def anchor_points(x, y):
    """(inputs, labels) of the partition picture's three points: the first of each of three classes."""
    firsts = [int((y == c).nonzero()[0, 0]) for c in torch.unique(y)[:3].tolist()]
    index = torch.tensor(firsts if len(firsts) == 3 else [0, 1, 2], device=x.device)
    return x[index], y[index]


def partition_picture(model, anchors, path, resolution=300, margin=0.5, batch_size=1024, title="", labels=None):
    """The linear regions of model on the plane x0 + a (x1 - x0) + b (x2 - x0), a, b in [-margin,
    1 + margin], through anchors (3, ...), from each grid point's activation pattern (region_ids).
    Left: the regions in light colours. Right: the boundary density, neurons whose sign flips between
    neighbouring grid points (readable where regions are finer than the grid). Red: the decision
    boundary; A, B, C: the anchors. Returns the number of regions on the grid (a lower bound)."""
    import matplotlib
    from matplotlib.figure import Figure

    device = next(model.parameters()).device
    x0, x1, x2 = anchors.to(device).float().flatten(1)
    ticks = torch.linspace(-margin, 1 + margin, resolution, device=device)
    b, a = torch.meshgrid(ticks, ticks, indexing="ij")  # row-major: a varies along a row
    grid = x0 + einops.rearrange(a, "r c -> (r c) 1") * (x1 - x0) + einops.rearrange(b, "r c -> (r c) 1") * (x2 - x0)
    pattern_ids, classes, flips = region_ids(model, grid, anchors.shape[1:], batch_size, row=resolution)
    ids, cls, flips = (einops.rearrange(t.cpu(), "(r c) -> r c", r=resolution) for t in (pattern_ids, classes, flips))
    n_regions = len(torch.unique(ids))

    def edges(t):
        e = torch.zeros_like(t, dtype=torch.bool)
        e[:, 1:] |= t[:, 1:] != t[:, :-1]
        e[1:, :] |= t[1:, :] != t[:-1, :]
        return e.numpy()

    rng = np.random.default_rng(0)
    _, inverse = torch.unique(ids, return_inverse=True)
    regions = (0.75 + 0.25 * rng.random((n_regions, 3)))[inverse.numpy()]
    if n_regions <= resolution ** 2 / 25:  # edges only where regions are few: many make the panel solid dark
        regions[edges(ids)] = 0.15
    neighbours = torch.full(flips.shape, 2.0)  # the last column has no right and the first row no upper neighbour
    neighbours[:, -1] -= 1
    neighbours[0] -= 1
    per_edge = (flips / neighbours.clamp(min=1)).numpy()
    low, high = np.percentile(per_edge, [2, 98])
    density = matplotlib.colormaps["viridis"](np.clip((per_edge - low) / max(high - low, 1e-9), 0, 1))[..., :3]
    fig = Figure(figsize=(11, 5.3))
    axes = fig.subplots(1, 2)
    extent = (-margin, 1 + margin, -margin, 1 + margin)
    with torch.no_grad(), eval_mode(model):
        predicted = model(anchors.to(device).float()).argmax(1).tolist()
    for ax, img, what in ((axes[0], regions, f"{n_regions} regions on the grid"),
                          (axes[1], density, "boundary density")):
        img[edges(cls)] = (0.85, 0.0, 0.0)
        ax.imshow(img, origin="lower", extent=extent, interpolation="nearest")
        ax.scatter([0, 1, 0], [0, 0, 1], c="tab:blue", s=30, zorder=3)
        for name, (u, v), p, y in zip("ABC", [(0, 0), (1, 0), (0, 1)], predicted, labels or [None] * 3):
            label = f"{name}: " + ("" if y is None else f"class {y}, ") + f"predicted {p}"
            ax.annotate(label, (u, v), xytext=(4, 4), textcoords="offset points", fontsize=8,
                        color="tab:blue", bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0))
        ax.set_title(f"{title}{what}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(low, high), matplotlib.colormaps["viridis"])
    fig.colorbar(scale, ax=axes[1], fraction=0.046, pad=0.02, label="neurons that flip per grid step (2nd-98th pct.)")
    fig.suptitle("plane through three training points A, B, C (the first of three classes); red: decision boundary",
                 fontsize=9)
    fig.savefig(path, dpi=100)
    return n_regions


def region_ids(model, points, point_shape, batch_size=1024, row=None):
    """Region index of each point's activation pattern (the signs at every ReLU input), its predicted
    class and, for a row-major grid of `row` points a row, the number of neurons whose sign differs
    from the next point in the row plus the point one row up (None without `row`). Each layer's
    signs are projected on 4 random integer vectors (entries < 2^20): exact float64 sums, so
    independent of batching; two patterns collide with probability below 2^-80."""
    gen = torch.Generator().manual_seed(12345)
    weights, keys, classes, flips = {}, [], [], []  # weights: each layer's projection
    if row:
        batch_size = max(1, batch_size // row) * row  # whole rows, so neighbours are in the batch or the last row
    above = None
    started, told = time.perf_counter(), False
    with torch.no_grad(), eval_mode(model), tf32_flags(False):
        for i in range(0, len(points), batch_size):
            expected = (time.perf_counter() - started) * len(points) / max(i, 1)
            if i and not told and expected > 5:  # a slow picture says how slow, once
                print(f"partition picture: {len(points)} grid points, about {expected:.0f} s (fewer with a "
                      f"smaller --partition-resolution)", flush=True)
                told = True
            xb = points[i:i + batch_size].reshape(-1, *point_shape)
            parts, signs = [], []

            def project(layer, pre):
                bits = einops.rearrange(pre, "n ... -> n (...)") > 0
                if layer not in weights:
                    weights[layer] = torch.randint(0, 2**20, (bits.shape[1], 4), generator=gen).double().to(xb.device)
                parts.append(bits.double() @ weights[layer])
                signs.append(bits)

            with relu_inputs(model, project):
                classes.append(model(xb).argmax(1))
            keys.append(torch.cat(parts, 1))
            if row:
                bits = einops.rearrange(torch.cat(signs, 1), "(r c) n -> r c n", c=row)
                count = torch.zeros(bits.shape[:2], dtype=torch.long, device=bits.device)
                count[:, :-1] += (bits[:, 1:] != bits[:, :-1]).sum(2)
                count[1:] += (bits[1:] != bits[:-1]).sum(2)
                if above is not None:
                    count[0] += (bits[0] != above).sum(1)
                above = bits[-1]
                flips.append(count.reshape(-1))
    _, ids = torch.unique(torch.cat(keys), dim=0, return_inverse=True)
    return ids, torch.cat(classes), torch.cat(flips) if row else None


# ==================== PART 2 of 3, BOOKKEEPING: how the scripts run (measurement readers can stop here)
# ----------------------------------------------------------------------------- errors, device
def die(message):
    """A usage error: one line on stderr, exit code 2, no traceback; a run folder this process holds is
    let go (release), so a refusal leaves no lock behind."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    for held in list(_LOCKS):
        release(Path(held.name).parent)
    raise SystemExit(2)


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu. On CUDA training may use TF32 (the measurements turn
    it off: tf32_flags). On CPU torch uses every core; give runs that share it OMP_NUM_THREADS=1."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name not in ("cuda", "mps", "cpu"):
        die(f"unknown --device {name!r}; use auto, cuda, mps or cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        die(f"--device {name} asked for but this machine has no usable {name.upper()} device; use --device cpu "
            f"(or auto)")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def sync(device):
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


def make_optimizer(cls, params, **kwargs):  # fused where the device has it: one kernel a step, no host-device sync
    params = list(params)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kwargs)


def compiled(model, enabled, device):  # --compile: the training step's model, with CUDA graphs on a GPU
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None) if enabled else model


# ----------------------------------------------------------------------------- evaluation step, schedule, timing
def evaluate_and_log(model, optimizer, generators, cfg, step, probes, run, timer, full=True, batch_loss_max=None):
    """One evaluation step: train and test accuracy and loss, measure(), the partition picture at init, at
    the fit (first train accuracy >= 99%) and at the end; one logged record, a progress line, a checkpoint.
    A step already logged is skipped; a non-finite training loss ends the run in one line. batch_loss_max:
    a 0-d tensor, the worst batch loss since the last evaluation (the spikes sparse evaluations miss)."""
    logged = read_metrics(run)
    if logged and logged[-1]["step"] >= step:
        return
    timer.stop_training()
    rec = {"step": step}
    if batch_loss_max is not None and step > 0:
        rec["batch_loss_max"] = batch_loss_max.item()
        batch_loss_max.zero_()
    with timer("eval"):
        rec["train_acc"], rec["train_loss"] = evaluate(model, *probes.train, probes.loss_fn)
        rec["test_acc"], rec["test_loss"] = evaluate(model, *probes.test, probes.loss_fn)
    if not math.isfinite(rec["train_loss"]):
        log_metrics(run, rec)
        write_csv(run)
        plot_run(run)
        die(f"training loss is {rec['train_loss']} at step {step}; lower --lr (or --init-scale) and start again "
            f"in a new --out (the metrics so far are in {run})")
    rec.update(measure(model, cfg, probes, timer, step, full))
    name = "init" if step == 0 else "end" if step == cfg.steps else None
    if name is None and full and rec["train_acc"] >= 0.99 and not (Path(run) / "partition_fit.png").exists():
        name = "fit"
    if name:
        with timer("partition"):
            partition_picture(model, probes.anchors[0], Path(run) / f"partition_{name}.png", cfg.partition_resolution,
                              title=f"step {step}: ", labels=probes.anchors[1].tolist())
    log_metrics(run, rec)
    shown = " ".join(f"{k} {v:.3g}" for k, v in rec.items()
                     if k in ("train_acc", "test_acc", "lc_train", "lc_boundary", "margin_p90", "zero_grad_frac")
                     or k.startswith(("pgd_acc", "pgd_ce32")))
    print(f"step {step:>7}/{cfg.steps} ({100 * step / max(cfg.steps, 1):5.1f}%) | {shown}", flush=True)
    with timer("checkpoint"):
        save_checkpoint(run, model, optimizer, step, generators, timer.totals())
    timer.start_training()


def log_steps(total, n=40, every=0):
    """About n steps from 0 to total, evenly spaced on a log axis, and each multiple of every > 0."""
    steps = np.unique(np.round(np.geomspace(1, max(total, 1), n)).astype(int)).tolist()
    steps += list(range(every, total, every)) if every else []
    return sorted({s for s in [0, *steps, total] if s <= total})


class Timer:
    """Wall time per category: a measurement (with timer("lc"): ...) syncs the device at both ends;
    training is timed per segment between evaluations (one sync each): no training step waits."""

    def __init__(self, device):
        self.device, self.seconds, self.carried = device, {}, {}  # carried: earlier processes' (restore)
        self.start = self.last_beat = time.perf_counter()
        self.segment, self.evaluations = None, 0

    def _add(self, name, since):
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since

    @contextlib.contextmanager
    def __call__(self, name):
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, t)

    def start_training(self):
        sync(self.device)
        self.segment = time.perf_counter()

    def stop_training(self):
        if self.segment is not None:
            self._add("train", self.segment)
        self.segment, self.evaluations = None, self.evaluations + 1

    def heartbeat(self, step, first_step, total, eval_steps=(), every=30.0):
        """Every `every` seconds a line: steps/s and the time left (training at the rate so far, the
        evaluations left at their mean cost). One clock read a step, no sync."""
        now = time.perf_counter()
        if now - self.last_beat < every:
            return
        self.last_beat = now
        trained = self.seconds.get("train", 0.0) + (now - self.segment if self.segment else 0.0)
        rate = (step - first_step) / trained if trained else 0.0
        per_eval = sum(v for k, v in self.seconds.items() if k not in ("train", "setup")) / max(self.evaluations, 1)
        evals_left = sum(s > step for s in eval_steps)
        left = (total - step) / rate + evals_left * per_eval if rate else 0.0
        print(f"step {step:>7}/{total} ({100 * step / max(total, 1):5.1f}%) {rate:7.0f} it/s, about {left / 60:.0f} "
              f"min left ({evals_left} evaluations of ~{per_eval:.0f} s to go)", flush=True)

    def totals(self):  # seconds per category and wall seconds, the run's earlier processes included
        seconds = {k: self.carried.get(k, 0.0) + self.seconds.get(k, 0.0) for k in {**self.carried, **self.seconds}}
        return {**seconds, "wall": seconds.get("wall", 0.0) + time.perf_counter() - self.start}

    def report(self, train_steps):  # the whole run's time breakdown; train_steps: trained in all its processes
        seconds = self.totals()
        wall = seconds.pop("wall")
        measured = sum(v for k, v in seconds.items() if k not in ("train", "setup"))
        return {"wall_s": round(wall, 2), **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
                "measurement_fraction": round(measured / wall, 3) if wall else 0.0,
                "train_steps_per_s": round(train_steps / seconds["train"], 1) if seconds.get("train") else None}


# ----------------------------------------------------------------------------- configuration, entry point
def cli(main, config_class, argv=None):
    """A script's entry point: parse the config, run main, and end what cannot be checked up front
    (Ctrl-C, out of memory, a full disk) in one line that says how to go on; what was logged stays."""
    cfg = parse_config(config_class, argv)
    go_on = f"python {Path(sys.argv[0]).name} --out {cfg.out} --resume"
    try:  # the plots come at the end of a run: a mistyped back-end must not wait for them
        import matplotlib
        matplotlib.get_backend()
    except ValueError:
        die(f"MPLBACKEND={os.environ.get('MPLBACKEND')!r} is not a matplotlib back-end; unset it, or set it to Agg")
    try:
        return main(cfg)
    except KeyboardInterrupt:
        records = read_metrics(cfg.out) if Path(cfg.out).is_dir() else []
        at = "nothing logged yet"
        if records:  # what was logged, as a table and a plot
            write_csv(cfg.out)
            plot_run(cfg.out)
            at = f"the last evaluation is at step {records[-1]['step']}; --resume goes on from the last checkpoint"
        print(f"\ninterrupted ({at}); continue with: {go_on}", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError, OSError) as e:
        text = str(e)
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate" in text:
            die(f"out of memory ({type(e).__name__}); lower --batch-size, --lc-batch, --lc-points, --pgd-points or "
                f"--rank-points (or the model's size), then start again; what was logged in {cfg.out} is kept")
        if getattr(e, "errno", None) == 28 or "No space left" in text:
            die(f"the disk is full (writing in {cfg.out}); free some space, then continue with: {go_on}")
        raise


# The fields that do not define the experiment, so --resume may change them: the schedule (a record
# depends only on its step), where data and run live, the device (each resume's is recorded).
# --compile is not among them: compiled kernels round differently.
NOT_THE_EXPERIMENT = ("steps", "evals", "evals_every", "rank_every", "device", "data_dir", "download", "out", "resume",
                      "continue_anyway")


def number(text):
    """A float from the command line; a fraction such as 8/255 is welcome."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.03 or 8/255)") from None


def whole_number(text):
    """An int from the command line; integral scientific notation such as 5e3 is welcome."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 5000 or 5e3)")
    if abs(value) > 1e12:
        raise argparse.ArgumentTypeError(f"{text!r} is too large a count (at most 1e9)")
    return int(value)


def parse_config(cls, argv=None):
    """The Config dataclass from the command line: every field a --flag, its comment the help. PRESETS
    {(field, value): {field: default}} fill the fields not given when a field has that value (--quick,
    a data set). --resume takes the stored config.json; its flags may change only NOT_THE_EXPERIMENT."""
    helps = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")  # argparse formats % in help
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.type in (tuple, "tuple"):
            parser.add_argument(flag, type=number, nargs="+", help=text)
        else:
            kind = {"int": whole_number, int: whole_number, "float": number, float: number}.get(f.type, str)
            parser.add_argument(flag, type=kind, choices=getattr(cls, "CHOICES", {}).get(f.name), help=text)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(parser.parse_args(argv)).items()}
    values = {**defaults, **given}
    for (field, value), preset in getattr(cls, "PRESETS", {}).items():  # a data set's own defaults, then --quick's
        if values[field] == value:
            values.update({k: v for k, v in preset.items() if k not in given})
    if values.get("quick") and "out" not in given:  # a quick run never takes the real run's folder
        values["out"] = values["out"].rstrip("/") + "_quick"
    if values["resume"]:  # the run's own config, checked (integrity, below), with the flags given now
        values = {**values, **stored_config(Path(values["out"]), defaults, given), **given}
    return cls(**values)


def check_config(cfg, input_dim=None):
    """Every field by its type, before anything is written: whole numbers >= 1, floats finite and > 0,
    tuples of finite numbers >= 0 (ZERO_OK fields may be 0); then what the measurements need. A script
    checks its own special fields itself. The first violation ends the program in one line."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        zero_ok = f.name in getattr(cfg, "ZERO_OK", ())
        if isinstance(value, int) and not isinstance(value, bool) and not value >= (0 if zero_ok else 1):
            die(f"{flag} {value}: must be " + ("0 or more" if zero_ok else "a positive whole number")
                + (" (0: all the training data)" if f.name == "train_size" else ""))
        if isinstance(value, int) and not isinstance(value, bool) and f.name != "seed" and value > 10**9:
            die(f"{flag} {value}: at most 1e9 (a count this large cannot run)")
        if isinstance(value, float) and not (math.isfinite(value) and (value > 0 or zero_ok and value == 0)):
            die(f"{flag} {value}: must be a finite number" + (", 0 or more" if zero_ok else " above 0"))
        if isinstance(value, tuple) and not (value and all(math.isfinite(v) and v >= 0 for v in value)):
            die(f"{flag} {' '.join(map(str, value))}: every value must be a finite number, 0 or more")
    for name in ("pgd_eps", "pgd_alpha"):
        values = getattr(cfg, name, ())
        values = values if isinstance(values, tuple) else (values,)
        if any(v >= 1 for v in values):
            die(f"--{name.replace('_', '-')} {' '.join(f'{v:g}' for v in values)}: at or above 1, the width of the "
                f"inputs' range; give radii as fractions, e.g. 8/255")
    if cfg.seed >= 2**32:
        die(f"--seed {cfg.seed}: must be below 2^32 (the measurements' generators are seeded from it)")
    if cfg.evals > 10**4:
        die(f"--evals {cfg.evals}: at most 1e4 evaluations (each one measures everything)")
    if cfg.rank_points < 2:
        die(f"--rank-points {cfg.rank_points}: at least 2 points (a covariance needs two)")
    if input_dim is not None and cfg.lc_directions > input_dim:
        die(f"--lc-directions {cfg.lc_directions}: at most the input dimension, {input_dim} (orthonormal directions)")
    return cfg


# ------------------------------------------------------------- run folder: start, log, checkpoint, resume, finish


def start_run(out, config, device, notes=None):
    """Claims the run folder (a lock) and records the run in config.json (notes: more facts); returns (run,
    checkpoint state or None). A folder with a checkpoint needs --resume (config.json gains a "resumed"
    entry); one without starts from step 0, a stopped attempt's metrics kept as metrics.failed.jsonl."""
    run = Path(out)
    has_checkpoint = (run / "checkpoint.pt").exists()
    if has_checkpoint and not config.resume:
        die(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    claim(run)
    info = {"config": dataclasses.asdict(config), "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "git_commit": git_commit(), "script": Path(sys.argv[0]).name,
            "code_sha256": code_hashes(),
            "setting": {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in
                        NOT_THE_EXPERIMENT and getattr(config, f.name) != f.default},  # what differs from the defaults
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "normalisation": {"name": "none", "source": "the model sees its inputs as given: [0, 1] pixels (one-hot "
                              "entries for modular arithmetic); radii are in those units"},
            **(notes or {})}
    # every refusal below (die) leaves the folder as it was: the lock goes with it
    state = read_checkpoint(run, config.steps) if has_checkpoint else None
    if state is not None and int(state["step"]) == config.steps and (run / "summary.json").exists():
        print(f"{run} finished at step {config.steps}: nothing to do, nothing changed (give --steps N to extend it)")
        release(run)
        raise SystemExit(0)
    if has_checkpoint:
        info = resumed_record(run, info, state, config)
    else:
        if config.resume:
            print(f"{run}: no checkpoint yet, so the run starts from step 0")
        if (run / "metrics.jsonl").exists():
            os.replace(run / "metrics.jsonl", run / "metrics.failed.jsonl")
            print(f"{run}: the metrics of the attempt that stopped before its first checkpoint are kept in "
                  f"metrics.failed.jsonl")
    if state is None:
        write_atomic(run / "config.json", json.dumps(info, indent=2))
    else:  # written by restore once the checkpoint has loaded: a refused resume leaves the folder as it was
        state["config.json"] = json.dumps(info, indent=2)
    return run, state


def write_atomic(path, data):
    """Text, bytes or tensors (torch.save) via a synced temporary file and a rename: a kill or a full
    disk mid-write leaves the old file whole. The one writer of every file a run rewrites."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if not isinstance(data, (str, bytes)):  # serialised in memory, so a full disk raises a plain OSError
        buffer = io.BytesIO()
        torch.save(data, buffer)
        data = buffer.getvalue()
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log_metrics(run, record):
    """Appends one JSON line, synced (a crash loses nothing logged); NaN and infinities become null."""
    strict = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(strict, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run, up_to_step=None):
    """The logged records; a half-written last line (a killed run) is skipped with a warning."""
    path, records = Path(run) / "metrics.jsonl", []
    lines = path.read_text().splitlines() if path.exists() else []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipped a half-written line (the run was killed while writing)")
                continue
            die(f"{path}:{i + 1}: not JSON; the file is damaged: restore it (or remove that line)")
        if not (isinstance(record, dict) and type(record.get("step")) is int):  # (a bool is not a step)
            die(f"{path}:{i + 1}: not a record of this toolkit (a JSON object with a whole-number step); restore the "
                f"file (or remove that line)")
        records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def truncate_metrics(run, step):  # on resume: the records after the checkpoint's step are redone
    records = read_metrics(run, up_to_step=step)
    write_atomic(Path(run) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def write_csv(run):
    records = read_metrics(run)
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(Path(run) / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)


def save_checkpoint(run, model, optimizer, step, generators, seconds=None):
    """Model, optimiser, step, config.json's config and every RNG state, written atomically."""
    try:  # the experiment as config.json states it, so a resume can tell whether that file was edited
        config = json.loads((Path(run) / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        config = None
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": config,
             "rng_cpu": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()},
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "seconds": seconds or {}}
    write_atomic(Path(run) / "checkpoint.pt", state)


def restore(run, state, model, optimizer, generators, timer=None):
    """Records the model's structure in config.json (a resumed run must have the same), loads the
    checkpoint into model, optimiser and RNGs and returns its step; 0 for a new run (state None)."""
    info = json.loads(state["config.json"]) if state else json.loads((Path(run) / "config.json").read_text())
    structure = {"parameters": sum(p.numel() for p in model.parameters()),
                 "layers": [type(m).__name__ for m in model.modules()], "printed": repr(model)}
    stored = info.get("model", structure)
    if (stored["parameters"], stored["layers"]) != (structure["parameters"], structure["layers"]):
        die(f"--resume: the model in this script differs from the one {run} was trained with (config.json: model); "
            f"start a new --out for the changed model")
    info.setdefault("model", structure)  # what was built, so a hand-edited model shows in the run folder
    if state is None:
        write_atomic(Path(run) / "config.json", json.dumps(info, indent=2))
        return 0
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        for k, g in generators.items():
            g.set_state(state["generators"][k])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        die(f"--resume: the checkpoint in {run} does not fit this script's model and generators "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); start a new --out")
    write_atomic(Path(run) / "config.json", json.dumps(info, indent=2))  # the resume, now that the states loaded
    if timer is not None:  # the time earlier processes spent, up to this checkpoint
        timer.carried = {k: float(v) for k, v in state.get("seconds", {}).items()}
    truncate_metrics(run, state["step"])
    print(f"{run}: resumed from the checkpoint at step {state['step']}", flush=True)
    return state["step"]


def onset_summary(records, tol=0.03):  # tol: accuracies this close to the final value count as the same level
    """Grokking onsets: the fit (first train accuracy >= 99%), then from it the first step where test and
    each PGD accuracy reach 99% of their final value and never again fall more than tol below that level
    (an early peak that collapses is not the onset), and the delays. An onset needs a plateau (the last
    three evaluations within tol of the final value, more than tol above the curve's lowest); else
    <key>_no_onset says why: no_rise, still_rising or not_settled. Plus LC at init, min, max and end."""
    if not records:
        return {}
    fit = next((r["step"] for r in records if (r.get("train_acc") or 0) >= 0.99), None)
    after = [r for r in records if r["step"] >= (fit or 0)]
    last = records[-1]
    out = {"train_acc_99_step": fit}
    for key in [k for k in last if k == "test_acc" or k.startswith(("pgd_acc", "pgd_ce32_acc"))]:
        out[f"{key}_final"] = last[key]
        curve = [(r["step"], r[key]) for r in after if r.get(key) is not None]
        if last[key] is None or not curve:
            continue
        tail, level = [v for _, v in curve[-3:]], 0.99 * last[key]
        if last[key] <= min(r[key] for r in records if r.get(key) is not None) + tol:
            out[f"{key}_no_onset"] = "no_rise"
        elif any(abs(v - last[key]) > tol for v in tail):
            out[f"{key}_no_onset"] = "still_rising" if tail[0] < last[key] - tol else "not_settled"
        fell = max((i for i, (_, v) in enumerate(curve) if v < level - tol), default=-1)  # its last fall below
        onset = None if f"{key}_no_onset" in out else next(s for s, v in curve[fell + 1:] if v >= level)
        out[f"{key}_99pct_of_final_step"] = onset
        if onset is not None and fit is not None:
            out[f"{key}_delay_steps"] = onset - fit
    lc = [r["lc_train"] for r in records if r.get("lc_train") is not None]
    if lc:
        out.update(lc_train_init=lc[0], lc_train_min=min(lc), lc_train_max=max(lc), lc_train_end=lc[-1])
    return out


def write_summary(run, time_report=None):  # summary.json: the onsets, and the time breakdown when given
    summary = {**onset_summary(read_metrics(run)), **({"time": time_report} if time_report else {})}
    write_atomic(Path(run) / "summary.json", json.dumps(summary, indent=2))
    return summary


def finish_run(run, timer, train_steps):
    """metrics.csv, metrics.png and summary.json (printed); the folder is released."""
    timer.stop_training()
    with timer("plot"):
        write_csv(run)
        plot_run(run)
    summary = write_summary(run, timer.report(train_steps))
    print(json.dumps(summary, indent=2))
    release(run)
    return summary


# ----------------------------------------------------------------------------- integrity: the same run, or a refusal
# What makes a resumed run the same run: the lock (claim, release), provenance (git commit, code
# hashes), the data's fingerprint, the checks of a resume and of its checkpoint. A reader may skip this.
_LOCKS = []  # open lock files: held for the life of the process


def claim(run):
    """Makes the run folder and takes its lock (run/.lock, holding this process's pid) for the life of
    the process; a folder another process holds is refused."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = open(run / ".lock", "a+")
    except OSError as e:
        die(f"cannot write the run folder {run} ({e.strerror}); choose another --out")
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        pass
    except OSError:
        lock.seek(0)
        die(f"{run} is in use by another process (pid {lock.read().strip() or '?'}); wait for it to end or choose "
            f"another --out")
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    _LOCKS.append(lock)


def release(run):
    """Lets go of the run folder: its lock file goes (a finished folder holds no lock)."""
    lock = Path(run) / ".lock"
    for held in [f for f in _LOCKS if Path(f.name) == lock]:
        lock.unlink(missing_ok=True)
        held.close()
        _LOCKS.remove(held)


def stored_config(out, defaults, given):
    """--resume: the config the run in out started with (config.json), refused when it cannot be the
    same experiment: no config.json, another script's run, an edited or damaged file, an older
    version's run without some of today's fields, a flag given now that defines the experiment."""
    stored_path = out / "config.json"
    if not stored_path.exists():
        if (out / "checkpoint.pt").exists():
            die(f"--resume: {out} has a checkpoint but no config.json (deleted?); without it the run cannot "
                f"be continued safely: restore config.json, or start a new --out")
        die(f"--resume: there is no run in {out} (no config.json); check --out, or drop --resume to start "
            f"a new run there")
    if not (out / "checkpoint.pt").exists():
        return {}  # no checkpoint yet: the run starts from step 0 with the flags given now
    try:
        info = json.loads(stored_path.read_text())
        stored = info["config"]
    except (ValueError, KeyError) as e:
        die(f"{stored_path} is not a config this toolkit wrote ({e}); start a new run with another --out")
    made_by, this = script_of(info), Path(sys.argv[0]).name
    if made_by and this.startswith("exp_") and made_by != this:
        die(f"--resume: {out} holds a run of {made_by}, not of {this}; resume it with {made_by}")
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in defaults}
    for k, v in stored.items():  # the types this script's fields have (JSON: exactly int, float, bool, str)
        want = type(defaults[k])
        if not (type(v) is want or (want, type(v)) == (float, int) or
                (want is tuple and all(type(e) in (int, float) for e in v))):
            die(f"{stored_path}: {k} is {v!r}, not a {want.__name__}; the file was edited or damaged: restore it, "
                f"or start a new --out")
    newer = sorted(set(defaults) - set(stored) - set(NOT_THE_EXPERIMENT))
    if newer:
        die(f"--resume: {out} was made by an older version of this script, without "
            + ", ".join(f"--{k.replace('_', '-')}" for k in newer) + "; today's defaults could change the "
            "experiment, so start a new --out (or add the value it ran with to config.json)")
    changed = [k for k, v in given.items() if k not in NOT_THE_EXPERIMENT and k in stored and stored[k] != v]
    if changed:
        die(f"--resume: {out} holds a run with " + ", ".join(f"--{k.replace('_', '-')} {stored[k]}" for k in
            changed) + " (given: " + ", ".join(f"{given[k]}" for k in changed) + "); these define the experiment "
            f"and cannot change on resume (only {', '.join(NOT_THE_EXPERIMENT)} can): drop them, or start a new --out")
    return stored


def read_checkpoint(run, steps):
    """The checkpoint (weights_only: loading runs no code), checked before anything is written: its
    entries, a whole-number step between 0 and --steps that metrics.jsonl logged. A damaged or
    inconsistent one ends the program in one line."""
    path = Path(run) / "checkpoint.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "optimizer", "step", "generators", "rng_cpu", "rng_cuda") if k not in state]
    except Exception as e:  # torch.load raises many types on a damaged file
        die(f"{path} is damaged or not a checkpoint of this toolkit ({type(e).__name__}); start again in a new --out")
    if missing:
        die(f"{path} lacks {', '.join(missing)}: not a checkpoint of this toolkit; start again in a new --out")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        die(f"{path}: its step {step!r} is not a whole number >= 0; the file is damaged, start again in a new --out")
    if step > steps:
        die(f"--resume: {run} is at step {step}, past --steps {steps}; give --steps {step} or more")
    logged = {r["step"] for r in read_metrics(run)}
    if step not in logged:
        die(f"{path} is at step {step} but metrics.jsonl logged no evaluation there; the two files do not belong "
            f"together: restore them, or start a new --out")
    return state


def resumed_record(run, info, state, config):
    """config.json's original record with this resume appended, once the checkpoint and this process
    agree with it: the same code (else --continue-anyway), the same data, config.json not edited."""
    stored = json.loads((run / "config.json").read_text())
    anyway = []  # what could not be checked, continued with --continue-anyway
    changed_code = sorted(k for k, v in info["code_sha256"].items() if stored.get("code_sha256", {}).get(k) != v)
    if changed_code:
        anyway.append(f"changed code: {', '.join(changed_code)}")
    if "data" in info and "data" not in stored:
        anyway.append("data made before fingerprints")
    if anyway and not getattr(config, "continue_anyway", False):
        die(f"--resume: {run} cannot be continued as it started ({'; '.join(anyway)}): the records could mix two "
            f"versions of the code or two data sets. Continue knowingly with --continue-anyway (recorded in "
            f"config.json), or start a new --out")
    if "data" in stored and "data" in info and stored["data"] != info["data"]:
        die(f"--resume: {run} was trained on other data (shapes {stored['data']['shapes']}, hash "
            f"{stored['data']['sha256']}; now {info['data']['shapes']}, {info['data']['sha256']}); point --data-dir "
            f"at the data it ran on, or start a new --out")
    edited = [k for k, v in json.loads(json.dumps(state.get("config") or {})).items()
              if k not in NOT_THE_EXPERIMENT and stored["config"].get(k) != v]
    if edited:
        die(f"--resume: {run}/config.json no longer matches its checkpoint ({', '.join(edited)} differ); "
            f"restore config.json or start a new --out")
    changed = {k: v for k, v in json.loads(json.dumps(info["config"])).items() if stored["config"].get(k) != v}
    stored.setdefault("resumed", []).append({k: info[k] for k in ("command", "git_commit", "device", "started")}
                                            | {"changed": changed} | ({"continued_anyway": anyway} if anyway else {}))
    stored["config"].update({k: v for k, v in changed.items() if k in NOT_THE_EXPERIMENT and k != "resume"})
    return stored  # the original record, with the schedule now in force (a later --resume continues it)


def git_commit():  # the checkout's commit, "-dirty" when tracked files differ from it; None outside git
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],
                             capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def script_of(info):
    """The script that made a run, from its config.json (older runs: from the command line)."""
    words = info.get("command", "").split()
    return info.get("script") or (Path(words[1]).name if len(words) > 1 else None)


def code_hashes():
    """sha256 of the running script and of common.py: identifies the code of a run made outside a
    git checkout (a script copied into coursework)."""
    files = {Path(sys.argv[0]).resolve(), Path(__file__).resolve()}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(files) if p.is_file()}


def data_fingerprint(*tensors):
    """Shapes and a hash of the data actually loaded (train and test tensors): a moved folder keeps
    its fingerprint, other contents do not. For config.json, so --resume can refuse other data."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"shapes": [list(t.shape) for t in tensors], "sha256": digest.hexdigest()[:20]}


# ----------------------------------------------------------------------------- plots
PANELS = [  # (title, which keys, y-axis label)
    ("accuracy", lambda k: k in ("train_acc", "test_acc"), "accuracy"),
    ("loss", lambda k: k in ("train_loss", "test_loss", "batch_loss_max"), "loss (log)"),
    ("local complexity", lambda k: k.startswith("lc_") and not k.endswith("_ci"), "cut neurons per point"),
    ("PGD accuracy", lambda k: k.startswith("pgd_") or k == "zero_grad_frac", "accuracy under attack"),
    ("logit margin", lambda k: k.startswith("margin_p"), "z_y - max_j z_j at PGD points (symlog)"),
    ("feature rank per layer", lambda k: k.startswith("rank_"), "rank of cov"),
    ("effective rank per layer", lambda k: k.startswith("erank_"), "effective rank"),
    ("weight norm", lambda k: k == "weight_norm", "L2 norm"),
]


def _style(key, keys):
    """PGD: a colour per eps, solid the toolkit's attack, dashed the papers'; zero-gradient fraction
    dotted black. Rank: layers coloured first (dark) to last (yellow)."""
    if key == "zero_grad_frac":
        return {"color": "black", "ls": ":"}
    if key.startswith(("rank_", "erank_")):
        import matplotlib
        layers = sorted(int(k.split("_")[1]) for k in keys)
        position = layers.index(int(key.split("_")[1])) / max(len(layers) - 1, 1)
        return {"color": matplotlib.colormaps["viridis"](position)}
    if not key.startswith("pgd_"):
        return {}
    radii = list(dict.fromkeys(k.rsplit("_", 1)[1] for k in keys if k.startswith("pgd_")))
    return {"color": f"C{radii.index(key.rsplit('_', 1)[1]) % 10}", "ls": "--" if "ce32" in key else "-"}


def _label(key):
    """Legend text: the PGD keys say which attack and which radius."""
    if key.startswith("pgd_ce32_acc_"):
        return f"papers' attack, ε {key.rsplit('_', 1)[1]}"
    if key.startswith("pgd_acc_"):
        return f"toolkit's attack, ε {key.rsplit('_', 1)[1]}"
    return {"zero_grad_frac": "zero-gradient fraction", "batch_loss_max": "worst batch since last eval"}.get(key, key)


def plot_run(run, path=None):
    """Every logged metric against the step on a log axis, one panel per group of PANELS, into
    run/metrics.png (LC with its 99% CI band); also while the run goes on. Returns the panel titles."""
    records = read_metrics(run)
    if not records:
        die(f"no metrics in {run}/metrics.jsonl to plot")
    fig, panels, zero_at = panel_figure([records], figure_title(run))
    for ax, (panel, ks, ylabel) in panels:
        for k in ks:
            xs, ys = curve(records, k, zero_at)
            if not len(xs):
                continue
            line, = ax.plot(xs, ys, marker=".", ms=3, lw=1.2, label=_label(k), **_style(k, ks))
            cx, cy = curve(records, k + "_ci", zero_at)
            if len(cx):
                mid = dict(zip(xs, ys))
                centre = np.array([mid[x] for x in cx])
                ax.fill_between(cx, centre - cy, centre + cy, alpha=0.2, color=line.get_color())
        finish_panel(ax, panel, ylabel)
    save_figure(fig, path or Path(run) / "metrics.png")
    return [panel for _, (panel, _, _) in panels]


def curve(records, key, zero_at):
    """(steps, values) of key where it is a finite number; step 0 drawn at zero_at (log axis)."""
    pairs = [(r["step"] or zero_at, r[key]) for r in records if isinstance(r.get(key), (int, float))
             and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def panel_figure(runs, title):
    """A figure with one panel for each group of PANELS that the runs' records fill; returns (figure,
    [(axis, (panel title, keys, y label))], the x at which step 0 is drawn: half the first step).
    A matplotlib Figure, not pyplot: a notebook's backend and figures are left alone."""
    from matplotlib.figure import Figure
    everything = [r for records in runs for r in records]
    keys = list(dict.fromkeys(k for r in everything for k in r if k != "step" and isinstance(r[k], (int, float))))
    panels = [p for p in ((t, [k for k in keys if pick(k)], y) for t, pick, y in PANELS) if p[1]]
    cols, rows = 3, math.ceil(len(panels) / 3)
    fig = Figure(figsize=(5.2 * cols, 4.8 * rows))  # inches: room for titles, legends below, footnote
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("\n".join(textwrap.fill(line, 160) for line in title.split("\n")), fontsize=11)  # long settings wrap
    positive = [r["step"] for r in everything if r["step"] > 0]
    return fig, list(zip(axes.flat, panels)), min(positive) / 2 if positive else 1


def finish_panel(ax, panel, ylabel):
    ax.set_xscale("log")
    if panel == "loss" and any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_yscale("log")
    if panel == "logit margin":
        ax.set_yscale("symlog", linthresh=1)
        ax.axhline(90, color="grey", ls=":", lw=1)  # about where float32 cross-entropy gradients vanish
    ax.set_title(panel, fontsize=10)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if panel.endswith("rank per layer") and panel.startswith("feature"):
        from matplotlib.ticker import MaxNLocator
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a rank is a whole number
    handles, labels = ax.get_legend_handles_labels()
    if panel.endswith("rank per layer") and len(handles) > 6:  # many layers: six named, the colours tell the rest
        named = sorted({round(i) for i in np.linspace(0, len(handles) - 1, 6)})
        handles, labels = [handles[i] for i in named], [labels[i] for i in named]
    if handles:  # below the panel, never over the data
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                  ncol=1 if len(handles) <= 2 else 2 if len(handles) <= 6 else 3)


def save_figure(fig, path, footer="step 0 is drawn at half the first logged step (log axis); LC bands: 99% "
                "confidence interval of the mean over points; PGD: a colour per ε, solid the toolkit's attack, "
                "dashed the papers', dotted black the zero-gradient fraction"):
    height = fig.get_figheight()
    fig.text(0.5, 0.003, footer, ha="center", va="bottom", fontsize=8, color="0.3")
    # a fixed layout: tight_layout measured every tick label twice and took half the plotting time
    fig.subplots_adjust(left=0.055, right=0.99, bottom=1.3 / height, top=1 - 1.05 / height, wspace=0.25, hspace=0.75)
    fig.savefig(path, dpi=100)


def figure_title(run):
    """The script and the fields that differ from its defaults (config.json's setting; else the
    folder's name), and the units of the LC radius and PGD's eps."""
    try:
        info = json.loads((Path(run) / "config.json").read_text())
    except (OSError, ValueError):
        return f"{Path(run).name}\nunits of r and ε: see the script"
    setting = info.get("setting")
    title = Path(run).name if setting is None else f"{info.get('script', Path(run).name)}: " + (
        ", ".join(f"{k}={v}" for k, v in setting.items()) or "its defaults")
    name = info.get("normalisation", {}).get("name")
    if name not in (None, "none"):
        return f"{title}\nr and ε in normalised units ({name} mean/std; config.json: pixel_units)"
    if name is None and "pixel_units" in info:  # runs made before config.json named its normalisation
        return f"{title}\nr and ε in normalised units (config.json: pixel_units)"
    return f"{title}\nr and ε in input units ([0, 1] pixels; one-hot entries for modular arithmetic)"


# ==================== PART 3 of 3, DATA: the loaders, each refusing malformed files in one line
# ----------------------------------------------------------------------------- MNIST, Fashion-MNIST, CIFAR-10
def check_data(source, x_train, y_train, x_test, y_test, image_shape, n_classes):
    """Refuses, naming the source, data the scripts would misuse: another image shape or dtype,
    labels not 1-D integers in 0..C-1, image and label counts that differ, an empty split."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if tuple(x.shape[1:]) != tuple(image_shape):
            die(f"{source}: {split} images must be {'x'.join(map(str, image_shape))} each, got {tuple(x.shape[1:])}")
        if x.dtype != torch.uint8:
            die(f"{source}: {split} images are {x.dtype}, expected uint8 (pixel values 0..255)")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            die(f"{source}: {split} labels must be a 1-D array of integers, got {tuple(y.shape)} {y.dtype}")
        if len(x) != len(y):
            die(f"{source}: {len(x)} {split} images but {len(y)} labels")
        if len(x) < (3 if split == "train" else 2):
            die(f"{source}: {len(x)} {split} images; at least {3 if split == 'train' else 2} (the partition pictures "
                f"need three training images, a covariance two test images)")
        if y.min() < 0 or y.max() >= n_classes:
            die(f"{source}: {split} labels must lie in 0..{n_classes - 1}, found {int(y.min())}..{int(y.max())}")
    if len(torch.unique(y_train)) < 2:
        die(f"{source}: every training label is {int(y_train[0])}; a classifier needs at least two classes")


def read_idx(path):
    """An IDX file of the MNIST distribution (plain or .gz) as a uint8 tensor; a truncated or
    foreign file ends the program with one line naming it."""
    path = Path(path)
    try:
        data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as e:
        die(f"{path}: cannot be read ({e})")
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        die(f"{path}: not an IDX file of unsigned bytes (the MNIST format)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != 4 + 4 * ndim + math.prod(shape):
        die(f"{path}: {len(data)} bytes, but its header announces shape {shape}: truncated or damaged; get it again")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def idx_file(folder, name):
    """The IDX file name in folder, plain or .gz as distributed; None when neither is there."""
    return next((p for p in (Path(folder) / name, Path(folder) / f"{name}.gz") if p.is_file()), None)


def load_npz(path):
    """(x_train, y_train, x_test, y_test) from an .npz holding those four arrays."""
    path = Path(path)
    if not path.is_file():
        die(f"{path} does not exist; pass --data-dir <.npz file or torchvision root>")
    try:
        with np.load(path) as d:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                die(f"{path} lacks {sorted(missing)}; it needs x_train, y_train, x_test, y_test")
            arrays = [torch.as_tensor(np.asarray(d[k])) for k in ("x_train", "y_train", "x_test", "y_test")]
    except Exception as e:  # a damaged zip, pickled objects, a file of another kind
        die(f"{path}: not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return arrays


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(data_dir, dataset="mnist", download=True):
    """(x_train, y_train, x_test, y_test): uint8 images (N, 28, 28) and int64 labels, checked, from
    an .npz, a folder with the four IDX files, or torchvision's root (<data_dir>/MNIST/raw/ or
    FashionMNIST/raw/), plain or .gz; downloaded through torchvision when missing and allowed."""
    path = Path(data_dir)
    if path.suffix == ".npz":
        arrays, source = load_npz(path), path
    else:
        folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset]
        raw = path / folder / "raw"

        def find():  # torchvision's layout, or the four files in the folder itself
            return {n: idx_file(raw, n) or idx_file(path, n) for n in MNIST_FILES}

        found, failed = find(), ""
        if None in found.values() and download:
            import torchvision
            try:
                for train in (True, False):
                    getattr(torchvision.datasets, folder)(path, train=train, download=True)
            except Exception as e:  # no network, a server error, a full disk: its reason goes into the one line
                failed = f"; the download failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            found = find()
        missing = [n for n, p in found.items() if p is None]
        if missing and all(n.startswith("train") for n in missing):
            src = found["t10k-images-idx3-ubyte"].parent
            die(f"{dataset} in {src}/ has only the test files (t10k-*): split them into a train and a test part with "
                f"`python tools/runs.py split-mnist {src} data/mnist_split --train 5000`, then pass --data-dir "
                f"data/mnist_split (README, On a laptop CPU)")
        if missing:
            have = sorted(p.name for p in raw.iterdir()) if raw.is_dir() else []
            die(f"{dataset} in {raw}/: found {', '.join(have) if have else 'nothing'}; missing {', '.join(missing)} "
                f"(plain or .gz){failed}; put them there or pass --data-dir <root or .npz>"
                + ("" if download else " (or drop --no-download to download them)"))
        arrays, source = [read_idx(found[n]) for n in MNIST_FILES], raw
    check_data(source, *arrays, image_shape=(28, 28), n_classes=10)
    x_train, y_train, x_test, y_test = arrays
    return x_train, y_train.long(), x_test, y_test.long()


def load_cifar10(data_dir, download=True):
    """(x_train, y_train, x_test, y_test): uint8 NHWC images and int64 labels, checked, from an
    .npz, a folder of class folders (load_image_folders) or torchvision's root
    <data_dir>/cifar-10-batches-py/ (downloaded there when missing and allowed)."""
    path = Path(data_dir)
    if path.suffix == ".npz":
        arrays, source = load_npz(path), path
    elif (path / "train").is_dir():
        x_train, y_train, x_test, y_test = load_image_folders(path, 32)
        arrays, source = [x_train.permute(0, 2, 3, 1), y_train, x_test.permute(0, 2, 3, 1), y_test], path
    else:
        import torchvision
        source = path / "cifar-10-batches-py"
        try:
            train = torchvision.datasets.CIFAR10(path, train=True, download=download)
            test = torchvision.datasets.CIFAR10(path, train=False, download=download)
        except Exception as e:  # missing, no network, or damaged batch files
            die(f"CIFAR-10 not usable in {source}/ (data_batch_1..5, test_batch; {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); put it there, or pass --data-dir <file.npz> with "
                f"x_train, y_train, x_test, y_test, or a folder with train/<class>/ and test/<class>/ images")
        arrays = [torch.as_tensor(np.asarray(a)) for a in (train.data, train.targets, test.data, test.targets)]
    check_data(source, *arrays, image_shape=(32, 32, 3), n_classes=10)
    x_train, y_train, x_test, y_test = arrays
    return x_train, y_train.long(), x_test, y_test.long()


# ----------------------------------------------------------------------------- folders of images (CIFAR-10, Imagenette)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def load_image_folders(root, resolution, resize=False):
    """(x_train, y_train, x_test, y_test): uint8 NCHW RGB images and int64 labels (sorted class names)
    from root/{train,test or val}/<class>/*. Every image resolution px square (resize=False), or resized
    and centre-cropped to it. Decoded once, then cached in root/tensors_<res>px_<key>.pt, the key hashing
    every file's path, size and time. A missing split or class or a bad image ends the run in one line."""
    root = Path(root)
    test_split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_split is None:
        die(f"{root}: needs train/ and test/ (or val/) folders of class folders of images; "
            f"{'test/ or val/' if (root / 'train').is_dir() else 'train/'} is missing")
    splits = {}
    for split in ("train", test_split):
        entries = sorted(p for p in (root / split).iterdir() if not p.name.startswith("."))
        stray = next((p for p in entries if not p.is_dir()), None)
        if stray is not None:
            die(f"{stray}: a file outside the class folders; images go in {root / split}/<class>/")
        splits[split] = {c.name: sorted(p for p in c.rglob("*") if p.is_file() and not p.name.startswith("."))
                         for c in entries}
    classes = list(splits["train"])
    for split, folders in splits.items():
        other = "train" if split != "train" else test_split
        missing = sorted(set(splits[other]) - set(folders))
        if missing:
            die(f"{root / split}: no class folder {', '.join(missing)} (it is in {other}/); both need the same classes")
        empty = next((c for c, files in folders.items() if not files), None)
        if empty is not None:
            die(f"{root / split / empty}: a class folder without images")
    if len(classes) < 2:
        die(f"{root}: {len(classes)} class folder(s); a classifier needs at least 2")
    files = [p for folders in splits.values() for fs in folders.values() for p in fs]
    key = hashlib.sha1((f"resize={resize};" + "".join(
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)).encode()).hexdigest()[:12]
    cache = root / f"tensors_{resolution}px_{key}.pt"
    if cache.exists():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # damaged (e.g. a killed write of an older version): decode again
            print(f"{cache} is damaged; decoding the images again")
    from PIL import Image
    import torchvision.transforms as T
    resizing = [T.Resize(resolution), T.CenterCrop(resolution)] if resize else []
    to_tensor = T.Compose(resizing + [T.PILToTensor()])
    tensors = []
    for split, folders in splits.items():
        print(f"decoding {sum(map(len, folders.values()))} images of {root / split} (cached afterwards)")
        images, labels = [], []
        for label, c in enumerate(classes):
            for path in folders[c]:
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    die(f"{path}: not an image file (PNG or JPEG expected); remove it or move it out of {root}")
                try:
                    with Image.open(path) as img:
                        rgb = img.convert("RGB")
                except Exception as e:  # PIL: truncated or not an image
                    die(f"{path}: not a readable image ({type(e).__name__}: {e}); remove or replace it")
                if not resize and rgb.size != (resolution, resolution):
                    die(f"{path}: {rgb.size[0]}x{rgb.size[1]} px, but every image must be {resolution}x{resolution}")
                images.append(to_tensor(rgb))
                labels.append(label)
        tensors += [torch.stack(images), torch.tensor(labels)]
    try:
        write_atomic(cache, tensors)
    except OSError as e:  # a read-only folder, a full disk
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        warnings.warn(f"cannot cache the decoded images in {root} ({reason}); they will be decoded again next time")
    return tensors


def take_train_subset(cfg, n_available, generator=None):
    """Indices of cfg.train_size training examples (0: all): a seeded random subset, or the first
    ones without a generator; refuses more than the data hold."""
    if cfg.train_size > n_available:
        die(f"--train-size {cfg.train_size}, but the data hold {n_available} training examples; ask for at most "
            f"{n_available} (0: all)")
    if 0 < cfg.train_size < 3:
        die(f"--train-size {cfg.train_size}: at least 3 training examples (the partition pictures need three), or 0 "
            f"for all")
    n = cfg.train_size or n_available
    return torch.randperm(n_available, generator=generator)[:n] if generator else torch.arange(n)
