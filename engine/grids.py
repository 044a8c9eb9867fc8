"""Scattering values onto regular 3-D grids with trilinear weights (the adjoint of trilinear sampling)."""

from __future__ import annotations

import torch

__all__ = ["trilinear_scatter"]


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
