"""One way to write a particle table: every importer, the engine and the matcher call it (format.md's columns)."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError
from .records import ParticleTable

__all__ = ["particle_table"]


def particle_table(repo, ids: np.ndarray, item_keys: list[str], positions: np.ndarray, angles: np.ndarray,
                   half_sets: np.ndarray, scores: np.ndarray) -> ParticleTable:
    """A ParticleTable (its arrays written to ``repo``) from one row per particle.

    ``positions`` are ``(n, 3)`` or trajectories ``(n, T, 3)`` (Å), ``angles`` RELION Euler angles ``(n, 3)``
    (the same at every temporal sample) or ``(n, T, 3)``; items are listed in name order.
    """
    n = len(item_keys)
    positions = np.asarray(positions, dtype=np.float64)
    positions = positions.reshape(n, -1, 3) if positions.size else positions.reshape(0, 1, 3)
    t = positions.shape[1]
    angles = np.asarray(angles, dtype=np.float64).reshape(n, -1, 3)
    if angles.shape[1] == 1 and t > 1:
        angles = np.repeat(angles, t, axis=1)
    for name, column in (("particle_id", ids), ("half_set", half_sets), ("score", scores)):
        if len(column) != n:
            raise InvalidInputError("one value per particle expected", field=name, expected=n, found=len(column))
    names = sorted(set(item_keys))
    columns = {"particle_id": repo.put_array(np.asarray(ids, dtype=np.uint64)),
               "item_index": repo.put_array(np.array([names.index(k) for k in item_keys], dtype=np.int32)),
               "position_angstrom": repo.put_array(np.ascontiguousarray(positions)),
               "orientation_deg": repo.put_array(np.ascontiguousarray(angles)),
               "half_set": repo.put_array(np.asarray(half_sets, dtype=np.uint8)),
               "score": repo.put_array(np.asarray(scores, dtype=np.float32))}
    return ParticleTable(count=n, temporal_samples=t, item_names=names, columns=columns)
