"""Arithmetic under the measurements: the TF32 emulation, the r/10 audit of LC, and the guards that
keep LC exact (TF32 off inside its forward) and PGD scored in eval mode."""
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import precision  # noqa: E402
from conftest import flags_seen_inside, tf32_now, tf32_set_to


def small_cnn(width=16):
    torch.manual_seed(0)
    w = width
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(w * 64, 10))


def test_round_to_tf32_keeps_ten_mantissa_bits_rounding_to_nearest():
    def oracle(v):  # the float32 bit pattern, rounded by hand at bit 13 (23 - 10 mantissa bits)
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        sign, magnitude = bits & 0x80000000, bits & 0x7FFFFFFF
        magnitude = ((magnitude + (1 << 12)) >> 13) << 13
        return struct.unpack("<f", struct.pack("<I", sign | magnitude))[0]

    values = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-11), 0.1, -0.3, 123.456, 1e-20])
    got = precision.round_to_tf32(values)
    assert got.tolist() == [oracle(v) for v in values.tolist()]
    assert got[2] == 1 + 2**-10 and got[3] == 1.0  # a tie rounds away from zero, below a tie rounds down


def test_emulated_tf32_rounds_operands_and_restores_the_weights():
    model = small_cnn()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    x = torch.rand(4, 3, 16, 16)
    exact = model(x)
    with precision.emulated_tf32(model):
        rounded = model(x)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert torch.equal(model(x), exact)
    err = (rounded - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 1e-2  # TF32-sized: ~1e-3 relative, far above float32's 1e-7


def test_r_over_10_audit_passes_exact_lc_and_fails_rounded_lc():
    model, x = small_cnn(), torch.rand(128, 3, 16, 16)
    audit = precision.lc_precision_audit(model, x, 3e-3, 10)
    assert audit["exact_is_linear"] and audit["exact_ratio"] > 7  # exact LC is proportional to r
    assert not audit["tf32_is_linear"] and audit["tf32_ratio"] < 4  # a rounding floor does not fall
    assert audit["tf32_r/10"] > 3 * audit["exact_r/10"]
    assert "emulated" in audit["tf32_kind"]


def test_lc_turns_tf32_off_inside_the_forward_and_restores_it():
    model = small_cnn(4)
    seen = flags_seen_inside(model[0])
    with tf32_set_to(True):
        common.local_complexity(model, torch.rand(3, 3, 16, 16), 0.01, 4)
        assert seen and all(flags == (False, False) for flags in seen)
        assert tf32_now() == (True, True)
    seen.clear()
    with tf32_set_to(False):
        common.local_complexity(model, torch.rand(3, 3, 16, 16), 0.01, 4, tf32=True)  # the authors' arithmetic
        assert seen and all(flags == (True, True) for flags in seen)
        assert tf32_now() == (False, False)


@pytest.mark.parametrize("loss", ["log1m", "ce32"])
def test_pgd_scores_the_final_iterate_in_eval_mode(loss):
    # dropout makes train-mode outputs differ from eval-mode ones: a score taken in train mode
    # would read a different accuracy
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 20, generator=g)
    y = (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.8), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.train()
    clean, _ = common.evaluate(model, x, y, F.cross_entropy)  # eval mode
    with torch.no_grad():
        train_mode = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9 and abs(train_mode - clean) > 0.03
    assert common.pgd_accuracy(model, x, y, eps=0.0, alpha=0.01, steps=3, loss=loss) == clean
    tiny = common.pgd_accuracy(model, x, y, eps=1e-7, alpha=1e-7, steps=1, loss=loss,
                               generator=torch.Generator().manual_seed(0))
    assert abs(tiny - clean) < 0.01 and model.training


def test_lc_refuses_bad_radius_integer_images_and_nan_inputs_and_takes_an_int_p():
    model, x = small_cnn(4), torch.rand(4, 3, 16, 16)
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="radius"):
            common.local_complexity(model, x, bad, 4)
    with pytest.raises(ValueError, match="uint8"):
        common.local_complexity(model, (x * 255).to(torch.uint8), 0.01, 4)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        common.local_complexity(model, nan, 0.01, 4)
    seeded = common.random_directions(4, x[0].numel(), torch.Generator().manual_seed(0))
    assert torch.equal(common.local_complexity(model, x, 0.05, 4), common.local_complexity(model, x, 0.05, seeded))


def test_the_audit_says_so_when_the_radius_is_too_large_for_lc_to_scale():
    model, x = small_cnn(), torch.rand(32, 3, 16, 16)
    audit = precision.lc_precision_audit(model, x, 500.0, 10)  # every neuron cut at r and at r/10 alike
    assert not audit["exact_is_linear"] and audit["exact_ratio"] < 2
