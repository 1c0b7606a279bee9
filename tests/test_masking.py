"""The papers' attack (loss="ce32") against a float32 reference, and gradient masking on scaled logits:
multiplying a model's logits by k changes no decision, so true robustness is unchanged."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import trained_mlp


class Scaled(nn.Module):
    """The model with its logits multiplied by k: the same decisions, margins k times larger."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x):
        return self.model(x) * self.k


def hard_mlp(seed=0):
    """Overlapping blobs: a trained MLP that is right on most points but not all, and fooled at eps 0.5."""
    return trained_mlp(seed, centres=(0.45, 0.55), spread=0.1, steps=300)


@pytest.mark.parametrize("k", [2.0, 16.0, 1024.0])
def test_margins_scale_by_exactly_k(k):
    model, x, y = trained_mlp()
    with torch.no_grad():  # the oracle: sort each row, the margin is z_y minus the best other logit
        z = model(x).double()
        other = torch.where(z.argsort(1, descending=True)[:, 0] == y, z.sort(1, descending=True).values[:, 1],
                            z.max(1).values)
        expected = z.gather(1, y[:, None])[:, 0] - other
    got = common.logit_margins(Scaled(model, k), x, y)
    assert torch.equal(common.logit_margins(model, x, y), expected)
    assert torch.equal(got, k * expected)  # powers of two: the float32 products are exact


def test_large_margins_mask_the_papers_attack_but_not_the_default():
    model, x, y = hard_mlp()
    clean, _ = common.evaluate(model, x, y, F.cross_entropy)
    assert 0.6 < clean < 0.95

    def attack(k, loss):
        return common.pgd_accuracy(Scaled(model, k), x, y, eps=0.5, alpha=0.1, steps=10, loss=loss,
                                   random_start=False)  # from x, as the papers' attack

    ks = (1.0, 2.0**6, 2.0**10, 2.0**16)
    ce32 = [attack(k, "ce32") for k in ks]
    default = [attack(k, "log1m") for k in ks]
    zero = [common.zero_grad_fraction(Scaled(model, k), x, y) for k in ks]
    assert ce32[0] < 0.05 and zero[0] == 0.0  # unmasked: both attacks break the model
    assert all(a <= b for a, b in zip(ce32, ce32[1:])) and ce32[-1] == clean
    assert all(a <= b for a, b in zip(zero, zero[1:])) and zero[-1] == clean  # every correct point is masked
    assert all(c >= z for c, z in zip(ce32, zero))  # a point with a zero gradient never moves
    assert max(default) < 0.05  # the default attack is not fooled by the scale


