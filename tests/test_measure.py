"""common.measure and its Probes: a misspelt or missing field is an error, and radii
given in normalised units reach LC and both attacks multiplied by each channel's std (checked against
the public functions called with radii and directions scaled by hand)."""
import types

import pytest
import torch
import torch.nn as nn

import common

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # cifar10_true, written out by hand


def tiny_setting(n=12):
    torch.manual_seed(0)
    model = nn.Sequential(common.Normalize(MEAN, STD), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()
    fields = dict(train=(x, y), test=(x, y), loss_fn=nn.functional.cross_entropy, lc_points={"train": x, "test": x},
                  directions=common.random_directions(3, 48, torch.Generator().manual_seed(2)), anchors=(x[:3], y[:3]))
    cfg = types.SimpleNamespace(lc_radius=0.05, lc_batch=4, pgd_eps=(0.1,), pgd_alpha=0.05, pgd_steps=3,
                                pgd_restarts=1, ce32_random_start=False, pgd_points=n, rank_points=n, seed=0)
    return model, fields, cfg


def test_a_misspelt_or_missing_field_is_an_error():
    _, fields, _ = tiny_setting()
    with pytest.raises(TypeError, match="pgd_scale"):
        common.Probes(**fields, pgd_scale=2.0)
    del fields["anchors"]
    with pytest.raises(TypeError, match="anchors"):
        common.Probes(**fields)


@pytest.mark.parametrize("bad", [dict(units="cifar10_tru"), dict(papers_clamp="normalised"), dict(papers_clamp="pixels")])
def test_unknown_units_or_clamps_are_refused(bad):
    _, fields, _ = tiny_setting()
    with pytest.raises(ValueError, match="Probes"):
        common.Probes(**fields, **bad)


def test_normalised_radii_are_scaled_by_each_channels_std():
    model, fields, cfg = tiny_setting()
    probes = common.Probes(**fields, units="cifar10_true", papers_clamp="normalised")
    rec = common.measure(model, cfg, probes, common.Timer(torch.device("cpu")), step=5)
    x, y = fields["test"]
    std = torch.tensor(STD).reshape(3, 1, 1)
    by_hand = (fields["directions"].reshape(-1, 3, 4, 4) * std).reshape(-1, 48)
    lc = common.lc_summary(common.local_complexity(model, x, cfg.lc_radius, by_hand, cfg.lc_batch))
    assert rec["lc_train"] == lc[0] and rec["lc_train_ci"] == lc[1]
    unscaled = common.lc_summary(common.local_complexity(model, x, cfg.lc_radius, fields["directions"], cfg.lc_batch))
    assert unscaled != lc  # the check can tell scaled from unscaled directions
    # the papers' clamp: the normalised input's one global range [min_c -m_c/s_c, max_c (1-m_c)/s_c], in pixels
    low, high = min(-m / s for m, s in zip(MEAN, STD)), max((1 - m) / s for m, s in zip(MEAN, STD))
    lo = torch.tensor([m + low * s for m, s in zip(MEAN, STD)]).reshape(3, 1, 1)
    hi = torch.tensor([m + high * s for m, s in zip(MEAN, STD)]).reshape(3, 1, 1)
    ce32 = common.pgd_accuracy(model, x, y, 0.1 * std, 0.05 * std, 3, loss="ce32", random_start=False, lo=lo, hi=hi)
    assert rec["pgd_ce32_acc_0.1"] == pytest.approx(ce32, abs=1e-9)
    weaker = common.pgd_accuracy(model, x, y, 0.1 * std / 4, 0.05 * std / 4, 3, loss="ce32", random_start=False,
                                 lo=lo, hi=hi)
    assert weaker > ce32  # ... and radii 4x too small (the misspelt-key failure) from the right ones
