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



def test_every_logged_lc_rank_and_norm_value_equals_the_library_called_by_hand():
    """Train and test points apart, rank on fewer points than PGD: LC at each set and at the decision
    boundary between the LC test points, rank on the first rank_points test points, the weight norm."""
    model, fields, cfg = tiny_setting(60)
    x_test = torch.rand(60, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    y_test = model(x_test).argmax(1).detach()
    lc_points = {"train": fields["train"][0][:20], "test": x_test[:20], "random": torch.rand(20, 3, 4, 4)}
    fields = {**fields, "test": (x_test, y_test), "lc_points": lc_points}
    cfg = types.SimpleNamespace(**{**vars(cfg), "rank_points": 7, "pgd_points": 40})
    rec = common.measure(model, cfg, common.Probes(**fields), common.Timer(torch.device("cpu")), step=1)
    sets = {**lc_points, "boundary": common.boundary_points(model, x_test[:20])}
    assert len(sets["boundary"]) > 0
    for name, points in sets.items():
        counts = common.local_complexity(model, points, cfg.lc_radius, fields["directions"], cfg.lc_batch)
        assert (rec[f"lc_{name}"], rec[f"lc_{name}_ci"]) == common.lc_summary(counts), name
    wrong = common.lc_summary(common.local_complexity(model, common.boundary_points(model, lc_points["train"]),
                                                      cfg.lc_radius, fields["directions"], cfg.lc_batch))
    assert wrong[0] != rec["lc_boundary"]  # the boundary between the train points would read otherwise
    for i, (rank, erank) in enumerate(common.layer_ranks(model, x_test[:7])):
        assert (rec[f"rank_{i + 1}"], rec[f"erank_{i + 1}"]) == (rank, round(erank, 2))
    assert rec["erank_1"] != round(common.layer_ranks(model, x_test[:40])[0][1], 2)  # rank_points count, not pgd_points
    assert rec["weight_norm"] == common.weight_norm(model)


def test_normalize_and_the_pixel_units_record_against_the_constants_written_out():
    x = torch.rand(5, 3, 4, 4)
    mean, std = torch.tensor(MEAN).reshape(3, 1, 1), torch.tensor(STD).reshape(3, 1, 1)
    assert torch.allclose(common.Normalize(MEAN, STD)(x), (x - mean) / std)
    cfg = types.SimpleNamespace(lc_radius=0.005, pgd_eps=(8 / 255,), pgd_alpha=4 / 255)
    units = common.units_notes(cfg, "cifar10_true")["pixel_units"]
    assert units["lc_radius"] == pytest.approx([0.005 * s for s in STD], rel=1e-3)
    assert units["pgd_eps"] == [pytest.approx([8 / 255 * s for s in STD], rel=1e-3)]
    assert units["pgd_alpha"] == pytest.approx([4 / 255 * s for s in STD], rel=1e-3)

def test_the_authors_constants_are_pinned_channel_by_channel():
    # written out from the reference code: grok-adversarial dataloaders.py (Normalize) and configs.py
    # (dmin, dmax), torchvision's ImageNet constants, and CIFAR-10's own mean and std
    expected = {"cifar10_authors": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                "cifar10_true": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    for name, (mean, std) in expected.items():
        got_mean, got_std, source = common.NORMALISATIONS[name]
        assert tuple(got_mean) == mean and tuple(got_std) == std and source, name
    lo, hi = common.papers_box("cifar10_authors")  # in [0, 1] pixels, per channel
    m, s = torch.tensor(expected["cifar10_authors"][0]).reshape(3, 1, 1), torch.tensor(expected["cifar10_authors"][1]).reshape(3, 1, 1)
    assert torch.allclose((lo - m) / s, torch.full((3, 1, 1), -2.4291), atol=1e-4)  # configs.py: dmin
    assert torch.allclose((hi - m) / s, torch.full((3, 1, 1), 2.7537), atol=1e-4)  # configs.py: dmax


@pytest.mark.parametrize("units, clamp", [("none", "box"), ("cifar10_true", "box"), ("cifar10_true", "normalised")])
@pytest.mark.parametrize("ce32_random_start", [False, True])
def test_every_logged_attack_value_equals_the_library_called_by_hand(units, clamp, ce32_random_start):
    """On 300 points (PGD on the first 250): both attacks at two radii, with radii scaled by each
    channel's std, the generator seeded by (seed, step) as documented and shared by both attacks, the
    papers' clamp, the margins' quantiles and the zero-gradient fraction, against the functions."""
    model, fields, cfg = tiny_setting(300)
    x, y = fields["test"]
    cfg = types.SimpleNamespace(**{**vars(cfg), "pgd_eps": (0.03, 0.1), "pgd_points": 250, "seed": 7,
                                   "ce32_random_start": ce32_random_start})
    probes = common.Probes(**fields, units=units, papers_clamp=clamp)
    step = 11
    rec = common.measure(model, cfg, probes, common.Timer(torch.device("cpu")), step=step)
    px, py = x[:250], y[:250]
    std = torch.tensor(STD).reshape(3, 1, 1) if units != "none" else 1.0
    lo, hi = (0.0, 1.0) if clamp == "box" else common.papers_box(units)
    gen = torch.Generator().manual_seed(7 * 1_000_003 + step)
    for eps in cfg.pgd_eps:
        start = gen.get_state()
        toolkit = common.pgd_accuracy(model, px, py, eps * std, cfg.pgd_alpha * std, cfg.pgd_steps, generator=gen)
        papers = common.pgd_accuracy(model, px, py, eps * std, cfg.pgd_alpha * std, cfg.pgd_steps, loss="ce32", lo=lo,
                                     hi=hi, random_start=ce32_random_start,
                                     generator=torch.Generator().set_state(start))
        assert rec[f"pgd_acc_{eps:.3g}"] == toolkit and rec[f"pgd_ce32_acc_{eps:.3g}"] == papers, eps
    margins = common.logit_margins(model, px, py)
    for q in (10, 50, 90):
        assert rec[f"margin_p{q}"] == torch.quantile(margins, q / 100).item()
    assert rec["zero_grad_frac"] == common.zero_grad_fraction(model, px, py)


def test_with_a_random_start_and_no_steps_both_attacks_score_the_same_points():
    model, fields, cfg = tiny_setting(200)
    cfg = types.SimpleNamespace(**{**vars(cfg), "pgd_steps": 0, "ce32_random_start": True, "pgd_eps": (0.2,)})
    rec = common.measure(model, cfg, common.Probes(**fields), common.Timer(torch.device("cpu")), step=3)
    assert rec["pgd_acc_0.2"] == rec["pgd_ce32_acc_0.2"] < 1.0  # the same random starts, and they fool some


def test_the_papers_attack_clamps_where_probes_say():
    """Black-and-white images, where every clamp binds: the papers' attack under papers_clamp "box"
    and "normalised" equals the function called with [0, 1] and with papers_box, and the two differ;
    the toolkit's attack clamps to [0, 1] either way."""
    model, fields, cfg = tiny_setting(300)
    x = fields["test"][0].round()
    y = model(x).argmax(1).detach()
    fields = {**fields, "train": (x, y), "test": (x, y)}
    cfg = types.SimpleNamespace(**{**vars(cfg), "pgd_eps": (0.5,), "pgd_alpha": 0.2, "pgd_points": 300})
    std = torch.tensor(STD).reshape(3, 1, 1)
    rec = {}
    for clamp, (lo, hi) in (("box", (0.0, 1.0)), ("normalised", common.papers_box("cifar10_true"))):
        probes = common.Probes(**fields, units="cifar10_true", papers_clamp=clamp)
        rec[clamp] = common.measure(model, cfg, probes, common.Timer(torch.device("cpu")), step=0)
        by_hand = common.pgd_accuracy(model, x, y, 0.5 * std, 0.2 * std, cfg.pgd_steps, loss="ce32", lo=lo, hi=hi,
                                      random_start=False)
        assert rec[clamp]["pgd_ce32_acc_0.5"] == by_hand, clamp
    assert rec["box"]["pgd_ce32_acc_0.5"] != rec["normalised"]["pgd_ce32_acc_0.5"]
    assert rec["box"]["pgd_acc_0.5"] == rec["normalised"]["pgd_acc_0.5"]