def reference_ce32(model, x, y, eps, alpha, steps, noise, lo=0.0, hi=1.0):
    """The papers' PGD written out in float32: start in the ball, sign steps of the batch-mean
    cross-entropy, project, clamp; the last iterate."""
    x_adv = torch.clamp(x + eps * (2 * noise - 1), lo, hi)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = nn.CrossEntropyLoss()(model(x_adv), y)
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps)
        x_adv = torch.clamp(x_adv, lo, hi)
    return x_adv.detach()


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_ce32_equals_a_float32_reference_step_by_step(steps):
    model, x, y = hard_mlp()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    expected = reference_ce32(model, x, y, 0.1, 0.03, steps, noise)
    got = common.pgd_attack(model, x, y, 0.1, 0.03, steps, loss="ce32", generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    if steps:
        assert not torch.equal(got, reference_ce32(model, x, y, 0.1, 0.03, steps - 1, noise))


def test_ce32_scores_the_last_iterate():
    # the band model: from 0.2 with steps of 0.25, 0.45 is fooled and 0.70 is not: the papers'
    # attack counts the point as robust, the default attack as fooled
    from conftest import band_model
    model, x, y = band_model(), torch.tensor([[0.2]]), torch.tensor([0])
    kwargs = dict(eps=0.6, alpha=0.25, steps=2, random_start=False)
    assert common.pgd_accuracy(model, x, y, loss="ce32", **kwargs) == 1.0
    assert common.pgd_accuracy(model, x, y, **kwargs) == 0.0


def test_ce32_clamps_to_per_channel_bounds():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.rand(20, 3, 2, 2), torch.randint(0, 2, (20,))
    lo, hi = torch.tensor([0.1, 0.0, -0.2]).reshape(3, 1, 1), torch.tensor([0.9, 1.05, 1.1]).reshape(3, 1, 1)
    x = torch.max(torch.min(x, hi), lo)
    x_adv = common.pgd_attack(model, x, y, 0.3, 0.2, 3, lo=lo, hi=hi, loss="ce32",
                              generator=torch.Generator().manual_seed(0))
    assert (x_adv >= lo).all() and (x_adv <= hi).all()
    assert (x_adv == hi).any() and (x_adv == lo).any()  # the bounds are reached: they are what clamps


@pytest.mark.parametrize("bad", [float("nan"), -0.1])
def test_nan_or_negative_eps_is_refused(bad):
    model, x, y = trained_mlp()
    with pytest.raises(ValueError, match="eps"):
        common.pgd_accuracy(model, x, y, eps=bad, alpha=0.01, steps=2)
    with pytest.raises(ValueError, match="loss"):
        common.pgd_accuracy(model, x, y, eps=0.1, alpha=0.01, steps=2, loss="ce")


def test_integer_and_nan_inputs_are_refused_and_labels_of_any_integer_dtype_work():
    model, x, y = trained_mlp()
    with pytest.raises(ValueError, match="floating-point"):
        common.pgd_accuracy(model, (x * 255).to(torch.uint8), y, eps=0.1, alpha=0.01, steps=2)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        common.pgd_accuracy(model, bad, y, eps=0.1, alpha=0.01, steps=2)
    for labels in (y.float(), y.bool()):  # float or bool labels: a mistake, not a class index
        with pytest.raises(ValueError, match="labels must be integers"):
            common.pgd_accuracy(model, x, labels, eps=0.1, alpha=0.01, steps=2)

    def gen():
        return torch.Generator().manual_seed(0)

    want = common.pgd_accuracy(model, x, y, 0.1, 0.01, 2, generator=gen())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert common.pgd_accuracy(model, x, y.to(dtype), 0.1, 0.01, 2, generator=gen()) == want
        assert torch.equal(common.logit_margins(model, x, y.to(dtype)), common.logit_margins(model, x, y))


def many_points(x, copies=8, seed=5):
    """More points than one batch of the papers' attack (2048): jittered copies of x, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (x.repeat(copies, 1) + 0.02 * torch.randn(copies * len(x), x.shape[1], generator=g)).clamp(0, 1)


def reference_accuracy(model, x, y, eps, alpha, steps, batch):
    """Accuracy after reference_ce32 run on consecutive batches of `batch` points, from x."""
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        x_adv = reference_ce32(model, xb, yb, eps, alpha, steps, torch.full_like(xb, 0.5))  # noise 0.5: the start is x
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


@pytest.mark.parametrize("scale", ["rounding", "underflow"])
def test_ce32_on_more_than_one_batch_where_float32_matters(scale):
    """Margins of 15-40 (float32 rounds p_y to 1, so the true class's gradient entry is 0) and of 80-110
    (the other entries underflow, the batch mean decides which): on 3200 points, the toolkit's papers'
    attack equals the float32 reference run on batches of 2048, step by step."""
    model, x, y = hard_mlp()
    x = many_points(x)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correct: the margins are the model's
        median = common.logit_margins(model, x, y).median().item()
    k = (25.0 if scale == "rounding" else 95.0) / median
    scaled = Scaled(model, k)
    margins = common.logit_margins(scaled, x, y)
    low, high = (15, 40) if scale == "rounding" else (80, 110)
    assert ((margins > low) & (margins < high)).float().mean() > 0.15  # the regime the test is about
    got = common.pgd_accuracy(scaled, x, y, 0.1, 0.03, 5, loss="ce32", random_start=False)
    assert got == reference_accuracy(scaled, x, y, 0.1, 0.03, 5, batch=2048)
    if scale == "underflow":  # here the batch is part of the attack's definition
        assert got != reference_accuracy(scaled, x, y, 0.1, 0.03, 5, batch=1024)


def float64_ce_gradient(model, x, y):
    """The batch-mean cross-entropy's input gradient with the model and its arithmetic in float64."""
    x64 = x.double().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(copy.deepcopy(model).double()(x64), y), x64)
    return grad


def test_ce32_is_float32_where_float64_would_step_elsewhere():
    """Three classes, margins of 20-30: float32 rounds p_y to 1, so the true class's entry of the
    logit gradient is 0 and the step follows the other classes alone; in float64 (p_y < 1) it would
    point elsewhere. The papers' attack follows float32, step by step."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = 0.3 + 0.4 * torch.rand(500, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
        scaled = Scaled(model, 25.0 / common.logit_margins(model, x, y).median().item())
    margins = common.logit_margins(scaled, x, y)
    keep = (margins > 20) & (margins < 30)
    x, y = x[keep], y[keep]
    assert len(x) > 50
    start = torch.full_like(x, 0.5)  # noise 0.5: the reference starts at x
    got = common.pgd_attack(scaled, x, y, 0.1, 0.03, 3, loss="ce32", random_start=False)
    assert torch.equal(got, reference_ce32(scaled, x, y, 0.1, 0.03, 3, start))
    step32 = reference_ce32(scaled, x, y, 0.1, 0.03, 1, start) - x
    step64 = 0.03 * float64_ce_gradient(scaled, x, y).sign().float()
    assert (step32.sign() != step64.sign()).any(1).float().mean() > 0.3  # the regime where precision decides


def test_masking_starts_near_a_margin_of_17_when_the_other_logits_are_flat():
    """Class 0's logit is a constant, class 1's is 5 sum(x) + 14: margins of 20-28. float32 rounds
    p_1 to 1, so the input gradient is exactly 0 (zero_grad_frac 1) and the papers' attack never
    moves; in float64 (p_1 = 1 - e^-m) it is not 0, and the toolkit's attack breaks every point."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0] * 4, [5.0] * 4]))
        model.bias.copy_(torch.tensor([0.0, 14.0]))
    x = 0.3 + 0.4 * torch.rand(300, 4, generator=torch.Generator().manual_seed(0))
    y = torch.ones(300, dtype=torch.long)
    margins = common.logit_margins(model, x, y)
    assert margins.min() > 20 and margins.max() < 28
    assert (float64_ce_gradient(model, x, y) != 0).all()
    assert common.zero_grad_fraction(model, x, y) == 1.0
    attack = dict(eps=2.0, alpha=0.5, steps=5, random_start=False, lo=-1e9, hi=1e9)
    assert common.pgd_accuracy(model, x, y, loss="ce32", **attack) == 1.0
    assert common.pgd_accuracy(model, x, y, **attack) == 0.0

def test_zero_grad_fraction_counts_gradients_zero_in_every_coordinate():
    """Against a float32 batch-mean reference gradient, on margins across the underflow threshold and a
    model with a dead input coordinate (its gradient entry is always 0: it must not count alone)."""
    model, x, y = hard_mlp()
    with torch.no_grad():
        model[0].weight[:, 3] = 0.0  # input coordinate 3 reaches nothing
    x = many_points(x)
    with torch.no_grad():
        y = model(x).argmax(1)
    for k in (1.0, 60.0, 90.0, 120.0, 400.0):
        scaled = Scaled(model, k)
        zero = 0
        for i in range(0, len(x), 2048):
            xb = x[i:i + 2048].clone().requires_grad_(True)
            grad, = torch.autograd.grad(nn.CrossEntropyLoss()(scaled(xb), y[i:i + 2048]), xb)
            zero += (grad == 0).all(1).sum().item()
        assert common.zero_grad_fraction(scaled, x, y) == zero / len(x), k
    assert common.zero_grad_fraction(Scaled(model, 1.0), x, y) == 0  # the dead coordinate alone counts for nothing
    assert 0 < common.zero_grad_fraction(Scaled(model, 120.0), x, y) < 1  # across the threshold


def test_logit_margins_do_not_depend_on_the_batch():
    model, x, y = hard_mlp()
    x = many_points(x)
    y = torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(0))
    assert torch.equal(common.logit_margins(model, x, y, batch_size=1024), common.logit_margins(model, x, y, 5000))
