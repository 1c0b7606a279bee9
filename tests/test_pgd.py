"""pgd_attack and pgd_accuracy: constraints, a closed-form worst case, the margin after each step,
restarts against their probability of success, monotonicity, no side effects."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import band_model, flags_seen_inside, tf32_now, tf32_set_to, trained_mlp


def test_stays_in_the_ball_and_the_box():
    model, x, y = trained_mlp()
    x_adv = common.pgd_attack(model, x, y, eps=0.05, alpha=0.02, steps=10, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


def test_eps_zero_gives_clean_accuracy():
    model, x, y = trained_mlp()
    clean, _ = common.evaluate(model, x, y, F.cross_entropy)
    assert common.pgd_accuracy(model, x, y, eps=0.0, alpha=0.01, steps=5) == clean > 0.95


def two_class_margins(model, x, y):
    """A two-class linear model's margins (w_y - w_o) x + b_y - b_o and the L1 norms |w_y - w_o|_1."""
    w, b = model.weight.detach(), model.bias.detach()
    other = 1 - y
    return ((w[y] - w[other]) * x).sum(1) + b[y] - b[other], (w[y] - w[other]).abs().sum(1)


def test_reaches_the_closed_form_worst_case_of_a_linear_classifier():
    # two classes, logits W x + b: the worst L-inf perturbation lowers the margin by eps * |w_y - w_o|_1
    torch.manual_seed(1)
    model = nn.Linear(8, 2)
    x = torch.randn(500, 8)
    y = model(x).argmax(1).detach()
    y[::3] = 1 - y[::3]  # some points start misclassified
    margin, l1 = two_class_margins(model, x, y)
    eps = 0.3
    expected = (margin - eps * l1 > 0).sum().item() / len(x)
    got = common.pgd_accuracy(model, x, y, eps, alpha=0.2, steps=5, lo=-1e9, hi=1e9,
                              generator=torch.Generator().manual_seed(0))
    assert 0.1 < expected < 0.6
    assert got == expected


@pytest.mark.parametrize("loss", ["log1m", "ce32"])
def test_each_step_lowers_a_linear_margin_by_alpha_times_the_l1_norm(loss):
    # two classes, from x (no random start): every sign step moves each coordinate by alpha towards
    # the other class, so after k steps the margin is m - min(k alpha, eps) |w_y - w_o|_1: the number
    # of steps taken is pinned, k by k, for both attacks
    torch.manual_seed(2)
    model = nn.Linear(8, 2)
    x = torch.randn(400, 8)
    y = model(x).argmax(1).detach()
    margin, l1 = two_class_margins(model, x, y)
    alpha, eps = 0.05, 0.3
    by_steps = []
    for k in range(1, 9):
        expected = (margin - min(k * alpha, eps) * l1 > 0).sum().item() / len(x)
        got = common.pgd_accuracy(model, x, y, eps, alpha, k, random_start=False, lo=-1e9, hi=1e9, loss=loss)
        assert got == expected, k
        by_steps.append(got)
    assert all(a > b for a, b in zip(by_steps[:6], by_steps[1:6])) and by_steps[5:] == [by_steps[5]] * 3  # eps caps it


@pytest.mark.parametrize("loss", ["log1m", "ce32"])
def test_restarts_find_what_one_random_start_misses(loss):
    # x = 0.5, eps 0.1: the class-1 logit is 10 relu(x - 0.55) against 0.3 for class 0, so its gradient
    # is zero at x and wherever a start lands at or below 0.55; a start above 0.55 (probability 1/4)
    # climbs to 0.6 and fools the model. Robust after R restarts: probability (3/4)^R
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-0.55)
        model[2].weight.copy_(torch.tensor([[0.0], [10.0]]))
        model[2].bias.copy_(torch.tensor([0.3, 0.0]))
    x, y = torch.full((4000, 1), 0.5), torch.zeros(4000, dtype=torch.long)
    for restarts in (1, 2, 4, 8):
        got = common.pgd_accuracy(model, x, y, 0.1, 0.02, 5, restarts=restarts, loss=loss,
                                  generator=torch.Generator().manual_seed(restarts))
        assert abs(got - 0.75 ** restarts) < 0.03, (restarts, got)  # 4000 draws: sd <= 0.007


def test_robust_accuracy_falls_with_eps_steps_and_restarts():
    model, x, y = trained_mlp()

    def acc(eps=0.1, steps=5, restarts=1):
        return common.pgd_accuracy(model, x, y, eps, alpha=0.02, steps=steps, restarts=restarts,
                                   generator=torch.Generator().manual_seed(0))

    by_eps = [acc(eps=e) for e in (0.02, 0.05, 0.1, 0.2)]
    assert all(a >= b for a, b in zip(by_eps, by_eps[1:])) and by_eps[0] > by_eps[-1]
    by_steps = [acc(steps=s) for s in (1, 3, 10)]
    assert all(a >= b for a, b in zip(by_steps, by_steps[1:]))
    assert acc(restarts=3) <= acc(restarts=1)


def test_large_eps_breaks_an_undefended_model():
    model, x, y = trained_mlp()
    assert common.pgd_accuracy(model, x, y, eps=0.5, alpha=0.1, steps=20) < 0.02


def test_model_parameters_buffers_mode_and_grads_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    model.train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    x, y = torch.rand(64, 10), torch.randint(0, 2, (64,))
    common.pgd_attack(model, x, y, eps=0.1, alpha=0.02, steps=5, restarts=2)
    assert model.training and model[1].training
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters())


