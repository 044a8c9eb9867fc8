"""Uniform cubic B-spline parameter grids in any number of dimensions (Warp/M's deformation grids).

A grid ``(c, n_1, …, n_k)`` spans each dimension: control point ``j`` of a
dimension sits at ``u = j / (n − 1)`` for ``u ∈ [0, 1]`` (a dimension with one
point is constant). Ends are extended linearly (one extra control point per
side), queries are clamped to [0, 1], and the value is the uniform cubic
B-spline of the 4 surrounding control points per dimension. This is the
convention of teamtomo's torch-cubic-spline-grids, which the tests use as
the reference. Differentiable in the grid values and the coordinates.
"""

from __future__ import annotations

import torch

__all__ = ["interpolate_bspline_grid", "bspline_basis"]


def bspline_basis(t: torch.Tensor) -> torch.Tensor:
    """The 4 uniform cubic B-spline weights for ``t ∈ [0, 1]`` between p1 and p2: ``(...,)`` → ``(..., 4)``."""
    t2, t3 = t * t, t * t * t
    return torch.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], dim=-1) / 6


def _pad_linear(grid: torch.Tensor, dim: int) -> torch.Tensor:
    if grid.shape[dim] == 1:
        grid = torch.cat([grid, grid], dim=dim)
    first, second = grid.narrow(dim, 0, 1), grid.narrow(dim, 1, 1)
    last, before = grid.narrow(dim, -1, 1), grid.narrow(dim, -2, 1)
    return torch.cat([2 * first - second, grid, 2 * last - before], dim=dim)


def interpolate_bspline_grid(grid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Values at ``u`` ``(..., k)`` (coordinates in [0, 1], ordered like the grid's dimensions) → ``(..., c)``."""
    k = grid.dim() - 1
    if u.shape[-1] != k:
        raise ValueError(f"grid has {k} dimensions but coordinates have {u.shape[-1]}")
    sizes = grid.shape[1:]
    padded = grid
    for d in range(1, k + 1):
        padded = _pad_linear(padded, d)
    flat = padded.reshape(padded.shape[0], -1)  # (c, prod)
    strides = [1] * k
    for d in range(k - 2, -1, -1):
        strides[d] = strides[d + 1] * padded.shape[d + 2]
    q = u.reshape(-1, k).clamp(0, 1)
    base_idx, weights = [], []
    for d, n in enumerate(sizes):
        if n > 1:
            x = q[:, d] * (n - 1)
            i0 = torch.clamp(torch.floor(x.detach()), 0, n - 2)
            t = x - i0
            base_idx.append(i0.long())
        else:
            t = torch.full_like(q[:, d], 0.5)
            base_idx.append(torch.zeros_like(q[:, d], dtype=torch.long))
        weights.append(bspline_basis(t))  # (b, 4)
    # all 4^k corners at once (a few large operations, not 4^k small ones: on a GPU each is a kernel launch);
    # corners in itertools.product order, the first dimension slowest
    offsets = torch.arange(4, device=q.device)
    lin = torch.zeros(q.shape[0], 1, dtype=torch.long, device=q.device)
    w = torch.ones(q.shape[0], 1, dtype=weights[0].dtype, device=q.device)
    for d in range(k):
        lin = (lin[:, :, None] + ((base_idx[d][:, None] + offsets) * strides[d])[:, None, :]).flatten(1)
        w = (w[:, :, None] * weights[d][:, None, :]).flatten(1)
    out = (flat[:, lin] * w).sum(-1).T  # (b, c)
    return out.reshape(*u.shape[:-1], grid.shape[0])
