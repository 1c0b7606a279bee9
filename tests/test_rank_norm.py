"""layer_ranks and weight_norm against numpy and closed forms."""
import math

import numpy as np
import torch
import torch.nn as nn

import common


def ranks_of(h):
    """layer_ranks of features h themselves: the input of a lone nn.ReLU is h."""
    (rank, erank), = common.layer_ranks(nn.Sequential(nn.ReLU(), nn.Linear(h.shape[1], 1)), h)
    return rank, erank


def numpy_effective_rank(h):
    """The float64 reference: exp of the entropy of the centred features' singular values, normalised."""
    s = np.linalg.svd(h - h.mean(0), compute_uv=False)
    p = s[s > 0] / s.sum()
    return math.exp(-(p * np.log(p)).sum())


def test_feature_rank_matches_numpy_on_low_and_full_rank_features():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 40, generator=g, dtype=torch.float64)
    full = torch.randn(300, 40, generator=g, dtype=torch.float64)
    for h, expected in ((low, 7), (full, 40)):
        assert ranks_of(h)[0] == np.linalg.matrix_rank(np.cov(h.numpy().T)) == expected


def test_feature_rank_sees_directions_a_float32_computation_misses():
    # rank 5 plus a small sixth direction (relative size 1e-5): float64 sees it, float32 does not
    g = torch.Generator().manual_seed(1)
    h = torch.randn(500, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    h += 1e-5 * torch.randn(500, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 20, generator=g, dtype=torch.float64)
    assert ranks_of(h)[0] == np.linalg.matrix_rank(np.cov(h.numpy().T)) == 6
    assert torch.linalg.matrix_rank(torch.cov(h.float().T)).item() != 6


def with_singular_values(s, n=200, d=30, seed=0):
    """Centred features (n, d) whose singular values are exactly s."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, len(s), generator=g, dtype=torch.float64)
    u -= u.mean(0)
    u, _ = torch.linalg.qr(u)  # orthonormal columns, each with zero mean (orthogonal to ones)
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_effective_rank_closed_forms():
    # layer_ranks takes singular values as square roots of the covariance's eigenvalues: ~1e-6 relative
    assert math.isclose(numpy_effective_rank(with_singular_values([2.0] * 4).numpy()), 4.0, rel_tol=1e-9)
    assert math.isclose(ranks_of(with_singular_values([2.0] * 4))[1], 4.0, rel_tol=1e-5)
    s = np.array([3.0, 2.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    h = with_singular_values(list(s)) + 5.0  # a constant offset: the features are centred first
    assert math.isclose(ranks_of(h)[1], expected, rel_tol=1e-5)
    assert math.isclose(numpy_effective_rank(h.numpy()), expected, rel_tol=1e-9)
    assert ranks_of(h)[0] == 3


def test_layer_ranks_match_hand_computed_pre_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[10:] = 0  # 20 dead rows: rank 10 at layer 1 (its input has dimension 10)
    x = torch.rand(500, 10)
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    w2, b2 = model[2].weight.detach().double().numpy(), model[2].bias.detach().double().numpy()
    h1 = x.double().numpy() @ w1.T + b1
    h2 = np.maximum(h1, 0) @ w2.T + b2
    got = common.layer_ranks(model, x, batch_size=64)  # streamed over 8 batches
    assert [r for r, _ in got] == [np.linalg.matrix_rank(np.cov(h.T)) for h in (h1, h2)] == [10, 4]
    for (_, erank), h in zip(got, (h1, h2)):
        assert math.isclose(erank, numpy_effective_rank(h), rel_tol=1e-6)


def test_conv_layers_are_ranked_over_channels():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight[4:] = conv.weight[:2]  # channels 4, 5 copy channels 0, 1 (bias too): rank 4 of 6
        conv.bias[4:] = conv.bias[:2]
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 2))
    (rank, _), = common.layer_ranks(model, torch.rand(20, 3, 5, 5))
    assert rank == 4


def test_weight_norm_closed_form():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        for p, value in zip(model.parameters(), (1.0, 2.0, -3.0, 0.5)):
            p.fill_(value)
    # 6 weights of 1, 2 biases of 2, 2 weights of -3, 1 bias of 0.5
    assert math.isclose(common.weight_norm(model), math.sqrt(6 + 8 + 18 + 0.25))


def bottleneck_mlp():
    """20-64-64-64-64-10 ReLU MLP, float32. Layer 1's weight has singular values 1 (x19) and 1e-5:
    its features have rank 20 in exact arithmetic, 19 under any tolerance looser than float64's
    default (the tiny direction's covariance eigenvalue is 1e-10 relative). Layer 2's weight is an
    exact rank-5 product of small integers (exact in float32), so its features have rank exactly 5."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    u, _ = torch.linalg.qr(torch.randn(64, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    s = torch.ones(20, dtype=torch.float64)
    s[-1] = 1e-5
    a = torch.randint(-2, 3, (64, 5), generator=g).float()
    b = torch.randint(-2, 3, (5, 64), generator=g).float() / 8
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(s) @ v.T)
        model[2].weight.copy_(a @ b)
    return model


def test_layer_ranks_are_the_float64_network_features_ranks():
    # Oracle: a float64 numpy forward of the same (float32) weights, ranked by numpy's default
    # tolerance. Float32 features, float32 covariance or a looser tolerance all disagree.
    model = bottleneck_mlp()
    x = torch.rand(2000, 20, generator=torch.Generator().manual_seed(4))
    h, expected = x.double().numpy(), []
    for i in range(0, 8, 2):
        w, b = model[i].weight.detach().double().numpy(), model[i].bias.detach().double().numpy()
        h = h @ w.T + b
        expected.append(np.linalg.matrix_rank(np.cov(h.T)))
        h = np.maximum(h, 0)
    got = [r for r, _ in common.layer_ranks(model, x, batch_size=500)]
    assert got == expected
    assert got[0] == 20 and got[1] == 5  # the planted spectrum and bottleneck

    float32_ranks = []  # the same ranks from the float32 forward: the bottleneck's rounding shows
    with torch.no_grad():
        h = x
        for i in range(0, 8, 2):
            h = model[i](h)
            float32_ranks.append(torch.linalg.matrix_rank(torch.cov(h.double().T)).item())  # float64 from here
            h = h.relu()
    assert float32_ranks != got
