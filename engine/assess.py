"""Comparing a refined population with the simulator's ground truth (tests, benchmarks, the demo).

Every measure is invariant to the gauge freedoms of the model (a global
rotation or translation of the specimen traded against per-tilt angles and
shifts): projected particle positions in every tilt (what the images
constrain), per-tilt defocus, and tilt-angle corrections after removing
their mean, with the in-plane rotation an image warp carries added to the
correction about the beam axis (the data see only their sum). Each species
is compared in its own frame (a shift of its map against the opposite shift
of its particles, ``register``): its map registered onto the true map, the
true positions moved alike.
"""

from __future__ import annotations

import torch

from dataclasses import replace

from cryopool.repo import Population, Repository, Species, TiltSeries, iter_items

from .fsc import fsc, resolution_at
from .records_io import load_item, load_map, load_particles
from .register import register_shift, shift_map, shift_poses
from .tilt_model import image_warp_rotation_deg, particle_positions_in_tilts, particle_rotations_in_tilts

__all__ = ["compare_with_truth"]


def _item_models(repo: Repository, item: TiltSeries) -> dict[int, object]:
    out = {}
    for half in (1, 2):
        hm = item.half_set_models.get(str(half))
        rec = item if hm is None else replace(item, deformation=hm.deformation, imaging=hm.imaging)
        out[half] = load_item(repo, rec, with_stack=False)
    return out


def _stage_angles(geometry) -> torch.Tensor:
    angles = geometry.angle_corrections_deg.clone()
    angles[:, 2] += image_warp_rotation_deg(geometry)
    return angles


def _rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle of the rotation between matrices ``a`` and ``b`` (degrees), elementwise over leading dims."""
    trace = (a * b).sum((-2, -1))  # tr(a bᵀ)
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))


def _truth_rows(cols, tcols, key: str, rows: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For particle ``rows`` of item ``key``: their true particle, by id, or else (picks made outside the
    simulation, e.g. imported by another lab) the nearest true particle in the item within ``radius``.
    Returns the rows that have one and the matching truth rows; the rest are false picks."""
    order = {int(i): j for j, i in enumerate(tcols.ids)}
    candidates = tcols.select(key).nonzero().flatten()
    keep, match = [], []
    for r in rows.tolist():
        j = order.get(int(cols.ids[r]))
        if j is None and len(candidates):
            d = (tcols.positions[candidates, 0] - cols.positions[r, 0]).norm(dim=-1)
            if float(d.min()) < radius:
                j = int(candidates[int(d.argmin())])
        if j is not None:
            keep.append(r)
            match.append(j)
    return torch.tensor(keep, dtype=torch.long), torch.tensor(match, dtype=torch.long)


def _centre_displacement_error(geometry, truth) -> torch.Tensor:
    """Per tilt, where the tomogram's centre lands (shift + image warp there) against the truth ``(t, 2)`` Å,
    less the part a translation of the whole specimen explains (a gauge freedom traded with the particles)."""
    origin = torch.zeros(1, 3, dtype=geometry.shifts_angstrom.dtype)
    d = (particle_positions_in_tilts(geometry, origin)[0] - particle_positions_in_tilts(truth, origin)[0])[0]
    rows = truth.rotations()[:, :2, :]  # (t, 2, 3): how a specimen translation moves each tilt's image
    fit = torch.linalg.lstsq(rows.reshape(-1, 3), d.reshape(-1, 1)).solution
    return d - (rows @ fit).squeeze(-1)


def _species_frames(repo: Repository, population: Population, truth: Population) -> dict[str, dict]:
    """Per species: the shift (px) that registers its half-map average onto the true map, and the FSC of the two
    in register (``register``: a species' frame is a gauge the data cannot fix, as one fits a map before comparing
    it with a model)."""
    out = {}
    for name in population.species:
        sp = repo.get_record(population.species[name], Species)
        true_map = load_map(repo, repo.get_record(truth.species[name], Species), "half_map_1")
        avg = 0.5 * (load_map(repo, sp, "half_map_1") + load_map(repo, sp, "half_map_2"))
        # at the FSC-0.5 resolution of the map as it stands, where the comparison has signal to register with
        res = max(resolution_at(fsc(avg, true_map), sp.pixel_size_angstrom, 0.5), 2 * sp.pixel_size_angstrom)
        shift = register_shift(avg, true_map, pixel_size_angstrom=sp.pixel_size_angstrom, resolution_angstrom=res)
        out[name] = {"shift_px": shift, "pixel": sp.pixel_size_angstrom,
                     "curve": fsc(shift_map(avg, shift), true_map)}
    return out


