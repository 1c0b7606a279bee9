"""The partition pictures: the region count against an exact line arrangement, region ids
independent of batching, the boundary density against the lines between grid points, anchors."""
import itertools

import numpy as np
import torch
import torch.nn as nn

import common


def arrangement_regions(w, b, lo, hi):
    """Closed form for lines in general position: regions of the arrangement inside the square
    [lo, hi]^2 = 1 + (lines crossing it) + (pairwise intersections inside it)  (Euler's formula)."""
    corners = np.array(list(itertools.product([lo, hi], repeat=2)))
    vals = corners @ w.T + b
    crossing = [(vals[:, i].min() < 0 < vals[:, i].max()) for i in range(len(b))]
    inside = 0
    for i, j in itertools.combinations(range(len(b)), 2):
        p = np.linalg.solve(w[[i, j]], -b[[i, j]])
        inside += bool(((p > lo) & (p < hi)).all())
    return 1 + sum(crossing) + inside


def test_partition_region_count_matches_the_line_arrangement(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3))
    anchors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the plane's coordinates are the inputs
    w, b = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    expected = arrangement_regions(w, b, -2.0, 3.0)
    found = common.partition_picture(model, anchors, tmp_path / "p.png", resolution=1000, margin=2.0)
    assert expected > 8 and found == expected
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_region_ids_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    points = torch.randn(999, 5)
    ids_a, cls_a, _ = common.region_ids(model, points, (5,), batch_size=4096)
    ids_b, cls_b, _ = common.region_ids(model, points, (5,), batch_size=37)
    assert torch.equal(ids_a, ids_b) and torch.equal(cls_a, cls_b)
    # and two points share an id exactly when their sign patterns agree
    pre1 = points @ model[0].weight.T + model[0].bias
    pre2 = pre1.clamp(min=0) @ model[2].weight.T + model[2].bias
    patterns = torch.cat([pre1 > 0, pre2 > 0], 1)
    _, expected = torch.unique(patterns, dim=0, return_inverse=True)
    assert torch.equal(ids_a[:, None] == ids_a[None], expected[:, None] == expected[None])
    # a neuron exactly at 0 is off, as in LC's cut rule (> 0 on, <= 0 off): 0 and -0.5 share a region
    gate = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        gate[0].weight.fill_(1.0)
        gate[0].bias.fill_(0.0)
    ids, _, _ = common.region_ids(gate, torch.tensor([[0.0], [-0.5], [0.5]]), (1,))
    assert ids[0] == ids[1] != ids[2]


def test_boundary_density_counts_the_lines_between_neighbouring_grid_points():
    # one hidden layer in 2D: between two grid points, exactly the neurons whose line separates them flip
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 3))
    n = 60
    ticks = np.linspace(-1.0, 2.0, n)
    b, a = np.meshgrid(ticks, ticks, indexing="ij")
    points = torch.tensor(np.stack([a.ravel(), b.ravel()], 1), dtype=torch.float32)
    w, bias = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    signs = (points.double().numpy() @ w.T + bias > 0).reshape(n, n, -1)
    expected = np.zeros((n, n), int)
    expected[:, :-1] += (signs[:, 1:] != signs[:, :-1]).sum(2)
    expected[1:] += (signs[1:] != signs[:-1]).sum(2)
    for batch in (37, 10_000):  # whole rows per batch, whatever is asked
        _, _, flips = common.region_ids(model, points, (2,), batch_size=batch, row=n)
        np.testing.assert_array_equal(flips.reshape(n, n).numpy(), expected)
    assert expected.sum() > 2 * n  # several lines cross the grid


def test_anchor_points_take_three_classes_or_the_first_three_inputs():
    x = torch.arange(6.0).reshape(6, 1)
    points, labels = common.anchor_points(x, torch.tensor([2, 2, 0, 1, 1, 0]))
    assert points.flatten().tolist() == [2.0, 3.0, 0.0] and labels.tolist() == [0, 1, 2]
    points, labels = common.anchor_points(x, torch.tensor([1, 1, 0, 0, 1, 0]))
    assert points.flatten().tolist() == [0.0, 1.0, 2.0] and labels.tolist() == [1, 1, 0]
