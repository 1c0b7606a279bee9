"""Would the tests notice a wrong measurement? Mutation testing of common.py's measurements.

    python tools/mutants.py              # every mutant, about 10 minutes on one core
    python tools/mutants.py pgd rank     # only the mutants whose name holds one of these words

Each mutant is one plausible mistake in the measurements (part 1 of common.py): a cut rule off by
a zero, one step too few, float64 where the papers' attack is float32, a clamp ignored. It is an
exact replacement of one piece of common.py's source. For each, a copy of the repository with that
one change runs the measurement tests; a mutant they let through (SURVIVED) is a mistake no test
would catch. Left out: changes that alter no number (a covariance divided by n instead of n - 1
has the same rank and effective rank). tests/test_tools.py checks that every piece still occurs
exactly once in common.py, so a refactor of common.py updates this list with it.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_local_complexity.py", "tests/test_rank_norm.py", "tests/test_pgd.py", "tests/test_masking.py",
         "tests/test_measure.py", "tests/test_partition.py", "tests/test_precision.py"]

MUTANTS = [  # (name, a piece of common.py, what replaces it)
    ("relu_inputs: first layer skipped", "        reduce(counter[0], inputs[0])\n",
     "        if counter[0]:\n            reduce(counter[0], inputs[0])\n"),
    ("relu_inputs: layer index never reset", "    handles = [model.register_forward_pre_hook(reset)] + [",
     "    handles = [] + ["),
    ("relu_inputs: F.relu not refused", "    if watch.stray_relus:", "    if False:"),
    ("eval_mode: old mode not restored", "            m.training = mode", "            pass"),
    ("labels: float labels taken", "    if y.is_floating_point() or y.dtype == torch.bool:", "    if False:"),
    ("directions: QR signs not fixed", "q = q * torch.sign(torch.diagonal(r))", "q = q"),
    ("lc: a zero counts as on", "cut = (high > 0) & (low <= 0)", "cut = (high > 0) & (low < 0)"),
    ("lc: the authors' rule ignored", "cut |= (high == 0) & (low < 0)", "pass"),
    ("lc: half the vertices", "offsets = radius * torch.cat([v, -v])", "offsets = radius * torch.cat([v, v])"),
    ("lc: radius doubled", "offsets = radius * torch.cat([v, -v])", "offsets = 2 * radius * torch.cat([v, -v])"),
    ("lc: TF32 on by default", "zero_is_a_sign=False, tf32=False):", "zero_is_a_sign=False, tf32=True):"),
    ("lc: 0..255 inputs not flagged", "    if x.abs().max() > 10:", "    if False:"),
    ("lc_summary: a 95% interval", "half = 2.576 *", "half = 1.96 *"),
    ("lc_summary: first layer only", "total = counts.sum(1).double()", "total = counts[:, 0].double()"),
    ("boundary: no bisection", "        for _ in range(steps):\n            mid",
     "        for _ in range(0):\n            mid"),
    ("boundary: the wrong half kept", "a = torch.where(same.reshape(shape), mid, a)",
     "a = torch.where(same.reshape(shape), a, mid)"),
    ("boundary: partners among 1 neighbour", "for shift in range(1, min(len(x), 64)):", "for shift in range(1, 2):"),
    ("rank: not shifted by the first row", "c = h - shift", "c = h"),
    ("rank: the mean not removed", "cov = (outer - torch.outer(total, total) / n) / (n - 1)", "cov = outer / (n - 1)"),
    ("rank: conv over positions, not channels", '"n c h w -> (n h w) c"', '"n c h w -> (n c h) w"'),
    ("rank: float32 features", "model64 = copy.deepcopy(model).to(device=device, dtype=torch.float64)",
     "model64 = copy.deepcopy(model).to(device=device, dtype=torch.float32)"),
    ("erank: singular values not normalised", "p = s / s.sum()", "p = s / s.max()"),
    ("erank: eigenvalues, not singular values", "_entropy_rank(eig.sqrt())", "_entropy_rank(eig)"),
    ("norm: biases left out", "for p in model.parameters()))", "for p in model.parameters() if p.dim() > 1))"),
    ("pgd: radius equal to the box width taken", "if (t.cpu() >= width).any():", "if (t.cpu() > width).any():"),
    ("pgd: inputs outside the box taken", "    if (x < lo - 1e-5).any() or (x > hi + 1e-5).any():", "    if False:"),
    ("pgd: no projection on the ball", "x_adv = torch.clamp(x + (x_adv - x).clamp(-eps, eps), lo, hi)",
     "x_adv = torch.clamp(x_adv, lo, hi)"),
    ("pgd: no clamp to the box", "x_adv = torch.clamp(x + (x_adv - x).clamp(-eps, eps), lo, hi)",
     "x_adv = x + (x_adv - x).clamp(-eps, eps)"),
    ("pgd: descends the loss", "x_adv = x_adv + alpha * grad.sign()", "x_adv = x_adv - alpha * grad.sign()"),
    ("pgd: one-sided random start", "x_adv = torch.clamp(x + eps * (2 * noise.to(x) - 1), lo, hi)",
     "x_adv = torch.clamp(x + eps * noise.to(x), lo, hi)"),
    ("pgd: restarts ignored", "for _ in range(restarts):", "for _ in range(1):"),
    ("pgd: one step too few", "for step in range(steps + 1):", "for step in range(steps):"),
    ("pgd: a fooled point forgotten", "                        fooled |= newly\n", "                        pass\n"),
    ("pgd: the last iterate kept", "best[~fooled] = x_adv.detach()[~fooled]", "best = x_adv.detach()"),
    ("pgd log1m: only the last iterate scored", 'if loss == "log1m" or step == steps:', "if step == steps:"),
    ("pgd log1m: the cross-entropy instead", "objective = log_wrong.sum()",
     "objective = F.cross_entropy(z, y, reduction='sum')"),
    ("pgd: TF32 left on", "with eval_mode(model), tf32_flags(False):\n        for _ in range(restarts):",
     "with eval_mode(model), tf32_flags(True):\n        for _ in range(restarts):"),
    ("ce32: every iterate scored", 'if loss == "log1m" or step == steps:', "if True:"),
    ("ce32: float64", "objective = F.cross_entropy(logits.float(), y)",
     "objective = F.cross_entropy(logits.double(), y)"),
    ("ce32: a sum, not the batch mean", "objective = F.cross_entropy(logits.float(), y)",
     "objective = F.cross_entropy(logits.float(), y, reduction='sum')"),
    ("margins: the true class among the others",
     "other = z.masked_fill(F.one_hot(yb, z.shape[1]).bool(), -math.inf).amax(1)", "other = z.amax(1)"),
    ("zero_grad: any coordinate zero", "zero += (grad.flatten(1) == 0).all(1).sum().item()",
     "zero += (grad.flatten(1) == 0).any(1).sum().item()"),
    ("zero_grad: float64", "F.cross_entropy(model(xb).float(), y[i:i + batch_size]), xb)",
     "F.cross_entropy(model(xb).double(), y[i:i + batch_size]), xb)"),
    ("units: Normalize without the mean", "        return (x - self.mean) / self.std", "        return x / self.std"),
    ("units: papers' box per channel", "low, high = (-m / s).min(), ((1 - m) / s).max()",
     "low, high = (-m / s), ((1 - m) / s)"),
    ("units: directions divided by std", "(directions.reshape(-1, *shape) * channel_std(name)",
     "(directions.reshape(-1, *shape) / channel_std(name)"),
    ("units: pixel record divided by std", 'return [float(f"{r * s:.4g}") for s in std]',
     'return [float(f"{r / s:.4g}") for s in std]'),
    ("measure: radii not scaled to pixels",
     "scale = channel_std(probes.units).to(x.device) if normalised else 1.0", "scale = 1.0"),
    ("measure: LC directions not scaled",
     "in_input_units(probes.directions, x.shape[1:], probes.units) if normalised else probes.directions",
     "probes.directions"),
    ("measure: the papers' clamp ignored", 'ce32_lo, ce32_hi = ((0.0, 1.0) if probes.papers_clamp == "box" else',
     "ce32_lo, ce32_hi = ((0.0, 1.0) if True else"),
    ("measure: attacks from different starts", "ce32_gen = torch.Generator(x.device).set_state(generator.get_state())",
     "ce32_gen = torch.Generator(x.device).manual_seed(7)"),
    ("measure: seed without the step", "manual_seed(cfg.seed * 1_000_003 + step)", "manual_seed(cfg.seed * 1_000_003)"),
    ("measure: margin quantiles reversed", 'torch.quantile(margins, q / 100).item()',
     'torch.quantile(margins, 1 - q / 100).item()'),
    ("measure: rank on the PGD points", "layer_ranks(model, probes.test[0][:cfg.rank_points])",
     "layer_ranks(model, x)"),
    ("measure: boundary between train points", 'boundary_points(model, sets["test"])',
     'boundary_points(model, sets["train"])'),
    ("partition: anchors the last of each class", "firsts = [int((y == c).nonzero()[0, 0])",
     "firsts = [int((y == c).nonzero()[-1, 0])"),
    ("partition: a zero counts as on", 'bits = einops.rearrange(pre, "n ... -> n (...)") > 0',
     'bits = einops.rearrange(pre, "n ... -> n (...)") >= 0'),
    ("partition: region keys collide", "torch.randint(0, 2**20, (bits.shape[1], 4)",
     "torch.randint(0, 2, (bits.shape[1], 1)"),
    ("partition: density without the row above", "                count[1:] += (bits[1:] != bits[:-1]).sum(2)\n", ""),
]


def run(names=()):
    """Runs every mutant (or those whose name holds one of names); returns the names that survived."""
    source = (REPO / "common.py").read_text()
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "data", "results", "runs", "__pycache__",
                                                                  ".pytest_cache"))
        for name, piece, replacement in MUTANTS:
            if names and not any(n in name for n in names):
                continue
            if source.count(piece) != 1:
                sys.exit(f"{name}: its piece occurs {source.count(piece)} times in common.py, not once; update MUTANTS")
            (copy / "common.py").write_text(source.replace(piece, replacement))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                                  cwd=copy, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            failed = next((line.split("::")[-1] for line in proc.stdout.splitlines() if line.startswith("FAILED")), "")
            print(f"{'caught  ' if proc.returncode else 'SURVIVED'} {name}" + (f"  ({failed[:70]})" if failed else ""),
                  flush=True)
            if not proc.returncode:
                survived.append(name)
    return survived


if __name__ == "__main__":
    survivors = run(sys.argv[1:])
    print(f"{len(survivors)} survived" + (": " + "; ".join(survivors) if survivors else ""))
    sys.exit(1 if survivors else 0)