def test_confident_logits_do_not_mask_the_gradient():
    # margins of 300-500: float32 cross-entropy's gradient is exactly 0 there (p_wrong underflows),
    # so a plain CE attack cannot move; the attack must still find the closed-form flip
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[300.0, 0, 0, 0], [-300.0, 0, 0, 0]]))
        model.bias.zero_()
    x = torch.full((10, 4), 0.5) + torch.linspace(0, 0.4, 10)[:, None] * torch.tensor([1.0, 0, 0, 0])
    y = torch.zeros(10, dtype=torch.long)
    x.requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    assert (x.grad == 0).all()  # the masking is real in float32
    x = x.detach()
    assert common.pgd_accuracy(model, x, y, eps=1.0, alpha=0.5, steps=3, random_start=False, lo=-10, hi=10) == 0.0


def test_sign_steps_equal_those_of_the_cross_entropy_on_moderate_logits():
    model, x, y = trained_mlp()
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x).double(), y, reduction="sum").backward()
    step = common.pgd_attack(model, x.detach(), y, eps=0.5, alpha=1e-3, steps=1, random_start=False)
    moved = (step - x.detach()).sign()
    fooled_at_start = model(x.detach()).argmax(1) != y
    keep = ~fooled_at_start
    assert torch.equal(moved[keep], x.grad.sign()[keep])


def test_box_limits_hold_for_the_random_start_and_every_step():
    # images with many pixels exactly at 0 and 1, as real MNIST and CIFAR have: an unclamped start
    # or step leaves [0, 1] there
    model, x, y = trained_mlp()
    x = (x > 0.5).float()
    gen = torch.Generator().manual_seed(0)
    for steps in (0, 1, 10):  # steps=0 returns the random start itself
        x_adv = common.pgd_attack(model, x, y, eps=0.2, alpha=0.1, steps=steps, generator=gen)
        assert x_adv.min() >= 0 and x_adv.max() <= 1, steps
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6


def test_random_start_is_uniform_in_the_ball_and_drawn_from_the_generator():
    model, x, y = trained_mlp()
    state = torch.get_rng_state()
    a = common.pgd_attack(model, x, y, eps=0.05, alpha=0.01, steps=0, generator=torch.Generator().manual_seed(1))
    b = common.pgd_attack(model, x, y, eps=0.05, alpha=0.01, steps=0, generator=torch.Generator().manual_seed(1))
    c = common.pgd_attack(model, x, y, eps=0.05, alpha=0.01, steps=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert torch.equal(a, b) and not torch.equal(a, c)
    delta = (a - x).abs() / 0.05  # x lies inside the box, so no clamp: |delta| / eps ~ U[0, 1]
    assert delta.max() <= 1 + 1e-5 and delta.max() > 0.99 and abs(delta.mean().item() - 0.5) < 0.02


def test_the_first_iterate_that_fools_is_kept_not_the_last():
    # from 0.2 with steps of 0.25: 0.45 is inside the band (fooled), 0.70 is past it (not fooled)
    model, x, y = band_model(), torch.tensor([[0.2]]), torch.tensor([0])
    x_adv = common.pgd_attack(model, x, y, eps=0.6, alpha=0.25, steps=2, random_start=False)
    assert torch.allclose(x_adv, torch.tensor([[0.45]]))
    assert common.pgd_accuracy(model, x, y, eps=0.6, alpha=0.25, steps=2, random_start=False) == 0.0


def test_modes_statistics_and_tf32_left_alone():
    # a model in train mode with one frozen (eval) BatchNorm: every submodule keeps its own mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    model.train()
    model[1].eval()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    seen = flags_seen_inside(model[0])
    with tf32_set_to(True):
        x, y = torch.rand(64, 10), torch.randint(0, 2, (64,))
        common.pgd_accuracy(model, x, y, eps=0.1, alpha=0.02, steps=3, batch_size=16)
        common.local_complexity(model, x, 0.1, common.random_directions(3, 10))
        assert tf32_now() == (True, True)
    assert [m.training for m in model] == [True, False, True, True]
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert seen and all(flags == (False, False) for flags in seen)


def test_plausible_mistakes_are_refused_in_one_line():
    model, x, y = trained_mlp()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="8/255"):  # eps in grey levels, not a fraction
        common.pgd_accuracy(model, x, y, eps=8, alpha=2 / 255, steps=2, generator=gen)
    with pytest.raises(ValueError, match="alpha 1.0 is at or above"):
        common.pgd_accuracy(model, x, y, eps=0.1, alpha=1.0, steps=2, generator=gen)
    with pytest.raises(ValueError, match=r"x / 255"):  # float images left in 0..255
        common.pgd_accuracy(model, x * 255, y, eps=0.1, alpha=0.02, steps=2, generator=gen)
    assert common.pgd_accuracy(model, x * 255, y, eps=0.1, alpha=0.02, steps=2, lo=0, hi=255, generator=gen) >= 0
    with pytest.raises(ValueError, match=r"shape \(400,\).*y.view\(-1\)"):  # labels shaped (N, 1)
        common.pgd_accuracy(model, x, y[:, None], eps=0.1, alpha=0.02, steps=2, generator=gen)
    for fn in (common.logit_margins, common.zero_grad_fraction):
        with pytest.raises(ValueError, match="one per input"):
            fn(model, x, y[:-1])
    with pytest.warns(UserWarning, match="x / 255"):
        common.local_complexity(model, x * 255, 0.05, 3)