def compare_with_truth(repo: Repository, population: Population, truth: Population) -> dict:
    """RMS projected-position error (Å), orientation error in the tilts (°), per-tilt defocus RMS error (Å),
    demeaned tilt-angle error (°), per-tilt shift error (Å, at the tomogram centre, less a specimen translation),
    and per species the resolution at FSC 0.5 of the half-map average against the true map, how far its frame
    is from the truth's (Å) and the number of particles with no true particle (false picks: not in the geometry
    measures).

    Each species is compared in its own frame: its map after registration onto the true map, and the true
    positions moved alike (``register.shift_poses``). The frame is a gauge (a shift of the map and the
    opposite shift of every particle give the same images), set by the starting maps; refinement keeps it
    (``refine``) but cannot find the truth's. Geometry and defocus are compared per half-set (each half-set
    is refined on its own); the defocus of the published item model (the two half-sets' average) is reported
    as well.
    """
    frames = _species_frames(repo, population, truth)
    true_items = {k: ts for k, _, ts in iter_items(repo, truth)}
    sq_pos, sq_def, sq_ang, sq_pub, sq_rot, sq_shift = [], [], [], [], [], []
    unmatched: dict[str, int] = {}
    for key, _, ts in iter_items(repo, population):
        models = _item_models(repo, ts)
        truth_model = load_item(repo, true_items[key], with_stack=False)
        for name in population.species:
            species = repo.get_record(population.species[name], Species)
            cols = load_particles(repo, species.particles)
            tcols = load_particles(repo, repo.get_record(truth.species[name], Species).particles)
            for half in (1, 2):
                rows = (cols.select(key) & (cols.half_sets == half)).nonzero().flatten()
                sel, tsel = _truth_rows(cols, tcols, key, rows, species.diameter_angstrom / 2)
                unmatched[name] = unmatched.get(name, 0) + len(rows) - len(sel)
                if len(sel) == 0:
                    continue
                xy, _ = particle_positions_in_tilts(models[half].geometry, cols.positions[sel])
                frame = frames[name]  # the true poses in the species' frame: x + A s, the map moved by −s
                true_pos = shift_poses(tcols.positions[tsel], tcols.orientations[tsel], -frame["shift_px"],
                                       frame["pixel"])
                txy, _ = particle_positions_in_tilts(truth_model.geometry, true_pos)
                sq_pos.append(((xy - txy) ** 2).sum(-1).flatten())
                rot = particle_rotations_in_tilts(models[half].geometry, cols.orientations[sel])
                trot = particle_rotations_in_tilts(truth_model.geometry, tcols.orientations[tsel])
                sq_rot.append(_rotation_angle_deg(rot, trot).flatten() ** 2)
        published = load_item(repo, ts, with_stack=False)  # the half-set models' average
        sq_pub.append((published.imaging.defocus_u_angstrom - truth_model.imaging.defocus_u_angstrom) ** 2)
        for half in (1, 2):
            m = models[half]
            sq_def.append((m.imaging.defocus_u_angstrom - truth_model.imaging.defocus_u_angstrom) ** 2)
            a, t = _stage_angles(m.geometry), _stage_angles(truth_model.geometry)
            sq_ang.append(((a - a.mean(0)) - (t - t.mean(0))) ** 2)  # (t, 3): about x, y (the tilt), z
            sq_shift.append((_centre_displacement_error(m.geometry, truth_model.geometry) ** 2).sum(-1))
    out = {"position_rms_angstrom": float(torch.sqrt(torch.cat(sq_pos).mean())),
           "orientation_rms_deg": float(torch.sqrt(torch.cat(sq_rot).mean())),
           "shift_rms_angstrom": float(torch.sqrt(torch.cat(sq_shift).mean())),
           "defocus_rms_angstrom": float(torch.sqrt(torch.cat(sq_def).mean())),
           "published_defocus_rms_angstrom": float(torch.sqrt(torch.cat(sq_pub).mean())),
           "tilt_angle_rms_deg": float(torch.sqrt(torch.cat(sq_ang).mean())),
           "tilt_angle_max_deg": float(torch.sqrt(torch.cat(sq_ang)).max()),
           "tilt_angle_y_rms_deg": float(torch.sqrt(torch.cat(sq_ang)[:, 1].mean())),
           "tilt_angle_y_max_deg": float(torch.sqrt(torch.cat(sq_ang)[:, 1]).max()), "species": {}}
    for name, frame in frames.items():
        curve = frame["curve"]
        out["species"][name] = {"fsc_vs_truth_0.5_angstrom": resolution_at(curve, frame["pixel"], 0.5),
                                "fsc_vs_truth": curve.tolist(), "false_picks": unmatched.get(name, 0),
                                "frame_offset_angstrom": float(torch.linalg.vector_norm(frame["shift_px"]))
                                * frame["pixel"]}
    return out
