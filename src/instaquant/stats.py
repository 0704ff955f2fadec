"""Rank statistics of per-image measurements (ties averaged, as the reports need them)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rankdata(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor; tied values get the average of the ranks they span."""
    x = x.detach().double().flatten().cpu()
    if torch.isnan(x).any():
        raise ValueError("cannot rank NaN values")
    n = x.numel()
    if n == 0:
        return x
    order = torch.argsort(x, stable=True)
    xs = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    mean_rank = sums / torch.bincount(group).double()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks).

    NaN when either input is constant or has fewer than two values: no ordering to correlate.
    """
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return math.nan if denom == 0 else float((dx * dy).sum()) / denom


def line_at(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear line through ``points`` (x, y) at ``x``, flat beyond its ends: the
    accuracy of a static or uniform line at a BitOPs level."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return points[-1][1]
