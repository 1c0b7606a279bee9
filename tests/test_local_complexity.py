"""local_complexity against independent oracles: a closed form at layer 1, exact region
enumeration in 2D, monotonicity, batch and layout invariance, and no side effects; its directions
(Gram-Schmidt), its summary (a closed form) and its decision-boundary points (a hyperplane)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import common


def mlp(widths, seed=0, inplace=False, bias=True):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU(inplace=inplace)]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1], bias=bias))


def test_random_directions_orthonormal_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    v = common.random_directions(25, 100, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.allclose(v @ v.T, torch.eye(25), atol=1e-5)
    assert torch.equal(v, common.random_directions(25, 100, torch.Generator().manual_seed(3)))


def test_random_directions_are_gram_schmidt_of_their_gaussian():
    # the draw is defined by its Gaussian: classical Gram-Schmidt of the same columns, in numpy, gives
    # the same rows (QR's signs fixed, so no LAPACK's sign convention leaks into the directions)
    g = torch.randn(40, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    basis = []
    for column in g.T:
        for b in basis:
            column = column - (b @ column) * b
        basis.append(column / np.linalg.norm(column))
    got = common.random_directions(6, 40, torch.Generator().manual_seed(4))
    assert np.allclose(got.numpy(), np.array(basis), atol=1e-6)


def test_lc_summary_is_the_mean_over_points_of_the_sum_over_layers_with_a_99pct_interval():
    counts = torch.tensor([[1, 2], [3, 4], [0, 5]])  # points x layers: totals 3, 7, 5
    mean, half = common.lc_summary(counts)
    assert mean == 5.0
    assert half == pytest.approx(2.576 * 2.0 / np.sqrt(3), rel=1e-12)  # sample std of 3, 7, 5 is 2
    assert np.isnan(common.lc_summary(torch.tensor([[4, 1]]))[1])  # one point: no interval


def test_layer_one_matches_closed_form():
    # neuron i is cut iff |w_i.x + b_i| < r * max_p |w_i.v_p|  (the cross-polytope's support function)
    model = mlp([12, 30, 20, 3])
    x = torch.randn(200, 12)
    v = common.random_directions(5, 12, torch.Generator().manual_seed(1))
    r = 0.3
    lc = common.local_complexity(model, x, r, v, batch_size=17)
    w, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    centre = x.double().numpy() @ w.T + b
    reach = r * np.abs(v.double().numpy() @ w.T).max(0)
    expected = (np.abs(centre) < reach).sum(1)
    assert lc.shape == (200, 2)
    assert 0 < expected.mean() < 30  # the oracle is not trivial: some neurons cut, not all
    np.testing.assert_array_equal(lc[:, 0].numpy(), expected)


# ---------------------------------------------------------------- exact 2D oracle (P = 2)
def split(poly, a, c):
    """Splits a convex polygon (k, 2) by the line a.u + c = 0 into its >= 0 and <= 0 parts."""
    parts = []
    for sign in (1, -1):
        out = []
        vals = sign * (poly @ a + c)
        for i in range(len(poly)):
            p, q, fp, fq = poly[i], poly[(i + 1) % len(poly)], vals[i], vals[(i + 1) % len(poly)]
            if fp >= 0:
                out.append(p)
            if (fp > 0 > fq) or (fp < 0 < fq):
                out.append(p + fp / (fp - fq) * (q - p))
        if len(out) >= 3:
            out = np.array(out)
            area = 0.5 * abs(np.dot(out[:, 0], np.roll(out[:, 1], 1)) - np.dot(out[:, 1], np.roll(out[:, 0], 1)))
            if area > 1e-18:
                parts.append(out)
    return parts


def exact_cut_counts(weights, biases, x, v, r):
    """Per hidden layer, the number of neurons whose pre-activation changes sign somewhere in the
    diamond conv{x +- r v_1, x +- r v_2}: enumerate the linear regions by splitting polygons layer
    by layer (float64), and on each region test the affine pre-activation at its corners."""
    diamond = np.array([x + r * v[0], x + r * v[1], x - r * v[0], x - r * v[1]])
    regions = [(diamond, np.eye(2), np.zeros(2))]  # polygon, and the affine map u -> M u + c of the layer input
    counts = []
    for w, b in zip(weights, biases):
        cut = np.zeros(len(b), dtype=bool)
        next_regions = []
        for poly, m, c in regions:
            a, d = w @ m, w @ c + b  # pre-activation z(u) = a u + d on this region
            z = poly @ a.T + d
            cut |= (z.max(0) > 0) & (z.min(0) < 0)
            pieces = [poly]
            for j in range(len(b)):
                pieces = [q for piece in pieces for q in split(piece, a[j], d[j])]
            for q in pieces:
                on = (a @ q.mean(0) + d) > 0
                next_regions.append((q, on[:, None] * a, on * d))
        regions = next_regions
        counts.append(int(cut.sum()))
    return counts


def test_boundary_points_lie_on_a_linear_classifiers_hyperplane():
    # two classes, logits W x + b: the boundary is the hyperplane g(p) = (w1 - w0) p + b1 - b0 = 0; after
    # 20 bisections a segment of length <= sqrt(5) (the unit cube's diagonal) leaves |g| <= |w1 - w0| sqrt(5) 2^-21
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    with torch.no_grad():
        model.bias[1] = model.bias[0] - (model.weight[1] - model.weight[0]).sum() / 2  # through the cube's centre
    x = torch.rand(200, 5, generator=torch.Generator().manual_seed(1))
    w, b = (model.weight[1] - model.weight[0]).detach(), (model.bias[1] - model.bias[0]).detach()
    assert 0.3 < ((x @ w + b) > 0).float().mean() < 0.7  # both classes, so every point finds a partner
    points = common.boundary_points(model, x, steps=20)
    assert len(points) == len(x)
    assert (points @ w + b).abs().max() <= w.norm() * 5 ** 0.5 * 2 ** -21 + 1e-5
    assert ((points >= 0) & (points <= 1)).all()  # on segments between the points
    with torch.no_grad():
        model.bias[1] = 1e3  # one class everywhere: no boundary between the points
    assert len(common.boundary_points(model, x)) == 0


def test_boundary_points_lie_between_two_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(200, 4)
    bp = common.boundary_points(model, x, steps=30)
    assert 150 < len(bp) <= 200
    # a tiny step in some direction changes the prediction: check along the bisection segment
    with torch.no_grad():
        logits = model(bp)
        top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).max() < 1e-4  # the two best classes tie: the point is on the boundary


def test_exact_2d_oracle_equal_at_layer_one_never_exceeded_deeper():
    model = mlp([2, 10, 10, 10, 1], seed=4)
    weights = [model[i].weight.detach().double().numpy() for i in (0, 2, 4)]
    biases = [model[i].bias.detach().double().numpy() for i in (0, 2, 4)]
    v = common.random_directions(2, 2, torch.Generator().manual_seed(0))
    x = torch.rand(60, 2) * 2 - 1
    r = 0.4
    lc = common.local_complexity(model, x, r, v).numpy()
    exact = np.array([exact_cut_counts(weights, biases, p, v.double().numpy(), r) for p in x.double().numpy()])
    np.testing.assert_array_equal(lc[:, 0], exact[:, 0])
    assert (lc <= exact).all()
    assert exact[:, 1:].sum() > 0 and lc[:, 1:].sum() > 0  # deeper layers are really exercised


def test_exact_oracle_catches_a_wrong_count():
    # the oracle must disagree with a deliberately wrong LC (sign test at the centre only)
    model = mlp([2, 10, 10, 1], seed=5)
    w, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    v = np.eye(2)
    x = np.array([0.1, -0.2])
    exact = exact_cut_counts([w, model[2].weight.detach().double().numpy()], [b, model[2].bias.detach().double().numpy()], x, v, 0.5)
    assert exact[0] != int(((x @ w.T + b) == 0).sum())


def test_monotone_in_nested_directions_and_radius():
    model = mlp([20, 40, 40, 5], seed=2)
    x = torch.randn(100, 20)
    v = common.random_directions(12, 20, torch.Generator().manual_seed(2))
    few = common.local_complexity(model, x, 0.2, v[:4])
    many = common.local_complexity(model, x, 0.2, v)
    assert (few <= many).all() and (few.sum() < many.sum())
    small = common.local_complexity(model, x, 0.05, v)[:, 0]
    assert (small <= many[:, 0]).all() and small.sum() < many[:, 0].sum()


def test_zero_bias_network_at_origin_cuts_every_first_layer_neuron():
    model = mlp([8, 16, 4], bias=False)
    v = common.random_directions(3, 8, torch.Generator().manual_seed(0))
    lc = common.local_complexity(model, torch.zeros(1, 8), 1e-3, v)
    assert lc[0, 0] == 16


def test_batch_size_and_chunking_do_not_change_counts():
    model = mlp([30, 50, 50, 50, 10], seed=3)
    x = torch.randn(101, 30)  # not a multiple of any batch size below: no dropped last batch
    v = common.random_directions(6, 30, torch.Generator().manual_seed(5))
    ref = common.local_complexity(model, x, 0.1, v, batch_size=1000)
    for bs in (1, 7, 64):
        assert torch.equal(ref, common.local_complexity(model, x, 0.1, v, batch_size=bs))
    assert (ref.sum(1) > 0).float().mean() > 0.8  # most points have cut neurons: the test has teeth


def test_conv_counted_per_channel_and_position_equals_unfolded_dense():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    head = nn.Linear(3 * 4 * 4, 5)
    conv_model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    # the same map as a dense layer: its matrix is the conv applied to each basis image
    basis = torch.eye(2 * 8 * 8).reshape(-1, 2, 8, 8)
    with torch.no_grad():
        matrix = (conv(basis) - conv.bias.reshape(1, -1, 1, 1)).reshape(2 * 8 * 8, -1).T
        dense = nn.Linear(2 * 8 * 8, 3 * 4 * 4)
        dense.weight.copy_(matrix)
        dense.bias.copy_(conv.bias.repeat_interleave(16))
    dense_model = nn.Sequential(nn.Flatten(), dense, nn.ReLU(), head)
    x = torch.randn(40, 2, 8, 8)
    v = common.random_directions(5, 128, torch.Generator().manual_seed(0))
    a = common.local_complexity(conv_model, x, 0.3, v)
    b = common.local_complexity(dense_model, x, 0.3, v)
    assert torch.equal(a, b) and a.sum() > 0


def test_inplace_relu_gives_the_same_counts():
    x = torch.randn(50, 10)
    v = common.random_directions(4, 10, torch.Generator().manual_seed(0))
    a = common.local_complexity(mlp([10, 20, 20, 2], seed=7), x, 0.2, v)
    b = common.local_complexity(mlp([10, 20, 20, 2], seed=7, inplace=True), x, 0.2, v)
    assert torch.equal(a, b)


def test_no_side_effects_on_model_rng_or_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    rng = torch.get_rng_state()
    v = common.random_directions(3, 6, torch.Generator().manual_seed(0))
    lc1 = common.local_complexity(model, torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), 0.1, v)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    lc2 = common.local_complexity(model, torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), 0.1, v)
    assert torch.equal(lc1, lc2)  # eval mode: dropout off, so the measure is deterministic


def test_model_without_relu_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="nn.ReLU"):
        common.local_complexity(model, torch.randn(3, 4), 0.1, common.random_directions(2, 4))
    assert not model[0]._forward_pre_hooks


def test_a_relu_module_used_twice_counts_as_two_layers():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(5, 7), nn.Linear(7, 7), nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    lc = common.local_complexity(Twice(), torch.randn(9, 5), 0.5, common.random_directions(3, 5))
    assert lc.shape == (9, 2)


def test_cut_rule_at_exact_zeros():
    # vertices (+-1, 0) around the origin; pre-activations at the two vertices:
    # dead (0, 0): never cut; (-2, 0) and (0, -2): the ReLU's output is 0 at both, not cut (the
    # authors' sign rule counts them); (1, -1) and (1, 0): > 0 at one vertex, <= 0 at the other, cut
    layer = nn.Linear(2, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0], [-1, 0], [1, 0], [1, 0], [0.5, 0]]))
        layer.bias.copy_(torch.tensor([0.0, -1, -1, 0, 0.5]))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(5, 2))
    x, v = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    assert common.local_complexity(model, x, 1.0, v).tolist() == [[2]]
    assert common.local_complexity(model, x, 1.0, v, zero_is_a_sign=True).tolist() == [[4]]


def test_models_the_measurements_would_get_wrong_are_refused_or_flagged():
    class Mixed(nn.Module):  # one nn.ReLU module and one F.relu: the second layer would be left out
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.relu = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2), nn.ReLU()

        def forward(self, x):
            return self.c(torch.nn.functional.relu(self.b(self.relu(self.a(x)))))

    x, v = torch.randn(5, 4), common.random_directions(2, 4)
    with pytest.raises(ValueError, match="calls relu as a function"):
        common.local_complexity(Mixed(), x, 0.1, v)
    with pytest.raises(ValueError, match="calls relu as a function"):
        common.layer_ranks(Mixed(), x)

    class Unused(nn.Module):  # an nn.ReLU that never runs
        def __init__(self, used):
            super().__init__()
            self.a, self.b, self.relu, self.spare, self.used = nn.Linear(4, 6), nn.Linear(6, 2), nn.ReLU(), nn.ReLU(), used

        def forward(self, x):
            return self.b(self.relu(self.a(x)) if self.used else self.a(x))

    with pytest.warns(UserWarning, match="1 of the 2 nn.ReLU modules of Unused never ran"):
        assert common.local_complexity(Unused(True), x, 0.1, v).shape == (5, 1)
    with pytest.raises(ValueError, match="no nn.ReLU module of Unused ran"):
        common.local_complexity(Unused(False), x, 0.1, v)
    with pytest.raises(ValueError, match="no nn.ReLU module of Unused ran"):
        common.partition_picture(Unused(False), torch.randn(3, 4), "/dev/null", resolution=8)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2))
    with pytest.warns(UserWarning, match="also uses max_pool2d"):
        common.local_complexity(pooled, torch.randn(2, 1, 8, 8), 0.1, common.random_directions(2, 64))


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r"## Using `common.py` on your own model.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    monkeypatch.chdir(tmp_path)  # it writes regions.png
    exec(compile(snippet, "README snippet", "exec"), namespace)
    assert namespace["counts"].shape[1] == 2 and len(namespace["ranks"]) == 2 and (tmp_path / "regions.png").exists()
