"""Point-group symmetry operators (Cn, Dn, T, O, I) as rotation matrices.

Cn and Dn follow RELION: the n-fold axis along z, Dn's two-fold axes in the xy
plane with one along x. T, O and I use scipy's group generators (T and O with
their axes along x, y, z; I with a two-fold along z, as scipy builds it:
this is not one of RELION's I1–I4 settings, which matters only when comparing
a symmetrised map with one from RELION).
"""

from __future__ import annotations

import re

import torch
from scipy.spatial.transform import Rotation

from cryopool.repo import InvalidInputError

__all__ = ["symmetry_operators"]


def symmetry_operators(symmetry: str, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(n, 3, 3)`` rotations of the group, identity first."""
    s = symmetry.upper()
    m = re.fullmatch(r"([CD])([1-9][0-9]*)|([TOI])[1-4]?", s)
    if not m:
        raise InvalidInputError("unknown point-group symmetry", field="symmetry", expected="Cn, Dn, T, O or I",
                                found=repr(symmetry))
    if m.group(1):
        group = Rotation.create_group(f"{m.group(1)}{m.group(2)}", axis="Z")
    else:
        group = Rotation.create_group(m.group(3))
    mats = torch.tensor(group.as_matrix(), dtype=torch.float64)
    ident = torch.eye(3, dtype=torch.float64)
    order = torch.argsort((mats - ident).abs().sum(dim=(-2, -1)))  # identity first
    return mats[order].to(dtype=dtype, device=device)
