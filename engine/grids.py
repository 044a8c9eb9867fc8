"""Trilinear sampling of regular 3-D grids, and scattering values onto them with the same weights (its adjoint)."""

from __future__ import annotations

import torch

__all__ = ["trilinear_sample", "trilinear_scatter"]


def trilinear_scatter(target: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Scatter ``values`` ``(n,)`` at fractional ``idx`` ``(n, 3)`` (x, y, z) into ``target`` ``(D, D, D)`` (z, y, x)."""
    D = target.shape[-1]
    base = torch.floor(idx)
    frac = idx - base
    base = base.long()
    flat = target.view(-1)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 2] if dz else 1 - frac[:, 2]))
                x, y, z = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                ok = (x >= 0) & (x < D) & (y >= 0) & (y < D) & (z >= 0) & (z < D)
                lin = (z * D + y) * D + x
                flat.index_add_(0, lin[ok], (values[ok] * w[ok].to(values.dtype)))


def trilinear_sample(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Values ``(D, D, D, C)`` (z, y, x, channel) at fractional ``idx`` ``(n, 3)`` (x, y, z) → ``(n, C)``; zero outside
    the grid. Differentiable in both; the gradient in ``idx`` is the interpolant's own, kept from the forward pass.

    What ``grid_sample`` computes (zeros padding, corners aligned), written out because refinement differentiates
    it in the coordinates only, millions of points per evaluation: the backward pass is then one multiply instead
    of ``grid_sample``'s gather-and-scatter (measured on 2 CPU cores, 1.2 M random points in a 100³ grid of 2
    channels, best of 3: forward 0.23 s vs 0.20 s, backward 0.04 s vs 0.38 s; one value and gradient of the
    alignment target, whose points are in a band, 1.8-1.9× faster at 64 and 128 px with equal peak memory).
    """
    return _TrilinearSample.apply(values, idx)


_CORNERS = [(x, y, z) for z in (0, 1) for y in (0, 1) for x in (0, 1)]  # x fastest, as the grid is laid out


# points per pass: the pass's temporaries (corner indices and values, ~250 bytes a point) stay ~16 MB however many
# points an evaluation samples; what is kept for the backward pass is the Jacobian, 6 values a point
CHUNK_POINTS = 1 << 16


class _TrilinearSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        D, C = values.shape[0], values.shape[-1]
        flat = values.reshape(-1, C)
        want_jacobian = ctx.needs_input_grad[1]
        out = values.new_empty(len(idx), C)
        jacobian = values.new_empty(len(idx), C, 3) if want_jacobian else None
        for start in range(0, len(idx), CHUNK_POINTS):
            rows = slice(start, start + CHUNK_POINTS)
            out[rows], jac = _sample(flat, D, idx[rows], want_jacobian)
            if want_jacobian:
                jacobian[rows] = jac
        ctx.jacobian, ctx.D, ctx.idx_dtype = jacobian, D, idx.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(idx)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_values = grad_idx = None
        if ctx.needs_input_grad[1]:
            grad_idx = (grad[..., None] * ctx.jacobian).sum(1).to(ctx.idx_dtype)
        if ctx.needs_input_grad[0]:  # the adjoint: scatter with the same weights, channel by channel
            (idx,) = ctx.saved_tensors
            D, C = ctx.D, grad.shape[-1]
            channels = grad.new_zeros(C, D, D, D)
            for c in range(C):
                trilinear_scatter(channels[c], idx.to(grad.dtype), grad[:, c])
            grad_values = channels.permute(1, 2, 3, 0)
        return grad_values, grad_idx


def _sample(flat: torch.Tensor, D: int, idx: torch.Tensor, want_jacobian: bool):
    """Trilinear values ``(n, C)`` at ``idx`` ``(n, 3)``, and their Jacobian in ``idx`` ``(n, C, 3)`` if wanted."""
    low = torch.floor(idx)
    f = (idx - low).to(flat.dtype)
    lin, valid = _corner_indices(low.long(), D, flat.dtype)
    corner = [flat.index_select(0, i) for i in lin]  # index_select: 3x faster than flat[i] on CPU
    if valid is not None:  # some corner off the grid: it reads as zero (zeros padding)
        corner = [c * v[:, None] for c, v in zip(corner, valid)]
    fx, fy, fz = (f[:, i, None] for i in range(3))
    dx = [corner[2 * j + 1] - corner[2 * j] for j in range(4)]  # along x, for (y, z) = 00, 10, 01, 11
    along_x = [corner[2 * j] + fx * dx[j] for j in range(4)]
    near, far = along_x[0] + fy * (along_x[1] - along_x[0]), along_x[2] + fy * (along_x[3] - along_x[2])
    out = near + fz * (far - near)
    if not want_jacobian:
        return out, None
    gx_near, gx_far = dx[0] + fy * (dx[1] - dx[0]), dx[2] + fy * (dx[3] - dx[2])
    dy_near, dy_far = along_x[1] - along_x[0], along_x[3] - along_x[2]
    return out, torch.stack([gx_near + fz * (gx_far - gx_near), dy_near + fz * (dy_far - dy_near), far - near], -1)


def _corner_indices(low: torch.Tensor, D: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Flat indices of the 8 corners of each point's cell, and (only where some corner is off the grid) each
    corner's validity; off-grid corners are clamped onto it, to be zeroed by their validity."""
    if low.numel() == 0 or (int(low.min()) >= 0 and int(low.max()) <= D - 2):  # the usual case: all on the grid
        base = (low[:, 2] * D + low[:, 1]) * D + low[:, 0]
        return [base + (oz * D + oy) * D + ox for ox, oy, oz in _CORNERS], None
    axes = []
    for a in range(3):
        lo, hi = low[:, a], low[:, a] + 1
        axes.append(((lo.clamp(0, D - 1), (lo >= 0) & (lo < D)), (hi.clamp(0, D - 1), (hi >= 0) & (hi < D))))
    lin, valid = [], []
    for ox, oy, oz in _CORNERS:
        (x, vx), (y, vy), (z, vz) = axes[0][ox], axes[1][oy], axes[2][oz]
        lin.append((z * D + y) * D + x)
        valid.append((vx & vy & vz).to(dtype))
    return lin, valid
