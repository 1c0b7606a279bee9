"""LC against the arithmetic under it: a CPU emulation of TF32 and the r/10 audit.

Exact LC is proportional to the radius when the radius is small, so LC at r/10 is ~10x smaller; a
reading made of rounding (TF32's 10-bit mantissa, ~1e-3 relative, is coarser than the papers'
radii of 5e-3 and 1e-4) does not fall. benchmarks/paper_suite.py runs the audit on the Fig. 1
ResNet at init; use it on your own model and radius:

    import sys; sys.path.insert(0, "benchmarks"); import precision
    precision.lc_precision_audit(model, x, radius, directions)   # exact_is_linear should be True
"""
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import lc_summary, local_complexity  # noqa: E402


def round_to_tf32(t):
    """float32 rounded to TF32's 10-bit mantissa (to nearest, ties away from zero), as tensor cores
    round the operands of a TF32 matmul or convolution."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32(model):
    """A CPU emulation of TF32 (an emulation, not a GPU measurement): the inputs and weights of
    every nn.Conv2d and nn.Linear are rounded to TF32 for the duration; products still accumulate
    in float32. The weights are restored afterwards."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    saved = [m.weight.data for m in layers]
    handles = [m.register_forward_pre_hook(lambda m, inputs: (round_to_tf32(inputs[0]), *inputs[1:]))
               for m in layers]
    try:
        for m, w in zip(layers, saved):
            m.weight.data = round_to_tf32(w)
        yield
    finally:
        for m, w in zip(layers, saved):
            m.weight.data = w
        for h in handles:
            h.remove()


def lc_precision_audit(model, x, radius, directions, batch_size=64):
    """Is an LC reading made of the geometry or of rounding? On the same weights, points and
    directions: exact LC (float32, TF32 off) at radius and radius/10, and LC with TF32 on at both
    (on a CUDA model the real flags; elsewhere emulated_tf32, labelled as an emulation). Exact LC
    is proportional to the radius when the radius is small, so it falls ~10x at radius/10; a
    rounding floor does not fall. Returns a dict with the four means, the two ratios, how TF32 was
    obtained, and exact_is_linear / tf32_is_linear: the reading fell at least 5x (else the radius is
    too large for the test, or rounding, not geometry, makes the reading)."""
    cuda = next(model.parameters()).device.type == "cuda"

    def lc(r, tf32):
        with contextlib.nullcontext() if cuda or not tf32 else emulated_tf32(model):
            return lc_summary(local_complexity(model, x, r, directions, batch_size, tf32=tf32 and cuda))[0]

    out = {"radius": radius, "exact": lc(radius, False), "exact_r/10": lc(radius / 10, False),
           "tf32": lc(radius, True), "tf32_r/10": lc(radius / 10, True),
           "tf32_kind": "CUDA TF32 flags on" if cuda else "emulated on the CPU (operands rounded to TF32)"}
    out["exact_ratio"] = out["exact"] / max(out["exact_r/10"], 1e-12)
    out["tf32_ratio"] = out["tf32"] / max(out["tf32_r/10"], 1e-12)
    out["exact_is_linear"] = out["exact_r/10"] * 5 <= out["exact"]
    out["tf32_is_linear"] = out["tf32_r/10"] * 5 <= out["tf32"]
    return out
