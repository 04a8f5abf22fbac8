"""The unit-square toy from the TASK2VEC talk: binary tasks on tiles of [0,1]².

The probe is 10 random ReLU features of a 2-D point; a task labels a point positive when it
falls in a chosen set of tiles of a grid. The Fisher of the feature weights is 10-dimensional,
small enough to look at whole, and tasks that share tiles get similar Fisher profiles because
they load on the features active in those tiles.
"""

from __future__ import annotations

import torch
from torch import nn

from t2v_core.embedding.probes import Probe


def unit_square_probe(n_features: int = 10, seed: int = 0) -> Probe:
    """Random ReLU features φ(x) = ReLU(Wx + b) of a point x ∈ [0,1]², as a 1×1 conv."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(2, n_features, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(n_features, 2, 1, 1, generator=gen) * 4)
        # put each feature's hinge somewhere inside the square
        centres = torch.rand(n_features, 2, generator=gen)
        conv.bias.copy_(-(conv.weight[:, :, 0, 0] * centres).sum(1))
    backbone = nn.Sequential(nn.Unflatten(1, (2, 1, 1)), conv, nn.ReLU(), nn.Flatten())
    backbone.requires_grad_(False)
    backbone.eval()
    return Probe("unit_square", backbone, n_features, 1, f"unit_square{n_features}-seed{seed}")


def tile_task(tiles: set[int] | list[int], grid: int = 4, n: int = 400, seed: int = 0):
    """Uniform points of the square, labelled 1 inside the given tiles (row-major ids)."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 2, generator=gen)
    cell = (points * grid).long().clamp_max(grid - 1)
    tile_ids = cell[:, 1] * grid + cell[:, 0]
    labels = torch.isin(tile_ids, torch.tensor(sorted(tiles))).long()
    return points, labels
